"""How each transform sliced each parameter, recorded where the slicing happens.

A layout-free checkpoint (``seqmesh.trainer.reshard``) has to know, for every tensor a rank holds,
which part of which full tensor it is. Rather than recognising module and optimizer classes, it
reads the records the transforms leave behind:

* ``ShardSpec`` (on each parameter, ``shard_spec(p)``): the full parameter's shape, the dimension
  tensor parallelism split, this rank's ``[start, start + length)`` of it, padding rows after the
  real ones (vocabulary padding), how many TP ranks hold an identical copy (a replicated KV head, a
  norm gain) and whether this rank is the one among them that writes it; the pipeline stage that
  owns it. ``apply_tensor_parallel`` records TP slices, ``PipelineStage`` the owning stage. A
  parameter nobody recorded is whole and identical on every TP rank.
* ``FlatShard`` (from a ZeRO optimizer's ``flat_shards()``): one tensor the inner optimizer steps
  -- a parameter (ZeRO 0), this rank's shard of the flat buffer (ZeRO 1/2) or of a layer's flat
  space (ZeRO 3, where the shard is the only copy of the values) -- and which elements of which
  parameters lie in it.
* ``StateCodec`` (from an optimizer's ``state_codec``): how a param group stores AdamW's moments
  (codes plus one scale per block, or plain numbers), so moments can be moved between blocks and
  layouts without the resharder knowing any quantization format. An optimizer that resharding
  checkpoints take implements ``block_state(p)`` (its state as codes of ``p``'s length, per-block
  scales under ``<moment>_scale``, and an int ``step``) and ``state_codec(group or format name)``;
  a plain torch optimizer (its moments are tensors in the parameter's dtype) needs neither.

Parameter names are always the full model's HF names (pipeline stages and activation-checkpoint
wrappers keep them; ``named_parameters`` strips the wrappers' prefix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

SPEC_ATTR = "shard_spec"
_WRAPPED = "_checkpoint_wrapped_module."
Model = nn.Module | Sequence[nn.Module]  # a model, a pipeline stage, or a rank's pipeline chunks


@dataclass(frozen=True)
class ShardSpec:
    """Where this rank's tensor of one parameter lies in the full parameter (see the module docstring)."""

    full_shape: tuple[int, ...]
    dim: int | None = None  # the tensor-parallel dimension; None: the rank holds the whole parameter
    start: int = 0
    length: int = 0  # real entries along ``dim`` (padding rows excluded)
    padding: int = 0  # rows after the real ones along ``dim`` that belong to no full index
    copies: int = 1  # TP ranks holding this identical slice (all of them for a whole parameter)
    writer: bool = True  # the one rank among the copies that writes the parameter to a checkpoint
    split: tuple[int, int] = (0, 1)  # (rank, size) of the TP group the parameter is split or replicated over
    stage: int | None = None  # the pipeline stage that owns it (None: no pipeline)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the slice's real part (the rank's tensor may have padding rows after it)."""
        if self.dim is None:
            return self.full_shape
        return self.full_shape[:self.dim] + (self.length,) + self.full_shape[self.dim + 1:]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def span(self, axis: int) -> tuple[int, int]:
        """The slice's range of indices along ``axis`` of the full parameter."""
        return (self.start, self.start + self.length) if self.dim == axis else (0, self.full_shape[axis])

    def overlap(self, other: ShardSpec) -> tuple[int | None, int, int]:
        """(axis, first, end) of the full-parameter index range two slices share along their sliced axis."""
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"sliced along dim {self.dim} in one layout but along dim {other.dim} in the other")
        axis = self.dim if self.dim is not None else other.dim
        if axis is None:
            return None, 0, 0
        (a0, a1), (b0, b1) = self.span(axis), other.span(axis)
        return axis, max(a0, b0), min(a1, b1)

    def intersects(self, other: ShardSpec) -> bool:
        axis, first, end = self.overlap(other)
        return axis is None or end > first

    def check(self, local_shape: Sequence[int], name: str) -> None:
        """Raise a ValueError when a rank's tensor of ``local_shape`` cannot hold this slice."""
        expected = list(self.full_shape)
        if self.dim is not None:
            expected[self.dim] = self.length + self.padding
        if list(local_shape) != expected:
            raise ValueError(f"{name}: local shape {tuple(local_shape)} does not match its shard spec {self} "
                             f"(expected {tuple(expected)})")


def tp_slice(full_shape: Sequence[int], dim: int, start: int, length: int, rank: int, size: int, *,
             padding: int = 0, copies: int = 1, writer: bool = True) -> ShardSpec:
    """The spec of a tensor-parallel slice ``[start, start + length)`` along ``dim`` held by TP ``rank`` of ``size``."""
    return ShardSpec(tuple(full_shape), dim, start, length, padding, copies, writer, (rank, size))


def tp_replicated(full_shape: Sequence[int], rank: int, size: int) -> ShardSpec:
    """A whole parameter held identically by all ``size`` TP ranks; rank 0 writes it."""
    return ShardSpec(tuple(full_shape), None, 0, 0, 0, size, rank == 0, (rank, size))


def set_shard_spec(p: Tensor | None, spec: ShardSpec) -> None:
    """Record ``spec`` on parameter ``p`` (a no-op for None: an absent bias)."""
    if p is not None:
        setattr(p, SPEC_ATTR, spec)


def shard_spec(p: Tensor) -> ShardSpec | None:
    """The spec recorded on ``p``, or None when no transform sliced it."""
    return getattr(p, SPEC_ATTR, None)


def record_stage(module: nn.Module, stage: int) -> None:
    """Record pipeline ``stage`` as the owner of ``module``'s parameters that no earlier stage owns."""
    for p in module.parameters():
        spec = shard_spec(p) or ShardSpec(tuple(p.shape))
        if spec.stage is None:
            set_shard_spec(p, dataclasses.replace(spec, stage=stage))


def _chunks(model: Model) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def named_parameters(model: Model) -> dict[str, nn.Parameter]:
    """The parameters by the full model's names (activation-checkpoint wrappers left out of the names).

    ``model`` may be a list of pipeline chunks (virtual stages): their names are disjoint.
    """
    named: dict[str, nn.Parameter] = {}
    for chunk in _chunks(model):
        for name, p in chunk.named_parameters():
            name = name.replace(_WRAPPED, "")
            if name in named and named[name] is not p:
                raise ValueError(f"two different parameters are both named {name!r}; pass each pipeline chunk once")
            named[name] = p
    return named


def shard_specs(model: Model, tp_rank: int = 0) -> dict[str, ShardSpec]:
    """Every parameter's spec by full name; one nobody sliced is whole (written by TP rank ``tp_rank`` 0)."""
    out = {}
    for name, p in named_parameters(model).items():
        spec = shard_spec(p)
        if spec is None or spec.split[1] == 1:  # no TP record
            spec = ShardSpec(tuple(p.shape), writer=tp_rank == 0, stage=None if spec is None else spec.stage)
        spec.check(p.shape, name)
        out[name] = spec
    return out


@dataclass
class FlatShard:
    """One tensor an optimizer steps, and the parameters' elements it holds.

    ``members``: (parameter, lo, hi, pos) -- elements ``[lo, hi)`` of the parameter's flattened local
    tensor sit at positions ``[pos, pos + hi - lo)`` of ``tensor``. ``group``: its param group.
    """

    tensor: Tensor
    group: int
    members: list[tuple[nn.Parameter, int, int, int]] = field(default_factory=list)


class StateCodec(Protocol):
    """How one optimizer state format stores a moment; ``name`` is recorded in checkpoints."""

    name: str
    block: int | None  # elements per scale block; None: plain numbers, no scales

    def decode(self, key: str, codes: Tensor, element_scales: Tensor | None) -> Tensor:
        """1-D fp32 values of moment ``key`` from its codes and each element's block scale."""

    def encode(self, step: int, moments: Mapping[str, tuple[Tensor, Tensor | None, Tensor | None]],
               like: Tensor) -> dict:
        """The optimizer's state of tensor ``like`` (the form its ``load_state_dict`` takes) from each moment's
        (fp32 values, saved codes or None, saved per-element scales or None; NaN: nothing saved there): a
        block whose elements all carry one saved scale keeps its codes and scale, any other is requantized."""
