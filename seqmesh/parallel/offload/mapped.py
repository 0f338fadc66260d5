"""Host tensors backed by files on NVMe (``offload.params=nvme``): memory-mapped, unlinked at once.

The master weights and gradients of ``offload.params=nvme`` are ordinary CPU tensors whose pages
belong to a file under ``offload.path`` (``torch.from_file``, a shared mapping): the kernel's page
cache keeps what RAM holds and reads the rest from the disk on access, and writes updated pages back
on its own. Every block is reserved when the file is made (a full disk fails there, naming
``offload.path``, not later inside a mapped write). So the model may exceed host memory, and the ZeRO buffers, the optimizer and the
streaming code use these tensors exactly as in-memory ones (the same bits). The file is unlinked
right after it is mapped: the mapping keeps its blocks until the tensor is freed, and no file is
left behind by a finished run, an exception or a killed process.

Copies from these pages to the device are not page-locked (registering a file mapping is not
portable), so they run at the disk's rate where the pages are not cached: the plan prices streamed
layers with ``min(PCIe, disk)``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from seqmesh.parallel.offload.errors import OffloadPathError, OffloadSpaceError


def mapped_zeros(numel: int, dtype: torch.dtype, directory: str | os.PathLike) -> torch.Tensor:
    """A zero-filled 1-D CPU tensor of ``numel`` elements whose storage is an (unlinked) file in ``directory``."""
    if numel < 0:
        raise ValueError(f"mapped_zeros: numel must be >= 0, got {numel}")
    root = Path(directory)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError as e:
        raise OffloadPathError(f"offload.path={str(root)!r} is not usable for offloaded weights ({e.strerror or e}); "
                               "set offload.path to a writable directory on a local NVMe drive") from None
    if nbytes > free:
        raise OffloadSpaceError(f"offload.params=nvme needs {nbytes / 2**30:.2f} GiB more under offload.path="
                                f"{str(root)!r}, which has {free / 2**30:.2f} GiB free; point offload.path at a larger "
                                "volume or use offload.params=cpu")
    path = root / f"seqmesh-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve every block now: a write into a mapped page the disk cannot hold would be a SIGBUS later.
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise OffloadSpaceError(f"offload.params=nvme could not reserve {nbytes / 2**30:.2f} GiB under "
                                    f"offload.path={str(root)!r} ({e.strerror or e}); point offload.path at a larger "
                                    "volume or use offload.params=cpu") from None
        finally:
            os.close(fd)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    finally:
        path.unlink(missing_ok=True)
