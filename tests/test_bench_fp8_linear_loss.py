"""bench/fp8_linear_loss.py's own arithmetic on the CPU: the real-text documents it trains on, the paired gaps."""

from __future__ import annotations

import json

import pytest

from bench.fp8_linear_loss import summarize, write_text_corpus


def test_documents_are_exactly_the_tokens_asked_for(tmp_path) -> None:
    from seqmesh.trainer.data.tokenizer import byte_tokenizer

    path = write_text_corpus(tmp_path / "text.jsonl", 512, 7)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(docs) == 7 and len(set(docs)) == 7 and all(d.isascii() for d in docs)
    assert all(len(byte_tokenizer().encode(d)) + 1 == 512 for d in docs)  # + end-of-text
    with pytest.raises(SystemExit, match="lower --steps or --tokens"):
        write_text_corpus(tmp_path / "big.jsonl", 1 << 20, 100)


def test_gaps_are_paired_by_seed_over_the_tail() -> None:
    """fp8 of seed s against bf16 of seed s over the last 2 steps; a seed missing one arm (failed run) counts in
    no gap; the bf16 yardstick is |bf16(s+1) - bf16(s)| / bf16(s)."""
    rows = [{"arm": "bf16", "seed": 0, "losses": [9.0, 4.0, 4.0]}, {"arm": "fp8", "seed": 0, "losses": [1.0, 4.1, 4.1]},
            {"arm": "bf16", "seed": 1, "losses": [9.0, 5.0, 5.0]}, {"arm": "fp8", "seed": 1, "losses": [9.0, 4.9, 4.9]},
            {"arm": "bf16", "seed": 2, "losses": [9.0, 4.0, 6.0]}, {"arm": "fp8", "seed": 2, "error": "timed out"}]
    s = summarize(rows, tail=2)
    assert s["seeds"] == [0, 1]
    assert s["fp8_linear_loss_gap_pct_per_seed"] == pytest.approx({"0": 2.5, "1": -2.0})
    assert s["fp8_linear_loss_gap_pct"] == pytest.approx(0.25)
    assert s["fp8_linear_loss_gap_abs_pct_mean"] == pytest.approx(2.25)
    assert s["seed_loss_gap_pct"] == pytest.approx((25.0 + 0.0) / 2)
