"""Bad data is named before any worker starts, and Parquet/Arrow tables are sources like JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqmesh.trainer.data import build_data, check_data, open_corpus
from seqmesh.trainer.data.corpus import BadDocument


def _settings(source: Path, cache: Path, **kw):
    return {"source": str(source), "tokenizer": "byte", "val_fraction": 0.0, "global_batch": 1,
            "cache_dir": str(cache), **kw}


def test_latin1_jsonl_names_file_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + '{"text": "caf\u00e9 au lait"}\n'.encode("latin-1"))
    with pytest.raises(BadDocument) as info:
        check_data(_settings(path, tmp_path / "cache"))
    message = str(info.value)
    assert f"{path} line 2 is not UTF-8 text (byte 0xe9 at column 14)" in message
    assert "iconv -f latin1 -t utf-8" in message and "data.skip_bad_documents=true" in message
    # The workers' path gives the same message (were the file changed after the driver's check).
    with pytest.raises(BadDocument, match="line 2 is not UTF-8"):
        build_data(**_settings(path, tmp_path / "cache"))
    # Skipping is opt-in and names what it leaves out.
    assert check_data(_settings(path, tmp_path / "cache", skip_bad_documents=True)) == ["docs.jsonl:2"]
    _, train, _ = build_data(**_settings(path, tmp_path / "cache", skip_bad_documents=True))
    assert len(train) == 1


def test_latin1_text_file_is_named_not_blamed_on_corpus_size(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("first line\nna\u00efve second line\n".encode("latin-1"))
    with pytest.raises(BadDocument, match=rf"{path} line 2 is not UTF-8 text \(byte 0xef at column 3\)"):
        check_data(_settings(path, tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"none of its 1 documents is readable text"):
        check_data(_settings(path, tmp_path / "cache", skip_bad_documents=True))


def test_directory_with_one_bad_file_names_it(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.txt").write_text("hello world\n")
    (root / "bad.txt").write_bytes("\u00e9t\u00e9\n".encode("latin-1"))
    with pytest.raises(BadDocument, match=r"corpus/bad.txt line 1 is not UTF-8"):
        check_data(_settings(root, tmp_path / "cache"))
    assert check_data(_settings(root, tmp_path / "cache", skip_bad_documents=True)) == ["bad.txt"]


def test_all_documents_in_validation_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("just one document\n")
    with pytest.raises(ValueError, match=r"fall in the validation split.*data.val_fraction=0"):
        check_data(_settings(path, tmp_path / "cache", val_fraction=0.999))


def _table(texts, column="text"):
    return pa.table({column: pa.array(texts, pa.string()), "id": pa.array(range(len(texts)), pa.int64())})


def test_parquet_and_arrow_sources(tmp_path: Path) -> None:
    texts = ["first document", "second", "third one here"]
    root = tmp_path / "corpus"
    root.mkdir()
    pq.write_table(_table(texts[:2]), root / "part-0.parquet")
    # datasets' save_to_disk writes Arrow IPC *streams*; Arrow files (random access) are read too.
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, _table(texts[2:]).schema) as writer:
        writer.write_table(_table(texts[2:]))
    corpus = open_corpus(str(root))
    assert [d.name for d in corpus.docs] == ["data-00000-of-00001.arrow:1", "part-0.parquet:1", "part-0.parquet:2"]
    tok, train, _ = build_data(**_settings(root, tmp_path / "cache"))
    got = sorted(tok.decode(train[i].tolist()) for i in range(len(train)))
    assert got == sorted(t + "<|endoftext|>" for t in texts)

    single = tmp_path / "file.arrow"
    with pa.OSFile(str(single), "wb") as sink, pa.ipc.new_file(sink, _table(texts).schema) as writer:
        writer.write_table(_table(texts))
    assert len(open_corpus(str(single)).docs) == 3


def test_text_column_is_configurable_and_a_missing_one_lists_columns(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(_table(["alpha beta", "gamma"], column="content"), path)
    with pytest.raises(ValueError, match=r"has no column 'text' \(its columns: content, id\); set data.text_column"):
        check_data(_settings(path, tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"column 'id' of .* holds int64, not text"):
        check_data(_settings(path, tmp_path / "cache", text_column="id"))
    assert check_data(_settings(path, tmp_path / "cache", text_column="content")) == []
    tok, train, _ = build_data(**_settings(path, tmp_path / "cache", text_column="content"))
    assert len(train) == 2

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "from a field"}) + "\n")
    assert check_data(_settings(jsonl, tmp_path / "cache", text_column="body")) == []


def test_null_rows_are_bad_documents(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array(["ok", None], pa.string())}), path)
    with pytest.raises(BadDocument, match=r"row 2 of .*docs.parquet has no text \(null in column 'text'\)"):
        check_data(_settings(path, tmp_path / "cache"))
    assert check_data(_settings(path, tmp_path / "cache", skip_bad_documents=True)) == ["docs.parquet:2"]
