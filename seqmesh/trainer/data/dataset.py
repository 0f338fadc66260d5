"""Map-style dataset of documents whose lengths are known before any token is read.

The scheduler plans a step from ``lengths`` alone, one step ahead, so every length the trainer will
see must be fixed when the index is built: long documents are split here (not at load time), and
documents with nothing to predict are dropped here. Nothing is ever truncated silently.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from .tokenized import TokenizedCorpus, open_tokens

log = logging.getLogger(__name__)

LONG_DOC_POLICIES = ("split", "reject")
MIN_MAX_SEQ_LEN = 4


def split_pieces(lengths: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, ...]:
    """Cut each length into ``ceil(L / max_seq_len)`` near-equal pieces.

    Near-equal rather than full pieces plus a remainder: a remainder of one token would have no
    target and be dropped (losing a token); near-equal pieces are all longer than max_seq_len / 2.
    Returns (document index, piece index within its document, start within the document, length)
    per piece, in document order.
    """
    n = np.maximum(1, -(-lengths // max_seq_len))
    doc = np.repeat(np.arange(len(lengths)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    q, r = (lengths // n)[doc], (lengths % n)[doc]
    return doc, k, k * q + np.minimum(k, r), q + (k < r)


def check_doc_settings(max_seq_len: int, long_doc_policy: str) -> None:
    if long_doc_policy not in LONG_DOC_POLICIES:
        raise ValueError(f"data.long_doc_policy={long_doc_policy!r} is not one of {LONG_DOC_POLICIES}")
    if max_seq_len < MIN_MAX_SEQ_LEN:
        raise ValueError(f"data.max_seq_len={max_seq_len} must be >= {MIN_MAX_SEQ_LEN}")


class DocumentDataset(Dataset):
    """Item ``i`` is document (or piece) ``i`` as a LongTensor; ``lengths[i]`` is its token count."""

    def __init__(self, corpus: TokenizedCorpus, doc_ids: np.ndarray, max_seq_len: int,
                 long_doc_policy: str, split: str) -> None:
        check_doc_settings(max_seq_len, long_doc_policy)
        self.split = split
        self.max_seq_len = max_seq_len
        self._directory, self._meta, self.names = corpus.directory, corpus.meta, corpus.names
        self._tokens = corpus.tokens
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        lengths = corpus.lengths[doc_ids]
        short = lengths < 2
        if short.any():
            log.info("%s split: dropped %d documents shorter than 2 tokens (no next token to predict)",
                     split, int(short.sum()))
        self.num_dropped_short = int(short.sum())
        doc_ids, lengths = doc_ids[~short], lengths[~short]
        too_long = np.flatnonzero(lengths > max_seq_len)
        if too_long.size and long_doc_policy == "reject":
            first = too_long[0]
            raise ValueError(
                f"document {self.names[doc_ids[first]]!r} has {lengths[first]} tokens, more than "
                f"data.max_seq_len={max_seq_len} ({too_long.size} documents of the {split} split are longer); "
                f"raise data.max_seq_len or set data.long_doc_policy=split"
            )
        piece_doc, self._piece, within, self.lengths = split_pieces(lengths, max_seq_len)
        self.doc_ids = doc_ids[piece_doc]
        self.starts = corpus.offsets[self.doc_ids] + within
        self._pieces_of = np.bincount(piece_doc, minlength=len(doc_ids))[piece_doc]
        if too_long.size:
            log.info("%s split: %d documents longer than %d tokens split into %d pieces", split,
                     too_long.size, max_seq_len, int(self._pieces_of[self._pieces_of > 1].size))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        start, length = self.starts[i], self.lengths[i]
        return torch.from_numpy(self._tokens[start:start + length].astype(np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def name(self, i: int) -> str:
        """Source document of item ``i``, with the piece number when it was split (for messages)."""
        name = self.names[self.doc_ids[i]]
        if self._pieces_of[i] == 1:
            return name
        return f"{name} (piece {self._piece[i] + 1}/{self._pieces_of[i]})"

    def __getstate__(self) -> dict:
        # Send the path, not the tokens: a worker re-opens the shared memory map.
        return {k: v for k, v in self.__dict__.items() if k != "_tokens"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokens = open_tokens(self._directory, self._meta)
