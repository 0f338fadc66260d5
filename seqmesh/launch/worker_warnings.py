"""Workers' warnings, kept in the run directory so the driver can show them.

Ray's worker output stays off the console by default (``launch.verbose=false``), but a warning
such as "skipping checkpoint step 4: checksum mismatch" is something the user must see. Each
worker appends its Python warnings and the ``seqmesh`` logger's warnings to
``RUN_DIR/warnings.jsonl``; the driver prints those written during its own invocation, once each,
under the end-of-run summary (or the failure message).
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FILE = "warnings.jsonl"


class _FileHandler(logging.Handler):
    def __init__(self, path: Path, rank: int) -> None:
        super().__init__(logging.WARNING)
        self.path, self.rank = path, rank

    def emit(self, record: logging.LogRecord) -> None:
        _append(self.path, self.rank, record.getMessage())


def _append(path: Path, rank: int, message: str) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"rank": rank, "message": message}) + "\n")


@contextmanager
def record_warnings(run_dir: str | Path, rank: int) -> Iterator[None]:
    """Within this block, copy this process's warnings into ``run_dir/warnings.jsonl`` (as well as
    showing them as usual)."""
    path = Path(run_dir) / FILE
    shown = warnings.showwarning
    handler = _FileHandler(path, rank)

    def show(message, category, filename, lineno, file=None, line=None):
        _append(path, rank, f"{category.__name__}: {message}")
        shown(message, category, filename, lineno, file, line)

    logger = logging.getLogger("seqmesh")
    warnings.showwarning = show
    logger.addHandler(handler)
    try:
        yield
    finally:
        warnings.showwarning = shown
        logger.removeHandler(handler)


def warnings_offset(run_dir: str | Path) -> int:
    """Where this invocation's warnings will start in the file (its current size)."""
    path = Path(run_dir) / FILE
    return path.stat().st_size if path.exists() else 0


def new_warnings(run_dir: str | Path, offset: int) -> list[str]:
    """The distinct warnings written since ``offset``, each with the ranks that raised it."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    if path.stat().st_size < offset:  # the run directory was replaced (overwrite=true) meanwhile
        offset = 0
    ranks: dict[str, list[int]] = {}
    with path.open() as f:
        f.seek(offset)
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed worker
                continue
            ranks.setdefault(rec["message"], []).append(rec["rank"])
    return [f"{msg} (rank {', '.join(map(str, sorted(set(r))))})" for msg, r in ranks.items()]
