"""Offloaded activations as files on a local NVMe volume.

Two I/O engines behind one future-based interface, chosen once per run:

* ``aio``: DeepSpeed's async I/O handle (libaio, O_DIRECT, several requests in flight per file),
  used when ``AsyncIOBuilder`` is compatible and builds here; it is what ZeRO-Infinity swaps with.
* ``threads``: a thread pool doing aligned ``pwrite``/``preadv`` of fixed chunks, each chunk in its
  own request so an NVMe drive sees a queue of them; ``O_DIRECT`` where the file system takes it
  (page cache bypassed: offloaded bytes are read once, caching them only evicts useful pages),
  buffered I/O elsewhere (tmpfs, some network file systems).

Each offloader owns a private directory under ``offload.path``; a file is removed as soon as its
bytes are back in memory, every file of a failed micro-batch is removed before the error leaves
the step, and the directory is removed at exit (``weakref.finalize`` runs at interpreter shutdown).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import glob
import os
import shutil
import socket
import uuid
import weakref
from pathlib import Path
from typing import Callable

import torch

from seqmesh.parallel.offload.errors import OffloadError, OffloadPathError, OffloadSpaceError

ENGINES = ("auto", "aio", "threads")
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def aio_available() -> bool:
    """Whether DeepSpeed's async I/O op is compatible with this machine (libaio present)."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError:
        return False
    try:
        return bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception:  # the builder probes compilers and libraries; any failure means "not here"
        return False


def aio_built() -> bool:
    """Whether the async I/O op is compatible *and* already compiled (installed with DS_BUILD_AIO=1, or
    in the torch-extensions JIT cache). ``engine=auto`` uses aio only then: a first JIT build takes
    many minutes, which must never happen silently inside a training step."""
    if not aio_available():
        return False
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("async_io"):
            return True
    except ImportError:
        pass
    root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return bool(glob.glob(os.path.join(root, "**", "async_io", "async_io.so"), recursive=True))


def _bytes_view(buf: torch.Tensor) -> memoryview:
    return memoryview(buf.numpy()).cast("B")


class _ThreadEngine:
    """Chunked aligned pwrite/preadv on a thread pool (the GIL is released inside each call)."""

    name = "threads"

    def __init__(self, threads: int, chunk_bytes: int, direct: bool) -> None:
        self.chunk_bytes, self.direct = chunk_bytes, direct
        self._pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="seqmesh-offload-io")

    def _flags(self, write: bool) -> int:
        flags = (os.O_WRONLY if write else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        return flags | (os.O_DIRECT if self.direct else 0)

    def _chunks(self, nbytes: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk_bytes, nbytes)) for a in range(0, nbytes, self.chunk_bytes)]

    def write(self, buf: torch.Tensor, path: str, before: Callable[[], None] | None) -> list[cf.Future]:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600))
        view = _bytes_view(buf)
        return [self._pool.submit(self._write_chunk, view, path, a, b, before) for a, b in self._chunks(len(view))]

    def read(self, buf: torch.Tensor, path: str) -> list[cf.Future]:
        view = _bytes_view(buf)
        return [self._pool.submit(self._read_chunk, view, path, a, b) for a, b in self._chunks(len(view))]

    def _write_chunk(self, view: memoryview, path: str, a: int, b: int, before: Callable[[], None] | None) -> None:
        if before is not None:
            before()
        fd = os.open(path, self._flags(True))
        try:
            while a < b:
                a += os.pwrite(fd, view[a:b], a)
        finally:
            os.close(fd)

    def _read_chunk(self, view: memoryview, path: str, a: int, b: int) -> None:
        fd = os.open(path, self._flags(False))
        try:
            while a < b:
                n = os.preadv(fd, [view[a:b]], a)
                if n == 0:
                    raise OffloadError(f"offload file {path} ended at byte {a}, expected {b}; it was truncated "
                                       "or removed while in use")
                a += n
        finally:
            os.close(fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _AioEngine:
    """DeepSpeed's ``aio_handle``: one handle for writes and one for reads, so prefetch reads never
    queue behind forward writes; each runs its synchronous parallel call on its own thread."""

    name = "aio"

    def __init__(self, threads: int, chunk_bytes: int) -> None:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        op = AsyncIOBuilder().load(verbose=False)
        block = min(chunk_bytes, 1 << 20)
        self._handles = {kind: op.aio_handle(block, 32, False, False, threads) for kind in ("write", "read")}
        self._threads = {kind: cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"seqmesh-aio-{kind}")
                         for kind in self._handles}
        self.parallelism = threads

    def write(self, buf: torch.Tensor, path: str, before: Callable[[], None] | None) -> list[cf.Future]:
        return [self._threads["write"].submit(self._run, "write", buf, path, before)]

    def read(self, buf: torch.Tensor, path: str) -> list[cf.Future]:
        return [self._threads["read"].submit(self._run, "read", buf, path, None)]

    def _run(self, kind: str, buf: torch.Tensor, path: str, before: Callable[[], None] | None) -> None:
        if before is not None:
            before()
        handle = self._handles[kind]
        rc = handle.sync_pwrite(buf, path) if kind == "write" else handle.sync_pread(buf, path)
        # The handle reports failures only as rc < 0 (and does not check completions), so a short
        # write (a full disk) is caught by the file's size.
        if rc < 0 or (kind == "write" and os.stat(path).st_size != buf.numel()):
            raise OSError(errno.EIO, f"DeepSpeed async I/O {kind} of {buf.numel()} bytes returned {rc}", path)

    def close(self) -> None:
        for pool in self._threads.values():
            pool.shutdown(wait=True)


_PREFIX = "seqmesh-offload-"


def _remove_stale(root: Path) -> None:
    """Delete the offload directories under ``root`` that processes of this host left behind when they were
    killed (a killed process runs no finalizer; workers that end with ``os._exit`` neither). A directory is
    named after its host and process: one whose process no longer runs on this host is stale."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for d in root.glob(f"{_PREFIX}{host}-*"):
        pid = d.name[len(_PREFIX) + len(host) + 1:].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # a live process of another user
            pass


def _probe_direct(directory: Path, align: int) -> bool:
    """Whether this file system accepts O_DIRECT writes of ``align``-aligned blocks."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "direct-probe"
    raw = torch.zeros(2 * align, dtype=torch.uint8)
    start = -raw.data_ptr() % align
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, _bytes_view(raw[start:start + align]), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class FileStore:
    """A private directory of offload files under ``root`` with one I/O engine."""

    def __init__(self, root: str | os.PathLike, engine: str = "auto", threads: int = 4,
                 chunk_bytes: int = 16 << 20, align: int = 4096) -> None:
        if engine not in ENGINES:
            raise ValueError(f"offload I/O engine {engine!r} is not known; choose one of {ENGINES}")
        if chunk_bytes <= 0 or chunk_bytes % align:
            raise ValueError(f"offload chunk_bytes={chunk_bytes} must be a positive multiple of {align}")
        self.root = Path(root)
        self.dir = self.root / f"{_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _remove_stale(self.root)
            self.dir.mkdir(parents=True, mode=0o700)
            probe = self.dir / "write-probe"
            probe.write_bytes(b"\0" * align)
            probe.unlink()
        except OSError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise OffloadPathError(
                f"offload.path={str(self.root)!r} is not usable for offload files ({e.strerror or e}); set "
                "offload.path to a writable directory on a local NVMe drive") from None
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.direct = _probe_direct(self.dir, align)
        if engine == "aio" and not aio_available():
            raise OffloadError("offload I/O engine 'aio' needs DeepSpeed's async I/O op, which is not compatible "
                               "here (it needs libaio: apt install libaio-dev); use the 'threads' or 'auto' engine")
        use_aio = engine == "aio" or (engine == "auto" and aio_built())
        self.engine = _AioEngine(threads, chunk_bytes) if use_aio else _ThreadEngine(threads, chunk_bytes, self.direct)
        self._serial = 0

    def new_path(self) -> str:
        self._serial += 1
        return str(self.dir / f"blob-{self._serial}.bin")

    def check_space(self, nbytes: int) -> None:
        """Fail before writing when the volume cannot take ``nbytes`` (async I/O does not report a full disk)."""
        free = shutil.disk_usage(self.dir).free
        if free < nbytes:
            raise self.space_error(nbytes, free)

    def space_error(self, nbytes: int, free: int | None = None) -> OffloadSpaceError:
        free = shutil.disk_usage(self.dir).free if free is None else free
        return OffloadSpaceError(
            f"offload.path={str(self.root)!r}: no space left on the device for {nbytes / 2**20:.1f} MiB of offloaded "
            f"activations ({free / 2**20:.1f} MiB free); free space there, set offload.path to a larger local NVMe "
            "volume, or lower offload.ratio")

    def translate(self, err: BaseException, nbytes: int) -> BaseException:
        """The offload error to raise for an I/O failure of a transfer of ``nbytes``."""
        if isinstance(err, OffloadError):
            return err
        if isinstance(err, OSError) and err.errno in _SPACE_ERRNOS:
            return self.space_error(nbytes)
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOENT):
            return OffloadPathError(f"offload.path={str(self.root)!r} stopped accepting offload files ({err}); "
                                    "set offload.path to a writable directory on a local NVMe drive")
        return OffloadError(f"offload file I/O under offload.path={str(self.root)!r} failed: {err!r}")

    def write(self, buf: torch.Tensor, path: str, before: Callable[[], None] | None = None) -> list[cf.Future]:
        """Start writing the whole of ``buf`` (aligned, a multiple of the block size) to ``path``;
        ``before`` runs first on the I/O thread (it waits for the device-to-host copy filling ``buf``)."""
        self.check_space(buf.numel())
        try:
            return self.engine.write(buf, path, before)
        except OSError as e:
            raise self.translate(e, buf.numel()) from e

    def read(self, buf: torch.Tensor, path: str) -> list[cf.Future]:
        try:
            return self.engine.read(buf, path)
        except OSError as e:
            raise self.translate(e, buf.numel()) from e

    @staticmethod
    def remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def files(self) -> list[str]:
        return sorted(str(p) for p in self.dir.iterdir()) if self.dir.exists() else []

    def close(self) -> None:
        self.engine.close()
        self._finalizer()
