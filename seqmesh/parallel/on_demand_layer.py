"""Decoder layers whose weights are on the device only while they compute: one autograd path for ZeRO-3's
gathered layers (``zero3.py``) and parameter offload's streamed ones (``offload/params.py``).

Why one path: both bring a layer's weights before use, run the layer without autograd and release the
weights; backward brings them again, recomputes the layer with autograd, takes the gradients of its inputs
and weights, hands the weight gradients to where they live and releases the weights. They differ only in
where the weights come from and the gradients go (an all-gather and a reduce-scatter over the HDP group; a
copy from and to host memory) and in when the next layer's transfer is best started, so each is a
``WeightSource`` and this module holds the rest. A collective starts the next layer's gather before this
layer's kernels are queued (its stream waits for the work queued before it); a host copy starts the next
fetch after them (that fetch may block the host on the optimizer update still writing those weights, and
the device computes this layer meanwhile).

Why the gradients are the resident model's: the recomputation runs the layer's own forward on the saved
inputs with the same weights, as activation checkpointing does, so each gradient is bit for bit the one a
checkpointed resident layer produces; each weight is used once per layer, so autograd sums nothing inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class WeightSource(Protocol):
    """Where an on-demand layer's weights come from and its weight gradients go."""

    device: torch.device  # where the layer computes

    def bring(self, unit: Any, backward: bool) -> None:
        """Make ``unit``'s parameters hold their values for compute on the current stream (and, where the source
        prefers, start the transfer of the unit its pass uses next)."""

    def queued(self, unit: Any, backward: bool) -> None:
        """The layer's kernels of this pass are queued (a source may start the next transfer here)."""

    def take_grads(self, unit: Any, grads: Sequence[Tensor | None]) -> None:
        """One backward's weight gradients of ``unit`` (None: the parameter got none)."""

    def release(self, unit: Any, keep: bool) -> None:
        """Free ``unit``'s device weights (``keep``: leave them for the backward that comes next)."""

    def keep_after_forward(self, unit: Any) -> bool:
        """Whether this forward should leave ``unit``'s weights on the device for backward's first layers."""


def run_on_demand(layers: Sequence[nn.Module], units: Sequence[Any], source: WeightSource) -> None:
    """Route each of ``layers``' forward through ``OnDemandLayer`` with its unit (a checkpoint wrapper is
    looked through: the layer is recomputed here, not twice)."""
    for layer, unit in zip(layers, units):
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        layer.forward = _on_demand_forward(source, unit, inner.forward)


def _on_demand_forward(source: WeightSource, unit: Any, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args: Any) -> Tensor:
        return OnDemandLayer.apply(source, unit, forward, source.keep_after_forward(unit), *args)
    return run


class OnDemandLayer(torch.autograd.Function):
    """A layer whose weights exist on the device only inside its forward and its recomputing backward."""

    @staticmethod
    def forward(ctx: Any, source: WeightSource, unit: Any, forward: Callable[..., Tensor], keep: bool,
                *args: Any) -> Tensor:
        device = source.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.source, ctx.unit, ctx.run = source, unit, forward
        ctx.is_tensor = [isinstance(a, Tensor) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*(a for a in args if isinstance(a, Tensor)))
        source.bring(unit, backward=False)
        try:
            out = forward(*args)
            source.queued(unit, backward=False)
            return out
        finally:
            source.release(unit, keep=keep)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        needs = ctx.needs_input_grad[4:]
        args = [next(saved).detach().requires_grad_(need) if is_tensor else other
                for is_tensor, other, need in zip(ctx.is_tensor, ctx.others, needs)]
        wants = [i for i, need in enumerate(needs) if need]
        source, unit = ctx.source, ctx.unit
        source.bring(unit, backward=True)
        try:
            device, enabled, dtype = ctx.autocast
            autocast = torch.autocast(device, enabled=enabled, dtype=dtype) if enabled else nullcontext()
            with torch.enable_grad(), autocast:
                out = ctx.run(*args)
            grads = torch.autograd.grad(out, [args[i] for i in wants] + unit.params, grad_out, allow_unused=True)
            source.queued(unit, backward=True)
            source.take_grads(unit, grads[len(wants):])
        finally:
            source.release(unit, keep=False)
        of_input = dict(zip(wants, grads[:len(wants)]))
        return (None, None, None, None, *(of_input.get(i) for i in range(len(args))))
