"""Validation loss: any split over ranks and SP groups equals one process's mean over every validation target;
the step loop logs it every eval_every steps and at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.scheduler import default_cost_model
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.build import build_model
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data import build_data, num_targets, pack
from seqmesh.trainer.evaluate import validation_loss, validation_plans
from seqmesh.trainer.loop import make_step_runner
from seqmesh.trainer.loss import token_loss_sum
from tests.conftest import tiny_overrides, write_corpus
from tests.distributed import run_distributed

def _corpus(tmp: Path) -> Path:
    return write_corpus(tmp, [100 + 37 * i for i in range(40)])


def _overrides(tmp: Path, world: int, **top) -> dict:
    return tiny_overrides(launch={"num_workers": world}, scheduler={"lookahead": 0, "policy": "adaptive"},
                          data={"source": str(tmp / "corpus"), "tokenizer": "byte", "max_seq_len": 160,
                                "global_batch": 4, "val_fraction": 0.3, "cache_dir": str(tmp / "cache")}, **top)


def _reference(tmp: Path) -> tuple[float, int]:
    """One process, one document at a time: sum of token losses over every validation target / their count."""
    cfg = config_from_dict(_overrides(tmp, 1))
    tokenizer, _, val = build_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size, torch.device("cpu"))
    total = 0.0
    with torch.no_grad():
        for i in range(len(val)):
            packed = pack([val[i]])
            total += float(token_loss_sum(model.logits(model(packed.input_ids, make_sp_batch(packed.seqlens, "local",
                                                                                           None))), packed.labels))
    return total / num_targets(val.lengths.tolist()), len(val)


def _split(rank: int, world: int, tmp: Path, how: str, sp_mode: str) -> float:
    cfg = config_from_dict({**_overrides(tmp, world), "parallel": {"sp_mode": sp_mode}})
    tokenizer, _, val = build_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size, torch.device("cpu"))
    mesh = Mesh(world, rank)
    if how == "planner":
        # Memory for ~100 tokens per rank: the longer documents need SP groups of 2 or 4.
        cost = default_cost_model(params=1e5, hidden_size=64, num_layers=2, device_flops=1e10, max_group=world,
                                  mem_limit_bytes=1.6e6 + 100 * 4352, checkpointing=False, zero_stage=0)
        plans = validation_plans(val, cfg.data.global_batch, cfg.scheduler, mesh, cost)
        sizes = {g.count for p in plans for mb in p.microbatches for g in mb.groups}
        assert sizes & {2, 4}, f"documents longer than one rank holds need SP groups, got sizes {sizes}"
    else:
        # Hand-made: each chunk of 4 documents as one group of 4, two groups of 2 and four single ranks in turn.
        layouts = [[(0, 4, [0, 1, 2, 3])], [(0, 2, [0, 3]), (2, 2, [1, 2])], [(r, 1, [r]) for r in range(4)]]
        plans = []
        for k in range(0, len(val), 4):
            n = min(4, len(val) - k)
            layout = [(f, c, [s for s in seqs if s < n]) for f, c, seqs in layouts[(k // 4) % 3]]
            plans.append(plan_from_assignment(world, [[g for g in layout if g[2]]], 0.0, 0.0))
    model.train()
    runner = make_step_runner(model, None, mesh, torch.device("cpu"), cfg.model)
    loss = validation_loss(runner, val, plans, cfg.data.global_batch, cfg.parallel)
    assert model.training, "the model is left in the mode it was in"
    assert all(p.grad is None for p in model.parameters()), "evaluation builds no gradients"
    return loss


@pytest.mark.parametrize("how,sp_mode", [("planner", "ulysses"), ("fixed", "ring")])
def test_validation_loss_equals_single_process(tmp_path: Path, how: str, sp_mode: str) -> None:
    _corpus(tmp_path)
    ref, count = _reference(tmp_path)
    assert count >= 8, "the test needs several validation chunks"
    for loss in run_distributed(_split, 4, tmp_path, how, sp_mode):
        assert loss == pytest.approx(ref, rel=1e-5)


def _train(rank: int, world: int, tmp: Path, run_dir: str) -> None:
    from seqmesh.trainer.loop import train

    train(config_from_dict(_overrides(tmp, world, steps=6, eval_every=4, ckpt_every=0)), run_dir, torch.device("cpu"))


def test_loop_logs_val_loss_every_eval_every_and_at_the_end(tmp_path: Path) -> None:
    _corpus(tmp_path)
    run_distributed(_train, 2, tmp_path, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(evals) == [4, 6]
    assert all(0 < v < 10 for v in evals.values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] == evals[6] and summary["val_loss_step"] == 6
    assert {r["peak_mem_source"] for r in records} == {"cpu_rss"}
