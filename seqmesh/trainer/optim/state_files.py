"""FP8AdamW's moments in files on NVMe (``offload.optimizer=nvme``), read and written chunk by chunk in ``step``.

Between steps the moments exist only as files under ``offload.path``; in memory each state tensor is
a placeholder on the ``meta`` device with its real dtype and shape, so the optimizer's bookkeeping
(which tensors, which slices) is unchanged. A host step walks the same block-aligned pieces as the
in-memory CPU step (``adam_update.chunks_of``, the same bits): for each piece it reads that piece's
moment bytes into host buffers, runs ``torch_step`` on them and writes them back. The reads of the
next piece are issued before the current piece computes and writes complete in the background, so
disk time overlaps the CPU arithmetic (at most two pieces of buffers in flight). A piece never
written reads as zeros, which is a fresh state's value, so the states never exist in memory whole.

``materialized()`` brings every state into memory for ``state_dict``/``block_state`` and
``load_state_dict`` (checkpoints hold the same tensors as the in-memory optimizer: the format is
FP8AdamW's own) and puts them back into files afterwards. ``close`` removes the directory; an
exception in a step removes nothing a later step needs and leaves no buffer held.
"""

from __future__ import annotations

import concurrent.futures as cf
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from seqmesh.kernels.adam_update import Bucket
from seqmesh.parallel.offload.files import FileStore
from seqmesh.parallel.offload.pool import HostPool

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")


class StateFiles:
    """The files of one optimizer's moments; pieces are named by (state tensor, element offset)."""

    def __init__(self, root: str, chunk_elems: int, block: int, engine: str = "auto",
                 host_limit_bytes: int = 1 << 30) -> None:
        self.step_elems = chunk_elems // block * block  # the piece length of ``chunks_of``
        self.block = block
        self.store = FileStore(root, engine=engine)
        self.pool = HostPool(host_limit_bytes, pin=False)
        self.ids: dict[int, int] = {}  # id(placeholder) -> serial, for file names
        self.written: dict[tuple[int, int], str] = {}  # (serial, storage offset) -> file

    def fresh(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A placeholder of a new (all-zero) state: no file until its first write."""
        meta = torch.empty(shape, dtype=dtype, device="meta")
        self.ids[id(meta)] = len(self.ids)
        return meta

    def forget(self) -> None:
        """Delete every piece file (before the states are written afresh)."""
        for path in self.written.values():
            self.store.remove(path)
        self.written.clear()
        self.ids.clear()

    def _span(self, key: str) -> int:
        """Elements of a state tensor one piece covers: ``chunks_of`` cuts codes every ``step_elems`` and the
        per-block scales every ``step_elems / block``."""
        return self.step_elems // self.block if key.endswith("_scale") else self.step_elems

    def placeholder(self, real: torch.Tensor, key: str) -> torch.Tensor:
        """A meta tensor standing for ``real``, whose bytes go to one file per piece first."""
        meta = torch.empty(real.shape, dtype=real.dtype, device="meta")
        self.ids[id(meta)] = len(self.ids)
        flat = real.reshape(-1)
        span = self._span(key)
        for o in range(0, flat.numel(), span):
            piece = flat[o:o + span]
            if bool(piece.view(torch.uint8).any()):  # an all-zero piece needs no file: missing reads as zeros
                self._write_piece((self.ids[id(meta)], o), piece)
        return meta

    def load(self, meta: torch.Tensor, key: str) -> torch.Tensor:
        """The whole tensor a placeholder stands for, in memory."""
        out = torch.zeros(meta.shape, dtype=meta.dtype)
        flat, span = out.view(-1), self._span(key)
        for o in range(0, flat.numel(), span):
            path = self.written.get((self.ids[id(meta)], o))
            if path is None:
                continue
            piece = flat[o:o + span]
            nbytes = piece.numel() * piece.element_size()
            buf = self._acquire(nbytes)
            try:
                for f in self.store.read(buf, path):
                    f.result()
                piece.view(torch.uint8).copy_(buf[:nbytes])
            finally:
                self.pool.release(buf)
        return out

    def _key(self, view: torch.Tensor) -> tuple[int, int]:
        base = view if view._base is None else view._base
        if id(base) not in self.ids:
            raise RuntimeError("a state tensor of this optimizer is not file-backed (it was replaced outside "
                               "StateFiles); rebuild the optimizer or swap its states again")
        return self.ids[id(base)], view.storage_offset()

    def _write_piece(self, k: tuple[int, int], piece: torch.Tensor) -> None:
        nbytes = piece.numel() * piece.element_size()
        buf = self._acquire(nbytes)
        buf[:nbytes].copy_(piece.view(torch.uint8))
        path = self.written.get(k) or self.store.new_path()
        try:
            for f in self.store.write(buf, path):
                f.result()
        finally:
            self.pool.release(buf)
        self.written[k] = path

    def _acquire(self, nbytes: int) -> torch.Tensor:
        buf = self.pool.acquire(max(nbytes, 1))
        if buf is None:
            raise MemoryError(f"offload.optimizer=nvme: {nbytes / 2**20:.1f} MiB of staging for one piece of optimizer "
                              "state exceeds the staging budget; lower the optimizer's host_chunk_elems")
        return buf

    def _read(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[cf.Future]]:
        """Start reading the bytes of the meta view ``v`` into a host buffer: (buffer, typed tensor, futures)."""
        nbytes = v.numel() * v.element_size()
        buf = self._acquire(nbytes)
        typed = buf[:nbytes].view(v.dtype).view(v.shape)
        path = self.written.get(self._key(v))
        if path is None:
            buf.zero_()
            return buf, typed, []
        try:
            return buf, typed, self.store.read(buf, path)
        except BaseException:
            self.pool.release(buf)
            raise

    def run(self, pieces: list[Bucket], step: Callable[[Bucket], None]) -> None:
        """``step`` each piece on host copies of its moments, reading the next piece while one computes."""
        writes: list[tuple[torch.Tensor, list[cf.Future]]] = []
        held: dict[int, tuple[torch.Tensor, list[cf.Future]]] = {}  # id -> (buffer, its reads): not yet written
        try:
            pending = self._start(pieces[0], held) if pieces else None
            for i, piece in enumerate(pieces):
                loaded = pending
                pending = self._start(pieces[i + 1], held) if i + 1 < len(pieces) else None
                real = {}
                for key, entries in loaded.items():
                    for _, typed, futures in entries:
                        for f in futures:
                            f.result()
                    real[key] = [typed for _, typed, _ in entries]
                views = {key: getattr(piece, key) for key in loaded}
                step(Bucket(params=piece.params, grads=piece.grads, key_base=piece.key_base, step=piece.step,
                            **real))
                for key, entries in loaded.items():
                    for v, (buf, _, _) in zip(views[key], entries):
                        k = self._key(v)
                        path = self.written.get(k) or self.store.new_path()
                        writes.append((buf, self.store.write(buf, path)))
                        del held[id(buf)]
                        self.written[k] = path
                while len(writes) > 2 * sum(len(e) for e in loaded.values()):  # bound buffers in flight
                    self._finish(*writes.pop(0))
        finally:
            errors = []
            for buf, futures in writes:
                try:
                    self._finish(buf, futures)
                except BaseException as e:  # noqa: BLE001 - every buffer goes back before the first error is raised
                    errors.append(e)
            for buf, reads in held.values():  # after a failure: reads still in flight land before the buffer goes
                cf.wait(reads)
                self.pool.release(buf)
            if errors:
                raise errors[0]

    def _start(self, piece: Bucket, held: dict[int, tuple[torch.Tensor, list[cf.Future]]]) -> dict[str, list]:
        loaded: dict[str, list] = {}
        for key in STATE_KEYS:
            for v in getattr(piece, key):
                entry = self._read(v)
                held[id(entry[0])] = (entry[0], entry[2])  # from now on released whatever happens
                loaded.setdefault(key, []).append(entry)
        return loaded

    def _finish(self, buf: torch.Tensor, futures: list[cf.Future]) -> None:
        try:
            for f in futures:
                f.result()
        finally:
            self.pool.release(buf)

    def files(self) -> list[str]:
        return self.store.files()

    def close(self) -> None:
        self.store.close()
        self.pool.close()


def swap_states_to_files(opt: Any, root: str, engine: str = "auto") -> StateFiles:
    """Keep ``opt``'s (an ``FP8AdamW`` on the host) moments in files under ``root`` from now on."""
    blocks = {g["block_size"] for g in opt.param_groups}
    if len(blocks) != 1:
        raise ValueError(f"offload.optimizer=nvme needs one block_size in every param group, got {sorted(blocks)}")
    files = StateFiles(root, opt.host_chunk_elems, blocks.pop(), engine)
    opt.state_files = files
    _to_files(opt, files)
    return files


def _to_files(opt: Any, files: StateFiles) -> None:
    for state in opt.state.values():
        for key in STATE_KEYS:
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":  # device states stay (``PlacedZero``)
                state[key] = files.placeholder(t, key)


@contextmanager
def materialized(opt: Any) -> Iterator[None]:
    """Inside, ``opt``'s states are ordinary tensors (for checkpoints); afterwards files again."""
    files: StateFiles | None = getattr(opt, "state_files", None)
    if files is None:
        yield
        return
    for state in opt.state.values():
        for key in STATE_KEYS:
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                state[key] = files.load(t, key)
    try:
        yield
    finally:
        files.forget()  # every piece is written again from the (possibly loaded) tensors
        _to_files(opt, files)
