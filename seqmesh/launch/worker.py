"""The function each Ray Train worker runs: rebuild the config, start the monitor, enter the step loop.

Ray Train has already initialised ``torch.distributed`` (gloo or NCCL) when this runs; the step
loop itself knows nothing of Ray, so tests drive it directly under plain gloo processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from seqmesh.launch.allocator import prefer_expandable_segments
    from seqmesh.launch.monitor import Monitor
    from seqmesh.launch.worker_warnings import record_warnings
    from seqmesh.trainer.config import config_from_dict
    from seqmesh.trainer.loop import train

    # Ray Train calls this function again after a worker failure (launch.max_failures). The run
    # directory holds only this run's checkpoints (the driver's prepare_run_dir refuses anyone
    # else's), so resuming from what it holds is right on the first attempt (nothing: step 0) and
    # after a restart (the newest intact checkpoint).
    prefer_expandable_segments()
    cfg = dataclasses.replace(config_from_dict(loop_config["config"]), resume=True)
    run_dir = loop_config["run_dir"]
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    device = ray.train.torch.get_device()
    ctx = ray.train.get_context()
    monitor = None
    if cfg.launch.monitor_interval_s > 0:
        monitor = Monitor(run_dir, rank=ctx.get_world_rank(), local_rank=ctx.get_local_rank(), device=device,
                          interval_s=cfg.launch.monitor_interval_s, prometheus_host=cfg.launch.prometheus_host,
                          prometheus_port=cfg.launch.prometheus_port, follow_metrics=ctx.get_world_rank() == 0,
                          extra_info={"node_id": ray.get_runtime_context().get_node_id(),
                                      "node_ip": ray.util.get_node_ip_address()}).start()
    try:
        with record_warnings(run_dir, ctx.get_world_rank()):
            summary = train(cfg, run_dir, device)
    finally:
        if monitor is not None:
            monitor.stop()
    # Ray Train's report is collective: every worker calls it (rank 0's summary holds the figures).
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})
