"""Shared pieces of the end-to-end benchmarks: synthetic corpora of chosen lengths, and running
the real step loop (``seqmesh.launch.torchrun``) as one process per GPU.

Documents are random printable bytes read with the byte tokenizer, so a document of ``n - 1``
bytes is exactly ``n`` tokens (its end-of-text token included): the benchmark controls the length
distribution exactly, and the token values do not matter to throughput.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, lengths: Sequence[int], seed: int = 0) -> Path:
    """A .jsonl corpus whose documents are exactly ``lengths`` tokens under the byte tokenizer."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:()", dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n in lengths:
            text = alphabet[rng.integers(0, len(alphabet), int(n) - 1)].tobytes().decode()
            f.write(json.dumps({"text": text}) + "\n")
    return path


def run_loop(overrides: Sequence[str], nproc: int, run_dir: Path, timeout_s: float = 900,
             device: str = "cuda") -> dict[str, Any]:
    """Train with the real step loop on ``nproc`` local GPUs; returns summary.json plus the step records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "seqmesh.launch.torchrun", *overrides, f"launch.num_workers={nproc}", f"run_dir={run_dir}",
           "overwrite=true", "ckpt_every=0", f"launch.device={device}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # Its own session, so a timeout kills the workers too (they would keep holding GPU memory).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s: " + out[-1500:]}
    if proc.returncode != 0:
        errors = [line for line in out.splitlines() if "Error" in line and "ChildFailedError" not in line]
        return {"error": f"exit {proc.returncode}: " + (" | ".join(errors[-3:]) or out[-1500:])}
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["records"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary
