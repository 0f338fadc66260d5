"""The trainer's count of activation memory per token (trainer/memory_model.py), against the shapes it
counts and against what the planner does with it."""

from __future__ import annotations

import dataclasses

import pytest

from seqmesh.scheduler import default_cost_model
from seqmesh.trainer.build import hf_config
from seqmesh.trainer.config import ModelConfig
from seqmesh.trainer.memory_model import (activation_bytes_per_token, layer_saved_bytes, loss_working_bytes,
                                          mlp_tile_working_bytes)
from seqmesh.trainer.model import model_dims

LLAMA_1B = ModelConfig(name="llama-1b", hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                       num_kv_heads=8, vocab_size=128256, dtype="bf16", loss_tile_tokens=8192)
DIMS = model_dims(hf_config(LLAMA_1B, 128256))


def test_a_llama_1b_layer_keeps_47_hidden_sized_values_per_token() -> None:
    """fp32 norm inputs (2 x 4h), five bf16 casts of normed inputs (5 x 2h), rotated q, k, v and the output
    (2 x (2h + 2 x h/4)), the LSE (4 bytes x 32 heads), gate, up and their product (3 x 2 x 4h)."""
    h = 2048
    assert layer_saved_bytes(DIMS, LLAMA_1B) == 8 * h + 10 * h + 2 * (2 * h + h // 2) + 4 * 32 + 24 * h
    assert activation_bytes_per_token(DIMS, LLAMA_1B) == 17 * layer_saved_bytes(DIMS, LLAMA_1B)


def test_the_bench_step_that_peaked_at_126_136_gib_on_an_h200_is_counted_near_that() -> None:
    """8 documents of 8K in one micro-batch, fp32 weights + grads + Adam moments (16 bytes/parameter)."""
    states = 16 * 1.236e9
    total = states + loss_working_bytes(DIMS, LLAMA_1B) + 65536 * activation_bytes_per_token(DIMS, LLAMA_1B)
    assert 120 < total / 2**30 < 140


def test_recompute_tiling_and_the_fused_loss_shrink_the_count() -> None:
    full = activation_bytes_per_token(DIMS, LLAMA_1B)
    ckpt = dataclasses.replace(LLAMA_1B, activation_checkpointing=True)
    assert activation_bytes_per_token(DIMS, ckpt) == 16 * 4 * 2048 + 2 * layer_saved_bytes(DIMS, LLAMA_1B)
    tiled = dataclasses.replace(LLAMA_1B, mlp_tile_tokens=4096)
    assert activation_bytes_per_token(DIMS, tiled) < full / 2 and mlp_tile_working_bytes(DIMS, tiled) > 0
    untiled_loss = dataclasses.replace(LLAMA_1B, loss_tile_tokens=0)
    assert activation_bytes_per_token(DIMS, untiled_loss) == full + 128256 * (2 + 4 + 4)
    assert loss_working_bytes(DIMS, untiled_loss) == 0
    liger = dataclasses.replace(LLAMA_1B, loss_kernel="liger")
    assert loss_working_bytes(DIMS, liger) == 8192 * 128256 * 2 + 4 * 128256 * 2048
    assert loss_working_bytes(DIMS, liger) < loss_working_bytes(DIMS, LLAMA_1B) / 3


def test_the_planner_packs_three_8k_documents_on_an_h100_where_the_generic_count_allowed_six() -> None:
    limit = 0.9 * 79.18 * 2**30
    common = dict(params=1.236e9, hidden_size=2048, num_layers=16, device_flops=4e14, mem_limit_bytes=limit,
                  checkpointing=False)
    generic = default_cost_model(**common)
    counted = default_cost_model(**common, mem_bytes_per_token=activation_bytes_per_token(DIMS, LLAMA_1B),
                                 mem_reserved_bytes=loss_working_bytes(DIMS, LLAMA_1B))
    assert generic.capacity(1) // 8192 == 6 and counted.capacity(1) // 8192 == 3
    with pytest.raises(ValueError, match="mem_bytes_per_token"):
        default_cost_model(**common, mem_bytes_per_token=0.0)


def _compiled_layer_saved_bytes_per_token(lengths: tuple[int, int] = (256, 512), residual: str = "fp32") -> float:
    """Bytes one token adds to what a compiled decoder layer saves for backward under bf16 autocast (fp32 weights),
    counted by storage as autograd saves them (their growth between two lengths: weight casts drop out)."""
    import torch

    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.trainer.compile_layers import apply_compile_layers
    from seqmesh.trainer.model import Transformer, tiny_config

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                                    num_attention_heads=8, num_key_value_heads=2))
    apply_compile_layers(model.model.layers)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    totals = []
    for tokens in lengths:
        meta = make_sp_batch((tokens,), "local", None, backend="auto", device="cpu")
        cos, sin = model.model.rotary_emb(meta.position_ids)
        saved: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(tokens, 256, dtype=torch.bfloat16 if residual == "bf16" else torch.float32, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.model.layers[0](x, cos, sin, meta)
        totals.append(sum(n for ptr, n in saved.items() if ptr not in params))
    return (totals[1] - totals[0]) / (lengths[1] - lengths[0])


def test_a_compiled_layer_saves_what_the_count_says() -> None:
    """Inductor's partitioner chooses what a compiled layer keeps; the planner's count must be that, byte for
    byte (an under-count is an out-of-memory error), and it is about 0.83x the eager layer's at Llama-1B."""
    from seqmesh.trainer.model import tiny_config

    dims = model_dims(tiny_config(vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                                  num_attention_heads=8, num_key_value_heads=2))
    cfg = ModelConfig(name="tiny", hidden_size=256, intermediate_size=1024, num_layers=1, num_heads=8,
                      num_kv_heads=2, vocab_size=64, dtype="bf16", compile_layers=True)
    assert _compiled_layer_saved_bytes_per_token() == layer_saved_bytes(dims, cfg)
    # a bf16 residual stream: the layer's input is the one fp32 tensor that becomes bf16
    bf16_stream = dataclasses.replace(cfg, residual_dtype="bf16")
    assert _compiled_layer_saved_bytes_per_token(residual="bf16") == layer_saved_bytes(dims, bf16_stream)
    assert layer_saved_bytes(dims, cfg) - layer_saved_bytes(dims, bf16_stream) == 2 * 256
    compiled_1b = layer_saved_bytes(DIMS, dataclasses.replace(LLAMA_1B, compile_layers=True))
    assert 0.8 < compiled_1b / layer_saved_bytes(DIMS, LLAMA_1B) < 0.85
