"""The function each Ray Train worker runs: rebuild the config, then enter the step loop.

Ray Train has already initialised ``torch.distributed`` (gloo or NCCL) when this runs; the step
loop itself knows nothing of Ray, so tests drive it directly under plain gloo processes.
"""

from __future__ import annotations

from typing import Any

import torch


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from seqmesh.trainer.config import config_from_dict
    from seqmesh.trainer.loop import train

    cfg = config_from_dict(loop_config["config"])
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    device = ray.train.torch.get_device()
    summary = train(cfg, loop_config["run_dir"], device)
    # Ray Train's report is collective: every worker calls it (rank 0's summary holds the figures).
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})
