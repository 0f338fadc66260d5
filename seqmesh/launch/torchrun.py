"""Run the step loop under ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE), without Ray.

For SLURM sites that launch with srun/torchrun, and for benchmarks that want one process per GPU
with nothing in between: ``torchrun --nproc_per_node 8 -m seqmesh.launch.torchrun steps=100 ...``.
Each rank composes the same config files with the same overrides (Hydra's compose API writes no
output directory, so ranks cannot race); rank 0 prepares the run directory.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    from seqmesh.launch.allocator import prefer_expandable_segments
    from seqmesh.launch.config import load_config
    from seqmesh.launch.ray_driver import prepare_run_dir
    from seqmesh.trainer.loop import train

    prefer_expandable_segments()
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    use_cuda = cfg.launch.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                            device_id=device if use_cuda else None)
    if dist.get_world_size() != cfg.launch.num_workers:
        raise SystemExit(f"launched {dist.get_world_size()} ranks but launch.num_workers={cfg.launch.num_workers}; "
                         f"pass launch.num_workers={dist.get_world_size()}")
    if dist.get_rank() == 0:
        prepare_run_dir(cfg)
    dist.barrier()
    try:
        summary = train(cfg, cfg.run_dir, device)
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print({k: summary.get(k) for k in ("first_loss", "last_loss", "mean_tokens_per_s_per_device", "mean_mfu")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
