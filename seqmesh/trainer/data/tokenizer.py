"""Tokenizers: byte-level BPE trained on the corpus, or plain bytes.

Both are HF ``tokenizers`` objects with the same byte-level pre-tokenizer and decoder, so any
text round-trips exactly (no unknown token, no normalisation) and both save as one
``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast`` loads for HF export. The byte
tokenizer is simply a BPE with no merges: 256 byte symbols plus the special token, which keeps tests
free of a training step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257
TOKENIZER_KINDS = ("bpe", "byte")


class TextTokenizer:
    """Thin wrapper that fixes the end-of-document convention the rest of seqmesh relies on."""

    def __init__(self, backend: Tokenizer, kind: str) -> None:
        self.backend = backend
        self.kind = kind
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; delete its cache directory to rebuild it")
        self.eos_id: int = eos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:20]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel (Rust threads) encoding without offsets, which is what corpus tokenization needs."""
        return [e.ids for e in self.backend.encode_batch_fast(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(self.backend.to_str())
        (directory / "kind").write_text(self.kind)

    @classmethod
    def load(cls, directory: Path) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), (directory / "kind").read_text())

    def to_transformers(self):  # -> transformers.PreTrainedTokenizerFast (imported lazily: heavy)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.backend, eos_token=EOS_TOKEN)


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> TextTokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = _byte_level(Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])))
    tok.add_special_tokens([EOS_TOKEN])
    return TextTokenizer(tok, "byte")


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size <= BYTE_VOCAB_SIZE:
        raise ValueError(f"data.vocab_size={vocab_size} leaves no room for merges; use a value > "
                         f"{BYTE_VOCAB_SIZE} (e.g. 8192) or data.tokenizer=byte")


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE; the vocabulary may come out smaller than asked on a tiny corpus (no more merges)."""
    check_vocab_size(vocab_size)
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, "bpe")
