"""The corpus tokenized once into a flat token file plus document offsets.

Layout of a cache directory: ``tokens.bin`` (raw uint16, or int32 when the vocabulary needs it),
``offsets.npy`` (int64 ``[n+1]``: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``),
``names.json`` and ``meta.json``. Raw tokens are memory-mapped, so every worker process shares one
page-cached copy, and document lengths are ``np.diff(offsets)`` without touching a token.
Every document ends with ``<|endoftext|>`` so the model learns where documents end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from .corpus import Corpus, read_texts
from .tokenizer import TextTokenizer

_ENCODE_CHUNK = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


@dataclass
class TokenizedCorpus:
    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray
    names: list[str]
    meta: dict

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def load(cls, directory: Path) -> "TokenizedCorpus":
        meta = json.loads((directory / "meta.json").read_text())
        tokens = open_tokens(directory, meta)
        offsets = np.load(directory / "offsets.npy")
        names = json.loads((directory / "names.json").read_text())
        return cls(directory, tokens, offsets, names, meta)


def open_tokens(directory: Path, meta: dict) -> np.ndarray:
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))


def write_tokenized(corpus: Corpus, tokenizer: TextTokenizer, out: Path, text_column: str = "text",
                    skip_bad: bool = True) -> None:
    """Stream the corpus through the tokenizer in chunks (memory stays flat for large corpora).

    Documents that cannot be read as text are left out with ``skip_bad`` (their names are kept in
    ``meta.json``'s ``skipped``) and raise a BadDocument naming them without it."""
    dtype = token_dtype(tokenizer.vocab_size)
    offsets, names, not_utf8, skipped = [0], [], 0, []
    texts = read_texts(corpus.docs, text_column, skip_bad)
    refs = iter(corpus.docs)
    with (out / "tokens.bin").open("wb") as f:
        while chunk := list(islice(texts, _ENCODE_CHUNK)):
            chunk_refs = list(islice(refs, len(chunk)))
            kept = [(r.name, t) for r, t in zip(chunk_refs, chunk) if t is not None]
            not_utf8 += len(chunk) - len(kept)
            skipped += [r.name for r, t in zip(chunk_refs, chunk) if t is None]
            for (name, _), ids in zip(kept, tokenizer.encode_batch([t for _, t in kept])):
                ids.append(tokenizer.eos_id)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
                names.append(name)
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (out / "names.json").write_text(json.dumps(names))
    meta = {"dtype": dtype.name, "num_tokens": offsets[-1], "num_docs": len(names), "not_utf8": not_utf8, "skipped": skipped,
            "source": corpus.source, "tokenizer": tokenizer.fingerprint}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
