"""bench/scheduler_sim.py's inputs and arithmetic on a small case (16 GPUs = 2 nodes, real Wikipedia
lengths): the derived bandwidth table, the memory decision, batching, and that every reported
speedup is the ratio of the simulator's step times of checked plans."""

from __future__ import annotations

import numpy as np
import pytest

from bench import scheduler_sim as sim
from seqmesh.scheduler import check_plan, simulate

GPUS = 16


@pytest.fixture(scope="module")
def wiki_batch() -> np.ndarray:
    """The first 16-GPU batch of real Wikipedia lengths at a 32K cap, 2K tokens per GPU (few sequences)."""
    chunks = sim.split_at_cap(sim.wikipedia_docs(), 32768)
    return next(sim.batches(chunks, GPUS, 1, 2048))


def test_a2a_table_prices_every_power_of_two_and_falls_beyond_a_node():
    table = sim.a2a_table(1024)
    assert sorted(table) == [2 ** k for k in range(1, 11)]
    assert all(table[d] == sim.NVLINK_GBPS for d in (2, 4, 8))
    beyond = [table[d] for d in sorted(table) if d > sim.GPUS_PER_NODE]
    assert all(a > b for a, b in zip(beyond, beyond[1:])) and beyond[0] < sim.NVLINK_GBPS
    assert table[16] == pytest.approx(0.8 * 50 * 15 / 8)            # the stated formula at two nodes
    assert beyond[-1] > sim.NIC_EFFICIENCY * sim.NIC_GBPS            # tends to the NIC rate from above
    cm = sim.llama8b_32layers(GPUS)
    assert sorted(cm.a2a_GBps) == [2, 4, 8, 16]                       # no group size left to extrapolation


def test_memory_decision_follows_from_the_profile():
    profile = sim.load_profile()
    # the profile's 16 B per parameter, 8 layers, is its mem_static_bytes exactly
    full = sim.memory_plan(profile, 1, 0, False)
    assert 16 * ((full.params - 2 * sim.VOCAB * sim.HIDDEN) / 4 + 2 * sim.VOCAB * sim.HIDDEN) \
        == pytest.approx(profile["mem_static_bytes"])
    unsharded = sim.memory_plan(profile, 64, 0, True)
    no_ckpt = sim.memory_plan(profile, 64, 1, False)
    chosen = sim.memory_plan(profile, 64, 1, True)
    assert unsharded.tokens_per_gpu < 8192 and no_ckpt.tokens_per_gpu < 32768 <= chosen.tokens_per_gpu
    assert sim.llama8b_32layers(64).capacity(1) == pytest.approx(chosen.tokens_per_gpu, abs=1)


def test_split_and_batches_keep_every_token_in_order():
    docs = np.array([100, 70000, 32768, 5])
    chunks = sim.split_at_cap(docs, 32768)
    assert chunks.tolist() == [100, 32768, 32768, 4464, 32768, 5]
    got = list(sim.batches(np.full(100, 10), 2, 3, 25))
    assert [b.size for b in got] == [5, 5, 5] and all(b.sum() >= 50 for b in got)
    with pytest.raises(ValueError, match="too few"):
        list(sim.batches(np.full(10, 10), 2, 3, 25))


def test_compare_reports_ratios_of_simulated_step_times(wiki_batch):
    cm = sim.llama8b_32layers(GPUS)
    adaptive, static, _ = sim.plans(wiki_batch, GPUS, cm)
    for plan in (adaptive, static):
        check_plan(plan, wiki_batch.tolist(), cm)
    row = sim.compare(wiki_batch, GPUS, cm)
    a_ms, s_ms = simulate(adaptive, wiki_batch.tolist(), cm), simulate(static, wiki_batch.tolist(), cm)
    assert row["adaptive_ms"] == pytest.approx(a_ms, abs=0.01) and row["best_static_ms"] == pytest.approx(s_ms, abs=0.01)
    assert row["speedup"] == pytest.approx(s_ms / a_ms, abs=1e-4)
    assert row["plan_speedup"] == pytest.approx((s_ms - cm.grad_reduce_ms) / (a_ms - cm.grad_reduce_ms), abs=1e-4)
    assert row["adaptive_tokens_per_s"] == pytest.approx(wiki_batch.sum() / a_ms * 1e3, abs=1)
    assert row["lower_bound_ms"] <= row["adaptive_ms"] <= row["best_static_ms"]   # adaptive is never worse
    params = sim.memory_plan(sim.load_profile(), GPUS, 1, True).params    # fp32 gradients out, parameters back
    assert row["grad_reduce_ms"] == pytest.approx(2 * 4 * params * (GPUS - 1) / GPUS / 40e9 * 1e3, abs=0.01)


def test_slow_node_slows_the_last_node_only(wiki_batch):
    cm = sim.llama8b_32layers(GPUS)
    slow = sim.with_slow_node(cm, GPUS)
    assert slow.speed == (1.0,) * 8 + (sim.STRAGGLER_SPEED,) * 8
    adaptive, _, _ = sim.plans(wiki_batch, GPUS, slow)
    assert simulate(adaptive, wiki_batch.tolist(), slow) >= simulate(adaptive, wiki_batch.tolist(), cm)


def test_summary_is_the_ratio_of_summed_headline_step_times():
    def row(gpus: int, s: float, a: float, headline: bool = True, straggler: bool = False) -> dict:
        return {"gpus": gpus, "best_static_ms": s, "adaptive_ms": a, "lower_bound_ms": a - 10, "grad_reduce_ms": 10.0,
                "headline": headline, "straggler": straggler}

    rows = [row(64, 300, 200), row(64, 110, 100), row(64, 900, 100, headline=False),
            row(64, 140, 100, headline=False, straggler=True)]
    s = sim.summarise(rows)
    assert s["sim_speedup_vs_best_static_64"] == pytest.approx(410 / 300, abs=1e-4)
    assert s["sim_plan_speedup_vs_best_static_64"] == pytest.approx(390 / 280, abs=1e-4)
    assert s["sim_speedup_vs_best_static_64_slow_node"] == pytest.approx(1.4)
    assert s["sim_speedup_bound_64"] == pytest.approx(410 / 280, abs=1e-4)
