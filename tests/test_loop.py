"""The step loop: exact global per-token loss under any split, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seqmesh import first_use
from seqmesh.parallel.grad_reduce import reduce_gradients
from seqmesh.parallel.mesh import Mesh
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data import num_targets, pack
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, tiny_config
from seqmesh.parallel.sequence import apply_sequence_parallel, make_sp_batch
from tests.conftest import CORPUS_SIZES, tiny_overrides, write_corpus
from tests.distributed import run_distributed
from tests.tolerances import loss_rel

LENGTHS = [37, 5, 64, 12, 2, 29, 41, 8, 17]
VOCAB = 97
LOSS_REL = loss_rel(sum(LENGTHS), 128)  # the MLP's width (128) is the longest sum behind a token's loss


def _model() -> Transformer:
    torch.manual_seed(0)
    return apply_sequence_parallel(Transformer(tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2)))


def _docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    """Single process, whole global batch in one packed micro-batch, mean over all target tokens."""
    model = _model()
    packed = pack(_docs())
    meta = make_sp_batch(packed.seqlens, "local", None)
    loss = token_loss_sum(model.logits(model(packed.input_ids, meta)), packed.labels) / packed.num_targets
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


# Four ranks; ranks run different numbers of micro-batches, one rank sits out micro-batch 1,
# and groups of 2 ranks run sequence parallel: any split must give the reference loss and gradients.
PLAN = plan_from_assignment(4, [
    [(0, 1, [0, 1]), (1, 1, [2]), (2, 2, [3, 4, 5])],
    [(0, 2, [6]), (2, 1, [7])],
    [(0, 1, [8])],
])


def _split_step(rank: int, world: int, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    from seqmesh.trainer.loop import run_group

    cfg = config_from_dict({"parallel": {"sp_mode": mode}, "launch": {"num_workers": world}})
    mesh = Mesh(world, rank)
    before = first_use.counts()
    mesh.ensure_sp_groups((g.first, g.count) for mb in PLAN.microbatches for g in mb.groups)
    assert first_use.since(before) == {"process_group": 2}, "the SP groups [0, 2) and [2, 4) are new, once each"
    mesh.ensure_sp_groups([(0, 2), (2, 2), (1, 1)])
    assert first_use.since(before) == {"process_group": 2}, "cached groups are no first use"
    model, docs = _model(), _docs()
    denominator = num_targets(LENGTHS)
    loss_sum = torch.zeros(())
    for _, group in PLAN.work_of(rank):
        loss_sum += run_group(model, [docs[s] for s in group.sequences], mesh.sp_group(group.first, group.count),
                              cfg.model, cfg.parallel, torch.device("cpu"), denominator)
    reduce_gradients(model.parameters())
    dist.all_reduce(loss_sum)
    return loss_sum.item() / denominator, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ulysses", "ring", "tokenring"])
def test_any_split_equals_single_process(mode: str) -> None:
    ref_loss, ref_grads = _reference()
    for loss, grads in run_distributed(_split_step, 4, mode):
        assert loss == pytest.approx(ref_loss, rel=LOSS_REL)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _corpus(tmp: Path) -> Path:
    return write_corpus(tmp, CORPUS_SIZES)


def _train(rank: int, world: int, overrides: dict, run_dir: str) -> list[float]:
    from seqmesh.trainer.loop import train

    train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    if rank:
        return []
    return [json.loads(line)["loss"] for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _overrides(src: Path, tmp: Path, stop_at: int | None, resume: bool) -> dict:
    return tiny_overrides(
        data={"source": str(src), "tokenizer": "byte", "max_seq_len": 96, "global_batch": 6,
              "cache_dir": str(tmp / "cache")},
        launch={"num_workers": 2}, optim={"warmup_steps": 2},
        steps=20, stop_at=stop_at, ckpt_every=5, resume=resume, scheduler={"lookahead": 0},
    )


def test_resume_continues_exactly(tmp_path: Path, corpus: Path) -> None:
    src = corpus
    straight = run_distributed(_train, 2, _overrides(src, tmp_path, None, False), str(tmp_path / "a"))[0]
    run_distributed(_train, 2, _overrides(src, tmp_path, 10, False), str(tmp_path / "b"))
    resumed = run_distributed(_train, 2, _overrides(src, tmp_path, None, True), str(tmp_path / "b"))[0]
    assert len(straight) == len(resumed) == 20
    # Every step reports its one-off work (summed over ranks); a step that did some is never fitted.
    feedback = [json.loads(line)["cost_feedback"] for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert all(isinstance(f["one_off"], dict) and not (f["one_off"] and f["fit"]) for f in feedback)
    assert resumed == straight
    assert straight[-1] < straight[0]


# parallel.sp_mode=auto: the plan names each group's mode, and one step may mix them.
MIXED = plan_from_assignment(4, [
    [(0, 1, [0, 1]), (1, 1, [2]), (2, 2, [3, 4, 5], "tokenring")],
    [(0, 2, [6], "ulysses"), (2, 1, [7])],
    [(0, 2, [8], "ring")],
])


def _mixed_step(rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    import functools

    from seqmesh.parallel.step_runner import forward_backward
    from seqmesh.trainer.microbatch import autocast, batch_layout, loss_sum_of

    cfg = config_from_dict({"parallel": {"sp_mode": "auto"}, "launch": {"num_workers": world}})
    mesh = Mesh(world, rank)
    mesh.ensure_sp_groups((g.first, g.count) for mb in MIXED.microbatches for g in mb.groups)
    model, docs = _model(), _docs()
    layout = batch_layout(lambda g: [docs[s] for s in g.sequences], cfg.parallel, torch.device("cpu"))
    denominator = num_targets(LENGTHS)
    loss_sum = torch.zeros(())
    for _, group in MIXED.work_of(rank):
        mb = layout(group, mesh.sp_group(group.first, group.count))
        assert mb.meta.mode == (group.mode or "local")
        loss_sum += forward_backward(model, mb, loss_sum_of, denominator,
                                     functools.partial(autocast, cfg.model.dtype, torch.device("cpu")))
    reduce_gradients(model.parameters())
    dist.all_reduce(loss_sum)
    return loss_sum.item() / denominator, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_groups_of_one_step_may_run_different_modes() -> None:
    ref_loss, ref_grads = _reference()
    for loss, grads in run_distributed(_mixed_step, 4):
        assert loss == pytest.approx(ref_loss, rel=LOSS_REL)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_mode_needs_the_plan_to_name_it() -> None:
    from seqmesh.trainer.microbatch import layout_group

    cfg = config_from_dict({"parallel": {"sp_mode": "auto"}, "launch": {"num_workers": 2}})
    with pytest.raises(ValueError, match="sp_mode=auto needs the plan to name each group's mode"):
        layout_group(_docs()[:2], object(), cfg.parallel, torch.device("cpu"))
