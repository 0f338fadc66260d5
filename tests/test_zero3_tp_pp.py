"""ZeRO-3 composed with tensor and pipeline parallelism equals one process, at (TP, PP, HDP) in {1, 2}^3.

Every layout builds the model as the trainer does (``build_parallel_model``: TP, pipeline split,
ZeRO-3 over HDP) and runs the trainer's step runner over hand-made plans in which HDP ranks run
different numbers of micro-batches (an idle rank joins the layer collectives empty, also inside
the 1F1B and interleaved schedules) and SP groups span two HDP ranks. After each step the rank's
pieces of the parameters and of the reduced gradients (from ZeRO-3's shards alone) are reassembled
into full tensors here and compared with one process at the same parameters:

* loss and gradients: the same sums in another order (TP shards, SP splits, pipeline stages, the
  per-micro-batch reduce-scatters), so they agree to fp32 rounding (``_grad_atol``);
* the update: a reference AdamW replays the run's trajectory (its parameters are set to the run's
  before each step) and the run's updated parameters must lie within what the gradients' rounding
  can move Adam's step (``_update_tolerance``), element by element.

Both ways of reducing layer gradients run (``parallel.zero3_grad_reduce``: in every backward, or once
per step), with and without PP; each step also counts the prefetched layer gathers and the
reduce-scatters issued during the passes (active and idle ranks alike), checks that at most two
layers were whole at any gather and that no parameter holds storage between steps.

The model has tied embeddings (the pipeline's last stage keeps a whole copy, re-sent after every
step), a vocabulary TP does not divide (padding rows) and one KV head (TP replicates it on both
ranks, so its gradient is summed over TP inside ZeRO-3's shard). The (2, 2, 2) run also saves a
layout-free checkpoint, which (TP 1, PP 2 interleaved, HDP 4) resumes, steps and saves again, and
(2, 2, 2) resumes that: parameters come back bit for bit and the steps after a resume still match.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.parallel.shard_spec import named_parameters, shard_specs
from seqmesh.scheduler.plan import Plan, plan_from_assignment
from seqmesh.trainer.build import build_model, build_optimizer
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data import num_targets, pack
from seqmesh.trainer.loss import token_loss_sum
from tests.distributed import run_distributed
from tests.tolerances import EPS32, grad_atol

VOCAB = 97  # odd: TP=2 pads the last vocabulary shard
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 1,
         "vocab_size": VOCAB}
LR, ADAM_EPS, MAX_NORM = 1e-2, 1e-6, 0.5
STEP_LENGTHS = [[37, 5, 64, 12, 29, 41], [9, 70, 23, 16, 4, 33], [48, 11, 6, 30, 20, 52], [25, 60, 8, 14, 40, 3]]
# Per HDP size, one plan per step: (first HDP rank, group size, sequences) per group of each micro-batch.
PLANS: dict[int, list[Plan]] = {
    1: [plan_from_assignment(1, [[(0, 1, [0, 1])], [(0, 1, [2, 3])], [(0, 1, [4, 5])]])] * 2,
    # rank 1 sits out micro-batch 2, rank 0 micro-batch 1 of the second step; SP groups of two.
    2: [plan_from_assignment(2, [[(0, 1, [0, 1]), (1, 1, [2])], [(0, 2, [3])], [(0, 1, [4])], [(0, 2, [5])]]),
        plan_from_assignment(2, [[(1, 1, [0]), (0, 1, [1, 2])], [(1, 1, [3, 4])], [(0, 2, [5])]]),
        None,
        plan_from_assignment(2, [[(0, 2, [0, 1])], [(0, 1, [2]), (1, 1, [3])], [(1, 1, [4, 5])]])],
    4: [plan_from_assignment(4, [[(0, 2, [0, 1]), (2, 1, [2]), (3, 1, [3])], [(0, 4, [4])], [(1, 1, [5])]]),
        plan_from_assignment(4, [[(0, 1, [0]), (1, 1, [1]), (2, 2, [2, 3])], [(2, 1, [4, 5])]]),
        plan_from_assignment(4, [[(0, 4, [0])], [(0, 2, [1, 2]), (2, 2, [3])], [(3, 1, [4, 5])]])],
}


def _config(world: int, tp: int, pp: int, virtual: int = 1, reduce: str = "auto"):
    """``reduce``: ``parallel.zero3_grad_reduce``, or "host": host shards (``offload.params=cpu``), reduced per
    micro-batch."""
    host = reduce == "host"
    return config_from_dict({"model": MODEL, "data": {"max_seq_len": 96},
                             "parallel": {"tp": tp, "pp": pp, "pp_virtual": virtual, "zero_stage": 3,
                                          "zero3_grad_reduce": "auto" if host else reduce, "sp_mode": "ulysses"},
                             "offload": {"params": "cpu" if host else "none"},
                             "launch": {"num_workers": world}, "optim": {"lr": LR, "eps": ADAM_EPS}})


def _docs(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in STEP_LENGTHS[step]]


def _pieces(model: torch.nn.Module, optimizer, mesh: Mesh, grad: bool) -> list[tuple]:
    """This rank's written pieces of every parameter (or its reduced gradient), read from ZeRO-3's shard:
    (name, full shape, TP dim, TP start, TP length, lo, hi, values of the slice's flat [lo, hi))."""
    specs, names = shard_specs(model, mesh.tp_rank), {id(p): n for n, p in named_parameters(model).items()}
    out = []
    for shard in optimizer.flat_shards():
        values = shard.tensor.grad if grad else shard.tensor
        for p, lo, hi, pos in shard.members:
            spec = specs[names[id(p)]]
            hi = min(hi, spec.numel)  # vocabulary padding rows belong to no full index
            if spec.writer and hi > lo:
                out.append((names[id(p)], spec.full_shape, spec.dim, spec.start, spec.length, lo, hi,
                            values.detach()[pos:pos + hi - lo].clone()))
    return out


def _assemble(per_rank: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's pieces; every element must be covered."""
    regions: dict[tuple, torch.Tensor] = {}
    shapes: dict[str, tuple] = {}
    for pieces in per_rank:
        for name, shape, dim, start, length, lo, hi, values in pieces:
            shapes[name] = tuple(shape)
            region = list(shape) if dim is None else [*shape[:dim], length, *shape[dim + 1:]]
            key = (name, dim, start, length)
            flat = regions.setdefault(key, torch.full((math.prod(region),), math.nan))
            flat[lo:hi] = values
    out = {name: torch.full(shape, math.nan) for name, shape in shapes.items()}
    for (name, dim, start, length), flat in regions.items():
        target = out[name] if dim is None else out[name].narrow(dim, start, length)
        target.copy_(flat.view(target.shape))
    for name, t in out.items():
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} elements written by no rank"
    return out


def _train(model, optimizer, runner, mesh: Mesh, steps: range) -> list[dict]:
    """The loop's step (runner, reduce, clip, AdamW, weight sync) for ``steps``; each step's pieces, how many
    layer gathers were prefetched (launched asynchronously) and layer gradients reduce-scattered during the
    step's passes against how many should have been, and the most layers whole at any gather."""
    import torch.distributed as dist

    from seqmesh.trainer.microbatch import batch_layout

    cfg = _config(mesh.world, mesh.tp, mesh.pp)
    chunks = getattr(model, "chunks", [model])
    # Every pass (a chunk's forward or backward) prefetches each layer but its first; every HDP rank runs or
    # idles through every plan micro-batch, in each of its chunks.
    per_item = 2 * sum(len(c.model.layers) - 1 for c in chunks) if mesh.hdp > 1 else 0
    # Reduce-scatters inside the passes: one per layer and item, or none when they wait for the step's end.
    scatters_per_item = 0 if optimizer.reduce_per_step or mesh.hdp == 1 else sum(len(c.model.layers) for c in chunks)
    gather, scatter = dist.all_gather_into_tensor, dist.reduce_scatter_tensor
    records = []
    for step in steps:
        docs = _docs(step)
        before = _pieces(model, optimizer, mesh, grad=False)
        launched, whole, scattered = [], [], []

        def counting(*args, **kwargs):
            launched.append(kwargs.get("async_op", False))
            whole.append(sum(1 for u in optimizer.units[:-1] if u.full.untyped_storage().nbytes()))
            return gather(*args, **kwargs)

        def counting_scatters(*args, **kwargs):
            scattered.append(kwargs.get("group") is optimizer.group)  # TP's token reduce-scatters are not ZeRO's
            return scatter(*args, **kwargs)

        dist.all_gather_into_tensor, dist.reduce_scatter_tensor = counting, counting_scatters
        try:
            loss_sum = runner.run(PLANS[mesh.hdp][step], batch_layout(lambda g: [docs[s] for s in g.sequences],
                                                                      cfg.parallel, torch.device("cpu")),
                                  num_targets(STEP_LENGTHS[step]))
        finally:
            dist.all_gather_into_tensor, dist.reduce_scatter_tensor = gather, scatter
        loss_sum = runner.reduce(loss_sum)
        grads = _pieces(model, optimizer, mesh, grad=True)
        norm = optimizer.clip_grad_norm_(MAX_NORM)
        optimizer.step()
        runner.sync_weights()
        optimizer.zero_grad()
        # Between steps no parameter holds storage (the tied copy on the last stage is not a parameter here).
        assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == 0
        records.append({"step": step, "loss": loss_sum.item() / num_targets(STEP_LENGTHS[step]), "norm": norm.item(),
                        "before": before, "grads": grads, "after": _pieces(model, optimizer, mesh, grad=False),
                        "prefetched": sum(launched), "to_prefetch": per_item * len(PLANS[mesh.hdp][step].microbatches),
                        "scattered": sum(scattered),
                        "to_scatter": scatters_per_item * len(PLANS[mesh.hdp][step].microbatches),
                        "most_layers_whole": max(whole, default=0)})
    return records


def _build(world: int, rank: int, tp: int, pp: int, virtual: int = 1, reduce: str = "auto"):
    from seqmesh.trainer.build import build_parallel_model
    from seqmesh.trainer.loop import make_step_runner

    cfg = _config(world, tp, pp, virtual, reduce)
    mesh = Mesh(world, rank, tp, pp)
    torch.manual_seed(0)
    model, optimizer, _ = build_parallel_model(cfg, VOCAB, mesh, torch.device("cpu"))
    runner = make_step_runner(model, optimizer, mesh, torch.device("cpu"), cfg.model, zero_stage=3)
    runner.sync_weights()
    return model, optimizer, runner, mesh


def _layouts(rank: int, world: int, layouts: list[tuple[int, int, int, str]]) -> dict:
    """Two steps from the same initial model at each (tp, pp, virtual, zero3_grad_reduce) layout of this world."""
    out = {}
    for layout in layouts:
        model, optimizer, runner, mesh = _build(world, rank, *layout)
        out[layout] = _train(model, optimizer, runner, mesh, range(2))
    return out


def _across_layouts(rank: int, world: int, tmp: str) -> dict:
    """(2, 2, 2): two steps, saved; (TP 1, PP 2 interleaved, HDP 4, gradients reduce-scattered per micro-batch)
    resumes it, steps, saves; (2, 2, 2) resumes that and steps (reducing once per step, PP's default)."""
    from seqmesh.trainer.reshard import load_resharded, save_resharded

    model, optimizer, runner, mesh = _build(world, rank, 2, 2)
    first = _train(model, optimizer, runner, mesh, range(2))
    save_resharded(f"{tmp}/a", 2, model, optimizer, mesh, {"extra": {"step": 2}})
    model, optimizer, runner, mesh = _build(world, rank, 1, 2, 2, "microbatch")
    assert load_resharded(f"{tmp}/a", model, optimizer, mesh)[0] == 2
    runner.sync_weights()
    second = _train(model, optimizer, runner, mesh, range(2, 3))
    save_resharded(f"{tmp}/b", 3, model, optimizer, mesh, {"extra": {"step": 3}})
    model, optimizer, runner, mesh = _build(world, rank, 2, 2)
    assert load_resharded(f"{tmp}/b", model, optimizer, mesh)[0] == 3
    runner.sync_weights()
    third = _train(model, optimizer, runner, mesh, range(3, 4))
    return {"trajectory": first + second + third}


def _reference_step(model: torch.nn.Module, step: int, plan: Plan) -> float:
    """One process: the plan's groups (as packed by the runner) forward and backward; returns the loss."""
    docs, denominator, loss = _docs(step), num_targets(STEP_LENGTHS[step]), 0.0
    for group in (g for mb in plan.microbatches for g in mb.groups):
        packed = pack([docs[s] for s in group.sequences])
        hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
        part = token_loss_sum(model.logits(hidden), packed.labels) / denominator
        part.backward()
        loss += part.item()
    return loss


def _update_tolerance(p: torch.Tensor, lr: float, delta: torch.Tensor, state: dict) -> torch.Tensor:
    """How far AdamW's update of each element may move when every gradient it averaged was off by at most
    ``delta``: with bias-corrected moments m and s = sqrt(v) (|m| <= s), |d(m / (s + eps))| <= 2 delta / (s + eps),
    times lr; plus the rounding of the update and of the weight-decayed parameter (a few ulps of |p| and lr)."""
    step = int(state["step"])
    s = (state["exp_avg_sq"] / (1 - 0.999**step)).sqrt()
    return lr * 2 * delta / (s + ADAM_EPS) + 4 * EPS32 * (p.abs() + lr)


def _check_trajectory(name: str, runs: list[list[dict]], plans: list[Plan | None]) -> None:
    """Replay ``runs`` (per rank: step records) on one process, step k over ``plans[k]``, and compare loss, norm,
    gradients and update."""
    records = [list(r) for r in zip(*runs)]  # per step: every rank's record
    model = build_model(_config(1, 1, 1).model, VOCAB, torch.device("cpu"))
    opt = build_optimizer(model, _config(1, 1, 1).optim)
    params = dict(named_parameters(model))
    delta = {n: torch.zeros_like(p) for n, p in params.items()}  # bound on each element's clipped-gradient error
    for per_rank in records:
        step = per_rank[0]["step"]
        before = _assemble([r["before"] for r in per_rank])
        assert before.keys() == params.keys(), name
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
        ref_loss = _reference_step(model, step, plans[step])
        tokens = sum(STEP_LENGTHS[step])
        grads = _assemble([r["grads"] for r in per_rank])
        bounds = {n: grad_atol(p.grad, tokens, chained=2 * MODEL["num_layers"]) for n, p in params.items()}
        for n, p in params.items():
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=bounds[n],
                                       msg=lambda m, n=n: f"{name} step {step}: gradient of {n}: {m}")
        for r in per_rank:
            assert r["prefetched"] == r["to_prefetch"], (name, step, r["prefetched"], r["to_prefetch"])
            assert r["scattered"] == r["to_scatter"], (name, step, r["scattered"], r["to_scatter"])
            assert r["most_layers_whole"] <= 2, (name, step, "more than the layer in use and the next one gathered")
        loss = per_rank[0]["loss"]
        assert all(r["loss"] == loss and r["norm"] == per_rank[0]["norm"] for r in per_rank), name
        assert loss == pytest.approx(ref_loss, rel=2 * MODEL["num_layers"] * EPS32 * tokens**0.5), name
        ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()
        assert ref_norm > MAX_NORM, "clipping must be active for the global norm over shards to matter"
        # |norm - ref| <= the norm of the per-element error bounds.
        norm_tol = math.sqrt(sum(b**2 * params[n].numel() for n, b in bounds.items()))
        assert abs(per_rank[0]["norm"] - ref_norm) <= norm_tol, (name, step, per_rank[0]["norm"], ref_norm)
        coef = MAX_NORM / (ref_norm + 1e-6)
        for n, p in params.items():  # the clipped gradient: coef x the bound, plus the coefficient's own error
            delta[n] = torch.maximum(delta[n], coef * bounds[n] + norm_tol / ref_norm * p.grad.abs())
        opt.step()
        opt.zero_grad()
        after = _assemble([r["after"] for r in per_rank])
        for n, p in params.items():
            tol = _update_tolerance(p.detach(), LR, delta[n], opt.state[p])
            err = (after[n] - p.detach()).abs()
            worst = int((err - tol).argmax())
            assert bool((err <= tol).all()), (f"{name} step {step}: {n} updated off by {err.view(-1)[worst]:.3g} "
                                              f"at element {worst}, allowed {tol.view(-1)[worst]:.3g}")


# (tp, pp, virtual stages, parallel.zero3_grad_reduce) per world size: every (TP, PP, HDP) in {1, 2}^3 but
# (2, 2, 2) (the cross-layout test), with the gradients reduced per micro-batch and per step at HDP 2 with and
# without PP (auto: per step under PP), and host shards (``offload.params=cpu``) under TP and under PP.
@pytest.mark.parametrize("world, layouts", [
    (1, [(1, 1, 1, "auto")]),
    (2, [(2, 1, 1, "auto"), (1, 2, 1, "auto"), (1, 1, 1, "auto"), (1, 1, 1, "step")]),
    (4, [(2, 2, 1, "auto"), (2, 1, 1, "auto"), (1, 2, 1, "auto"), (1, 2, 1, "microbatch"), (2, 1, 1, "host"),
         (1, 2, 1, "host")]),
], ids=["world1", "world2", "world4"])
def test_zero3_with_tp_and_pp_equals_one_process(world: int, layouts: list[tuple[int, int, int, str]]) -> None:
    per_rank = run_distributed(_layouts, world, layouts)
    for layout in layouts:
        tp, pp, virtual, reduce = layout
        _check_trajectory(f"tp{tp} pp{pp}{' v2' if virtual > 1 else ''} hdp{world // (tp * pp)} reduce={reduce}",
                          [r[layout] for r in per_rank], PLANS[world // (tp * pp)])


def test_zero3_tp2_pp2_hdp2_and_checkpoints_across_layouts(tmp_path) -> None:
    per_rank = run_distributed(_across_layouts, 8, str(tmp_path))
    runs = [r["trajectory"] for r in per_rank]
    # A resume restores exactly what was saved: each resumed run starts from the saved run's parameters.
    for saved, resumed in ((1, 2), (2, 3)):
        last = _assemble([r[saved]["after"] for r in runs])
        first = _assemble([r[resumed]["before"] for r in runs])
        for name, value in last.items():
            assert torch.equal(first[name], value), f"resume after step {saved + 1}: {name}"
    # Steps 1-2 at (2, 2, 2), step 3 at (1, 2 x 2, 4) from its checkpoint, step 4 at (2, 2, 2) from that one: one
    # trajectory, whose Adam moments must have survived both layout changes for the updates to match.
    plans = [PLANS[2][0], PLANS[2][1], PLANS[4][2], PLANS[2][3]]
    _check_trajectory("tp2 pp2 hdp2 -> tp1 pp2 v2 hdp4 -> tp2 pp2 hdp2", runs, plans)
