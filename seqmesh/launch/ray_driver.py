"""Run a training job under Ray Train: the driver side.

The driver prepares the run directory, starts (or joins) a Ray cluster, launches one
``TorchTrainer`` worker per device and shows a progress bar by following the run's
``metrics.jsonl`` (workers never draw progress bars: Ray would interleave their output).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

# Imported here, not in the progress thread: an import in a thread racing the main thread's imports
# failed with ModuleNotFoundError inside Ray jobs.
from seqmesh.launch.monitor import JsonlFollower
from seqmesh.trainer.config import ConfigError, RunConfig, config_to_dict
from seqmesh.trainer.metrics import progress_postfix


MARKER = ".seqmesh-run"  # written into every run directory: what overwrite=true may delete


class NothingToDo(Exception):
    """The run asked for is already complete; the message says so and how to extend it."""


def is_seqmesh_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is recognisably a seqmesh run: it holds the marker, or (runs made before the
    marker) a ``config.yaml`` that is a seqmesh configuration."""
    if (run_dir / MARKER).is_file():
        return True
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"model", "data", "launch", "run_dir", "steps"} <= set(saved)


def has_progress(run_dir: Path) -> bool:
    """Whether a run got as far as a training step (a start that failed earlier left nothing worth keeping)."""
    metrics = run_dir / "metrics.jsonl"
    checkpoints = run_dir / "checkpoints"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "summary.json").exists()
            or (checkpoints.is_dir() and any(checkpoints.iterdir())))


def _unsafe_to_delete(run_dir: Path) -> str | None:
    """Why ``run_dir`` must never be deleted, whatever marks it as a run; None when it may be."""
    cwd = Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents:
        return f"it contains the current directory {cwd}"
    if run_dir == Path.home().resolve() or run_dir.parent == run_dir:
        return "it is your home directory or a filesystem root"
    for dirpath, dirnames, filenames in os.walk(run_dir):
        if ".git" in dirnames or ".git" in filenames:
            return f"it contains a git checkout ({dirpath})"
    return None


def _plain(value: Any) -> Any:
    """Tuples as lists, so yaml.safe_dump can write the config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory; refuse to reuse one unless ``resume=true`` or ``overwrite=true``.

    Only a recognisable seqmesh run (its ``.seqmesh-run`` marker) is ever replaced, never a directory
    holding the current directory or a git checkout. A run that never reached its first step (a start
    that failed) is reused without asking.
    """
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory; choose another run_dir=...")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not is_seqmesh_run(run_dir):
            raise ConfigError(
                f"run_dir {run_dir} is not empty and is not a seqmesh run (it has no {MARKER} file); seqmesh "
                f"{'only ever deletes its own run directories' if cfg.overwrite else 'keeps each run in a directory of its own'}"
                f". Choose a new or empty directory with run_dir=..., or move that directory's contents away "
                f"yourself. Nothing was deleted.")
        if cfg.overwrite:
            reason = _unsafe_to_delete(run_dir)
            if reason:
                raise ConfigError(f"overwrite=true would delete {run_dir}, but {reason}; seqmesh never deletes such a "
                                  f"directory. Choose another run_dir=... Nothing was deleted.")
            shutil.rmtree(run_dir)
        elif not cfg.resume and has_progress(run_dir):
            raise ConfigError(f"run_dir {run_dir} already holds a run; pass resume=true to continue it, "
                              f"overwrite=true to replace it, or choose another run_dir=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(_plain(config_to_dict(cfg)), sort_keys=False))
    os.replace(tmp, run_dir / "config.yaml")
    return run_dir


def finished_message(cfg: RunConfig) -> str | None:
    """With ``resume=true``: what to tell the user when the run has nothing left to do, else None."""
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if not cfg.resume or not (run_dir / "summary.json").is_file():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        last = int(summary["last_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    loss = ""
    if isinstance(summary.get("first_loss"), (int, float)) and isinstance(summary.get("last_loss"), (int, float)):
        loss = f" (loss {summary['first_loss']:.4g} -> {summary['last_loss']:.4g})"
    if last >= cfg.steps:
        return (f"run {run_dir} is finished: all {cfg.steps} of its steps are done{loss}. Nothing was changed. To "
                f"train it further, resume with more steps, e.g. `seqmesh train run_dir={cfg.run_dir} resume=true "
                f"steps={2 * last}`; to look at it: `seqmesh report {cfg.run_dir}`.")
    if cfg.stop_at is not None and last >= cfg.stop_at:
        return (f"run {run_dir} is already at step {last} of {cfg.steps}, past stop_at={cfg.stop_at}{loss}. Nothing "
                f"was changed. To continue it: resume=true with stop_at above {last}, or without stop_at to run to "
                f"step {cfg.steps}.")
    return None


def _use_gpu(cfg: RunConfig) -> bool:
    if cfg.launch.device == "cpu":
        return False
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.launch.device == "cuda" and gpus < cfg.launch.num_workers:
        raise ConfigError(f"launch.device=cuda needs {cfg.launch.num_workers} GPUs, the Ray cluster has {gpus:g}; "
                          f"lower launch.num_workers or use launch.device=cpu")
    return gpus >= cfg.launch.num_workers


def _quiet_ray(verbose: bool) -> None:
    """Keep Ray's own INFO lines (cluster start, worker-group events, "Reporting training result ...")
    off the console unless ``launch.verbose=true``; warnings and errors still show."""
    if verbose:
        return
    import logging

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _init_ray(cfg: RunConfig) -> None:
    import logging

    import ray

    if ray.is_initialized():
        return
    verbose = cfg.launch.verbose
    _quiet_ray(verbose)
    # Worker output (their Python logging, Ray Train's per-worker report lines) reaches the console only
    # with launch.verbose=true; a worker's error still does, as the exception trainer.fit() raises.
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}}
    if cfg.launch.address:
        # A driver started by `seqmesh submit` inherits its job's runtime env (the uploaded
        # working_dir on every node); this machine's source path would mean nothing on the others.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=cfg.launch.address, runtime_env=None if in_job else env, **quiet)
        return
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(cfg.launch.num_workers * cfg.launch.cpus_per_worker + 0.999)),
        object_store_memory=cfg.launch.object_store_mb * 1024 * 1024,
        include_dashboard=cfg.launch.dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=env,
        **quiet,
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
    from seqmesh.trainer.data import check_data

    # Everything that can be checked without workers is, before anything is written or Ray starts:
    # a finished run is left as it is, bad data is named, and no run directory is made for a start
    # that cannot succeed.
    message = finished_message(cfg)
    if message:
        raise NothingToDo(message)
    try:
        skipped = check_data(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if skipped and cfg.data.skip_bad_documents:
        print(f"seqmesh: data.skip_bad_documents=true: leaving out {len(skipped)} document(s) that are not "
              f"readable text: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}", file=sys.stderr)
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
