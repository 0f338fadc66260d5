"""Parameter offload's middle placement: decoder layers whose weights and gradients stay on the device while
their optimizer states live in host memory.

Why: a layer kept whole on the device costs it 6 bytes per parameter (bf16 weights and gradients, fp8
moments) and the link nothing; a streamed layer costs the device nothing and the link about 10 bytes in
and 6 out per parameter and step, 8 of the 10 in the window the next forward leaves (the update cannot
start before the clip norm, and each layer's forward needs its update). Between them, a layer with its
states on the host costs the device 4 bytes and the link 2 each way (``FP8AdamW.keep_states_on_host``:
only the moments are staged). ZeRO-Offload's own placement, with the update on the GPU instead of the
CPU. The plan (``scheduler/offload_plan.py``) chooses how many layers take each place.

On one rank the update of these layers runs behind the step (``FP8AdamW.overlap_updates``) beside the next
forward, in layer order, and each layer waits before its forward for its own part only (``wait_for``).
That update still reads the layers' gradients when the next step's ``zero_grad`` comes, so ZeRO leaves
their zeros to this transform (``ZeroOptimizer.register_step_hooks(zeroes_grads=)``): each layer zeroes its
own gradients after its wait, in the step's first forward through it, before any backward writes them.
The arithmetic is the update inside the step, on the same values: the bits are the same.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

_ATTR = "_seqmesh_host_states"


class HostStateLayers:
    """The update of ``layers`` (their states on the host: ``PlacedZero(states_on_host=)``) behind the step on one
    rank; see the module docstring. Elsewhere their update runs inside the step and this does nothing."""

    def __init__(self, layers: Sequence[nn.Module], placed: Any) -> None:
        self._optimizer = placed.optimizer
        self._tensors = list(placed.host_state_tensors)
        zero = placed.device_part
        self._hooks: list[Any] = []
        self.update_wait_s = 0.0  # host time forwards spent waiting for their layer's update (benchmarks read it)
        self._unhook_zero = lambda: None
        self.active = bool(self._tensors) and zero is not None and zero.world == 1 and zero.stage == 1 and \
            hasattr(self._optimizer, "overlap_updates")
        if not self.active:
            return
        self._layers = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
        self._owed: set[int] = set()  # layers whose gradients are owed the zeros of a new step
        self._now = _complement(zero.shard_grad, [t.grad for t in self._tensors])  # zeroed at ``zero_grad`` itself
        self._optimizer.overlap_updates(self._tensors)
        self._unhook_zero = zero.register_step_hooks(zeroes_grads=self._zero_grads)
        self._hooks = [layer.register_forward_pre_hook(lambda *_, i=i: self._before_forward(i))
                       for i, layer in enumerate(layers)]

    def _zero_grads(self) -> None:
        with torch.no_grad():
            for t in self._now:
                t.zero_()
        self._owed = set(range(len(self._layers)))

    def _before_forward(self, index: int) -> None:
        params = self._layers[index]
        began = time.perf_counter()
        self._optimizer.wait_for(params)  # the last step's update of this layer
        self.update_wait_s += time.perf_counter() - began
        if index in self._owed:
            self._owed.discard(index)
            with torch.no_grad():
                torch._foreach_zero_([p.grad for p in params if p.grad is not None])

    def close(self) -> None:
        """Back to the update inside the step; owed zeros paid (idempotent)."""
        if not self.active:
            return
        self._optimizer.overlap_updates(self._tensors, False)  # waits for the update behind
        for i in sorted(self._owed):
            self._before_forward(i)
        for hook in self._hooks:
            hook.remove()
        self._unhook_zero()
        self.active = False


def _complement(flat: torch.Tensor, taken: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The slices of 1-D ``flat`` outside the views ``taken`` of it."""
    size, base = flat.element_size(), flat.data_ptr()
    spans = sorted(((t.data_ptr() - base) // size, (t.data_ptr() - base) // size + t.numel()) for t in taken)
    out, at = [], 0
    for a, b in spans:
        if a > at:
            out.append(flat[at:a])
        at = max(at, b)
    if at < flat.numel():
        out.append(flat[at:])
    return out


def attach_host_states(model: nn.Module, layers: Sequence[nn.Module], placed: Any) -> HostStateLayers:
    """Run the update of ``layers`` (their states on the host, ``placed.host_state_tensors``) behind the step."""
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("host-state layers are already attached to this model")
    states = HostStateLayers(layers, placed)
    setattr(model, _ATTR, states)
    return states


def get_host_states(model: nn.Module) -> HostStateLayers | None:
    return getattr(model, _ATTR, None)


def detach_host_states(model: nn.Module) -> None:
    states = getattr(model, _ATTR, None)
    if states is not None:
        states.close()
        delattr(model, _ATTR)
