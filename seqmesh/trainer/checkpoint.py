"""Atomic, checksummed, multi-rank training checkpoints that load with ``weights_only=True``.

Layout (``run_dir`` must be on storage every rank sees, as for any distributed checkpoint)::

    run_dir/checkpoints/
        step_00000200/
            shared.pt        rank 0: the keys every rank holds alike (default: model, lr_scheduler, extra)
            rank0.pt ...     rank r: every other key (optimizer shard, RNG states, data sampler position)
            manifest.json    step, world size, SHA-256 and size of every file, ``extra`` as JSON,
                             and each rank's ``index`` (what its file holds, for loaders at another layout)
        step_00000300/
        .tmp-step_00000400/  a save in progress (or one that crashed): never loaded

Every rank calls ``save_checkpoint`` with its whole state; the keys in ``shared_keys`` are written
once by rank 0, the rest by each rank to its own file (with TP/PP-sharded models pass
``shared_keys=("lr_scheduler", "extra")`` so each rank keeps its own model shard). Files are
written into the temp directory and fsynced, rank 0 writes the manifest last and publishes the
step with one ``os.replace`` of the directory: a crash at any point leaves either the old set of
checkpoints or the new one, never a half-written step that looks complete. A save then deletes
all but the newest ``keep`` steps, and any step above the one saved (see ``_prune``). A save that
fails on any rank (a full disk: ENOSPC) raises on every rank after rank 0 removed its temp directory.

``load_latest`` (same world size) walks the steps newest first and takes the newest one whose manifest parses and
whose files match their checksums *on every rank* (ranks agree through a collective, so they never
resume from different steps); a damaged one is warned about by name and skipped. Payloads load
with ``torch.load(weights_only=True)``, which refuses pickled code, so only tensors, numbers,
strings and containers of them may be saved -- ``save_checkpoint`` checks that up front.

Collective helpers for loaders built on these files (``rank_and_world``, ``gather_objects``,
``raise_if_any``) are public: a loader raises its own errors on every rank the same way.

``load_latest_files`` is the same walk for a loader that picks the files it needs from the manifest
(``seqmesh.trainer.reshard`` resumes at another TP/PP/HDP layout through it): each rank verifies and
reads only the files it chose, memory-mapped when asked, so a rank touches only the bytes it uses.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

FORMAT = 1
SHARED_FILE = "shared.pt"
MANIFEST = "manifest.json"
DEFAULT_SHARED_KEYS = ("model", "lr_scheduler", "extra")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, size) in ``group`` (None: the world); a process without torch.distributed is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank of ``group``."""
    if rank_and_world(group)[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _barrier(group: dist.ProcessGroup | None) -> None:
    if rank_and_world(group)[1] > 1:
        dist.barrier(group=group)


def raise_if_any(errors: list[str | None], what: str) -> None:
    """Raise on every rank when any rank failed, so no rank is left waiting in a collective."""
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise RuntimeError(f"{what} failed on {len(failed)} rank(s):\n" + "\n".join(failed))


def _storable(value: Any, path: str) -> Any:
    """``value`` as weights_only can load it, or an error naming the key path.

    Views of a larger storage (slices of flat ZeRO buffers) are cloned, since ``torch.save``
    writes a tensor's whole storage.
    """
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        tensor = value.detach()
        return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor
    if isinstance(value, _LEAVES):
        return value
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _storable(v, f"{path}[{k!r}]")) for k, v in value.items())
    if isinstance(value, (list, tuple, set)) and type(value) in (list, tuple, set, torch.Size):
        items = [_storable(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value if type(value) is torch.Size else type(value)(items)
    raise TypeError(f"checkpoint state {path} is a {type(value).__module__}.{type(value).__qualname__}, which "
                    "torch.load(weights_only=True) refuses; store tensors, numbers, strings and "
                    "dicts/lists/tuples of them (e.g. a state_dict(), or capture_rng_state())")


def _write(obj: Any, path: Path) -> dict[str, Any]:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished temp directory into place; a stale directory of the same step is replaced."""
    old = None
    if final.exists():  # left by a run that resumed from an earlier step
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` steps up to ``step``; later steps belong to an abandoned timeline.

    A step above the one just saved can only come from a run that crashed after writing it and
    was resumed from an earlier step (its own checkpoint was damaged); left in place, a later
    resume would jump back into that run's history.
    """
    steps = _steps(root)
    doomed = [p for s, p in steps if s > step] + [p for s, p in steps if s <= step][:-keep]
    doomed += [p for p in root.iterdir() if p.name.startswith((".tmp-step_", ".old-step_"))]
    for path in doomed:
        shutil.rmtree(path)


def _json(value: Any, what: str, fix: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable (it is copied into {MANIFEST}): {exc}; {fix}") from exc


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: Mapping[str, Any], keep: int = 2, *,
                    shared_keys: Collection[str] = DEFAULT_SHARED_KEYS, index: Any = None,
                    group: dist.ProcessGroup | None = None) -> Path:
    """Save ``state`` as step ``step`` from every rank of ``group``; keep the newest ``keep`` steps.

    Collective: every rank of ``group`` (default: the world, or a single process) must call it with
    the same ``step``. ``state["extra"]``, when present, must be JSON-able; it is also copied into
    the manifest so a person can read it without torch. ``index`` (JSON-able, optional) describes
    this rank's file for loaders that choose files by content; the manifest keeps it under
    ``index["rank<r>.pt"]``. Returns the published directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (the config's ckpt_keep), got {keep!r}")
    rank, world = rank_and_world(group)
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"

    error, shared, own, extra = None, {}, {}, None
    try:
        bad_keys = [k for k in state if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"checkpoint state keys must be strings, got {bad_keys}")
        if "extra" in state:
            extra = _json(state["extra"], "state['extra']", "put tensors in another key")
        index = _json(index, "index", "describe the file with numbers, strings, lists and dicts")
        for key, value in state.items():
            (shared if key in shared_keys else own)[key] = _storable(value, key)
    except (TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    raise_if_any(gather_objects(error, group), f"save_checkpoint(step={step}) validation")

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that crashed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(group)

    files, error = {}, None
    try:
        if rank == 0:
            files[SHARED_FILE] = _write(shared, tmp / SHARED_FILE)
        files[f"rank{rank}.pt"] = _write(own, tmp / f"rank{rank}.pt")
    except OSError as exc:
        error = _write_error(tmp, exc)
    gathered = gather_objects((error, files, index), group)
    _abandon_if_any([e for e, _, _ in gathered], rank, tmp, step)

    error = None
    if rank == 0:
        manifest = {"format": FORMAT, "step": step, "world_size": world, "shared_keys": sorted(shared),
                    "time": time.time(), "extra": extra,
                    "files": {name: meta for _, rank_files, _ in gathered for name, meta in rank_files.items()},
                    "index": {f"rank{r}.pt": i for r, (_, _, i) in enumerate(gathered) if i is not None}}
        try:
            with (tmp / MANIFEST).open("w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            _publish(tmp, final)
        except OSError as exc:  # every rank must hear it: the others wait below
            error = _write_error(tmp, exc)
        else:
            _prune(root, step, keep)
    _abandon_if_any(gather_objects(error, group), rank, tmp, step)
    return final


def _write_error(tmp: Path, exc: OSError) -> str:
    """What went wrong writing into ``tmp``; a full disk (or quota) says which disk and what to do."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return f"writing {tmp}: {exc}"
    try:
        usage = shutil.disk_usage(tmp.parent)
        free = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB"
    except OSError:
        free = "free space unknown"
    return (f"the disk holding {tmp.parent} is full ({exc.strerror}; {free}) while writing {tmp.name}. The "
            f"half-written step was removed and the previous checkpoints are intact. Free space on that disk, lower "
            f"ckpt_keep, or move run_dir to a larger disk, then resume (resume=true)")


def _abandon_if_any(errors: list[str | None], rank: int, tmp: Path, step: int) -> None:
    """On any rank's failure: rank 0 removes the unpublished step (a full disk gets its space back,
    nothing half-written stays behind), then every rank raises."""
    if any(errors) and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise_if_any(errors, f"save_checkpoint(step={step})")


def _read_manifest(step_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(None, manifest) when ``step_dir``'s manifest parses and is of this format, else (reason, None)."""
    manifest_path = step_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest["files"], dict):
            raise TypeError(f"'files' is a {type(manifest['files']).__name__}, not a dict")
        if manifest.get("format") != FORMAT:
            return f"{manifest_path}: format {manifest.get('format')!r}, this seqmesh reads {FORMAT}", None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is missing or unreadable ({exc})", None
    return None, manifest


def _verify(step_dir: Path, manifest: Mapping[str, Any], names: Collection[str]) -> str | None:
    """None when the files ``names`` of ``step_dir`` match the manifest's sizes and checksums, else the reason."""
    for name in names:
        path, meta = step_dir / name, manifest["files"].get(name)
        if meta is None:
            return f"{step_dir / MANIFEST} lists no {name}"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{path} does not match its SHA-256 in {step_dir / MANIFEST} (corrupt)"
    return None


def _load(path: Path, map_location: Any, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: an intact file holding pickled objects is an error, not damage."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # the unpickler's refusal comes in several exception types
        # torch's message suggests weights_only=False; keep only the line that names the culprit.
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), str(exc))
        raise RuntimeError(f"{path} passed its checksum but torch.load(weights_only=True) refused it: it holds "
                           f"something other than tensors and plain containers ({detail})") from exc


Select = Callable[[dict[str, Any]], Collection[str]]


def load_latest_files(run_dir: str | os.PathLike, select: Select, *, group: dist.ProcessGroup | None = None,
                      map_location: Any = "cpu", mmap: bool = False
                      ) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]] | None:
    """``(step, manifest, {file name: payload})`` of the newest checkpoint whose chosen files are intact.

    Collective. ``select(manifest)`` names the files this rank needs (ranks may choose differently);
    a ``ValueError`` it raises on any rank (the checkpoint cannot serve this run) is raised on every
    rank. A step whose manifest or chosen files are damaged on any rank is skipped on all of them,
    with a warning naming the damage. ``mmap=True`` maps the files instead of reading them whole.
    """
    rank, _ = rank_and_world(group)
    for step, step_dir in reversed(_steps(Path(run_dir) / "checkpoints")):
        reason, manifest = _read_manifest(step_dir)
        names: Collection[str] = ()
        error = None
        if manifest is not None:
            try:
                names = select(manifest)
            except ValueError as exc:
                error = str(exc)
        errors = gather_objects(error, group)
        if any(errors):
            raise ValueError("; ".join(dict.fromkeys(e for e in errors if e)))
        if manifest is not None:
            reason = _verify(step_dir, manifest, names)
        reasons = [r for r in gather_objects(reason, group) if r]
        if reasons:
            if rank == 0:
                warnings.warn(f"skipping checkpoint step {step}: " + "; ".join(reasons), stacklevel=3)
            continue
        payloads, error = {}, None
        try:
            payloads = {name: _load(step_dir / name, map_location, mmap) for name in names}
        except RuntimeError as exc:
            error = str(exc)
        raise_if_any(gather_objects(error, group), f"loading checkpoint step {step}")
        return step, manifest, payloads
    return None


def load_latest(run_dir: str | os.PathLike, *, group: dist.ProcessGroup | None = None,
                map_location: Any = "cpu") -> tuple[int, dict[str, Any]] | None:
    """``(step, state)`` of the newest intact checkpoint under ``run_dir``, or None when there is none.

    Collective like ``save_checkpoint``. ``state`` is the shared part merged with this rank's part,
    i.e. the dict this rank passed to ``save_checkpoint``, with tensors on ``map_location``. The
    checkpoint must come from as many ranks as this run has (``reshard.load_resharded`` reads one
    written at another layout).
    """
    rank, world = rank_and_world(group)

    def own_files(manifest: dict[str, Any]) -> list[str]:
        if manifest.get("world_size") != world:
            raise ValueError(f"the checkpoint of step {manifest.get('step')} under {run_dir} was written by "
                             f"{manifest.get('world_size')} ranks, this run has {world}; per-rank shards are not "
                             f"remapped by load_latest: resume with the same number of workers, load with "
                             f"seqmesh.trainer.reshard.load_resharded (layout-free checkpoints), or start a "
                             f"fresh run_dir")
        return [SHARED_FILE, f"rank{rank}.pt"]

    found = load_latest_files(run_dir, own_files, group=group, map_location=map_location)
    if found is None:
        return None
    step, _, payloads = found
    state = payloads[SHARED_FILE]
    state.update(payloads[f"rank{rank}.pt"])
    return step, state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in a form ``weights_only`` loads.

    CUDA: the current device's generator only (one GPU per rank), and only when CUDA is already
    initialised, so a CPU run on a GPU host does not start a CUDA context.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what ``capture_rng_state`` returned (possibly after a save/load round trip)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            warnings.warn("checkpoint holds a CUDA RNG state but this process has no CUDA; it is not restored",
                          stacklevel=2)
