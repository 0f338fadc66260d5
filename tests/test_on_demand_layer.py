"""The one autograd path of ZeRO-3's gathered layers and offload's streamed ones, against a plain layer.

A source that keeps its weights aside (as a host or a shard would) and records what the path asks of it:
the order of its calls is the contract both real sources rely on, and the gradients are bitwise those of
the same layer under activation checkpointing (the same forward recomputed on the same values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seqmesh.parallel.on_demand_layer import run_on_demand


class _Unit:
    def __init__(self, layer: nn.Module) -> None:
        self.params = list(layer.parameters())
        self.aside = [p.detach().clone() for p in self.params]


class _AsideSource:
    """Weights live in ``unit.aside``; parameters hold empty tensors while the layer does not compute."""

    device = torch.device("cpu")

    def __init__(self, units: Sequence[_Unit], keep_last: bool) -> None:
        self.calls: list[tuple[str, int, Any]] = []
        self.grads: dict[int, list[Tensor | None]] = {}
        self.units, self.keep_last = list(units), keep_last
        for unit in self.units:
            self._empty(unit)

    def _empty(self, unit: _Unit) -> None:
        for p in unit.params:
            p.data = torch.empty(0)

    def bring(self, unit: _Unit, backward: bool) -> None:
        self.calls.append(("bring", self.units.index(unit), backward))
        for p, v in zip(unit.params, unit.aside):
            p.data = v.clone()

    def queued(self, unit: _Unit, backward: bool) -> None:
        self.calls.append(("queued", self.units.index(unit), backward))

    def take_grads(self, unit: _Unit, grads: Sequence[Tensor | None]) -> None:
        self.calls.append(("take_grads", self.units.index(unit), None))
        self.grads[self.units.index(unit)] = list(grads)

    def release(self, unit: _Unit, keep: bool) -> None:
        self.calls.append(("release", self.units.index(unit), keep))
        if not keep:
            self._empty(unit)

    def keep_after_forward(self, unit: _Unit) -> bool:
        return self.keep_last and torch.is_grad_enabled() and unit is self.units[-1]


def _layers(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3)))


@pytest.mark.parametrize("keep_last", [False, True])
def test_on_demand_layers_match_checkpointed_layers_bitwise(keep_last: bool) -> None:
    reference, layers = _layers(0), _layers(0)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    units = [_Unit(layer) for layer in layers]
    source = _AsideSource(units, keep_last)
    run_on_demand(list(layers), units, source)

    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = xr
    for layer in reference:
        out_ref = checkpoint(layer, out_ref, use_reentrant=False)
    out_ref.square().sum().backward()
    out = layers(xo)
    assert all(p.numel() == 0 for u in units[:-1] for p in u.params)  # weights away between passes
    assert all(p.numel() > 0 for p in units[-1].params) == keep_last
    out.square().sum().backward()

    assert torch.equal(out, out_ref)
    assert torch.equal(xo.grad, xr.grad)
    for i, layer in enumerate(reference):
        for g, p in zip(source.grads[i], layer.parameters()):
            assert torch.equal(g, p.grad)
    assert all(p.numel() == 0 for u in units for p in u.params)
    forward = [c for i in range(3) for c in (("bring", i, False), ("queued", i, False),
                                              ("release", i, keep_last and i == 2))]
    backward = [c for i in reversed(range(3)) for c in (("bring", i, True), ("queued", i, True),
                                                         ("take_grads", i, None), ("release", i, False))]
    assert source.calls == forward + backward


def test_on_demand_layer_releases_weights_when_the_layer_raises() -> None:
    layer = nn.Linear(4, 4)
    unit = _Unit(layer)
    source = _AsideSource([unit], keep_last=False)
    run_on_demand([layer], [unit], source)
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 5))  # wrong width: the product fails inside the forward
    assert source.calls[-1] == ("release", 0, False) and all(p.numel() == 0 for p in unit.params)


class _Counted(nn.Linear):
    runs = 0

    def forward(self, x: Tensor) -> Tensor:
        self.runs += 1
        return super().forward(x)


def test_a_checkpoint_wrapper_is_looked_through() -> None:
    """The path recomputes the layer itself: a checkpoint wrapper's own recomputation would run it a third time."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    inner = _Counted(4, 4)
    wrapped = checkpoint_wrapper(inner)
    unit = _Unit(wrapped)
    run_on_demand([wrapped], [unit], _AsideSource([unit], keep_last=False))
    wrapped(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert inner.runs == 2  # once in forward, once recomputed in backward
