"""Tensors saved for backward, moved to host memory or files while they wait, through saved_tensors_hooks.

What is offloaded: inside the chosen modules (one per layer: the checkpointed layer, whose only
saved tensors are its inputs, or the attention of a non-checkpointed layer: its q, k, v, output and
LSE), every saved tensor that scales with the micro-batch (a dimension equal to the local token
count), is contiguous and at least ``min_bytes``, and is not a parameter or a cast of one (those
stay on the device anyway). Several saved views of the same bytes (the attention output and its
reshape for ``o_proj``; RoPE's cos/sin saved by every layer) travel once.

How, on CUDA: the device-to-host copy runs on a side stream as soon as the tensor is saved, and the
device tensor is kept alive only until that copy's event fires (beyond the current layer's own
copies, at most ``max_inflight_bytes`` of them at once). File offload then writes the pinned
buffer from an I/O thread and hands the buffer back. In backward, the first saved tensor a layer
unpacks starts the loads of the offloaded layers up to ``lookahead`` layers below it (file reads on
I/O threads, then host-to-device copies on a second side stream), so they arrive while this layer
computes; the compute stream waits on the copy's event only when it needs the tensor. On a CPU
device the same code runs with plain synchronous copies (file I/O still goes through the I/O
threads), which is what tests exercise.

State is per micro-batch (``Offloader.session``): a failure inside it releases every buffer and
file of that micro-batch before the exception propagates.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from seqmesh.parallel.offload.errors import HostMemoryError, OffloadError
from seqmesh.parallel.offload.files import FileStore
from seqmesh.parallel.offload.policy import OffloadPolicy, Selection
from seqmesh.parallel.offload.pool import HostPool

TARGETS = ("cpu", "nvme")
_ALIGN = 4096


class _Blob:
    """The bytes of one offloaded tensor (shared by every saved view of the same bytes)."""

    __slots__ = ("nbytes", "group", "refs", "src", "d2h", "host", "path", "writes", "reads", "gpu", "h2d",
                 "released", "dead")

    def __init__(self, nbytes: int, group: int) -> None:
        self.nbytes, self.group, self.refs = nbytes, group, 0
        self.src: torch.Tensor | None = None  # the device tensor, kept until its copy to host is done
        self.d2h: torch.cuda.Event | None = None
        self.host: torch.Tensor | None = None  # pool buffer holding the bytes (or staging them for a file)
        self.path: str | None = None
        self.writes: list[cf.Future] = []
        self.reads: list[cf.Future] = []
        self.gpu: torch.Tensor | None = None  # restored bytes on the device
        self.h2d: torch.cuda.Event | None = None
        self.released = False
        self.dead = False  # its micro-batch failed: unpacking it is an error


class _Saved:
    """What autograd stores instead of an offloaded tensor; its end releases the bytes."""

    __slots__ = ("session", "blob", "group", "dtype", "shape", "stride")

    def __init__(self, session: "_Session", blob: _Blob, group: int, t: torch.Tensor) -> None:
        self.session, self.blob, self.group = session, blob, group
        self.dtype, self.shape, self.stride = t.dtype, t.shape, t.stride()
        blob.refs += 1

    def __del__(self) -> None:
        self.session.drop(self.blob)


class _Resident:
    """A saved tensor left on the device; unpacking it tells the session where backward is."""

    __slots__ = ("session", "tensor", "group")

    def __init__(self, session: "_Session", tensor: torch.Tensor, group: int) -> None:
        self.session, self.tensor, self.group = session, tensor, group


@dataclass
class OffloadStats:
    """Totals since the offloader was built (the benchmark and tests read them)."""

    offloaded_bytes: int = 0
    offloaded_tensors: int = 0
    deduplicated: int = 0
    resident_bytes: int = 0
    restored_bytes: int = 0
    sync_loads: int = 0  # tensors backward had to wait for because no prefetch had started them
    sessions: int = 0
    groups_last: tuple[int, ...] = field(default_factory=tuple)


class Offloader:
    """Offload saved activations of chosen modules to pinned host memory (``cpu``) or files (``nvme``)."""

    def __init__(self, device: torch.device | str, target: str, policy: OffloadPolicy, host_limit_bytes: int, *,
                 path: str | None = None, engine: str = "auto", io_threads: int = 4, chunk_bytes: int = 16 << 20,
                 min_bytes: int = 1 << 20, max_inflight_bytes: int = 256 << 20,
                 bytes_per_token: float | None = None) -> None:
        if target not in TARGETS:
            raise ValueError(f"offload target {target!r} is not known; choose one of {TARGETS} (or do not attach)")
        if target == "nvme" and not path:
            raise ValueError("offload.target=nvme needs offload.path, a directory on a local NVMe drive")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.target, self.policy = device, target, policy
        self.cuda = device.type == "cuda"
        self.min_bytes, self.max_inflight_bytes = int(min_bytes), int(max_inflight_bytes)
        self.pool = HostPool(host_limit_bytes, pin=self.cuda, align=_ALIGN)
        self.files = FileStore(path, engine, io_threads, chunk_bytes, _ALIGN) if target == "nvme" else None
        self.d2h_stream = torch.cuda.Stream(device) if self.cuda else None
        self.h2d_stream = torch.cuda.Stream(device) if self.cuda else None
        self.bytes_per_token = bytes_per_token  # refined by every micro-batch
        self.stats = OffloadStats()
        self.num_groups = 0
        self._local = threading.local()
        self._session: _Session | None = None
        self._hooks: list = []

    # ---- wiring ------------------------------------------------------------------------------------
    def attach(self, scopes: Sequence[nn.Module]) -> None:
        """Offload what ``scopes[i]`` saves as layer ``i`` (forward order)."""
        if self._hooks:
            raise RuntimeError("this offloader is already attached; build one per model")
        for group, module in enumerate(scopes):
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, g=group: self._stack().append(g)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o, g=group: self._leave(g),
                                                            always_call=True))
        self.num_groups = len(scopes)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _stack(self) -> list[int]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _leave(self, group: int) -> None:
        stack = self._stack()
        if stack and stack[-1] == group:
            stack.pop()

    @contextmanager
    def session(self, seqlens: Sequence[int], group_size: int, tokens: int) -> Iterator["_Session"]:
        """Offload during the forward of one micro-batch (``tokens`` local tokens of documents
        ``seqlens`` over ``group_size`` ranks); wrap its backward too, so a failure there is cleaned up."""
        if self._session is not None:
            raise RuntimeError("offload sessions do not nest: finish one micro-batch's backward before the next "
                               "forward")
        bpt = self.bytes_per_token or 0.0
        selection = self.policy.select(list(seqlens), group_size, bpt)
        session = _Session(self, selection, tokens)
        self._session = session
        self.stats.sessions += 1
        self.stats.groups_last = tuple(sorted(selection.groups))
        try:
            with torch.autograd.graph.saved_tensors_hooks(session.pack, _unpack):
                yield session
        except BaseException:
            session.abort()
            raise
        finally:
            self._session = None
            self._stack().clear()
        session.finish()

    def close(self) -> None:
        """Release host memory and the offload directory (also done at exit)."""
        self.detach()
        if self.files is not None:
            self.files.close()
        self.pool.close()

    # ---- host buffers --------------------------------------------------------------------------------
    def acquire(self, session: "_Session", nbytes: int) -> torch.Tensor:
        """A pool buffer, waiting for buffers in flight to come back before giving up."""
        while True:
            buf = self.pool.acquire(nbytes)
            if buf is not None:
                return buf
            if not session.wait_one():
                raise HostMemoryError(
                    f"offload needs {_size(nbytes)} more host memory but its budget offload.host_mem_gb="
                    f"{_size(self.pool.limit_bytes)} is spent ({_size(self.pool.in_use_bytes)} holding activations); "
                    "raise offload.host_mem_gb, lower offload.ratio, or use offload.target=nvme (host memory then "
                    "only stages transfers)")


def _unpack(handle: object) -> torch.Tensor:
    if isinstance(handle, torch.Tensor):
        return handle
    if isinstance(handle, _Resident):
        handle.session.enter_backward(handle.group)
        return handle.tensor
    assert isinstance(handle, _Saved)
    return handle.session.restore(handle)


def _is_parameter_like(t: torch.Tensor) -> bool:
    """Parameters, views of them, and autocast's casts of them: they stay on the device regardless."""
    if t.is_leaf and t.requires_grad:
        return True
    base = t._base
    if base is not None and base.is_leaf and base.requires_grad:
        return True
    fn = t.grad_fn
    return fn is not None and type(fn).__name__ == "ToCopyBackward0" and any(
        nxt is not None and type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions)


class _Session:
    """Offload state of one micro-batch: its blobs, transfers in flight and backward's position."""

    def __init__(self, off: Offloader, selection: Selection, tokens: int) -> None:
        self.off, self.selection, self.tokens = off, selection, tokens
        self.lock = threading.RLock()
        self.blobs: dict[tuple, _Blob] = {}
        self.all_blobs: list[_Blob] = []  # every blob made, so a failure anywhere frees them all
        self.group_blobs: dict[int, list[_Blob]] = defaultdict(list)
        self.d2h_pending: deque[_Blob] = deque()
        self.inflight_bytes = 0
        self.writing: list[_Blob] = []
        self.reading: list[_Blob] = []
        self.h2d_pending: list[_Blob] = []
        self.seen: set[tuple] = set()
        self.seen_bytes: dict[int, int] = defaultdict(int)
        self.backward_group: int | None = None
        self.prefetched: set[int] = set()

    # ---- forward --------------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> object:
        off = self.off
        stack = off._stack()
        if not stack or torch._C._current_graph_task_id() != -1 or not self._candidate(t):
            return t
        group = stack[-1]
        nbytes = t.numel() * t.element_size()
        key = (StorageWeakRef(t.untyped_storage()), t.storage_offset() * t.element_size(), nbytes, t._version)
        if key not in self.seen:
            self.seen.add(key)
            self.seen_bytes[group] += nbytes
        if group not in self.selection.groups:
            off.stats.resident_bytes += nbytes
            return _Resident(self, t, group)
        with self.lock:
            self.poll()
            blob = self.blobs.get(key)
            if blob is not None and not blob.released:
                off.stats.deduplicated += 1
            else:
                blob = self._offload(t, group, nbytes)
                self.blobs[key] = blob
            self.group_blobs[group].append(blob)
            return _Saved(self, blob, group, t)

    def _candidate(self, t: torch.Tensor) -> bool:
        off = self.off
        return (t.device == off.device and t.numel() * t.element_size() >= max(off.min_bytes, 1)
                and self.tokens in t.shape and t.is_contiguous() and not _is_parameter_like(t))

    def _offload(self, t: torch.Tensor, group: int, nbytes: int) -> _Blob:
        off = self.off
        blob = _Blob(nbytes, group)
        self.all_blobs.append(blob)
        blob.host = off.acquire(self, nbytes)
        src = t.detach().reshape(-1).view(torch.uint8)
        if off.cuda:
            assert off.d2h_stream is not None
            off.d2h_stream.wait_stream(torch.cuda.current_stream(off.device))
            with torch.cuda.stream(off.d2h_stream):
                blob.host[:nbytes].copy_(src, non_blocking=True)
                blob.d2h = torch.cuda.Event()
                blob.d2h.record(off.d2h_stream)
            blob.src = t
            self.d2h_pending.append(blob)
            self.inflight_bytes += nbytes
            # earlier layers' copies have had a layer of compute to finish; wait for them only
            # beyond the bound (a layer's own copies, saved at the same point, all run)
            while self.inflight_bytes > off.max_inflight_bytes and self.d2h_pending[0].group != group:
                self._finish_d2h(self.d2h_pending[0], wait=True)
        else:
            blob.host[:nbytes].copy_(src)
        if off.files is not None:
            size = -(-nbytes // _ALIGN) * _ALIGN
            blob.path = off.files.new_path()
            event = blob.d2h
            blob.writes = off.files.write(blob.host[:size], blob.path, event.synchronize if event is not None else None)
            self.writing.append(blob)
        off.stats.offloaded_bytes += nbytes
        off.stats.offloaded_tensors += 1
        return blob

    def _finish_d2h(self, blob: _Blob, wait: bool) -> bool:
        if blob.d2h is not None and blob.src is not None:
            if not wait and not blob.d2h.query():
                return False
            blob.d2h.synchronize()
        if blob.src is not None:
            blob.src = None
            self.inflight_bytes -= blob.nbytes
        if blob in self.d2h_pending:
            self.d2h_pending.remove(blob)
        return True

    # ---- progress ----------------------------------------------------------------------------------
    def poll(self) -> None:
        """Retire finished transfers: free device sources, return staging buffers, start copies
        whose file reads are done; raise the first I/O error as an offload error."""
        while self.d2h_pending and self._finish_d2h(self.d2h_pending[0], wait=False):
            pass
        for blob in [b for b in self.writing if all(f.done() for f in b.writes)]:
            self._finish_writes(blob)
        for blob in [b for b in self.reading if all(f.done() for f in b.reads)]:
            self._finish_reads(blob)
        for blob in [b for b in self.h2d_pending if b.h2d is None or b.h2d.query()]:
            self._finish_h2d(blob)

    def wait_one(self) -> bool:
        """Return host buffers: those of finished transfers, else wait for the oldest one in flight;
        False when no transfer holds any."""
        before = self.off.pool.in_use_bytes
        self.poll()
        if self.off.pool.in_use_bytes < before:
            return True
        if self.h2d_pending:
            self._finish_h2d(self.h2d_pending[0], wait=True)
        elif self.writing:
            self._finish_writes(self.writing[0], wait=True)
        elif self.reading:
            self._finish_reads(self.reading[0], wait=True)
        else:
            return False
        return True

    def _finish_writes(self, blob: _Blob, wait: bool = False) -> None:
        files = self.off.files
        assert files is not None
        errors = [e for e in (_exception(f, wait) for f in blob.writes) if e is not None]
        self.writing.remove(blob)
        blob.writes = []
        if errors:
            raise files.translate(errors[0], blob.nbytes) from errors[0]
        self._finish_d2h(blob, wait=True)
        self._release_host(blob)

    def _finish_reads(self, blob: _Blob, wait: bool = False) -> None:
        files = self.off.files
        assert files is not None and blob.path is not None
        errors = [e for e in (_exception(f, wait) for f in blob.reads) if e is not None]
        self.reading.remove(blob)
        blob.reads = []
        if errors:
            raise files.translate(errors[0], blob.nbytes) from errors[0]
        files.remove(blob.path)
        blob.path = None
        self._copy_to_device(blob)

    def _finish_h2d(self, blob: _Blob, wait: bool = False) -> None:
        if blob.h2d is not None and wait:
            blob.h2d.synchronize()
        self.h2d_pending.remove(blob)
        self._release_host(blob)

    def _release_host(self, blob: _Blob) -> None:
        if blob.host is not None:
            self.off.pool.release(blob.host)
            blob.host = None

    # ---- backward ------------------------------------------------------------------------------------
    def enter_backward(self, group: int) -> None:
        """Backward reached layer ``group``: start loading the offloaded layers ``lookahead`` below it."""
        with self.lock:
            if group == self.backward_group:
                return
            self.backward_group = group
            self.poll()
            for g in range(group - 1, group - 1 - self.selection.lookahead, -1):
                if g in self.selection.groups and g not in self.prefetched:
                    self.prefetched.add(g)
                    for blob in self.group_blobs.get(g, ()):
                        self._start_load(blob)

    def restore(self, handle: _Saved) -> torch.Tensor:
        blob = handle.blob
        if blob.dead:
            raise OffloadError("an offloaded activation was released because its micro-batch failed; run the step "
                               "again (after zero_grad) instead of reusing its graph")
        self.enter_backward(handle.group)
        off = self.off
        with self.lock:
            if blob.gpu is None and not blob.reads:
                off.stats.sync_loads += 1
                self._start_load(blob)
            if blob.reads:
                self._finish_reads(blob, wait=True)
            gpu = blob.gpu
            assert gpu is not None
            if off.cuda and blob.h2d is not None:
                stream = torch.cuda.current_stream(off.device)
                stream.wait_event(blob.h2d)
                gpu.record_stream(stream)
        return gpu.view(handle.dtype).as_strided(handle.shape, handle.stride)

    def _start_load(self, blob: _Blob) -> None:
        if blob.gpu is not None or blob.reads or blob.released:
            return
        off = self.off
        if blob.path is None:  # host copy
            self._copy_to_device(blob)
            return
        if blob.writes:
            self._finish_writes(blob, wait=True)
        assert off.files is not None
        blob.host = off.acquire(self, blob.nbytes)
        blob.reads = off.files.read(blob.host[:-(-blob.nbytes // _ALIGN) * _ALIGN], blob.path)
        self.reading.append(blob)

    def _copy_to_device(self, blob: _Blob) -> None:
        off = self.off
        assert blob.host is not None
        host = blob.host[:blob.nbytes]
        if off.cuda:
            assert off.h2d_stream is not None
            with torch.cuda.stream(off.h2d_stream):
                if blob.d2h is not None:
                    off.h2d_stream.wait_event(blob.d2h)
                blob.gpu = torch.empty(blob.nbytes, dtype=torch.uint8, device=off.device)
                blob.gpu.copy_(host, non_blocking=True)
                blob.h2d = torch.cuda.Event()
                blob.h2d.record(off.h2d_stream)
            self.h2d_pending.append(blob)
        else:
            blob.gpu = host.to(off.device, copy=True)
            self._release_host(blob)
        off.stats.restored_bytes += blob.nbytes

    # ---- lifetime --------------------------------------------------------------------------------------
    def drop(self, blob: _Blob) -> None:
        """One saved view of ``blob`` is gone (autograd freed it); free the bytes with the last one."""
        with self.lock:
            blob.refs -= 1
            if blob.refs <= 0:
                self._free(blob)

    def _free(self, blob: _Blob) -> None:
        if blob.released:
            return
        blob.released = True
        for futures in (blob.writes, blob.reads):
            for f in futures:
                _exception(f, wait=True)
        for queue in (self.writing, self.reading):
            if blob in queue:
                queue.remove(blob)
        blob.writes, blob.reads = [], []
        self._finish_d2h(blob, wait=True)
        if blob in self.h2d_pending:
            self._finish_h2d(blob, wait=True)
        self._release_host(blob)
        if blob.path is not None and self.off.files is not None:
            self.off.files.remove(blob.path)
            blob.path = None
        blob.gpu = None

    def finish(self) -> None:
        """The micro-batch ended normally: retire transfers, learn its bytes per token."""
        with self.lock:
            self.poll()
        if self.seen_bytes and self.tokens:
            self.off.bytes_per_token = max(self.seen_bytes.values()) / self.tokens

    def abort(self) -> None:
        """The micro-batch failed: every blob is freed now (its saved views may outlive the error)."""
        with self.lock:
            for blob in self.all_blobs:
                blob.dead = True
                self._free(blob)
            self.blobs.clear()


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _exception(future: cf.Future, wait: bool) -> BaseException | None:
    if not wait and not future.done():
        return None
    return future.exception()
