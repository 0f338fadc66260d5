"""Gradient buckets reduced during the last backward give the same bits as reducing after it.

Four HDP ranks run adaptive plans through the real step runner: SP groups of two and four ranks,
ranks running 1-3 micro-batches, a rank idle for a whole step. While one rank's last backward
launches its buckets, the others are still running SP collectives (ring attention's point-to-point
messages, its own too in the layers below): the test records that mix and checks that nothing hangs
and that every parameter after three optimizer steps equals, bit for bit (``torch.equal``), the run
that reduces after backward -- at ZeRO stages 0, 1 and 2, and at TP=2 with ZeRO-1 (TP-replicated
gradients are summed over TP after backward, so their buckets must wait). Bitwise equality holds by
construction (same buckets, same collectives, same order); with four ranks a different summation
order would show in the last bits.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.sequence import apply_sequence_parallel
from seqmesh.parallel.step_runner import LocalRunner
from seqmesh.parallel.tensor import apply_tensor_parallel, tensor_parallel
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.build import build_sharded_optimizer
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data import num_targets
from seqmesh.trainer.microbatch import batch_layout, loss_sum_of
from seqmesh.trainer.model import Transformer, tiny_config
from tests.distributed import run_distributed

VOCAB = 97
STEP_LENGTHS = [[40, 9, 23, 16, 31, 12, 27, 8], [64, 11, 29, 6, 35, 14, 20, 5], [37, 50, 13, 22, 9, 18]]
# (first, count, documents) per group, per micro-batch, for 4 HDP ranks.
PLANS_HDP4 = [
    # ranks 0-1 end on a pair (their buckets launch while ranks 2-3 still run a pair, then one micro-batch each)
    plan_from_assignment(4, [[(0, 2, [0]), (2, 1, [1]), (3, 1, [2])], [(0, 2, [3]), (2, 2, [4, 5])],
                             [(2, 1, [6]), (3, 1, [7])]]),
    # all four in one group, then rank 3 ends on a pair while rank 0 has one more micro-batch
    plan_from_assignment(4, [[(0, 4, [0])], [(0, 1, [1]), (1, 1, [2]), (2, 2, [3, 4])], [(0, 1, [5, 6, 7])]]),
    # rank 3 runs nothing: it launches every bucket after the others' backward
    plan_from_assignment(4, [[(0, 2, [0, 1]), (2, 1, [2])], [(0, 1, [3]), (1, 1, [4]), (2, 1, [5])]]),
]
# TP=2 x HDP=2: HDP rank 0 ends on a pair while rank 1 still runs alone.
PLANS_HDP2 = [
    plan_from_assignment(2, [[(0, 1, [0, 1]), (1, 1, [2])], [(0, 2, [3, 4])], [(1, 1, [5, 6, 7])]]),
    plan_from_assignment(2, [[(0, 2, [0])], [(0, 1, [1, 2]), (1, 1, [3])], [(1, 1, [4, 5, 6, 7])]]),
    plan_from_assignment(2, [[(0, 1, [0]), (1, 1, [1, 2, 3, 4, 5])]]),
]
BUCKET_MB = 4096 / 2**20  # 4 KiB: the tiny model's ~170 KB of gradients fall into dozens of buckets
SCENARIOS = [(1, 0), (1, 1), (1, 2), (2, 1)]  # (tp, zero_stage)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))


def _docs(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in STEP_LENGTHS[step]]


def _train(rank: int, world: int, tp: int, stage: int, overlap: bool, events: list[str]) -> dict:
    """Three optimizer steps through ``LocalRunner``; returns the final parameters and overlap counts."""
    cfg = config_from_dict({"parallel": {"sp_mode": "ring", "tp": tp, "zero_stage": stage},
                            "launch": {"num_workers": world}, "optim": {"lr": 1e-2}})
    mesh = Mesh(world, rank, tp=tp)
    plans = PLANS_HDP4 if tp == 1 else PLANS_HDP2
    model = _model()
    if tp > 1:
        apply_tensor_parallel(model, mesh.tp_group)
    apply_sequence_parallel(model)
    opt = build_sharded_optimizer(model, cfg.optim, stage, mesh, overlap=overlap, bucket_mb=BUCKET_MB)
    for bucket in opt.reduction.buckets:
        bucket.launch = _logged(bucket.launch, events)
    runner = LocalRunner(model, opt, mesh, loss_sum_of, torch.device("cpu"))
    overlapped, buckets = [], len(opt.reduction.buckets)
    for step, plan in enumerate(plans):
        docs = _docs(step)
        events.append("step")
        loss_sum = runner.run(plan, batch_layout(lambda g: [docs[s] for s in g.sequences], cfg.parallel,
                                                 torch.device("cpu")), num_targets(STEP_LENGTHS[step]))
        events.append("reduce")
        runner.reduce(loss_sum)
        overlapped.append(opt.reduction.overlapped)
        opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
    tp_model = tensor_parallel(model)
    late = {id(p) for p in (tp_model.replicated + tp_model.kv_shared if tp_model else ())}
    early = sum(not any(id(p) in late for p in b.params) for b in opt.reduction.buckets)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "overlapped": overlapped,
            "buckets": buckets, "early": early}


def _logged(launch, events: list[str]):
    @functools.wraps(launch)
    def run():
        events.append("bucket")
        return launch()
    return run


def _runs(rank: int, world: int) -> dict:
    events: list[str] = []
    send = dist.batch_isend_irecv

    def logged_p2p(ops):  # SP attention's messages (ring attention's K/V blocks)
        events.append("sp")
        return send(ops)

    dist.batch_isend_irecv = logged_p2p
    out = {}
    for tp, stage in SCENARIOS:
        events.clear()
        off = _train(rank, world, tp, stage, False, events)
        events.clear()
        on = _train(rank, world, tp, stage, True, events)
        out[(tp, stage)] = (off, on, _sp_after_bucket(events))
    return out


def _sp_after_bucket(events: list[str]) -> int:
    """SP messages sent after this rank launched a bucket, before the step's reduction started."""
    count, launched = 0, False
    for e in events:
        if e == "step":
            launched = False
        elif e == "bucket":
            launched = True
        elif e == "reduce":
            launched = None
        elif e == "sp" and launched:
            count += 1
    return count


def test_overlapped_reduction_is_bitwise_the_reduction_after_backward() -> None:
    results = run_distributed(_runs, 4)
    for scenario in SCENARIOS:
        tp, _ = scenario
        for rank, result in enumerate(results):
            off, on, mixed = result[scenario]
            assert off["overlapped"] == [0, 0, 0], scenario  # without overlap nothing launches in backward
            assert off["params"].keys() == on["params"].keys()
            for name, p in on["params"].items():
                assert torch.equal(p, off["params"][name]), f"{scenario} rank {rank}: {name}"
            hdp_rank = rank // tp
            plans = PLANS_HDP4 if tp == 1 else PLANS_HDP2
            for step, plan in enumerate(plans):
                if not list(plan.work_of(hdp_rank)):  # idle all step: every bucket after backward
                    assert on["overlapped"][step] == 0, (scenario, rank, step)
                else:  # every bucket whose gradients backward finishes (all but TP-replicated ones) went early
                    assert 0 < on["early"] == on["overlapped"][step], (scenario, rank, step, on)
                    assert (on["early"] == on["buckets"]) == (tp == 1), (scenario, rank, on)
        # the ranks that end a step on an SP group kept exchanging SP messages after launching buckets
        assert any(result[scenario][2] > 0 for result in results), scenario
    initial = dict(_model().named_parameters())
    off = results[0][(1, 0)][0]["params"]
    assert not torch.equal(off["model.norm.weight"], initial["model.norm.weight"])  # training moved them
    for result in results[1:]:  # ZeRO-0 replicas agree
        for name, p in result[(1, 0)][0]["params"].items():
            assert torch.equal(p, off[name]), name


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bucket_order_follows_backward(stage: int) -> None:
    """Buckets launch in the order backward finishes their parameters (registration reversed): the final
    norm's first (stage 0), the (tied) embedding's last; ZeRO-1/2 buckets tile the flat space, each inside
    one rank's slice."""
    run_distributed(_check_order, 2, stage)


def _check_order(rank: int, world: int, stage: int) -> None:
    cfg = config_from_dict({"parallel": {"zero_stage": stage}, "launch": {"num_workers": world}})
    model = _model()
    opt = build_sharded_optimizer(model, cfg.optim, stage, Mesh(world, rank), overlap=True, bucket_mb=BUCKET_MB)
    buckets = opt.reduction.buckets
    position = {id(p): i for i, p in enumerate(list(model.parameters())[::-1])}
    last = [max((position[id(p)] for p in b.params), default=-1) for b in buckets]
    assert last == sorted(last)
    if stage == 0:
        assert any(p is model.model.norm.weight for p in buckets[0].params)
    assert any(p is model.model.embed_tokens.weight for p in buckets[-1].params)
    if stage:
        for b in buckets:
            assert b.owner * opt.shard_size <= b.start < b.end <= (b.owner + 1) * opt.shard_size
        covered = sorted((b.start, b.end) for b in buckets)
        assert covered[0][0] == 0 and covered[-1][1] == opt.flat.numel()
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
