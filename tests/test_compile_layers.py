"""Regional compilation (``model.compile_layers``): compiled decoder layers compute what eager ones do, over packed
documents of unequal lengths, checkpointed and tiled, without recompiling per token count; what cannot compose is
refused with the setting to change."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from seqmesh import first_use
from seqmesh.parallel.checkpointing import apply_activation_checkpointing
from seqmesh.trainer.build import apply_offload
from seqmesh.trainer.compile_layers import CompiledDecoderLayer, CompiledTiledDecoderLayer, apply_compile_layers
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.loop import run_group
from seqmesh.trainer.model import DecoderLayer, Transformer, tiny_config
from seqmesh.trainer.tiled import TiledMLP, apply_tiled_mlp
from tests.conftest import cost_model_of, merged
from tests.distributed import run_distributed

V, H, LAYERS = 97, 64, 2
# Micro-batches of packed documents of unequal lengths (varlen attention, positions restarting per document);
# their token counts (50, 36, 62) differ from each other and from every model width, so one dynamic-shape
# graph per half must serve them all.
BATCHES = ([23, 9, 18], [31, 5], [12, 40, 7, 3])

# fp32 tolerance. Compiled and eager layers call the same GEMMs and the same (eager) attention core on the
# same inputs; what Inductor changes is the order of the reductions it generates itself (RMSNorm's mean of
# squares over the H features, forward, and its row sums over H and the gain's sum over the T tokens,
# backward) and the pointwise maths library (vectorised exp/rsqrt within an ulp). A sum of n fp32 terms
# reassociated moves by about sqrt(n) * u relative to the size of its terms (u = 2^-24, random-walk
# rounding), with n <= 64 here (H, and T <= 62). Each layer has two norms; forward and backward pass
# through 2 * LAYERS of them each, and independent errors add in quadrature: sqrt(4 * LAYERS * n) * u =
# 1.4e-6. A factor 8 covers the error growth through the GEMMs and the loss of these O(1)-conditioned
# layers (measured: 2.6e-7 of the outputs, 4.6e-7 of the largest gradient entry). Errors of sums scale with
# their terms, not their (possibly cancelled) result, so the bound is relative to each tensor's largest
# entry (normwise), not elementwise.
FP32_RTOL = 8 * math.sqrt(4 * LAYERS * 64) * 2.0**-24


def assert_normwise_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=lambda m: f"{what}: {m}")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2))


def _docs(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _train(base: Transformer, model_cfg: dict, device: torch.device, batches: tuple[list[int], ...] = BATCHES,
           dtype: str = "fp32", fp8: bool = False) -> tuple[Transformer, list[torch.Tensor], list[torch.Tensor],
                                                            dict[str, torch.Tensor], list[dict[str, int]]]:
    """The model built as a run of ``model_cfg`` builds it (checkpointing, float8 linears, phase 2 with
    compilation last), then forward and backward of the micro-batches ``batches`` (document lengths) on it:
    (model, losses, final hidden states, accumulated gradients by plain parameter name, one-off events of each
    micro-batch)."""
    cfg = config_from_dict({"launch": {"num_workers": 1}, "model": {**model_cfg, "dtype": dtype}})
    model = copy.deepcopy(base).to(device)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model.model.layers)
    if fp8:
        from seqmesh.trainer.float8 import apply_float8_linears

        apply_float8_linears(model, device)
    apply_offload(model, cfg.model, cfg.offload, cost_model_of(cfg, model, device), device)
    hidden: list[torch.Tensor] = []
    model.model.norm.register_forward_hook(lambda m, a, out: hidden.append(out.detach().float()))
    losses, events = [], []
    for i, lengths in enumerate(batches):
        before = first_use.counts()
        losses.append(run_group(model, _docs(lengths, i), None, cfg.model, cfg.parallel, device, denominator=100))
        events.append(first_use.since(before))
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.float() for n, p in model.named_parameters()}
    return model, losses, hidden, grads, events


@pytest.mark.parametrize("schedule", [{}, {"activation_checkpointing": True},
                                      {"activation_checkpointing": True, "layer_tile_tokens": 16}],
                         ids=["plain", "checkpointed", "tiled_checkpointed"])
def test_compiled_layers_equal_eager_over_packed_documents(schedule: dict) -> None:
    device, base = torch.device("cpu"), _model()
    _, losses0, hidden0, grads0, _ = _train(base, schedule, device)
    breaks = _graph_breaks()
    model, losses1, hidden1, grads1, events = _train(base, {**schedule, "compile_layers": True}, device)

    inner = [getattr(layer, "_checkpoint_wrapped_module", layer) for layer in model.model.layers]
    want = CompiledTiledDecoderLayer if schedule.get("layer_tile_tokens") else CompiledDecoderLayer
    assert all(type(layer) is want for layer in inner)
    assert (model.model.layers[0] is not inner[0]) == bool(schedule.get("activation_checkpointing"))
    assert set(grads1) == set(grads0) == set(n for n, _ in base.named_parameters())
    for step, (l0, l1, h0, h1) in enumerate(zip(losses0, losses1, hidden0, hidden1)):
        assert_normwise_close(l1, l0, FP32_RTOL, f"loss of micro-batch {step}")
        assert_normwise_close(h1, h0, FP32_RTOL, f"hidden states of micro-batch {step}")
    for name, g in grads0.items():
        assert_normwise_close(grads1[name], g, FP32_RTOL, name)
    # One graph per half serves every layer and every token count: no graph breaks, and once the first
    # micro-batch has compiled (or found the graphs of an earlier test), later lengths record no compile.
    assert _graph_breaks() == breaks
    assert all("compile" not in e for e in events[1:]), events


def test_run_config_refuses_what_does_not_compose() -> None:
    def check(sections: dict, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(merged({"launch": {"num_workers": 2}, "model": {"compile_layers": True}}, **sections))

    check({"model": {"mlp_tile_tokens": 16}}, "model.mlp_tile_tokens=16: the tiled MLP .*model.layer_tile_tokens")
    check({"parallel": {"zero_stage": 3}}, "parallel.zero_stage=3: ZeRO-3 .* set parallel.zero_stage to 0-2")
    check({"parallel": {"zero_stage": 1}, "offload": {"params": "cpu"}},
          "offload.params=cpu: streamed layers .* set offload.params=none or model.compile_layers=false")
    check({"offload": {"target": "cpu"}}, "offload.target=cpu and no activation checkpointing")
    with pytest.raises(ConfigError, match="model.compile_layers='yes' must be true or false"):
        config_from_dict({"model": {"compile_layers": "yes"}})
    # What composes is accepted: checkpointing with activation offload, layer tiling, tensor parallelism.
    config_from_dict({"launch": {"num_workers": 2}, "offload": {"target": "cpu"},
                      "model": {"compile_layers": True, "activation_checkpointing": True, "layer_tile_tokens": 64}})
    config_from_dict({"launch": {"num_workers": 2}, "parallel": {"tp": 2}, "model": {"compile_layers": True}})


def test_transform_refuses_layers_it_would_not_compile() -> None:
    layers = _model().model.layers
    apply_tiled_mlp(layers[:1], 8)
    with pytest.raises(ValueError, match="MLP is tiled"):
        apply_compile_layers(layers[:1])
    layers[1].forward = layers[1].forward  # as ZeRO-3 and parameter offload wrap it
    with pytest.raises(ValueError, match="replaced this layer's forward"):
        apply_compile_layers(layers[1:])
    with pytest.raises(ValueError, match="Linear is not seqmesh's DecoderLayer"):
        apply_compile_layers([nn.Linear(2, 2)])
    layer = _model().model.layers[0]
    apply_compile_layers([layer])
    apply_compile_layers([layer])  # idempotent
    assert type(layer) is CompiledDecoderLayer and isinstance(layer, DecoderLayer)
    assert isinstance(layers[0].mlp, TiledMLP) and type(layers[0]) is DecoderLayer  # refused: left as it was


def _tp_compiled_vs_eager(rank: int, world: int) -> int:
    """On each TP rank: the same TP-sharded model eager and compiled over ``TP_BATCHES``; returns the graphs built."""
    from torch._dynamo.utils import counters

    from seqmesh.parallel.mesh import Mesh
    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.parallel.tensor import (apply_tensor_parallel, reduce_tensor_parallel_gradients,
                                         vocab_parallel_cross_entropy)
    from seqmesh.trainer.data import IGNORE_INDEX, pack

    mesh = Mesh(world, rank, tp=world)
    results = []
    for compiled in (False, True):
        model = _model()
        tp = apply_tensor_parallel(model, mesh.tp_group)
        if compiled:
            apply_compile_layers(model.model.layers)
        outs = []
        for i, lengths in enumerate(TP_BATCHES):
            packed = pack(_docs(lengths, i))
            hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
            loss = vocab_parallel_cross_entropy(model.logits(hidden), packed.labels, tp, IGNORE_INDEX)
            (loss / 100).backward()
            outs.append((loss.detach(), hidden.detach()))
        reduce_tensor_parallel_gradients(model)
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs0, grads0), (outs1, grads1) = results
    for step, ((l0, h0), (l1, h1)) in enumerate(zip(outs0, outs1)):
        assert_normwise_close(l1, l0, FP32_RTOL, f"rank {rank}: loss of micro-batch {step}")
        assert_normwise_close(h1, h0, FP32_RTOL, f"rank {rank}: hidden states of micro-batch {step}")
    for name, g in grads0.items():
        assert_normwise_close(grads1[name], g, FP32_RTOL, f"rank {rank}: {name}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    return int(counters["stats"]["unique_graphs"])


# Odd token counts: TP pads every one of them to a multiple of 2, so each half has one graph (a count that TP
# divides is a second one, without the padding).
TP_BATCHES = ([37, 5, 64, 13], [11, 30, 8], [50, 9, 18])


@pytest.mark.slow
def test_tp2_compiled_layers_equal_eager() -> None:
    """Tensor parallelism's gathers and reduce-scatters (autograd functions of gloo collectives here) are traced
    into the compiled halves: the same results on each rank, without graph breaks or per-length recompiles."""
    assert run_distributed(_tp_compiled_vs_eager, 2) == [2, 2]


# bf16 tolerance. Under autocast both paths run the GEMMs and attention on the same bf16 inputs; eager
# rounds the output of every elementwise op to bf16 (RoPE: 4 ops, SwiGLU: 2, the norm's cast: 1), while
# Inductor keeps each fused chain in fp32 and rounds once. That is a difference of a few half-ulps of bf16
# (u = 2^-8) per fused chain, relative to the chain's values; the chains of 2 layers, forward and backward,
# add in quadrature to sqrt(4 * LAYERS) * 4 * u / 2 = 2.2e-2. Bounds are normwise (the largest entry of each
# tensor), as for fp32. Measured on an H200 (torch 2.11): outputs and losses bit-identical (the eager path's
# RoPE and SwiGLU are Inductor kernels too), gradients within 3.3e-3.
BF16_RTOL = math.sqrt(4 * LAYERS) * 4 * 2.0**-8 / 2
# float8 linears quantise their bf16 inputs to e4m3 (3 mantissa bits, u = 2^-4) with scales from each tensor's
# largest entry: an input that differs by the bf16 amounts above can round to the neighbouring float8 value, so
# the two paths may differ by up to u of a linear's output scale wherever that happens (measured on an H200:
# gradients within 3.5e-2).
FP8_RTOL = 2.0**-4
GPU_DIMS = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2)
GPU_BATCHES = ([300, 120, 77], [511, 13], [64, 200, 31, 5])
# float8's weight gradient multiplies over the tokens, and _scaled_mm wants that dimension a multiple of 16
# (eager float8 linears fail the same way at 497 tokens).
FP8_BATCHES = ([300, 120, 76], [500, 12], [64, 200, 31, 9])


def _assert_gpu_runs_match(base: Transformer, schedule: dict, rtol: float, batches: tuple[list[int], ...],
                           fp8: bool = False) -> None:
    device = torch.device("cuda")
    _, losses0, hidden0, grads0, _ = _train(base, schedule, device, batches, "bf16", fp8)
    breaks = _graph_breaks()
    _, losses1, hidden1, grads1, events = _train(base, {**schedule, "compile_layers": True}, device, batches,
                                                 "bf16", fp8)
    for step, (l0, l1, h0, h1) in enumerate(zip(losses0, losses1, hidden0, hidden1)):
        assert_normwise_close(l1, l0, rtol, f"loss of micro-batch {step}")
        assert_normwise_close(h1, h0, rtol, f"hidden states of micro-batch {step}")
    for name, g in grads0.items():
        assert_normwise_close(grads1[name], g, rtol, name)
    assert _graph_breaks() == breaks
    assert all("compile" not in e for e in events[1:]), events


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", [{}, {"activation_checkpointing": True}], ids=["plain", "checkpointed"])
def test_gpu_compiled_layers_equal_eager_in_bf16(schedule: dict) -> None:
    """On CUDA under bf16 autocast (the model's fused RoPE and SwiGLU in the eager path, cuDNN or flash attention
    between the compiled halves): compiled layers train as eager ones do."""
    torch.manual_seed(0)
    _assert_gpu_runs_match(Transformer(tiny_config(intermediate_size=512, **GPU_DIMS)), schedule, BF16_RTOL,
                           GPU_BATCHES)


@pytest.mark.gpu
def test_gpu_compiled_layers_inline_float8_linears() -> None:
    """float8 linears (each compiled on its own) inside compiled layers: one graph per half, same training."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matrix units need compute capability 8.9 or newer")
    torch.manual_seed(0)  # gate/up (256 -> 2048) are large enough for float8
    _assert_gpu_runs_match(Transformer(tiny_config(intermediate_size=2048, **GPU_DIMS)), {}, FP8_RTOL, FP8_BATCHES,
                           fp8=True)
