"""The one result format every benchmark writes (docs/design.md, "Benchmark result format").

Results are ratios against a baseline measured in the same run, because the machines are noisy;
the file is only ever written by a real run of the benchmark, never edited by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag() -> str:
    """``cpu``, ``h100``, ``h200x2``...: the suffix of the result file."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower()
            kind = next((k for k in ("h200", "h100", "a100", "l40s", "a10g") if k in name), name.split()[-1])
            n = torch.cuda.device_count()
            return kind if n == 1 else f"{kind}x{n}"
    except ImportError:
        pass
    return "cpu"


def head_commit() -> str:
    """HEAD of the checkout, ``-dirty`` when tracked files differ from it; ``$SEQMESH_COMMIT`` where the tree
    travelled without its .git or with a stale one (GPU runs: a copy's HEAD once named a commit sessions
    older than the files that ran, so a result would have named code it did not measure)."""
    if os.environ.get("SEQMESH_COMMIT"):
        return os.environ["SEQMESH_COMMIT"]
    try:
        git = ["git", "-C", str(RESULTS.parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        return f"{head}-dirty" if changed else head
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, config: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any],
                 device: str | None = None, out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>_<device>.json`` and print the summary as the last line."""
    device = device or device_tag()
    record = {
        "benchmark": name,
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": head_commit(),
        "config": config,
        "rows": rows,
        "summary": summary,
    }
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary))
    return path
