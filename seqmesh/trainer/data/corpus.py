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
from typing import Any, Iterable, Iterator

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
# Tables as the ``datasets`` library keeps them on disk: Parquet files and Arrow files (``save_to_disk``
# writes Arrow IPC streams); one document per row, its text in the ``data.text_column`` column.
TABLE_SUFFIXES = (".parquet", ".arrow")
SOURCE_SUFFIXES = TEXT_SUFFIXES + (JSONL_SUFFIX,) + TABLE_SUFFIXES
SKIP_HINT = "or set data.skip_bad_documents=true to leave such documents out (each one is named when skipped)"
STDLIB_SUFFIXES = (".py", ".txt", ".rst")
# Skipped inside the stdlib folder: third-party packages (they differ from machine to machine) and
# the top-level regression-test package ``test`` (Debian/Ubuntu ship it separately, so including it
# would make the default corpus differ between fresh machines; it also holds deliberately
# malformed fixtures). The tests of individual packages (e.g. idlelib/idle_test) stay.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}
_STDLIB_SKIP_TOP = frozenset({"test"})


@dataclass(frozen=True)
class DocRef:
    """Where one document lives: a whole file, one line of a JSONL file or one row of a Parquet/Arrow
    table (``line`` >= 1: the line or row number)."""

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


def read_table_column(path: Path, column: str):
    """The ``column`` of a Parquet or Arrow file as a pyarrow ChunkedArray; ValueError naming the columns
    there are when it is missing or holds no strings."""
    import pyarrow as pa

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=[column]) if column in names else None
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    reader = pa.ipc.open_file(source)
                except pa.ArrowInvalid:  # datasets' save_to_disk writes the streaming format
                    source.seek(0)
                    reader = pa.ipc.open_stream(source)
                table = reader.read_all()
            names = table.column_names
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"data.source: {path} cannot be read as a {path.suffix[1:]} table ({e}); check that the "
                         f"file is complete, or remove it from the source") from e
    if table is None or column not in names:
        raise ValueError(f"data.source: {path} has no column {column!r} (its columns: {', '.join(names) or 'none'}); "
                         f"set data.text_column to the column that holds the documents' text")
    col = table.column(column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ValueError(f"data.source: column {column!r} of {path} holds {col.type}, not text (its columns: "
                         f"{', '.join(f'{n} ({t})' for n, t in zip(names, table.schema.types))}); set "
                         f"data.text_column to a string column")
    return col


def _table_refs(path: Path, name: str, column: str) -> list[DocRef]:
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.binary_length(read_table_column(path, column)), 0).to_pylist()
    return [DocRef(f"{name}:{row}", path, n, row) for row, n in enumerate(lengths, start=1)]


def _file_refs(files: list[Path], root: Path, text_column: str = "text") -> list[DocRef]:
    refs: list[DocRef] = []
    for p in files:
        name = p.relative_to(root).as_posix() if p != root else p.name
        if p.suffix == JSONL_SUFFIX:
            refs.extend(_jsonl_refs(p, name))
        elif p.suffix in TABLE_SUFFIXES:
            refs.extend(_table_refs(p, name, text_column))
        else:
            refs.append(DocRef(name, p, p.stat().st_size))
    return refs


def check_source(source: str) -> None:
    if source != STDLIB and not Path(source).expanduser().exists():
        raise ValueError(
            f"data.source={source!r} is neither 'stdlib' nor an existing path; set data.source=stdlib or "
            f"to a directory of {'/'.join(SOURCE_SUFFIXES)} files or one such file"
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


def open_corpus(source: str, max_docs: int | None = None, max_bytes: int | None = None,
                text_column: str = "text") -> Corpus:
    """Enumerate ``source``: ``"stdlib"``, a directory, a ``.jsonl`` file (one ``{"text": ...}`` per
    line), a ``.parquet``/``.arrow`` table (one document per row, text in ``text_column``) or a single
    text file (one document)."""
    check_source(source)
    check_limits(max_docs, max_bytes)
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        suffixes, skip, skip_top = STDLIB_SUFFIXES, _STDLIB_SKIP, _STDLIB_SKIP_TOP
    else:
        root = Path(source).expanduser()
        suffixes, skip, skip_top = SOURCE_SUFFIXES, {"__pycache__"}, frozenset()
    try:
        refs = _file_refs(_walk(root, suffixes, skip, skip_top) if root.is_dir() else [root], root, text_column)
    except PermissionError as e:
        raise ValueError(f"data.source={source!r} cannot be read ({e}); fix its permissions or point "
                         f"data.source elsewhere") from e
    refs = _limit(refs, max_docs, max_bytes)
    if not refs:
        raise ValueError(
            f"data.source={source!r} holds no documents (looked for {', '.join(TEXT_SUFFIXES)} files, "
            f".jsonl lines and .parquet/.arrow rows); point data.source at a directory with text files or a "
            f"non-empty .jsonl, .parquet or .arrow file"
        )
    # The text column picks the documents' content; "text" (the default) keeps older caches' keys.
    key = str(root) if text_column == "text" else f"{root}\0column={text_column}"
    return Corpus(str(root), tuple(refs), _fingerprint(key, refs, {r.path for r in refs}))


def is_validation(name: str, val_fraction: float) -> bool:
    """Stable split: the document's name hashed to [0, 1) and compared with the fraction."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


class BadDocument(ValueError):
    """A document that cannot be read as text; the message names the file, the line and the fixes."""


def _not_utf8(ref: DocRef, data: bytes, error: UnicodeDecodeError, offset_line: int | None = None) -> BadDocument:
    if offset_line is None:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    else:
        line, column = offset_line, error.start + 1
    return BadDocument(
        f"data.source: {ref.path} line {line} is not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
        f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {ref.path.name} > {ref.path.stem}.utf8"
        f"{ref.path.suffix}), {SKIP_HINT}")


def _jsonl_text(raw: bytes, ref: DocRef, text_column: str = "text") -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(ref, raw, e, ref.line) from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadDocument(f"data.source: {ref.path} line {ref.line} is not valid JSON ({e.msg}); every line of a "
                          f".jsonl source must be one object like {{\"{text_column}\": \"...\"}}: fix that line, "
                          f"{SKIP_HINT}") from None
    text = record.get(text_column) if isinstance(record, dict) else None
    if not isinstance(text, str):
        fields = f" (its fields: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
        raise BadDocument(f"data.source: {ref.path} line {ref.line} has no string field \"{text_column}\"{fields}; "
                          f"set data.text_column to the field that holds the text, {SKIP_HINT}")
    return text


def iter_texts(docs: Iterable[DocRef], text_column: str = "text") -> Iterator[tuple[DocRef, str | BadDocument]]:
    """Each document with its text, or the BadDocument error that says why it has none."""
    lines_of: tuple[Path, list[bytes]] | None = None
    column_of: tuple[Path, Any] | None = None
    for ref in docs:
        if ref.line is None:
            data = ref.path.read_bytes()
            try:
                yield ref, data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ref, _not_utf8(ref, data, e)
        elif ref.path.suffix in TABLE_SUFFIXES:
            if column_of is None or column_of[0] != ref.path:
                column_of = (ref.path, read_table_column(ref.path, text_column))
            text = column_of[1][ref.line - 1].as_py()
            yield ref, text if text is not None else BadDocument(
                f"data.source: row {ref.line} of {ref.path} has no text (null in column {text_column!r}); "
                f"drop or fill that row, {SKIP_HINT}")
        else:
            if lines_of is None or lines_of[0] != ref.path:
                lines_of = (ref.path, ref.path.read_bytes().split(b"\n"))
            try:
                yield ref, _jsonl_text(lines_of[1][ref.line - 1], ref, text_column)
            except BadDocument as e:
                yield ref, e


def read_texts(docs: Iterable[DocRef], text_column: str = "text", skip_bad: bool = True) -> Iterator[str | None]:
    """The text of each document in order; a document that cannot be read as text (not UTF-8, a bad
    JSONL line, a null row) is None with ``skip_bad`` (the caller counts and drops those: the stdlib
    corpus always has a few, e.g. encoding test fixtures) and raises BadDocument without it."""
    for _, text in iter_texts(docs, text_column):
        if isinstance(text, BadDocument):
            if not skip_bad:
                raise text
            yield None
        else:
            yield text
