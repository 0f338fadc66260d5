"""Run a training job under Ray Train: the driver side.

The driver prepares the run directory, starts (or joins) a Ray cluster, launches one
``TorchTrainer`` worker per device and shows a progress bar by following the run's
``metrics.jsonl`` (workers never draw progress bars: Ray would interleave their output).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

# Imported here, not in the progress thread: an import in a thread racing the main thread's imports
# failed with ModuleNotFoundError inside Ray jobs.
from seqmesh.launch.monitor import JsonlFollower
from seqmesh.trainer.config import ConfigError, RunConfig, config_to_dict
from seqmesh.trainer.metrics import progress_postfix


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory; refuse to reuse one unless ``resume=true`` or ``overwrite=true``."""
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(run_dir)
        elif not cfg.resume:
            raise ConfigError(f"run_dir {run_dir} already holds a run; pass resume=true to continue it, "
                              f"overwrite=true to replace it, or choose another run_dir=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return run_dir


def _use_gpu(cfg: RunConfig) -> bool:
    if cfg.launch.device == "cpu":
        return False
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.launch.device == "cuda" and gpus < cfg.launch.num_workers:
        raise ConfigError(f"launch.device=cuda needs {cfg.launch.num_workers} GPUs, the Ray cluster has {gpus:g}; "
                          f"lower launch.num_workers or use launch.device=cpu")
    return gpus >= cfg.launch.num_workers


def _init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}}
    if cfg.launch.address:
        # A driver started by `seqmesh submit` inherits its job's runtime env (the uploaded
        # working_dir on every node); this machine's source path would mean nothing on the others.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=cfg.launch.address, runtime_env=None if in_job else env, log_to_driver=True)
        return
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(cfg.launch.num_workers * cfg.launch.cpus_per_worker + 0.999)),
        object_store_memory=cfg.launch.object_store_mb * 1024 * 1024,
        include_dashboard=cfg.launch.dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
    )


class _Progress(threading.Thread):
    """Follows metrics.jsonl and draws one tqdm bar: loss, tokens/s, MFU."""

    def __init__(self, path: Path, total: int) -> None:
        super().__init__(daemon=True)
        self.path, self.total, self.stop = path, total, threading.Event()

    def run(self) -> None:
        bar = tqdm(total=self.total, desc="train", unit="step", dynamic_ncols=True)
        follower = JsonlFollower(self.path)
        while not self.stop.wait(0.5):
            for rec in follower.new_records():
                bar.n = rec["step"]
                bar.set_postfix(progress_postfix(rec), refresh=False)
                bar.refresh()
        bar.close()


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` on Ray; returns the run's summary (also in ``RUN_DIR/summary.json``)."""
    import ray
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from seqmesh.launch.worker import train_worker

    run_dir = prepare_run_dir(cfg)
    _init_ray(cfg)
    use_gpu = _use_gpu(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config_to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.launch.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.launch.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(name=run_dir.name, storage_path=str(run_dir / "ray"),
                                failure_config=FailureConfig(max_failures=cfg.launch.max_failures)),
    )
    progress = _Progress(run_dir / "metrics.jsonl", cfg.steps)
    progress.start()
    try:
        trainer.fit()
    finally:
        progress.stop.set()
        progress.join()
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"training ended without writing {summary_path}; see the worker logs above")
    return json.loads(summary_path.read_text())
