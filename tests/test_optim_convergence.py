"""FP8AdamW trains a small Llama as well as fp32 AdamW: 300 steps, final loss within 2%."""

from __future__ import annotations

import functools

import pytest
import torch

from bench.optim import BETAS, LR, train_lm, window_mean
from seqmesh.trainer.optim import FP8AdamW

# The default tiny model's architecture (Llama, GQA, tied embeddings) at CPU-test width.
MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
STEPS = 300


@functools.cache
def _reference_loss() -> float:
    return window_mean(_train(lambda groups: torch.optim.AdamW(groups, lr=LR, betas=BETAS)))


def _train(make) -> list[float]:
    torch.set_num_threads(1)
    return train_lm(make, steps=STEPS, model=MODEL, docs_per_step=4, doc_len=64, device=torch.device("cpu"))


@pytest.mark.parametrize("state_dtype", ["fp8", "int8"])
def test_final_loss_within_two_percent_of_fp32_adamw(state_dtype):
    losses = _train(functools.partial(FP8AdamW, lr=LR, betas=BETAS, state_dtype=state_dtype))
    reference = _reference_loss()
    assert losses[-1] < losses[0] * 0.8, "the model did not learn at all"
    gap = (window_mean(losses) - reference) / reference
    assert abs(gap) <= 0.02, f"final loss {window_mean(losses):.4f} vs fp32 AdamW {reference:.4f} ({100 * gap:+.2f}%)"
