"""Measured transfer rates the offload policy prices transfers with (and the benchmark reports).

Each figure is the best of a few timed transfers of one buffer, as the steady state of a training
step (large, repeated copies from reused pinned buffers) sees it, not the first cold copy.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from seqmesh.parallel.offload.files import FileStore
from seqmesh.parallel.offload.pool import HostPool


def available_host_bytes() -> int:
    """Host memory the system can hand out now (MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure_h2d_GBps(device: torch.device | str, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Host-to-device copy rate from a pinned (page-locked) buffer, GB/s; on a CPU device, memcpy."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    pool = HostPool(nbytes * 2, pin=cuda)
    try:
        host = pool.acquire(nbytes)
        assert host is not None
        host = host[:nbytes]
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(repeats + 1):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dev.copy_(host, non_blocking=True)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                dev.copy_(host)
                seconds = time.perf_counter() - t0
            best = min(best, seconds)
        return nbytes / best / 1e9
    finally:
        pool.close()


def measure_both_ways_GBps(device: torch.device | str, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """GB/s each way of a host-to-device and a device-to-host copy of ``nbytes`` each, from and to pinned
    buffers, run at the same time on two streams (a staged update copies both ways at once): the link's
    ceiling for the update, which one direction's rate (``measure_h2d_GBps``) does not show."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_both_ways_GBps times copies over a GPU's link; got device {device}")
    pool = HostPool(nbytes * 2, pin=True)
    try:
        src, dst = pool.acquire(nbytes), pool.acquire(nbytes)
        assert src is not None and dst is not None
        src, dst = src[:nbytes], dst[:nbytes]
        dev_in, dev_out = torch.empty(nbytes, dtype=torch.uint8, device=device), \
            torch.empty(nbytes, dtype=torch.uint8, device=device)
        inbound, outbound = torch.cuda.Stream(device), torch.cuda.Stream(device)
        best = float("inf")
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.cuda.stream(inbound):
                dev_in.copy_(src, non_blocking=True)
            with torch.cuda.stream(outbound):
                dst.copy_(dev_out, non_blocking=True)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9
    finally:
        pool.close()


def measure_disk_GBps(path: str | os.PathLike | None = None, nbytes: int = 256 << 20, engine: str = "threads",
                      threads: int = 4) -> tuple[float, float]:
    """(write, read) rates of offload files under ``path``, GB/s, through the offload I/O engine."""
    store = FileStore(path or tempfile.gettempdir(), engine=engine, threads=threads)
    pool = HostPool(nbytes * 2, pin=False)
    try:
        buf = pool.acquire(nbytes)
        assert buf is not None
        buf = buf[:nbytes]
        buf.fill_(7)
        target = store.new_path()
        t0 = time.perf_counter()
        for f in store.write(buf, target):
            f.result()
        t1 = time.perf_counter()
        for f in store.read(buf, target):
            f.result()
        t2 = time.perf_counter()
        store.remove(target)
        return nbytes / (t1 - t0) / 1e9, nbytes / (t2 - t1) / 1e9
    finally:
        store.close()
        pool.close()
