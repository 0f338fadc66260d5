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
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .cache import build_once, default_cache_dir
from .corpus import Corpus, check_limits, check_source, is_validation, open_corpus, read_texts
from .dataset import DocumentDataset, check_doc_settings
from .sampler import GlobalBatchSampler, check_global_batch
from .tokenized import TokenizedCorpus, write_tokenized
from .tokenizer import TOKENIZER_KINDS, TextTokenizer, byte_tokenizer, check_vocab_size, train_bpe

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class DataConfig:
    """The keys of the ``data`` config group, with the defaults of the built-in job."""

    source: str = "stdlib"          # "stdlib", a directory, a .jsonl file ({"text": ...} per line) or a text file
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
        tok = train_bpe((t for t in read_texts(docs) if t is not None), cfg.vocab_size)
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
    corpus = open_corpus(cfg.source, cfg.max_docs, cfg.max_bytes)
    train_mask = np.array([not is_validation(d.name, cfg.val_fraction) for d in corpus.docs])
    tokenizer = _tokenizer(cfg, corpus, train_mask, cache)

    target = cache / "corpora" / _key(corpus.fingerprint, tokenizer.fingerprint)
    build_once(target, lambda out: write_tokenized(corpus, tokenizer, out))
    tokenized = TokenizedCorpus.load(target)
    if tokenized.meta["not_utf8"]:
        log.info("skipped %d documents that are not UTF-8 text", tokenized.meta["not_utf8"])
    is_val = np.array([is_validation(n, cfg.val_fraction) for n in tokenized.names], dtype=bool)
    args = (cfg.max_seq_len, cfg.long_doc_policy)
    train = DocumentDataset(tokenized, np.flatnonzero(~is_val), *args, split="train")
    val = DocumentDataset(tokenized, np.flatnonzero(is_val), *args, split="validation")
    if len(train) == 0:
        raise ValueError(f"data.source={cfg.source!r} leaves no training documents of 2 or more tokens; "
                         f"use a larger corpus or lower data.val_fraction")
    check_global_batch(len(train), cfg.global_batch)
    log.info("data ready in %.1f s: %d train / %d validation documents, %d / %d tokens, vocab %d (%s)",
             time.perf_counter() - t0, len(train), len(val), train.num_tokens, val.num_tokens,
             tokenizer.vocab_size, asdict(cfg))
    return tokenizer, train, val


def make_sampler(train: DocumentDataset, cfg: DataConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> GlobalBatchSampler:
    cfg = DataConfig.from_any(cfg, **overrides)
    return GlobalBatchSampler(len(train), cfg.global_batch, cfg.seed)
