"""Data pipeline: corpus, tokenizers, caches, long-document policy, sampler, packing."""

from __future__ import annotations

import json
import pickle
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seqmesh.trainer.data import (
    IGNORE_INDEX,
    DataConfig,
    GlobalBatchSampler,
    build_data,
    byte_tokenizer,
    is_validation,
    make_sampler,
    num_targets,
    open_corpus,
    pack,
    split_pieces,
    train_bpe,
)
from seqmesh.trainer.data import build as build_mod
from seqmesh.trainer.data import corpus as corpus_mod
from seqmesh.trainer.data.cache import build_once
from seqmesh.trainer.data.corpus import read_texts

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _write_corpus(root: Path, sizes: dict[str, int]) -> Path:
    """Files of ``n`` ASCII characters each (the byte tokenizer makes that n + 1 tokens with EOS)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(rng.choice(list("abcdefgh \n"), size=n)))
    return root


def _byte_data(root: Path, cache: Path, **kw):
    kw = {"tokenizer": "byte", "val_fraction": 0.0, "global_batch": 1, "cache_dir": str(cache), **kw}
    return build_data(source=str(root), **kw)


# ---------------------------------------------------------------------------------------- packing


def test_pack_exact_values():
    b = pack([torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30])])
    assert b.input_ids.tolist() == [10, 11, 12, 20, 21, 30]
    assert b.labels.tolist() == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 5, 6]
    assert b.seqlens == [3, 2, 1] and b.max_seqlen == 3
    assert b.num_targets == 3 == num_targets([3, 2, 1])


def test_pack_labels_never_cross_documents():
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 40, (25,), generator=gen)]
    docs = [torch.randint(0, 50, (n,), generator=gen) for n in lengths]
    b = pack(docs)
    doc_of = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(lengths))
    targets = torch.nonzero(b.labels != IGNORE_INDEX).flatten()
    assert torch.equal(b.labels[targets], b.input_ids[targets + 1])
    assert torch.equal(doc_of[targets], doc_of[targets + 1])  # the predicted token is in the same document
    assert (b.labels[b.cu_seqlens[1:].long() - 1] == IGNORE_INDEX).all()
    assert torch.equal(b.position_ids[b.cu_seqlens[:-1].long()], torch.zeros(len(docs), dtype=torch.long))
    assert torch.equal(b.position_ids, torch.cat([torch.arange(n) for n in lengths]))
    assert torch.equal(torch.diff(b.cu_seqlens).long(), torch.tensor(lengths))
    assert targets.numel() == num_targets(lengths) == sum(lengths) - len(lengths)


def test_pack_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one document"):
        pack([])
    with pytest.raises(ValueError, match="empty document"):
        pack([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)])


def test_split_pieces_bounds_and_coverage():
    lengths = np.array([1, 4, 5, 8, 9, 100, 17])
    doc, k, start, length = split_pieces(lengths, 4)
    assert length.max() <= 4 and length[lengths[doc] > 1].min() >= 2
    for d, n in enumerate(lengths):
        mine = doc == d
        assert length[mine].sum() == n
        assert start[mine].tolist() == np.concatenate([[0], np.cumsum(length[mine])[:-1]]).tolist()
        assert k[mine].tolist() == list(range(int(mine.sum())))
    assert length[doc == 2].tolist() == [3, 2]  # near-equal pieces, no 1-token tail


def test_split_policy_keeps_every_token_once_in_order(tmp_path):
    root = _write_corpus(tmp_path / "c", {"a.txt": 3, "b.txt": 50, "c.txt": 7, "d/e.txt": 120})
    tok, train, _ = _byte_data(root, tmp_path / "cache", max_seq_len=16, long_doc_policy="split")
    assert train.lengths.max() <= 16 and train.lengths.min() >= 2
    assert len(train) == 1 + 4 + 1 + 8  # ceil((L + 1) / 16) pieces for L + 1 = 4, 51, 8, 121
    for name in ("a.txt", "b.txt", "c.txt", "d/e.txt"):
        items = [i for i in range(len(train)) if train.name(i).startswith(name)]
        joined = torch.cat([train[i] for i in items])
        text = (root / name).read_text()
        assert joined.tolist() == tok.encode(text) + [tok.eos_id]
    assert train.name(items[2]) == "d/e.txt (piece 3/8)"
    assert train.num_tokens == sum(len((root / n).read_text()) + 1 for n in ("a.txt", "b.txt", "c.txt", "d/e.txt"))


def test_reject_policy_names_document_and_fix(tmp_path):
    root = _write_corpus(tmp_path / "c", {"short.txt": 10, "long.txt": 40})
    with pytest.raises(ValueError) as err:
        _byte_data(root, tmp_path / "cache", max_seq_len=32, long_doc_policy="reject")
    msg = str(err.value)
    for part in ("'long.txt'", "41 tokens", "data.max_seq_len=32", "data.long_doc_policy=split"):
        assert part in msg


def test_short_documents_are_dropped_and_counted(tmp_path):
    root = _write_corpus(tmp_path / "c", {"empty.txt": 0, "one.txt": 1, "ok.txt": 20})
    _, train, _ = _byte_data(root, tmp_path / "cache", max_seq_len=64)
    assert train.num_dropped_short == 1  # the empty file is only <|endoftext|>
    assert sorted(train.lengths.tolist()) == [2, 21]


def test_bad_settings_get_clear_errors(tmp_path):
    root = _write_corpus(tmp_path / "c", {"a.txt": 30, "b.txt": 30})
    with pytest.raises(ValueError, match="data.long_doc_policy='truncate'"):
        _byte_data(root, tmp_path / "cache", long_doc_policy="truncate")
    with pytest.raises(ValueError, match="data.max_seq_len=2 must be >= 4"):
        _byte_data(root, tmp_path / "cache", max_seq_len=2)
    with pytest.raises(ValueError, match="data.tokenizer='words'"):
        _byte_data(root, tmp_path / "cache", tokenizer="words")
    with pytest.raises(ValueError, match="fewer than data.global_batch=5"):
        _byte_data(root, tmp_path / "cache", global_batch=5)
    with pytest.raises(ValueError, match=r"unknown data setting\(s\) \['vocab'\]"):
        build_data({"vocab": 10})
    with pytest.raises(ValueError, match="neither 'stdlib' nor an existing path"):
        build_data(source=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no documents"):
        build_data(source=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="data.max_docs=0 must be >= 1"):
        DataConfig(max_docs=0).validate()
    with pytest.raises(ValueError, match="data.vocab_size=100 leaves no room"):
        build_data(source=str(root), vocab_size=100, cache_dir=str(tmp_path / "cache"))


def test_unreadable_source_gets_clear_error(tmp_path, monkeypatch):
    root = _write_corpus(tmp_path / "c", {"sub/a.txt": 30})

    def walk_without_permission(top, onerror):
        onerror(PermissionError(13, "Permission denied", str(Path(top) / "sub")))
        yield from ()

    # chmod cannot take a permission away from root (CI runs as root), so the OS error is injected.
    monkeypatch.setattr(corpus_mod.os, "walk", walk_without_permission)
    with pytest.raises(ValueError, match=r"cannot be read .*Permission denied.*fix its permissions"):
        build_data(source=str(root))


# ------------------------------------------------------------------------------ corpus sources


def test_jsonl_source_one_document_per_line(tmp_path):
    lines = [{"text": "first document"}, {"text": "second"}, {"text": "third one here"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    corpus = open_corpus(str(path))
    assert [d.name for d in corpus.docs] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:4"]
    assert list(read_texts(corpus.docs)) == [x["text"] for x in lines]
    tok, train, _ = _byte_data(path, tmp_path / "cache")
    assert [tok.decode(train[i].tolist()) for i in range(3)] == [x["text"] + "<|endoftext|>" for x in lines]

    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl line 1 has no string field \"text\" \(its fields: body\); set data.text_column"):
        _byte_data(path, tmp_path / "cache2")


def test_stdlib_corpus_is_sorted_and_skips_third_party_and_tests():
    corpus = open_corpus("stdlib", max_bytes=400_000)
    names = [d.name for d in corpus.docs]
    assert names == sorted(names) and sum(d.nbytes for d in corpus.docs) <= 400_000
    full = open_corpus("stdlib")
    assert full.docs[: len(names)] == corpus.docs  # a byte limit keeps a prefix
    assert not any(n.startswith(("site-packages/", "test/")) or "__pycache__" in n for n in (d.name for d in full.docs))
    assert any(d.name == "json/decoder.py" for d in full.docs)
    assert open_corpus("stdlib").fingerprint == full.fingerprint


def test_validation_split_is_stable_per_name():
    names = [f"dir/file_{i}.py" for i in range(20_000)]
    held = [n for n in names if is_validation(n, 0.1)]
    assert 0.09 < len(held) / len(names) < 0.11
    assert [n for n in names[:5000] if is_validation(n, 0.1)] == [n for n in held if int(n[9:-3]) < 5000]
    assert set(n for n in names if is_validation(n, 0.05)) <= set(held)  # nested as the fraction shrinks


# ---------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_on_stdlib_text():
    tok = byte_tokenizer()
    text = (STDLIB / "json" / "decoder.py").read_text() + "\nnon-ASCII: héllo wörld 日本語 🎉\t\r\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_bpe_round_trip_and_compression_on_stdlib():
    corpus = open_corpus("stdlib", max_bytes=300_000)
    texts = [t for t in read_texts(corpus.docs) if t is not None]
    tok = train_bpe(texts, 600)
    assert tok.vocab_size == 600 and tok.kind == "bpe"
    sample = (STDLIB / "textwrap.py").read_text()
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < 0.5 * len(sample.encode())  # merges learnt on Python source compress Python source
    assert train_bpe(texts, 600).fingerprint == tok.fingerprint  # training is deterministic


def test_build_is_cached_and_deterministic(tmp_path, monkeypatch):
    cfg = DataConfig(source="stdlib", max_bytes=250_000, vocab_size=512, max_seq_len=256, global_batch=4,
                     val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    t0 = time.perf_counter()
    tok, train, val = build_data(cfg)
    first_s = time.perf_counter() - t0
    assert tok.kind == "bpe" and tok.vocab_size == 512 and len(val) > 0
    assert train.lengths.max() <= 256
    assert not set(train.names[i] for i in train.doc_ids) & set(val.names[i] for i in val.doc_ids)

    def fail(*_a, **_k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(build_mod, "train_bpe", fail)
    monkeypatch.setattr(build_mod, "write_tokenized", fail)
    t0 = time.perf_counter()
    tok2, train2, val2 = build_data(cfg)
    print(f"first build {first_s:.2f} s, cached {time.perf_counter() - t0:.2f} s")
    assert tok2.fingerprint == tok.fingerprint
    assert np.array_equal(train2.lengths, train.lengths) and np.array_equal(val2.lengths, val.lengths)
    assert all(torch.equal(train2[i], train[i]) for i in range(0, len(train), 7))
    # A different max_seq_len reuses the same tokens; only the index changes.
    _, train3, _ = build_data(cfg, max_seq_len=64)
    assert train3.num_tokens == train.num_tokens and train3.lengths.max() <= 64
    monkeypatch.undo()
    # A fresh cache directory rebuilds to the very same tokenizer and tokens.
    tok4, train4, _ = build_data(cfg, cache_dir=str(tmp_path / "other"))
    assert tok4.fingerprint == tok.fingerprint and np.array_equal(train4.lengths, train.lengths)


def test_dataset_pickles_by_path(tmp_path):
    root = _write_corpus(tmp_path / "c", {"a.txt": 30, "b.txt": 90})
    _, train, _ = _byte_data(root, tmp_path / "cache", max_seq_len=32)
    blob = pickle.dumps(train)
    assert len(blob) < 4096  # the tokens stay on disk, shared through the memory map
    again = pickle.loads(blob)
    assert all(torch.equal(again[i], train[i]) for i in range(len(train)))


def test_build_once_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (out / "x").write_text("done")

    threads = [threading.Thread(target=build_once, args=(tmp_path / "t", build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (tmp_path / "t" / "x").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["t"]  # no temp dirs left


# -------------------------------------------------------------------------------------- sampler


def _take(sampler: GlobalBatchSampler, n: int) -> list[list[int]]:
    return [next(sampler) for _ in range(n)]


def test_sampler_epochs_are_permutations_and_seeded():
    s = GlobalBatchSampler(num_docs=23, global_batch=5, seed=7)
    assert s.steps_per_epoch == 4
    epoch0, epoch1 = _take(s, 4), _take(s, 4)
    for epoch in (epoch0, epoch1):
        flat = [i for b in epoch for i in b]
        assert all(len(b) == 5 for b in epoch) and len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert epoch0 != epoch1
    assert _take(GlobalBatchSampler(23, 5, seed=7), 8) == epoch0 + epoch1
    assert _take(GlobalBatchSampler(23, 5, seed=8), 4) != epoch0


def test_sampler_resume_mid_epoch_is_exact():
    reference = _take(GlobalBatchSampler(23, 5, seed=3), 15)
    first = GlobalBatchSampler(23, 5, seed=3)
    assert _take(first, 6) == reference[:6]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["step"] == 2
    resumed = GlobalBatchSampler(23, 5, seed=3)
    resumed.load_state_dict(state)
    assert _take(resumed, 9) == reference[6:]
    other = GlobalBatchSampler(23, 5, seed=4)
    with pytest.raises(ValueError, match="checkpoint has seed=3 but this run has 4"):
        other.load_state_dict(state)


def test_sampler_peek_matches_what_is_yielded():
    s = GlobalBatchSampler(23, 5, seed=1)
    _take(s, 2)
    ahead = s.peek(5)  # crosses the epoch boundary
    assert s.steps_done == 2 and s.peek(5) == ahead
    assert _take(s, 5) == ahead


def test_make_sampler_from_config(tmp_path):
    root = _write_corpus(tmp_path / "c", {f"{i}.txt": 10 + i for i in range(9)})
    cfg = {"source": str(root), "tokenizer": "byte", "global_batch": 4, "seed": 5, "val_fraction": 0.0,
           "cache_dir": str(tmp_path / "cache")}
    _, train, _ = build_data(cfg)
    sampler = make_sampler(train, cfg)
    assert (sampler.num_docs, sampler.global_batch, sampler.seed) == (9, 4, 5)
    step = next(sampler)
    batch = pack([train[i] for i in step])
    assert batch.num_targets == num_targets(train.lengths[step])
