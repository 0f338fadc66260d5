"""Multi-node on loopback, for real: a Ray head and two worker nodes started with ``ray start`` on this
machine, training jobs sent through the Ray Jobs API with ``seqmesh submit``, and a worker killed by
its pid mid-run.

The cluster uses token authentication with a token made here and handed to every process in
``RAY_AUTH_TOKEN`` (nothing is written to ``~/.ray``), its own temp dir and free ports, so it never
meets another cluster on the machine. Every ``ray start`` runs in a new session; the finalizer ends
exactly those sessions' processes (never ``ray stop``, which would also stop other users' clusters).
The head has no CPUs, so the two training workers can only run on the two worker nodes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from seqmesh.launch.report import write_report

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 12
TRAIN = [f"steps={STEPS}", "data.max_bytes=300000", "data.global_batch=4", "launch.num_workers=2", "ckpt_every=2",
         "launch.monitor_interval_s=1", "optim.warmup_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """A head node (dashboard on 127.0.0.1) and worker nodes, each a ``ray start`` of its own session."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="smray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        self.gcs = f"127.0.0.1:{_free_port()}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.dashboard}
        self.sessions: list[int] = []

    def _start(self, name: str, *args: str) -> None:
        ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "metrics-export-port", "runtime-env-agent-port")]
        log = Path(self.temp_dir, f"{name}.log")
        with log.open("w") as out:
            proc = subprocess.Popen([str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                     f"--object-store-memory={80 * 2**20}", *ports, *args],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(proc.pid)  # the node's daemons stay in this session after `ray start` returns
        if proc.wait(timeout=180) != 0:
            raise RuntimeError(f"ray start of the {name} node failed:\n{log.read_text()[-3000:]}")

    def start(self) -> "LoopbackCluster":
        self._start("head", "--head", f"--port={self.gcs.split(':')[1]}", "--num-cpus=0",
                    '--resources={"seqmesh_head": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", f"--ray-client-server-port={_free_port()}",
                    f"--temp-dir={self.temp_dir}")
        for name in ("node_a", "node_b"):  # one at a time: two raylets starting at once can miss Ray's 30 s limit
            self._start(name, f"--address={self.gcs}", "--num-cpus=1", f'--resources={{"{name}": 1}}')
        return self

    def seqmesh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "seqmesh", *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        """End every process of the nodes' sessions: SIGTERM, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._members():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self._members() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _members(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) in self.sessions:
                        found.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    pass
        return found


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


def _submit(cluster: LoopbackCluster, run_dir: Path, workdir: Path, *extra: str) -> str:
    done = cluster.seqmesh("submit", "--working-dir", str(REPO), "--", *TRAIN, f"run_dir={run_dir}",
                           f"data.cache_dir={workdir / 'cache'}", *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def _finish(cluster: LoopbackCluster, job_id: str) -> tuple[bool, str]:
    """Follow the job's logs until it ends (one client process, not a polling loop that competes with
    the job for the two CPUs); returns (succeeded, logs)."""
    done = cluster.seqmesh("jobs", "logs", "--follow", job_id, timeout=300)
    return done.returncode == 0, done.stdout


def _losses(run_dir: Path) -> list[float]:
    """Losses of the complete lines of metrics.jsonl (it may be mid-write)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def reference(cluster: LoopbackCluster, workdir: Path) -> tuple[str, Path, str]:
    """An uninterrupted job across the two worker nodes."""
    run_dir = workdir / "reference"
    job_id = _submit(cluster, run_dir, workdir)
    ok, logs = _finish(cluster, job_id)
    assert ok, logs[-5000:]
    return job_id, run_dir, logs


def test_job_trains_across_two_worker_nodes(cluster: LoopbackCluster, reference: tuple[str, Path, str]) -> None:
    job_id, run_dir, logs = reference
    losses = _losses(run_dir)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    workers = [json.loads((run_dir / "monitor" / f"rank{r}.json").read_text()) for r in range(2)]
    assert workers[0]["node_id"] != workers[1]["node_id"], "both ranks ran on one node"
    for r in range(2):
        samples = [json.loads(line) for line in (run_dir / "monitor" / f"rank{r}.jsonl").read_text().splitlines()]
        assert samples and all(s["gpu"] is None and s["note"].startswith("no GPU") for s in samples)
        assert all(s["cpu"]["process_rss_bytes"] > 0 for s in samples)
    listed = cluster.seqmesh("jobs", "list")
    assert listed.returncode == 0 and job_id in listed.stdout and str(run_dir) in listed.stdout
    # The job's log ends with the driver's one summary (loss first -> last, the run directory).
    assert f"seqmesh: trained {STEPS} steps" in logs and f"run dir     {run_dir}" in logs
    assert "Exception in thread" not in logs
    png, _ = write_report(run_dir)
    assert png.stat().st_size > 10_000


def test_killed_worker_restarts_from_last_intact_checkpoint(cluster: LoopbackCluster, reference: tuple[str, Path, str],
                                                            workdir: Path) -> None:
    """Kill rank 1 mid-run after damaging the newest checkpoint: Ray Train restarts the group, which
    skips the damaged step (checksum) with a warning, resumes from the one before, and ends with
    exactly the losses of the uninterrupted run."""
    run_dir = workdir / "killed"
    job_id = _submit(cluster, run_dir, workdir, "launch.max_failures=1")
    deadline = time.monotonic() + 240
    while len(_losses(run_dir)) < 5:
        assert time.monotonic() < deadline, cluster.seqmesh("jobs", "logs", job_id).stdout[-5000:]
        time.sleep(0.05)
    pids = [json.loads((run_dir / "monitor" / f"rank{r}.json").read_text())["pid"] for r in range(2)]
    for pid in pids:  # freeze both ranks, so no newer checkpoint appears while we pick the one to damage
        os.kill(pid, signal.SIGSTOP)
    steps = sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*"))
    newest = steps[-1]
    assert len(steps) >= 2 and newest < STEPS, f"checkpoints {steps}: the run got too far before the kill"
    damaged = run_dir / "checkpoints" / f"step_{newest:08d}" / "rank1.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    os.kill(pids[1], signal.SIGKILL)
    os.kill(pids[0], signal.SIGCONT)

    ok, logs = _finish(cluster, job_id)
    assert ok, logs[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == steps[-2]
    assert f"skipping checkpoint step {newest}" in logs
    assert json.loads((run_dir / "monitor" / "rank1.json").read_text())["pid"] != pids[1]
    assert _losses(run_dir) == _losses(reference[1])
