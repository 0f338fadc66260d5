"""``seqmesh submit --address ADDR [--working-dir DIR] -- OVERRIDES``: train on a Ray cluster as a job.

The job's entrypoint is ``python -m seqmesh train OVERRIDES launch.address=auto`` on the head node;
its driver joins the cluster (never starts one) and Ray Train places the workers. The overrides are
composed and validated here first, so a typo fails in a second on the laptop instead of after an
upload. ``--working-dir`` ships a source tree (the repository root: seqmesh/ and conf/) to every
node through the job's runtime env; without it the cluster's own seqmesh install runs.

A job runs in a temporary copy of the working dir, so ``run_dir`` must be an absolute path on storage
every node sees (checkpoints are written by every rank): a relative one is refused here.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

from seqmesh.launch.jobs import JobsError, follow_logs, job_client

# Never uploaded: environments, outputs and caches (Ray also honours the tree's .gitignore).
EXCLUDES = [".git", ".venv", "venv", "runs", "outputs", "__pycache__", "*.pt", "*.safetensors", ".device",
            ".pytest_cache", ".hypothesis"]


def _has_override(overrides: Sequence[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def job_spec(overrides: Sequence[str], *, working_dir: str | None = None, python: str = "python",
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate ``overrides`` and build the ``submit_job`` arguments (entrypoint, runtime env, metadata)."""
    from seqmesh.launch.config import load_config
    from seqmesh.trainer.config import ConfigError

    overrides = list(overrides)
    cfg = load_config(overrides)
    if not Path(cfg.run_dir).is_absolute():
        raise ConfigError(f"run_dir={cfg.run_dir!r} is relative, but a job runs in a temporary copy of its working "
                          f"dir on the head node; pass run_dir=/ABSOLUTE/PATH on storage every node sees")
    if cfg.launch.address is None:
        overrides.append("launch.address=auto")  # the driver joins the cluster it runs on
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        root = Path(working_dir).expanduser().resolve()
        if not (root / "seqmesh").is_dir() or not (root / "conf" / "config.yaml").is_file():
            raise ConfigError(f"--working-dir {root} is not a seqmesh source tree (it needs seqmesh/ and "
                              f"conf/config.yaml); pass the repository root, or leave it out to run the "
                              f"cluster's installed seqmesh")
        runtime_env = {"working_dir": str(root), "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    return {"entrypoint": shlex.join([python, "-m", "seqmesh", "train", *overrides]),
            "runtime_env": runtime_env or None,
            "metadata": {"run_dir": cfg.run_dir, "overrides": shlex.join(overrides), "seqmesh": "train"}}


def submit(address: str | None, overrides: Sequence[str], *, working_dir: str | None = None,
           submission_id: str | None = None, python: str = "python", env: dict[str, str] | None = None) -> str:
    """Submit a training job; returns its submission id."""
    spec = job_spec(overrides, working_dir=working_dir, python=python, env=env)
    client = job_client(address)
    submission_id = submission_id or f"seqmesh-{uuid.uuid4().hex[:10]}"
    try:
        return client.submit_job(submission_id=submission_id, **spec)
    except RuntimeError as exc:
        raise JobsError(f"the cluster refused the job: {exc}") from exc


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def submit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqmesh submit", usage="seqmesh submit --address ADDR [options] -- [OVERRIDES...]",
        description="Submit a training job to a Ray cluster (Ray Jobs API). Everything after -- is passed to "
                    "`seqmesh train` as Hydra overrides.")
    parser.add_argument("--address", help="the head's dashboard, http://HOST:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--working-dir", help="source tree to ship to every node (the seqmesh repository root)")
    parser.add_argument("--job-id", help="submission id (default: seqmesh-<random>)")
    parser.add_argument("--python", default="python", help="the interpreter on the cluster (default: python)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the driver and workers (repeatable), e.g. NCCL_DEBUG=WARN")
    parser.add_argument("--follow", "-f", action="store_true", help="print the job's logs until it ends; exit 1 "
                                                                     "unless it succeeded")
    ours, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    try:
        job_id = submit(args.address, overrides, working_dir=args.working_dir, submission_id=args.job_id,
                        python=args.python, env=_env_pairs(args.env))
    except JobsError as exc:
        print(f"seqmesh submit: {exc}", file=sys.stderr)
        return 1
    print(f"submitted {job_id}")
    if not args.follow:
        print(f"  seqmesh jobs status {job_id}   |   seqmesh jobs logs --follow {job_id}   |   seqmesh jobs stop {job_id}")
        return 0
    try:
        state = follow_logs(args.address, job_id)
    except JobsError as exc:
        print(f"seqmesh submit: {exc}", file=sys.stderr)
        return 1
    print(f"{job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1
