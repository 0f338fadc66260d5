"""One call from data settings to (tokenizer, train set, validation set), cached on disk.

Two caches, each keyed by everything that determines its content, so a changed setting never
reads a stale cache and an unchanged one never recomputes: the BPE tokenizer (corpus fingerprint,
validation fraction, vocabulary size) and the tokenized corpus (corpus fingerprint, tokenizer).
Splitting and the long-document policy are applied on top at load time: they are cheap and keeping
them out of the keys lets runs with different ``max_seq_len`` share one tokenized corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .cache import build_once, default_cache_dir
from .corpus import (STDLIB, BadDocument, Corpus, check_limits, check_source, is_validation, iter_texts, open_corpus,
                     read_texts)
from .dataset import DocumentDataset, check_doc_settings
from .sampler import GlobalBatchSampler, check_global_batch
from .tokenized import TokenizedCorpus, write_tokenized
from .tokenizer import TOKENIZER_KINDS, TextTokenizer, byte_tokenizer, check_vocab_size, train_bpe

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class DataConfig:
    """The keys of the ``data`` config group, with the defaults of the built-in job."""

    source: str = "stdlib"          # "stdlib", a directory, a .jsonl/.parquet/.arrow file or a text file
    tokenizer: str = "bpe"          # "bpe" (trained on the training split) or "byte" (256 bytes + <|endoftext|>)
    vocab_size: int = 8192          # BPE only
    max_seq_len: int = 2048         # longest document (piece) the trainer will see
    long_doc_policy: str = "split"  # "split" longer documents into pieces, or "reject" them with an error
    global_batch: int = 16          # documents per optimizer step
    seed: int = 0                   # shuffling of the global batches
    val_fraction: float = 0.02      # share of documents held out, chosen by a hash of their name
    max_docs: int | None = None     # keep only the first documents (sorted order)
    max_bytes: int | None = None    # keep only the first documents up to this many bytes
    cache_dir: str | None = None    # default: $SEQMESH_CACHE/data or ~/.cache/seqmesh/data
    text_column: str = "text"       # the field of a .jsonl line / column of a .parquet/.arrow table with the text
    skip_bad_documents: bool = False  # leave out (and name) documents that are not text instead of stopping

    @property
    def skip_bad(self) -> bool:
        """Whether unreadable documents are left out: on request, and always for the built-in stdlib corpus
        (it ships encoding test fixtures that are deliberately not UTF-8)."""
        return self.skip_bad_documents or self.source == STDLIB

    def validate(self) -> None:
        """Every check that needs no corpus read, so the driver can fail before any worker starts."""
        check_source(self.source)
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"data.tokenizer={self.tokenizer!r} is not one of {TOKENIZER_KINDS}")
        if self.tokenizer == "bpe":
            check_vocab_size(self.vocab_size)
        check_doc_settings(self.max_seq_len, self.long_doc_policy)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.global_batch < 1:
            raise ValueError(f"data.global_batch={self.global_batch} must be >= 1")
        check_limits(self.max_docs, self.max_bytes)
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"data.text_column={self.text_column!r} must name a field/column, e.g. text")

    @classmethod
    def from_any(cls, cfg: "DataConfig | Mapping[str, Any] | None", **overrides: Any) -> "DataConfig":
        if cfg is None:
            cfg = cls()
        elif not isinstance(cfg, DataConfig):
            cfg = dict(cfg)
            unknown = sorted(set(cfg) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown data setting(s) {unknown}; allowed: {[f.name for f in fields(cls)]}")
            cfg = cls(**cfg)
        return replace(cfg, **overrides)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts]).encode()).hexdigest()[:16]


def _tokenizer(cfg: DataConfig, corpus: Corpus, train_mask: np.ndarray, cache: Path) -> TextTokenizer:
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    target = cache / "tokenizers" / f"bpe{cfg.vocab_size}-{_key(corpus.fingerprint, cfg.val_fraction, cfg.vocab_size)}"

    def train(out: Path) -> None:
        t0 = time.perf_counter()
        docs = [d for d, keep in zip(corpus.docs, train_mask) if keep]
        texts = read_texts(docs, cfg.text_column, cfg.skip_bad)
        tok = train_bpe((t for t in texts if t is not None), cfg.vocab_size)
        tok.save(out)
        seconds = time.perf_counter() - t0
        (out / "meta.json").write_text(json.dumps({"train_seconds": seconds, "vocab_size": tok.vocab_size}))
        log.info("trained a byte-level BPE tokenizer (vocab %d) in %.1f s", tok.vocab_size, seconds)

    build_once(target, train)
    return TextTokenizer.load(target)


def build_data(cfg: DataConfig | Mapping[str, Any] | None = None,
               **overrides: Any) -> tuple[TextTokenizer, DocumentDataset, DocumentDataset]:
    """Tokenizer, training set and validation set for ``cfg`` (a DataConfig, or a mapping of its keys).

    Make the matching sampler with ``make_sampler(train, cfg)``. Safe to call from several processes
    at once: the first builds the caches, the others wait and read them.
    """
    cfg = DataConfig.from_any(cfg, **overrides)
    cfg.validate()
    t0 = time.perf_counter()
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    corpus = open_corpus(cfg.source, cfg.max_docs, cfg.max_bytes, cfg.text_column)
    train_mask = np.array([not is_validation(d.name, cfg.val_fraction) for d in corpus.docs])
    tokenizer = _tokenizer(cfg, corpus, train_mask, cache)

    target = cache / "corpora" / _key(corpus.fingerprint, tokenizer.fingerprint)
    build_once(target, lambda out: write_tokenized(corpus, tokenizer, out, cfg.text_column, cfg.skip_bad))
    tokenized = TokenizedCorpus.load(target)
    if tokenized.meta["not_utf8"]:
        names = tokenized.meta.get("skipped", [])
        log.info("skipped %d documents that are not readable text%s", tokenized.meta["not_utf8"],
                 f": {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names else "")
    is_val = np.array([is_validation(n, cfg.val_fraction) for n in tokenized.names], dtype=bool)
    args = (cfg.max_seq_len, cfg.long_doc_policy)
    train = DocumentDataset(tokenized, np.flatnonzero(~is_val), *args, split="train")
    val = DocumentDataset(tokenized, np.flatnonzero(is_val), *args, split="validation")
    if len(train) == 0:
        raise ValueError(f"data.source={cfg.source!r} leaves no training documents of 2 or more tokens ({len(val)} "
                         f"validation documents, {tokenized.meta['not_utf8']} skipped as unreadable); use a larger "
                         f"corpus or lower data.val_fraction")
    check_global_batch(len(train), cfg.global_batch)
    log.info("data ready in %.1f s: %d train / %d validation documents, %d / %d tokens, vocab %d (%s)",
             time.perf_counter() - t0, len(train), len(val), train.num_tokens, val.num_tokens,
             tokenizer.vocab_size, asdict(cfg))
    return tokenizer, train, val


def check_data(cfg: DataConfig | Mapping[str, Any] | None = None) -> list[str]:
    """Read every document of the source once, in the driver, before any worker starts.

    Raises ValueError (a BadDocument names the file and line) for a document that is not text unless
    the settings skip those, and when no document would be left for training. Returns the names of
    the documents that will be skipped. The outcome is cached per corpus fingerprint and text column,
    so an unchanged corpus is read once, not at every start.
    """
    cfg = DataConfig.from_any(cfg)
    cfg.validate()
    corpus = open_corpus(cfg.source, cfg.max_docs, cfg.max_bytes, cfg.text_column)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    record = cache / "checked" / f"{_key(corpus.fingerprint, cfg.text_column)}.json"
    if record.is_file():
        bad = json.loads(record.read_text())
    else:
        bad = []
        for ref, text in iter_texts(corpus.docs, cfg.text_column):
            if isinstance(text, BadDocument):
                bad.append([ref.name, str(text)])
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(bad))
        os.replace(tmp, record)
    if bad and not cfg.skip_bad:
        more = f" ({len(bad) - 1} more documents have the same kind of problem)" if len(bad) > 1 else ""
        raise BadDocument(bad[0][1] + more)
    good = [d for d in corpus.docs if d.name not in {name for name, _ in bad}]
    if not good:
        raise ValueError(f"data.source={cfg.source!r}: none of its {len(corpus.docs)} documents is readable text "
                         f"(first: {bad[0][1].split('; ')[0]}); point data.source at UTF-8 text")
    if not any(not is_validation(d.name, cfg.val_fraction) for d in good):
        raise ValueError(f"data.source={cfg.source!r}: all {len(good)} of its documents fall in the validation split "
                         f"(data.val_fraction={cfg.val_fraction}); add documents or lower data.val_fraction "
                         f"(e.g. data.val_fraction=0)")
    return [name for name, _ in bad]


def make_sampler(train: DocumentDataset, cfg: DataConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> GlobalBatchSampler:
    cfg = DataConfig.from_any(cfg, **overrides)
    return GlobalBatchSampler(len(train), cfg.global_batch, cfg.seed)
