"""Sequence tiling: the tiled loss and TiledMLP equal the untiled computation, and never hold a whole tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqmesh.parallel.checkpointing import apply_activation_checkpointing
from seqmesh.parallel.offload import get_offloader
from seqmesh.trainer.build import apply_offload
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import MLP, Transformer, model_dims, tiny_config
from seqmesh.trainer.tiled import TiledMLP, apply_tiled_mlp, lm_loss_sum, tiled_token_loss_sum
from tests.conftest import cost_model_of

T, H, V = 50, 32, 97


class _LargestTensor(TorchDispatchMode):
    """The most elements any op produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, H, generator=g) * 0.1
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[3, 17, 49]] = -100  # ignored targets, as at document ends
    return hidden, weight, labels


@pytest.mark.parametrize("tile", [7, 16, 50, 64])
def test_tiled_loss_equals_untiled_with_gradients(tile: int) -> None:
    hidden, weight, labels = _inputs()
    results = []
    for tiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = tiled_token_loss_sum(h, w, labels, tile) if tiled else token_loss_sum(h @ w.T, labels)
        (loss / 13.0).backward()  # the loop divides by the global token count: gradients must scale with it
        results.append((loss.detach(), h.grad, w.grad))
    (loss0, dh0, dw0), (loss1, dh1, dw1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dh1, dh0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-7)


def test_tiled_loss_never_materialises_the_logits() -> None:
    hidden, weight, labels = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestTensor() as probe:
        tiled_token_loss_sum(h, w, labels, 8).backward()
    assert probe.largest <= max(8 * V, V * H)  # one tile of logits, or the weight gradient
    with _LargestTensor() as probe:
        token_loss_sum(h @ w.T, labels).backward()
    assert probe.largest == T * V
    with pytest.raises(ValueError, match="tile_tokens must be >= 1"):
        tiled_token_loss_sum(h, w, labels, 0)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(model_dims(tiny_config(vocab_size=V, hidden_size=H, intermediate_size=80, num_attention_heads=4,
                                      num_key_value_heads=2)))


@pytest.mark.parametrize("tile", [8, 13])
def test_tiled_mlp_equals_mlp_with_gradients(tile: int) -> None:
    mlp = _mlp()
    tiled = TiledMLP(copy.deepcopy(mlp), tile)
    assert tiled.state_dict().keys() == mlp.state_dict().keys()
    x = torch.randn(T, H)
    grad = torch.randn(T, H)
    outs = []
    for module in (mlp, tiled):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
    with _LargestTensor() as probe:
        tiled(x.clone().requires_grad_()).backward(grad)
    assert probe.largest <= max(T * H, 80 * H)  # never [T, intermediate]
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), y0, rtol=1e-6, atol=1e-6)
    short = x[:tile]
    assert torch.equal(tiled(short), mlp(short))  # a stream within one tile runs the MLP as is


def test_model_with_tiling_checkpointing_and_offload_through_the_loop(tmp_path: Path) -> None:
    from seqmesh.trainer.loop import run_group

    torch.manual_seed(0)
    base = Transformer(tiny_config(vocab_size=V, hidden_size=H, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (40, 9, 23)]
    plain = config_from_dict({"parallel": {"attn_backend": "math"}, "launch": {"num_workers": 1}})
    tiled = config_from_dict({
        "parallel": {"attn_backend": "math"}, "launch": {"num_workers": 1},
        "model": {"activation_checkpointing": True, "mlp_tile_tokens": 16, "loss_tile_tokens": 10},
        "offload": {"target": "nvme", "ratio": "1.0", "path": str(tmp_path), "engine": "threads",
                    "host_mem_gb": 0.01},
    })
    device = torch.device("cpu")
    results = []
    for cfg in (plain, tiled):
        model = copy.deepcopy(base)
        if cfg.model.activation_checkpointing:
            apply_activation_checkpointing(model.model.layers)
        apply_offload(model, cfg.model, cfg.offload, cost_model_of(cfg, model, device), device)
        off = get_offloader(model)
        if off is not None:
            off.min_bytes = 0  # the tiny model's activations are below the default threshold
        loss = run_group(model, docs, None, cfg.model, cfg.parallel, device, denominator=69)
        results.append((loss, {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in
                               model.named_parameters()}, off))
    (loss0, g0, _), (loss1, g1, off) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-5)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)
    assert off.stats.offloaded_tensors > 0 and off.files.files() == []
    assert isinstance(model.model.layers[0]._checkpoint_wrapped_module.mlp, TiledMLP)
    apply_tiled_mlp(model.model.layers, 4)  # idempotent: an already tiled MLP stays as it is
    assert model.model.layers[0]._checkpoint_wrapped_module.mlp.tile_tokens == 16
    hidden = torch.randn(5, H)
    assert torch.equal(lm_loss_sum(base, hidden, torch.zeros(5, dtype=torch.long), 10),
                       token_loss_sum(base.logits(hidden), torch.zeros(5, dtype=torch.long)))


@pytest.mark.gpu
def test_gpu_tiled_loss_peak_memory() -> None:
    """On CUDA: the tiled loss's peak is a tile of logits, not the whole [T, vocab] fp32 tensor."""
    tokens, hidden, vocab = 16384, 1024, 32000
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    peaks = []
    for tile in (0, 1024):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tiled_token_loss_sum(h, w, labels, tile) if tile else token_loss_sum(h @ w.T, labels)
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        h.grad = w.grad = None
    assert peaks[1] < peaks[0] / 4
