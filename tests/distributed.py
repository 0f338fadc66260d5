"""Run a test function in N gloo processes and collect what each rank returns.

Every distributed test in seqmesh compares a multi-process run against a single-process
reference; this helper is the one way such runs are started, so they all share the same
rendezvous (a file store in a temp dir: no ports to collide between parallel test runs).
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(init_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result: Any = fn(rank, world, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - the traceback is re-raised in the parent
        payload = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    # Leave without running C++ static destructors: at interpreter exit, after everything above had
    # finished and been written, gloo workers aborted now and then ("terminate called without an
    # active exception": a thread still joinable when its owner is destroyed), failing a test that
    # had passed. The result is on disk; there is nothing left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    ``fn`` must be importable (module level) and return picklable values (tensors are fine).
    A failure on any rank raises here with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.start_processes(_worker, args=(world_size, init_file, tmp, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
