"""Build-once cache directories, safe when several processes (Ray workers) ask at the same time.

A directory is built under a temporary name and renamed into place, so a reader never sees half of
one; a file lock makes the other processes wait for the first builder instead of repeating its work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEQMESH_CACHE", Path.home() / ".cache" / "seqmesh")) / "data"


def build_once(target: Path, build: Callable[[Path], None]) -> bool:
    """Make ``target`` with ``build(tmp_dir)`` unless it exists; returns True when it was built now."""
    if target.is_dir():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return False
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True
