"""Which documents a run trains on, in a fixed order, and how they split into train/validation.

Enumeration only stats files (no reads), so a cached run can check that its cache still matches
the corpus in milliseconds. A document's split is decided by a hash of its *name* (a path relative
to the source), never by its position: adding or removing other files, or changing a byte limit,
leaves every remaining document on the same side of the split.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
STDLIB_SUFFIXES = (".py", ".txt", ".rst")
# Skipped inside the stdlib folder: third-party packages (they differ from machine to machine) and
# the top-level regression-test package ``test`` (Debian/Ubuntu ship it separately, so including it
# would make the default corpus differ between fresh machines; it also holds deliberately
# malformed fixtures). The tests of individual packages (e.g. idlelib/idle_test) stay.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}
_STDLIB_SKIP_TOP = frozenset({"test"})


@dataclass(frozen=True)
class DocRef:
    """Where one document lives: a whole file, or one line of a JSONL file (``line`` >= 1)."""

    name: str
    path: Path
    nbytes: int
    line: int | None = None


@dataclass(frozen=True)
class Corpus:
    """An ordered list of documents plus a fingerprint that changes whenever any of them could have."""

    source: str
    docs: tuple[DocRef, ...]
    fingerprint: str


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _fingerprint(root: str, docs: Iterable[DocRef], files: Iterable[Path]) -> str:
    h = hashlib.sha256(root.encode())
    for d in docs:
        h.update(f"\0{d.name}\0{d.nbytes}".encode())
    for f in sorted(set(files)):
        h.update(f"\0{f}\0{_stat_key(f)}".encode())
    return h.hexdigest()[:20]


def _reraise(error: OSError) -> None:
    raise error


def _walk(root: Path, suffixes: tuple[str, ...], skip: set[str], skip_top: frozenset[str] = frozenset()) -> list[Path]:
    """Files under root ending in ``suffixes``, sorted by relative path. Folders named in ``skip``
    (anywhere) or ``skip_top`` (directly under root) are never descended."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_reraise):
        top = skip_top if dirpath == str(root) else frozenset()
        dirnames[:] = [d for d in dirnames if d not in skip and d not in top]
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes)]
    return sorted((Path(f) for f in found if os.path.isfile(f)), key=lambda p: p.relative_to(root).as_posix())


def _jsonl_refs(path: Path, name: str) -> list[DocRef]:
    refs = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                refs.append(DocRef(f"{name}:{lineno}", path, len(raw), lineno))
    return refs


def _file_refs(files: list[Path], root: Path) -> list[DocRef]:
    refs: list[DocRef] = []
    for p in files:
        name = p.relative_to(root).as_posix() if p != root else p.name
        if p.suffix == JSONL_SUFFIX:
            refs.extend(_jsonl_refs(p, name))
        else:
            refs.append(DocRef(name, p, p.stat().st_size))
    return refs


def check_source(source: str) -> None:
    if source != STDLIB and not Path(source).expanduser().exists():
        raise ValueError(
            f"data.source={source!r} is neither 'stdlib' nor an existing path; set data.source=stdlib or "
            f"to a directory of {'/'.join(TEXT_SUFFIXES + (JSONL_SUFFIX,))} files or a .jsonl file"
        )


def check_limits(max_docs: int | None, max_bytes: int | None) -> None:
    for key, value in (("max_docs", max_docs), ("max_bytes", max_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"data.{key}={value} must be >= 1 (or null for no limit)")


def _limit(refs: list[DocRef], max_docs: int | None, max_bytes: int | None) -> list[DocRef]:
    """First documents in sorted order until a limit is reached, so a limit is a stable prefix."""
    if max_docs is not None:
        refs = refs[:max_docs]
    if max_bytes is not None:
        kept, total = [], 0
        for r in refs:
            if total + r.nbytes > max_bytes and kept:
                break
            kept.append(r)
            total += r.nbytes
        refs = kept
    return refs


def open_corpus(source: str, max_docs: int | None = None, max_bytes: int | None = None) -> Corpus:
    """Enumerate ``source``: ``"stdlib"``, a directory, a ``.jsonl`` file (one ``{"text": ...}`` per
    line) or a single text file (one document)."""
    check_source(source)
    check_limits(max_docs, max_bytes)
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        suffixes, skip, skip_top = STDLIB_SUFFIXES, _STDLIB_SKIP, _STDLIB_SKIP_TOP
    else:
        root = Path(source).expanduser()
        suffixes, skip, skip_top = TEXT_SUFFIXES + (JSONL_SUFFIX,), {"__pycache__"}, frozenset()
    try:
        refs = _file_refs(_walk(root, suffixes, skip, skip_top) if root.is_dir() else [root], root)
    except PermissionError as e:
        raise ValueError(f"data.source={source!r} cannot be read ({e}); fix its permissions or point "
                         f"data.source elsewhere") from e
    refs = _limit(refs, max_docs, max_bytes)
    if not refs:
        raise ValueError(
            f"data.source={source!r} holds no documents (looked for {', '.join(TEXT_SUFFIXES)} files and "
            f".jsonl lines); point data.source at a directory with text files or a non-empty .jsonl file"
        )
    return Corpus(str(root), tuple(refs), _fingerprint(str(root), refs, {r.path for r in refs}))


def is_validation(name: str, val_fraction: float) -> bool:
    """Stable split: the document's name hashed to [0, 1) and compared with the fraction."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _jsonl_text(raw: bytes, ref: DocRef) -> str:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ref.path}:{ref.line} is not valid JSON ({e.msg}); every line of a .jsonl "
                         f"source must be one object like {{\"text\": \"...\"}}") from e
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{ref.path}:{ref.line} has no string field \"text\"; every line of a .jsonl "
                         f"source must be one object like {{\"text\": \"...\"}}")
    return text


def read_texts(docs: Iterable[DocRef]) -> Iterator[str | None]:
    """The text of each document in order, or None where a file is not UTF-8 (the caller counts
    and drops those: a corpus of source files always has a few, e.g. encoding test fixtures)."""
    lines_of: tuple[Path, list[bytes]] | None = None
    for ref in docs:
        if ref.line is None:
            try:
                yield ref.path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                yield None
            continue
        if lines_of is None or lines_of[0] != ref.path:
            lines_of = (ref.path, ref.path.read_bytes().split(b"\n"))
        yield _jsonl_text(lines_of[1][ref.line - 1], ref)
