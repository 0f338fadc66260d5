"""Reusable host buffers for offloaded activations, inside a fixed byte budget.

Allocating pinned memory costs milliseconds per megabyte and PyTorch's caching host allocator rounds
every block up to a power of two (up to 2x the host memory); a training step offloads the same
shapes every time, so buffers are kept in size classes (at most 1/8 above the request) and handed
out again. Pinned buffers are ordinary CPU allocations page-locked with ``cudaHostRegister``, which
locks exactly the bytes asked for (CUDA's pinned allocator is the fallback where registering fails). Every buffer starts on an ``align`` boundary and spans a whole
number of ``align`` blocks, which is what ``O_DIRECT`` file I/O requires. Only that aligned window
is registered: it covers whole pages of its own allocation, so two buffers never share a locked
page (registering a page twice fails with ``cudaErrorHostMemoryAlreadyRegistered``, and the failed
call's error would then surface at the next kernel launch).

The budget is a hard limit: when the free buffers of other sizes, once returned to the system, do
not make room, ``acquire`` answers None and the caller decides whether to wait for buffers still
in flight (file writes) or to raise ``HostMemoryError``.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections import defaultdict

import numpy as np
import torch

from seqmesh.parallel.offload.errors import HostMemoryError


def size_class(nbytes: int, align: int = 4096) -> int:
    """``nbytes`` rounded up to a multiple of max(align, 1/8 of the power of two below it): at most 12.5% waste."""
    if nbytes <= 0:
        raise ValueError(f"size_class: nbytes must be positive, got {nbytes}")
    granule = max(align, 1 << max(0, (nbytes - 1).bit_length() - 4))
    return -(-nbytes // granule) * granule


class _Slab:
    """One allocation: ``raw`` owns the memory, ``buf`` is its aligned window handed to callers.

    A registered window is unregistered when the slab is freed or collected: the driver keeps a
    registration after the memory is unmapped, and a later allocation at the same address would
    then fail to register ("already mapped").
    """

    __slots__ = ("raw", "buf", "registered")

    def __init__(self, raw: torch.Tensor, buf: torch.Tensor, registered: bool) -> None:
        self.raw, self.buf, self.registered = raw, buf, registered

    def free(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.registered = False
        self.raw = self.buf = None  # type: ignore[assignment]

    def __del__(self) -> None:
        if self.registered:
            self.free()


def _window(raw: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """``raw[start:start + size]`` as a tensor whose storage begins at the window, so that
    ``is_pinned()`` (which looks at the storage's first byte) sees the registered pages."""
    view = (ctypes.c_uint8 * size).from_address(raw.data_ptr() + start)
    return torch.from_numpy(np.ctypeslib.as_array(view))


class HostPool:
    """Size-classed host buffers within ``limit_bytes``; thread-safe (file I/O threads return buffers)."""

    def __init__(self, limit_bytes: int, pin: bool, align: int = 4096) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"HostPool: limit_bytes must be positive, got {limit_bytes}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"HostPool: align must be a power of two, got {align}")
        # Pinned buffers start and end on page boundaries, so none shares a locked page with another.
        self.limit_bytes, self.pin = int(limit_bytes), pin
        self.align = max(align, mmap.PAGESIZE) if pin else align
        self._free: dict[int, list[_Slab]] = defaultdict(list)
        self._used: dict[int, _Slab] = {}  # data_ptr of the handed-out buffer -> its slab
        self._lock = threading.Lock()
        self.allocated_bytes = 0
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocations = 0  # fresh allocations so far: stays flat once a run reaches steady state

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer of at least ``nbytes`` (its class size, or a larger free buffer where a new one would not
        fit the budget), or None when the budget is spent.

        Why the larger buffer: a new one would be made room for by freeing others, and users that alternate
        sizes (a layer's gradients, then a resident unit's in pieces, each tensor's last piece shorter) would
        free and page-lock buffers every step; on an H100's host the 7 registrations and releases of a
        Llama-3-8B step's staging took 0.78 s of a 1.74 s step."""
        size = size_class(nbytes, self.align)
        with self._lock:
            free = self._free[size]
            over = self.allocated_bytes + size > self.limit_bytes
            larger = min((s for s, slabs in self._free.items() if s > size and slabs), default=None) if over else None
            if free:
                slab = free.pop()
            elif larger is not None:
                slab = self._free[larger].pop()
            else:
                if not self._make_room(size):
                    return None
                slab = self._allocate(size)
                self.allocated_bytes += size
                self.allocations += 1
            self._used[slab.buf.data_ptr()] = slab
            self.in_use_bytes += size
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            return slab.buf

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            slab = self._used.pop(buf.data_ptr(), None)
            if slab is None:
                raise ValueError("HostPool.release: this buffer was not handed out by this pool (or was released "
                                 "twice)")
            self.in_use_bytes -= slab.buf.numel()
            self._free[slab.buf.numel()].append(slab)

    def trim(self) -> None:
        """Return every free buffer to the system (after a step that needed unusually large ones)."""
        with self._lock:
            for size, slabs in self._free.items():
                for slab in slabs:
                    slab.free()
                    self.allocated_bytes -= size
            self._free.clear()

    def close(self) -> None:
        """Free everything; buffers still handed out are freed too (their users must be finished)."""
        self.trim()
        with self._lock:
            for slab in self._used.values():
                self.allocated_bytes -= slab.buf.numel()
                slab.free()
            self._used.clear()
            self.in_use_bytes = 0

    def _make_room(self, size: int) -> bool:
        """Free cached buffers of other sizes, largest first, until ``size`` more fits the budget."""
        if self.allocated_bytes + size <= self.limit_bytes:
            return True
        for other in sorted((s for s, slabs in self._free.items() if slabs), reverse=True):
            slabs = self._free[other]
            while slabs and self.allocated_bytes + size > self.limit_bytes:
                slabs.pop().free()
                self.allocated_bytes -= other
        return self.allocated_bytes + size <= self.limit_bytes

    def _allocate(self, size: int) -> _Slab:
        try:
            raw = torch.empty(size + self.align, dtype=torch.uint8)
        except RuntimeError as e:
            raise HostMemoryError(
                f"offload could not allocate {size / 2**30:.2f} GiB of host memory ({e}); the machine has less "
                f"free RAM than offload.host_mem_gb={self.limit_bytes / 2**30:.1f} GiB assumes: lower "
                "offload.host_mem_gb, lower offload.ratio, or use offload.target=nvme") from None
        start = -raw.data_ptr() % self.align
        registered = self.pin and int(torch.cuda.cudart().cudaHostRegister(raw.data_ptr() + start, size, 0)) == 0
        if self.pin and not registered:
            # Some drivers or containers refuse to register; CUDA's own pinned allocator (page-aligned
            # blocks, rounded up to a power of two) is the fallback before giving up.
            del raw
            try:
                raw = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:
                raise HostMemoryError(
                    f"offload could not page-lock {size / 2**30:.2f} GiB of host memory ({e}); free RAM is below "
                    f"what offload.host_mem_gb={self.limit_bytes / 2**30:.1f} GiB assumes: lower "
                    "offload.host_mem_gb or offload.ratio, or use offload.target=nvme") from None
            start = 0
        return _Slab(raw, _window(raw, start, size) if registered else raw[start:start + size], registered)
