"""``seqmesh jobs list|status|logs|stop``: watch and control jobs sent by ``seqmesh submit``.

A thin layer over Ray's ``JobSubmissionClient`` (the Ray dashboard's HTTP API), so the same jobs are
visible in ``ray job ...`` and the dashboard; what it adds is seqmesh's view (the run directory of
each job) and error messages that say what to check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """The cluster cannot be reached, or refused a request; the message says what to check."""


def job_client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (the head's dashboard, http://HOST:8265) or ``$RAY_ADDRESS``."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 (the head node's Ray dashboard) or set "
                        "RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection, HTTP and authentication errors all come through here
        raise JobsError(_explain(address, exc)) from exc


def _explain(address: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    hint = ("the head must run the dashboard (ray start --head --include-dashboard=true --dashboard-port 8265); "
            "check the address and that this machine can reach it (e.g. through an SSH tunnel)")
    if "ray[default]" in text:
        hint = "this machine's Ray lacks the Jobs API client: pip install 'ray[default]'"
    elif "uthenticat" in text or "token" in text.lower():
        hint = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or the file "
                "~/.ray/auth_token) to the cluster's token in this shell")
    return f"cannot use the Ray Jobs API at {address} ({text.splitlines()[0]}); {hint}"


def _call(address: str | None, fn: str, *args: Any) -> Any:
    client = job_client(address)
    try:
        return getattr(client, fn)(*args)
    except RuntimeError as exc:  # the SDK raises RuntimeError for HTTP errors (unknown job id, ...)
        raise JobsError(f"{fn.replace('_', ' ')} {' '.join(map(str, args))}: {exc}") from exc


def status(address: str | None, job_id: str) -> dict[str, Any]:
    """The job's status, message, timing and seqmesh metadata as a plain dict."""
    info = _call(address, "get_job_info", job_id)
    return {"job_id": job_id, "status": str(info.status),
            "message": info.message, "entrypoint": info.entrypoint, "metadata": dict(info.metadata or {}),
            "start_time": info.start_time, "end_time": info.end_time}


def follow_logs(address: str | None, job_id: str, out: Any = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    client = job_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:
        raise JobsError(f"logs of {job_id}: {exc}") from exc
    return wait(address, job_id, timeout_s=60)


def wait(address: str | None, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Wait until the job ends (or ``timeout_s``); returns its status."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(address, job_id)["status"]
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def jobs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seqmesh jobs", description="Watch and control seqmesh jobs on a Ray cluster.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="the head's dashboard, http://HOST:8265 (default: $RAY_ADDRESS)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="every job the cluster knows, newest last")
    for name, text in (("status", "a job's status and run directory"), ("logs", "a job's driver output"),
                       ("stop", "stop a job (its workers are killed; its checkpoints stay)")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job_id")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="return once the job has stopped")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            jobs = sorted(_call(args.address, "list_jobs"), key=lambda j: j.start_time or 0)
            for job in jobs:
                run_dir = (job.metadata or {}).get("run_dir", "")
                print(f"{job.submission_id or job.job_id}\t{job.status}\t{run_dir}\t{job.entrypoint}")
        elif args.action == "status":
            info = status(args.address, args.job_id)
            print(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
            if info["metadata"].get("run_dir"):
                print(f"run_dir: {info['metadata']['run_dir']}")
        elif args.action == "logs":
            if args.follow:
                state = follow_logs(args.address, args.job_id)
                return 0 if state == "SUCCEEDED" else 1
            print(_call(args.address, "get_job_logs", args.job_id), end="")
        else:
            stopped = _call(args.address, "stop_job", args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'already ended'}")
            if args.wait:
                print(f"{args.job_id}: {wait(args.address, args.job_id, timeout_s=120)}")
    except JobsError as exc:
        print(f"seqmesh jobs: {exc}", file=sys.stderr)
        return 1
    return 0
