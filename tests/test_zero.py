"""ZeRO over HDP: stages 1/2 over 2 and 4 ranks give unsharded AdamW's parameters; shard checkpoints resume exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.parallel.zero import ZeroOptimizer, sum_of_squares
from seqmesh.trainer.data import num_targets, pack
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, tiny_config
from seqmesh.trainer.optim import FP8AdamW
from tests.distributed import run_distributed
from tests.test_tensor_parallel import where

VOCAB = 97
LR = 1e-2
STEPS = [[37, 5, 64, 12, 2, 29, 41], [8, 17, 50, 3, 30, 22, 9], [61, 4, 15, 26, 33, 7, 11]]
MAX_NORM = 0.2  # small enough that clipping acts on every step
SMALL_BUCKET = 4096  # bytes: stage 2 walks the flat space in many buckets


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))


def param_groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(name: str):
    if name == "adamw":
        return lambda groups: torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
    return lambda groups: FP8AdamW(groups, lr=LR, betas=(0.9, 0.95), state_dtype="fp8")


def step_docs(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in STEPS[step]]


def backward(model: Transformer, docs: list[torch.Tensor], denominator: int) -> float:
    packed = pack(docs)
    loss = token_loss_sum(model.logits(model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))),
                          packed.labels)
    (loss / denominator).backward()
    return loss.item()


def train(opt: ZeroOptimizer, model: Transformer, steps: range,
          group: dist.ProcessGroup | None = None) -> tuple[list[float], list[float]]:
    """Each rank of ``group`` runs every size-th document as its own micro-batch: different counts per rank."""
    rank, size = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    losses, norms = [], []
    for step in steps:
        docs, denominator = step_docs(step), num_targets(STEPS[step])
        loss = torch.tensor(sum(backward(model, [d], denominator) for d in docs[rank::size]) / denominator)
        opt.reduce_gradients()
        if size > 1:
            dist.all_reduce(loss, group=group)
        norms.append(opt.clip_grad_norm_(MAX_NORM).item())
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses, norms


def _reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Unsharded torch AdamW on the whole global batch, torch's own clipping."""
    model = make_model()
    opt = make_optimizer("adamw")(param_groups(model))
    losses, norms = [], []
    for step in range(len(STEPS)):
        losses.append(backward(model, step_docs(step), num_targets(STEPS[step])) / num_targets(STEPS[step]))
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        opt.zero_grad()
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _flat_reference(optimizer: str) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process stepping the whole flat buffer (what a sharded FP8AdamW must reproduce)."""
    model = make_model()
    losses, norms = train(ZeroOptimizer(param_groups(model), make_optimizer(optimizer), stage=1), model,
                          range(len(STEPS)))
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _sharded(optimizer: str, stage: int, group: dist.ProcessGroup | None) -> tuple[Transformer, ZeroOptimizer]:
    model = make_model()
    return model, ZeroOptimizer(param_groups(model), make_optimizer(optimizer), stage=stage, group=group,
                                bucket_bytes=SMALL_BUCKET)


def _zero_runs(rank: int, world: int) -> dict:
    """Four ranks: HDP=2 on each pair of ranks at once, then HDP=4 over all of them."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    out = {}
    for hdp, group in ((2, pairs[rank // 2]), (4, None)):
        for stage, optimizer in RUNS:
            model, opt = _sharded(optimizer, stage, group)
            losses, norms = train(opt, model, range(len(STEPS)), group)
            held = sum(s["exp_avg"].numel() for s in opt.optimizer.state.values())
            out[(hdp, stage, optimizer)] = (losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()},
                                            held)
        # resume: two steps, save model and this rank's optimizer shard, load both into fresh ones, one more step
        model, opt = _sharded("adamw", 2, group)
        train(opt, model, range(2), group)
        saved_model, saved_opt = model.state_dict(), opt.state_dict()
        model, opt = _sharded("adamw", 2, group)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        train(opt, model, range(2, 3), group)
        out[(hdp, "resumed")] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


RUNS = [(1, "adamw"), (2, "adamw"), (2, "fp8")]


def assert_adam_close(got: torch.Tensor, ref: torch.Tensor, rel: float, atol: float, lr: float, steps: int,
                      msg: str) -> None:
    """``got`` equals ``ref`` within (``rel``, ``atol``) except where Adam amplifies rounding, and there by at most
    what Adam allows.

    A sharded gradient is summed in another order than the unsharded one, so it differs by rounding. Adam
    divides each moment by its own root mean square, so an element whose gradient nearly cancels (within a
    few rounding units of zero) can take a step of any sign: its relative error becomes O(1), not O(2^-24).
    Such elements are rare; each still moves at most ``lr`` per step (|m_hat| <= sqrt(v_hat) up to 0.1% for
    betas (0.9, 0.95), by Cauchy-Schwarz over the bias-corrected averages; decay adds lr * wd * |p|), so two
    runs part by at most 2 * lr * steps there (5% margin for the decay)."""
    diff = (got - ref).abs()
    loose = diff > atol + rel * ref.abs()
    assert int(loose.sum()) <= max(1, got.numel() // 100), \
        f"{msg}: {int(loose.sum())} of {got.numel()} elements beyond rel={rel}, atol={atol} (max diff {diff.max():.3g})"
    assert float(diff.max()) <= 2.1 * lr * steps, f"{msg}: an element moved {diff.max():.3g} apart, more than Adam allows"


def test_zero_over_2_and_4_ranks_equals_unsharded_adamw() -> None:
    references = {"adamw": _reference(), "fp8": _flat_reference("fp8")}
    # every parameter starts on a 128-element block of the flat space
    numel = sum(-(-p.numel() // 128) * 128 for p in references["adamw"][2].values())
    for results in run_distributed(_zero_runs, 4):
        for hdp in (2, 4):
            for stage, optimizer in RUNS:
                losses, norms, final, held = results[(hdp, stage, optimizer)]
                ref_losses, ref_norms, expected = references[optimizer]
                # fp8 states turn last-bit differences of a sharded gradient sum into whole quantization steps
                rel, atol = (1e-5, 2e-5) if optimizer == "adamw" else (1e-3, 5e-4)
                assert losses == pytest.approx(ref_losses, rel=rel), (hdp, stage, optimizer)
                assert norms == pytest.approx(ref_norms, rel=rel), (hdp, stage, optimizer)
                for name, p in final.items():
                    assert_adam_close(p, expected[name], rel, atol, LR, len(STEPS),
                                      where(f"hdp={hdp} stage={stage} {optimizer}: {name}"))
                # each rank keeps 1/hdp of the optimizer state (shards are whole 128-element blocks)
                assert held <= -(-numel // hdp) + 2 * 128
            for name, p in results[(hdp, "resumed")].items():
                torch.testing.assert_close(p, results[(hdp, 2, "adamw")][2][name], rtol=0, atol=0,
                                           msg=where(f"hdp={hdp} resumed: {name}"))


def test_bad_input_fails_clearly() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="stage must be one of"):
        ZeroOptimizer(param_groups(model), make_optimizer("adamw"), stage=3)
    with pytest.raises(ValueError, match="appears twice"):
        ZeroOptimizer([{"params": list(model.parameters()) * 2}], make_optimizer("adamw"), stage=1)
    mixed = torch.nn.Linear(4, 4)
    mixed.bias.data = mixed.bias.data.double()
    with pytest.raises(ValueError, match="one dtype and device"):
        ZeroOptimizer([{"params": list(mixed.parameters())}], make_optimizer("adamw"), stage=1)
    sharded = ZeroOptimizer(param_groups(model), make_optimizer("adamw"), stage=1)
    with pytest.raises(ValueError, match="zero_stage"):
        sharded.load_state_dict(make_optimizer("adamw")(param_groups(make_model())).state_dict())
    state = sharded.state_dict()
    state["zero"] = {**state["zero"], "world": 2}
    with pytest.raises(ValueError, match="same HDP size"):
        sharded.load_state_dict(state)


def test_sum_of_squares_in_chunks() -> None:
    """One chunk: BLAS ``dot`` of the widened values (the CPU's way). Many chunks, a ragged last one, and the
    GPU's way (``vector_norm`` in fp64, squared): each within the recursive-summation bound n u sum(x^2) of the
    exact value (u = 2^-53; the squares are exact in fp64), so any device's order of the same terms gives the
    same fp32 norm wherever that bound is far from an fp32 rounding boundary, which is checked for this data
    rather than assumed."""
    x = (torch.randn(10_007, generator=torch.Generator().manual_seed(0)) * 1e-2).to(torch.bfloat16).view(1, -1)
    one = sum_of_squares(x, chunk=1 << 20)
    assert one.dtype == torch.float64
    wide = x.reshape(-1).double()
    assert torch.equal(one, torch.dot(wide, wide))
    exact = math.fsum(v * v for v in x.double().reshape(-1).tolist())  # correctly rounded: fsum of exact squares
    bound = x.numel() * 2.0**-53 * exact * 4  # 4: vector_norm's sqrt and the square round once each too
    norm = math.sqrt(exact)
    f = torch.tensor(norm).float()
    half_ulp = (torch.nextafter(f, torch.tensor(float("inf"))) - f).item() / 2
    assert half_ulp - abs(norm - f.item()) > bound / norm, "this data lies too close to an fp32 rounding boundary"
    gpu_way = torch.linalg.vector_norm(x.reshape(-1), 2, dtype=torch.float64).square().item()
    for got in (one.item(), sum_of_squares(x, chunk=1000).item(), gpu_way):
        assert abs(got - exact) <= bound
        assert torch.tensor(math.sqrt(got)).float() == f

def test_clip_under_the_limit_leaves_host_gradients_and_nan_still_spreads() -> None:
    """A host shard skips the scaling when the factor is exactly 1 (the norm under the limit): the same bits as
    multiplying by 1, signed zeros included. A non-finite norm still scales, so NaN reaches every gradient as
    it does on a GPU (the step loop's non-finite policy sees the same gradients either way)."""
    model = make_model()
    opt = ZeroOptimizer(param_groups(model), make_optimizer("adamw"), stage=1)
    g = torch.randn(opt.shard_grad.numel(), generator=torch.Generator().manual_seed(0)) * 1e-3
    g[0] = -0.0
    opt.shard_grad.copy_(g)
    norm = opt.clip_grad_norm_(1e6)
    assert torch.equal(opt.shard_grad.view(torch.int32), (g * 1.0).view(torch.int32))
    assert norm.item() == pytest.approx(g.double().norm().item(), rel=1e-6)
    opt.shard_grad[1] = float("nan")
    opt.clip_grad_norm_(1e6)
    assert torch.isnan(opt.shard_grad).all()


@pytest.mark.parametrize("update_device", [None, "cpu"])  # the host update, and the staged one (as copies)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8adamw_scales_host_gradients_inside_its_step(update_device: str | None, dtype: torch.dtype) -> None:
    """On a host shard the clip hands its factor to ``FP8AdamW``, which scales each piece as its update reads it
    (several pieces here): the updated weights are bitwise those of scaling the whole buffer first."""
    stepped = []
    for deferred in (True, False):
        model = make_model().to(dtype)
        opt = ZeroOptimizer(param_groups(model), lambda g: FP8AdamW(g, lr=LR, state_dtype="fp8",
                                                                      host_chunk_elems=4096), stage=1)
        opt.optimizer.update_device = torch.device(update_device) if update_device else None
        g = (torch.randn(opt.shard_grad.numel(), generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
        opt.shard_grad.copy_(g)
        if deferred:
            norm = opt.clip_grad_norm_(MAX_NORM)
            assert torch.equal(opt.shard_grad, g)  # not scaled by a pass of its own
        else:
            norm = opt.clip_grad_norm_(float("inf"))
            opt.shard_grad.mul_((MAX_NORM / (norm + 1e-6)).clamp(max=1.0).to(dtype))
        assert norm.item() > MAX_NORM  # the clip acts
        opt.step()
        opt.zero_grad()
        stepped.append([p.detach().clone() for p in model.parameters()])
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    for a, b in zip(*stepped):
        assert torch.equal(a.view(int_type), b.view(int_type))
