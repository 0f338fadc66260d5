"""Sequence tiling for the longest contexts: the loss and the MLP a tile of tokens at a time.

At 500K tokens the logits of a 128K vocabulary are 250 GB in fp32 and a Llama-8B MLP's
intermediates tens of GB; both are token-wise, so computing them tile by tile (ALST's tiled loss and
TiledMLP) makes the peak one tile's worth. Each is an autograd function that keeps only its input
and recomputes a tile's forward inside backward (the MLP then runs twice, three times under
checkpointing; the loss's extra cost is one more ``lm_head`` matmul). Whole decoder layers are tiled
the same way in ``trainer/tiled_layer.py``, on the helpers here.

Why not DeepSpeed's ``TiledFusedLogitsLoss``/``TiledMLP``: its loss computes the weight gradient
inside forward assuming an upstream gradient of 1, which is wrong under seqmesh's division by the
global token count (and writes ``.grad`` during forward); here every gradient is returned from
backward, so autograd scales and accumulates it like any other op, and parameter gradients stay
untouched until backward. Gradients are accumulated over tiles in fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmesh.kernels.fused_loss import liger_linear_cross_entropy_sum
from seqmesh.trainer.data.packing import IGNORE_INDEX
from seqmesh.trainer.loss import token_loss_sum

# How the untensor-parallel loss is computed (``model.loss_kernel``): torch (logits whole, or tiled by
# ``model.loss_tile_tokens``) or Liger-Kernel's fused linear + cross-entropy (CUDA only).
LOSS_KERNELS = ("torch", "liger")


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def tiles(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


class _TiledLinearCrossEntropy(torch.autograd.Function):
    """``token_loss_sum(hidden @ weight.T, labels)`` without the [T, vocab] logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, tile: int) -> Tensor:
        ctx.save_for_backward(hidden, weight, labels)
        ctx.tile, ctx.autocast = tile, autocast_state(hidden.device.type)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a, b in tiles(hidden.shape[0], tile):
            total += token_loss_sum(F.linear(hidden[a:b], weight), labels[a:b])
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, labels = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.detach().requires_grad_(dw is not None)
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for a, b in tiles(hidden.shape[0], ctx.tile):
                h = hidden[a:b].detach().requires_grad_(dh is not None)
                loss = token_loss_sum(F.linear(h, w), labels[a:b])
                wanted = [t for t in (h, w) if t.requires_grad]
                grads = iter(torch.autograd.grad(loss, wanted, grad))
                if dh is not None:
                    dh[a:b] = next(grads)
                if dw is not None:
                    dw += next(grads)
        return dh, None if dw is None else dw.to(weight.dtype), None, None


def tiled_token_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor, tile_tokens: int) -> Tensor:
    """Sum of next-token cross-entropy of ``hidden @ weight.T`` (fp32), ``tile_tokens`` rows at a time."""
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, H] and labels [T], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    return _TiledLinearCrossEntropy.apply(hidden, weight, labels, int(tile_tokens))


def lm_loss_sum(model: nn.Module, hidden: Tensor, labels: Tensor, tile_tokens: int = 0,
                kernel: str = "torch") -> Tensor:
    """The step loop's loss: Liger's fused linear + cross-entropy (``kernel="liger"``, chunks of
    ``tile_tokens`` or 8192 tokens), else untiled (``tile_tokens`` 0, or a stream no longer than one
    tile) or tiled."""
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"loss kernel {kernel!r} is not one of {LOSS_KERNELS}")
    head = model.lm_head
    if kernel == "liger":
        if getattr(head, "bias", None) is not None:
            raise ValueError("model.loss_kernel=liger supports an lm_head without bias; set model.loss_kernel=torch")
        return liger_linear_cross_entropy_sum(hidden, head.weight, labels, IGNORE_INDEX, tile_tokens or 8192)
    if not tile_tokens or hidden.shape[0] <= tile_tokens:
        return token_loss_sum(model.logits(hidden), labels)
    if getattr(head, "bias", None) is not None:
        raise ValueError("the tiled loss supports an lm_head without bias; set model.loss_tile_tokens=0")
    return tiled_token_loss_sum(hidden, head.weight, labels, tile_tokens)


class _TiledRows(torch.autograd.Function):
    """``fn(*row tiles of inputs) -> outputs`` tile by tile; keeps only the inputs, recomputes each tile in backward.

    ``fn`` must act on each row (token) on its own, so the tiles' outputs laid side by side are the
    whole computation's. Forward runs without autograd, so no tile's intermediates survive it;
    backward rebuilds one tile's graph at a time, so its peak is one tile's intermediates besides
    the whole-length inputs, outputs and their gradients. Parameter gradients are summed over
    tiles in fp32 and returned, so autograd scales and accumulates them like any other op's.
    """

    @staticmethod
    def forward(ctx, n_inputs: int, fn: Callable[..., tuple[Tensor, ...]], tile: int,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        inputs = tensors[:n_inputs]
        ctx.save_for_backward(*inputs)
        ctx.fn, ctx.tile, ctx.params = fn, tile, tensors[n_inputs:]
        ctx.autocast = autocast_state(inputs[0].device.type)
        rows = inputs[0].shape[0]
        outs: list[Tensor] = []
        with torch.no_grad():
            for a, b in tiles(rows, tile):
                ys = fn(*(t[a:b] for t in inputs))
                if not outs:
                    outs = [y.new_empty((rows, *y.shape[1:])) for y in ys]
                for out, y in zip(outs, ys):
                    out[a:b] = y
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        inputs, params = ctx.saved_tensors, ctx.params
        device_type, enabled, dtype = ctx.autocast
        need_in = ctx.needs_input_grad[3:3 + len(inputs)]
        need_p = ctx.needs_input_grad[3 + len(inputs):]
        dins = [torch.empty_like(t) if need else None for t, need in zip(inputs, need_in)]
        dps = [torch.zeros_like(p, dtype=torch.float32) if need else None for p, need in zip(params, need_p)]
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for a, b in tiles(inputs[0].shape[0], ctx.tile):
                xs = [t[a:b].detach().requires_grad_(need) for t, need in zip(inputs, need_in)]
                ys = ctx.fn(*xs)
                wanted = [x for x in xs if x.requires_grad] + [p for p, dp in zip(params, dps) if dp is not None]
                tile_grads = iter(torch.autograd.grad(ys, wanted, [g[a:b] for g in grads], allow_unused=True))
                for din in dins:
                    if din is not None:
                        g = next(tile_grads)
                        din[a:b] = 0 if g is None else g
                for dp in dps:
                    if dp is not None:
                        g = next(tile_grads)
                        if g is not None:
                            dp += g
        return (None, None, None, *dins, *(None if dp is None else dp.to(p.dtype) for dp, p in zip(dps, params)))


def tiled_rows(fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...], params: list[Tensor],
               tile_tokens: int) -> tuple[Tensor, ...]:
    """``fn(*inputs)`` computed ``tile_tokens`` rows at a time, differentiable in ``inputs`` and ``params``
    (the parameters ``fn`` reads: their gradients are returned through this op, so list every one that
    needs a gradient)."""
    return _TiledRows.apply(len(inputs), fn, int(tile_tokens), *inputs, *params)


def grad_params(module: nn.Module) -> list[Tensor]:
    """Parameters of ``module`` that the running forward must differentiate (none under no_grad)."""
    return [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []


class TiledMLP(nn.Module):
    """A token-wise module (the SwiGLU MLP) run ``tile_tokens`` rows at a time.

    It adopts the wrapped module's children under their own names, so parameter names, state
    dicts and HF weight mapping are unchanged (``mlp.gate_proj.weight`` stays
    ``mlp.gate_proj.weight``).
    """

    def __init__(self, module: nn.Module, tile_tokens: int) -> None:
        super().__init__()
        if tile_tokens < 1:
            raise ValueError(f"TiledMLP: tile_tokens must be >= 1, got {tile_tokens}")
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"TiledMLP: {type(module).__name__} holds parameters directly; it can wrap modules "
                             "whose parameters live in sub-modules (as the Llama MLP's projections)")
        for name, child in module.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "inner", module)  # not a registered child: its names are ours already
        self.tile_tokens = int(tile_tokens)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.tile_tokens:
            return self.inner(x)
        return tiled_rows(lambda t: (self.inner(t),), (x,), grad_params(self), self.tile_tokens)[0]

    def extra_repr(self) -> str:
        return f"tile_tokens={self.tile_tokens}"


def apply_tiled_mlp(layers: nn.ModuleList, tile_tokens: int) -> None:
    """Replace every layer's ``mlp`` by a ``TiledMLP`` (before or after activation checkpointing)."""
    for layer in layers:
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        if not isinstance(getattr(inner, "mlp", None), nn.Module):
            raise ValueError(f"apply_tiled_mlp: layer {type(inner).__name__} has no 'mlp' module to tile")
        if not isinstance(inner.mlp, TiledMLP):
            inner.mlp = TiledMLP(inner.mlp, tile_tokens)
