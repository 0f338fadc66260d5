"""Tensor parallelism: a TP=2 forward/backward equals the single-process model; bad layouts fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.parallel.tensor import (apply_tensor_parallel, check_tensor_parallel, reduce_tensor_parallel_gradients,
                                     vocab_parallel_cross_entropy)
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.data import IGNORE_INDEX, pack
from seqmesh.trainer.model import Transformer, model_dims, tiny_config
from tests.distributed import run_distributed
from tests.tolerances import loss_rel

VOCAB = 97  # odd: TP pads the vocabulary to a multiple of the degree
LENGTHS = [37, 5, 64, 13]  # 119 tokens: the sequence-parallel token split needs padding too

CASES = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2),
    # one KV head (replicated on both TP ranks), untied head, biases on q/k/v/o and the MLP
    "mqa_bias_untied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            attention_bias=True, mlp_bias=True),
}


def where(context: str):
    """An assert_close message that keeps torch's mismatch details after ``context``."""
    return lambda message: f"{context}: {message}"


def make_model(case: str, seed: int = 0, intermediate_size: int = 64) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=intermediate_size,
                                    num_hidden_layers=2, **CASES[case]))
    if model.dims.qkv_bias:  # HF initialises biases to zero; random ones check that they are sharded right
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.02)
    return model


def make_docs(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def full_tensors(named: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], group: dist.ProcessGroup | None,
                 kv_copies: int = 1) -> dict[str, torch.Tensor]:
    """The unsharded tensors of a TP model's named shards, gathered over ``group``, in the shapes of ``reference``
    (the unsharded model's tensors of the same names).

    Shards are concatenated along the dimension where their shape differs from the reference
    (vocabulary padding is cut off; a replicated KV head is taken once); tensors with the reference
    shape are replicated and must agree on every rank.
    """
    gathered: list[dict[str, torch.Tensor]] = [{}] * dist.get_world_size(group)
    dist.all_gather_object(gathered, named, group=group)
    out = {}
    for name, ref in reference.items():
        shards = [g[name] for g in gathered]
        if shards[0].shape == ref.shape:
            for s in shards[1:]:
                torch.testing.assert_close(s, shards[0], rtol=0, atol=0, msg=where(f"{name} differs across TP ranks"))
            out[name] = shards[0]
            continue
        dim = next(d for d in range(ref.dim()) if shards[0].shape[d] != ref.shape[d])
        if (".k_proj." in name or ".v_proj." in name) and kv_copies > 1:
            shards = shards[::kv_copies]
        out[name] = torch.cat(shards, dim=dim).narrow(dim, 0, ref.shape[dim])
    return out


def _reference(case: str) -> tuple[torch.Tensor, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = make_model(case)
    packed = pack(make_docs(LENGTHS))
    hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
    loss = F.cross_entropy(model.logits(hidden), packed.labels, ignore_index=IGNORE_INDEX,
                           reduction="sum") / packed.num_targets
    loss.backward()
    return (hidden.detach(), loss.item(), {n: p.grad for n, p in model.named_parameters()},
            dict(model.named_parameters()))


def _tp_step(rank: int, world: int, cases: list[str]) -> dict[str, tuple]:
    mesh = Mesh(world, rank, tp=world)
    results = {}
    for case in cases:
        model = make_model(case)
        tp = apply_tensor_parallel(model, mesh.tp_group)
        packed = pack(make_docs(LENGTHS))
        hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
        loss = vocab_parallel_cross_entropy(model.logits(hidden), packed.labels, tp, IGNORE_INDEX) / packed.num_targets
        loss.backward()
        reduce_tensor_parallel_gradients(model)
        shapes = dict(make_model(case).named_parameters())  # full_tensors needs only the unsharded shapes
        grads = full_tensors({n: p.grad for n, p in model.named_parameters()}, shapes, mesh.tp_group, tp.kv_copies)
        params = full_tensors({n: p.detach() for n, p in model.named_parameters()}, shapes, mesh.tp_group,
                              tp.kv_copies)
        results[case] = (hidden.detach(), loss.item(), grads, params)
    return results


def test_tp2_forward_backward_equals_single_process() -> None:
    per_rank = run_distributed(_tp_step, 2, list(CASES))
    for case in CASES:
        ref_hidden, ref_loss, ref_grads, ref_params = _reference(case)
        for results in per_rank:
            hidden, loss, grads, params = results[case]
            torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5, msg=where(f"{case}: hidden"))
            assert loss == pytest.approx(ref_loss, rel=loss_rel(sum(LENGTHS), VOCAB)), case
            for name, g in grads.items():
                torch.testing.assert_close(params[name], ref_params[name].detach(), rtol=0, atol=0, msg=name)
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=where(f"{case}: {name}"))


def test_layouts_that_do_not_divide_fail_clearly() -> None:
    dims = model_dims(tiny_config(vocab_size=VOCAB, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                                  intermediate_size=96))
    with pytest.raises(ValueError, match="does not divide the model's 6 attention heads"):
        check_tensor_parallel(dims, 4)
    with pytest.raises(ValueError, match="2 key/value heads"):
        check_tensor_parallel(dims, 3)
    check_tensor_parallel(dims, 6)  # 6 = 3 x 2 KV heads: each KV head replicated on 3 ranks
    with pytest.raises(ValueError, match="intermediate_size=100"):
        check_tensor_parallel(model_dims(tiny_config(vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=8,
                                                     intermediate_size=100)), 8)
    with pytest.raises(ValueError, match="too large for a vocabulary of 5"):
        check_tensor_parallel(model_dims(tiny_config(vocab_size=5)), 4)
    with pytest.raises(ValueError, match="not divisible by tp x pp"):
        Mesh(6, 0, tp=4)


def test_config_rejects_bad_tensor_parallel_layouts() -> None:
    with pytest.raises(ConfigError, match="not divisible by parallel.tp"):
        config_from_dict({"parallel": {"tp": 4}, "launch": {"num_workers": 6}})
    with pytest.raises(ConfigError, match="num_heads=8"):
        config_from_dict({"parallel": {"tp": 3}, "launch": {"num_workers": 6}})
    cfg = config_from_dict({"parallel": {"tp": 2, "zero_stage": 2}, "launch": {"num_workers": 4}})
    assert cfg.hdp == 2


WIDE = 96  # an MLP shard (96 / 2) wider than hidden (32): no activation shape is mistaken for another


def _tp_autocast_step(rank: int, world: int, case: str) -> tuple:
    """A TP=2 step under bf16 autocast, recording the shapes of the tensors autograd saves."""
    mesh = Mesh(world, rank, tp=world)
    model = make_model(case, intermediate_size=WIDE)
    tp = apply_tensor_parallel(model, mesh.tp_group)
    packed = pack(make_docs(LENGTHS))
    shapes: list[tuple[int, ...]] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
        loss = vocab_parallel_cross_entropy(model.logits(hidden), packed.labels, tp, IGNORE_INDEX) / packed.num_targets
    loss.backward()
    reduce_tensor_parallel_gradients(model)
    full = dict(make_model(case, intermediate_size=WIDE).named_parameters())
    grads = full_tensors({n: p.grad for n, p in model.named_parameters()}, full, mesh.tp_group, tp.kv_copies)
    return loss.item(), grads, shapes


def test_tp2_under_autocast_matches_and_saves_only_token_shards_of_block_inputs() -> None:
    """bf16 autocast: the same loss and gradients as one process (bf16 tolerance), and no decoder
    block keeps the all-gathered ``[tokens, hidden]`` input of its column-parallel GEMMs for
    backward (sequence parallelism's memory saving); only the LM head's input is that shape."""
    case = "mqa_bias_untied"
    model = make_model(case, intermediate_size=WIDE)
    packed = pack(make_docs(LENGTHS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
        ref_loss = F.cross_entropy(model.logits(hidden).float(), packed.labels, ignore_index=IGNORE_INDEX,
                                   reduction="sum") / packed.num_targets
    ref_loss.backward()
    hidden_size, tokens = model.dims.hidden_size, sum(LENGTHS)
    for loss, grads, shapes in run_distributed(_tp_autocast_step, 2, case):
        assert loss == pytest.approx(ref_loss.item(), rel=2e-2)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=5e-2, atol=5e-3, msg=where(name))
        gathered = [s for s in shapes if len(s) == 2 and s[0] >= tokens and s[1] == hidden_size]
        assert len(gathered) == 1, f"saved gathered-size inputs {gathered}; expected only the LM head's"
