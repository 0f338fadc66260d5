"""Variable-length document data: corpus -> tokenizer -> cached tokens -> dataset -> global batches -> packing.

Typical use (what the trainer does)::

    tokenizer, train, val = build_data(cfg.data)
    sampler = make_sampler(train, cfg.data)
    lengths = train.lengths[sampler.peek(1)[0]]     # plan the next step from lengths alone
    batch = pack([train[i] for i in next(sampler)])  # input_ids, labels, position_ids, cu_seqlens
"""

from .build import DataConfig, build_data, check_data, make_sampler
from .corpus import Corpus, DocRef, is_validation, open_corpus
from .dataset import DocumentDataset, split_pieces
from .packing import IGNORE_INDEX, PackedBatch, num_targets, pack
from .sampler import GlobalBatchSampler
from .tokenizer import EOS_TOKEN, TextTokenizer, byte_tokenizer, train_bpe

__all__ = [
    "DataConfig", "build_data", "check_data", "make_sampler", "Corpus", "DocRef", "is_validation", "open_corpus",
    "DocumentDataset", "split_pieces", "IGNORE_INDEX", "PackedBatch", "num_targets", "pack",
    "GlobalBatchSampler", "EOS_TOKEN", "TextTokenizer", "byte_tokenizer", "train_bpe",
]
