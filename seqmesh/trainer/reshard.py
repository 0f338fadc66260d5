"""Checkpoints that resume at another layout: (TP, PP, HDP, ZeRO stage, optimizer state format) may all change.

What a rank writes. Every tensor is stored under the *full* model's parameter name as a piece of
the full parameter, ``full.narrow(dim, start, length).reshape(-1)[lo:hi]``: ``dim, start, length``
is the rank's tensor-parallel slice (``dim`` None: the whole parameter; vocabulary padding rows
are left out), ``[lo, hi)`` the part of that slice the rank writes -- its ZeRO shard of the flat
buffer (ZeRO-3: its shard of the parameter's layer, the only copy it holds), or an even 1/HDP share
where every HDP rank holds the same values, so the HDP ranks split the bytes. Of identical copies exactly one is written: a TP-replicated parameter by TP rank 0, a
KV head that several TP ranks share by the first of them. A piece holds the parameter values,
AdamW's two moments in the optimizer's own storage (fp32 / bf16, or FP8AdamW's fp8 / int8 codes
with the fp32 scales of the blocks the piece touches and the piece's position in block space) and
the step count. A JSON index of the pieces (full shapes, regions, formats, the layout) goes into
the checkpoint's manifest, so a loader knows which files to open before it opens any.

How a rank loads. It computes, for each parameter it holds at its own layout, the slice it needs,
takes the files whose pieces intersect it, maps them (``torch.load(mmap=True)``: only the bytes it
touches are read) and assembles the slice. Weights are copied: bit-exact at any layout, so the
first step after the resume computes the uninterrupted run's loss (up to the new layout's own
summation order). Optimizer moments are assembled per element as (code, scale of its saved block)
and laid out in the new layout's state space -- a parameter (ZeRO 0) or a shard of the flat buffer
(ZeRO 1/2). A new quantization block whose elements all carry one saved scale keeps its codes and
that scale bit for bit (the layout kept the blocks: same TP slices and ZeRO flat space, e.g. ZeRO-1
over another HDP size); a block that mixes saved blocks (their borders moved: another TP degree,
per-parameter blocks vs blocks of the flat buffer) is dequantized to fp32 and requantized with
round-to-nearest, which perturbs the moments by one rounding, as one optimizer step does. fp32 and
bf16 moments are exact at any layout, and a change of ``state_dtype`` converts the same way. A
target state element that the checkpoint has no state for (a parameter that never got a gradient)
starts at zero; a ZeRO shard spanning parameters takes the largest saved step count.

Why an own format rather than ``torch.distributed.checkpoint``: DCP reshards rectangular chunks of
global tensors (DTensor / sharded-tensor offsets). seqmesh's shards are not all such chunks: a ZeRO
shard is a range of a flat buffer concatenating many TP-local parameters, vocabulary slices carry
padding rows, a KV head may live on several TP ranks, and an fp8 moment is codes plus per-block
scales whose blocks straddle parameter borders, so resharding needs the requantization above, which
DCP's planner cannot express. A (TP slice, flat range) pair describes each of these with five
integers, and ``checkpoint.py``'s machinery (atomic publish, checksums, weights-only loading,
fallback to an older intact step) carries the pieces unchanged.

Use. Every rank calls ``save_resharded(run_dir, step, model, optimizer, mesh, {"lr_scheduler": ...,
"sampler": ..., "extra": ...})``. To resume, build the model (TP applied, pipeline stage cut), the
ZeRO optimizer and the lr schedule at the new layout, then ``load_resharded(run_dir, model,
optimizer, mesh, seed=...)`` restores model, optimizer and RNG and returns the step and the global
keys. ``model`` is whatever module (or list of pipeline chunks) registers exactly this rank's own
parameters under the full model's names; a tied embedding's copy on the last pipeline stage is not
among them (its owner, the first stage, writes and reads it; the pipeline re-syncs the copy).

Global and per-rank state. The lr schedule, the data sampler (one global position, identical on
every rank) and ``extra`` are written once and restored at any layout; the optimizer's lr and
other hyper-parameters come back per param group. RNG states are per rank: at the same (world,
TP, PP) each rank gets its own back; at another layout every rank is re-seeded from (seed, step,
rank), deterministically. Nothing in seqmesh's step depends on continuing those streams: the
sampler derives its order from (seed, epoch) and FP8AdamW its rounding bits from (seed, step,
element index) -- the latter index is the element's position in its group's flat space, so after a
layout change the stochastic rounding draws other (equally valid) bits than the old layout would.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from seqmesh.kernels.adam_update import padded_numel
from seqmesh.kernels.fp8_codec import FORMATS, CodeFormat, dequantize_blocks, quantize_blocks, round_plain
from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                     VocabParallelHead)
from seqmesh.parallel.zero import ZeroOptimizer
from seqmesh.parallel.zero3 import Zero3Optimizer
from seqmesh.trainer.checkpoint import (SHARED_FILE, _dist, _gather, _raise_if_any, capture_rng_state,
                                        load_latest_files, restore_rng_state, save_checkpoint)
from seqmesh.trainer.optim.fp8_adamw import FP8AdamW

PIECES = "layout_free"  # key of a rank's pieces in its checkpoint file
RNG = "rng"
MOMENTS = ("exp_avg", "exp_avg_sq")
HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")  # restored per param group
PLAIN = "plain"  # a torch optimizer's moments: tensors in the parameter's dtype
_WRAPPED = "_checkpoint_wrapped_module."
Model = nn.Module | Sequence[nn.Module]  # a model, a pipeline stage, or a rank's pipeline chunks
Optim = ZeroOptimizer | torch.optim.Optimizer


@dataclass(frozen=True)
class Placement:
    """Where this rank's tensor of one parameter lies in the full parameter."""

    full_shape: tuple[int, ...]
    dim: int | None  # the tensor-parallel dimension; None: the rank holds the whole parameter
    start: int = 0
    length: int = 0  # entries along ``dim`` (vocabulary padding rows excluded)
    writer: bool = True  # the one TP rank among identical copies that writes the parameter

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


def placements(model: Model, mesh: Mesh) -> dict[str, Placement]:
    """Each parameter's place in the full parameter, from the tensor-parallel modules of ``tensor.py``.

    Column-parallel q/k/v and gate/up slice dim 0, row-parallel o/down slice dim 1, the vocabulary-
    parallel embedding and head slice rows (with padding rows after the real ones); everything else
    is whole on every TP rank.
    """
    tp, r = mesh.tp, mesh.tp_rank
    sliced: dict[int, tuple[int, int, int, int, bool]] = {}  # id(param) -> (dim, full size, start, length, writer)

    def cut(p: Tensor | None, dim: int, full: int, start: int, length: int, writer: bool = True) -> None:
        if p is not None:
            sliced[id(p)] = (dim, full, start, length, writer)

    for chunk in _chunks(model):
        for module in chunk.modules():
            # The sliced linears record their own place (a TiledMLP registers its MLP's linears as its own).
            if isinstance(module, ColumnParallelLinear):  # q/k/v (a replicated KV head: one writer), gate/up
                n = module.out_features
                cut(module.weight, 0, module.full_features, module.start, n, module.writer)
                cut(module.bias, 0, module.full_features, module.start, n, module.writer)
            elif isinstance(module, RowParallelLinear):
                n = module.weight.shape[1]
                cut(module.weight, 1, n * tp, r * n, n)
            elif isinstance(module, VocabParallelEmbedding):
                vocab, start = chunk.dims.vocab_size, module.start
                cut(module.weight, 0, vocab, start, max(0, min(vocab, start + module.weight.shape[0]) - start))
            elif isinstance(module, VocabParallelHead):
                rows = module.weight.shape[0]
                cut(module.weight, 0, chunk.dims.vocab_size, r * rows, module.real_rows)
    out = {}
    for name, p in named_parameters(model).items():
        if id(p) not in sliced:
            out[name] = Placement(tuple(p.shape), None, writer=r == 0)
            continue
        dim, full, start, length, writer = sliced[id(p)]
        shape = list(p.shape)
        if shape[dim] != length and (dim != 0 or shape[dim] < length):
            raise ValueError(f"{name}: local shape {tuple(p.shape)} does not hold {length} entries along dim {dim}")
        shape[dim] = full
        out[name] = Placement(tuple(shape), dim, start, length, writer)
    return out


@dataclass
class _Slot:
    """One tensor the inner optimizer steps (a parameter, or a ZeRO shard of the flat buffer).

    ``members``: (name, lo, hi, pos) -- real elements ``[lo, hi)`` of the parameter's slice sit at
    positions ``[pos, pos + hi - lo)`` of the slot.
    """

    tensor: Tensor
    group: int
    members: list[tuple[str, int, int, int]] = field(default_factory=list)


def _inner(optimizer: Optim) -> tuple[torch.optim.Optimizer, ZeroOptimizer | None]:
    if isinstance(optimizer, ZeroOptimizer):
        return optimizer.optimizer, optimizer if optimizer.stage else None
    return optimizer, None


def _slots(optimizer: Optim, params: dict[str, nn.Parameter],
           where: dict[str, Placement]) -> tuple[torch.optim.Optimizer, ZeroOptimizer | None, list[_Slot]]:
    """The inner optimizer's slots in ``state_dict`` order (index i is slot i)."""
    inner, zero = _inner(optimizer)
    name_of = {id(p): n for n, p in params.items()}
    slots = []
    if zero is None:
        for g, group in enumerate(inner.param_groups):
            for p in group["params"]:
                if id(p) not in name_of:
                    raise ValueError(f"the optimizer steps a tensor of shape {tuple(p.shape)} that is not a parameter "
                                     "of the model; pass the model (or pipeline chunks) the optimizer was built over")
                name = name_of[id(p)]
                slots.append(_Slot(p, g, [(name, 0, where[name].numel, 0)]))
        return inner, zero, slots
    if isinstance(zero, Zero3Optimizer):  # one tensor per (param group, unit); the optimizer maps them
        members = iter(zero.slot_members())
        for g, group in enumerate(inner.param_groups):
            for piece in group["params"]:
                slots.append(_Slot(piece, g, [(name_of[id(p)], lo, min(hi, where[name_of[id(p)]].numel), pos)
                                              for p, lo, hi, pos in next(members)
                                              if min(hi, where[name_of[id(p)]].numel) > lo]))
        return inner, zero, slots
    for g, group in enumerate(inner.param_groups):
        piece, = group["params"]
        a = group["index_offset"]
        slot = _Slot(piece, g)
        for p, o in zip(zero._ordered, zero._offsets):
            name = name_of[id(p)]
            lo, hi = max(o, a), min(o + where[name].numel, a + piece.numel())
            if hi > lo:
                slot.members.append((name, lo - o, hi - o, lo - a))
        slots.append(slot)
    return inner, zero, slots


def _format(group: Mapping[str, Any]) -> tuple[str, int | None]:
    """(state_dtype, block size) of a param group: FP8AdamW's, or PLAIN for a torch optimizer."""
    name = group.get("state_dtype", PLAIN)
    return name, group["block_size"] if name != PLAIN and FORMATS[name].scaled else None


def _block_state(inner: torch.optim.Optimizer, p: Tensor) -> Mapping[str, Any] | None:
    """``p``'s optimizer state as codes plus per-block scales (FP8AdamW may pack its scales into codes)."""
    return inner.block_state(p) if isinstance(inner, FP8AdamW) else inner.state.get(p)


def _code_format(state_dtype: str, key: str) -> CodeFormat | None:
    if state_dtype == PLAIN:
        return None
    fmt = FORMATS[state_dtype]
    return fmt.m if key == "exp_avg" else fmt.v


@dataclass
class LayoutFreeState:
    """One rank's pieces (``tensors``, for its checkpoint file) and their JSON description (``index``)."""

    tensors: dict[str, dict[str, Tensor]]
    index: dict[str, Any]


@torch.no_grad()
def layout_free_state(model: Model, optimizer: Optim, mesh: Mesh) -> LayoutFreeState:
    """This rank's share of the model and optimizer, stored by full parameter name (see the module docstring).

    ``optimizer``: the loop's ``ZeroOptimizer`` (any stage), or a plain torch optimizer over the
    model's parameters (replicated over HDP, as ZeRO stage 0).
    """
    where = placements(model, mesh)
    params = named_parameters(model)
    inner, zero, slots = _slots(optimizer, params, where)
    member_of = {m[0]: (slot, m) for slot in slots for m in slot.members}
    flat = set() if zero is None else {id(p) for p in zero._ordered}
    sharded = isinstance(zero, Zero3Optimizer)
    tensors: dict[str, dict[str, Tensor]] = {}
    metas: dict[str, Any] = {}
    for name, place in where.items():
        if not place.writer:
            continue
        slot, (_, m_lo, m_hi, pos) = member_of.get(name, (None, (name, 0, 0, 0)))
        if id(params[name]) in flat:  # ZeRO 1/2: this rank's shard of the flat buffer
            lo, hi = m_lo, m_hi
        else:  # every HDP rank holds the same values: each writes its 1/HDP share
            share = -(-place.numel // mesh.hdp)
            lo, hi = min(mesh.hdp_rank * share, place.numel), min((mesh.hdp_rank + 1) * share, place.numel)
        if hi <= lo:
            continue
        # ZeRO-3 holds only its shard (the parameter itself is released between steps); the values are the same.
        piece = {"param": slot.tensor.detach().reshape(-1)[pos:pos + hi - lo] if sharded
                 else params[name].detach().reshape(-1)[lo:hi]}
        region = [place.dim, place.start, place.length, lo, hi]
        meta: dict[str, Any] = {"shape": list(place.full_shape), "region": region, "state": None}
        state = None if slot is None else _block_state(inner, slot.tensor)
        if state:
            group = inner.param_groups[slot.group]
            state_dtype, block = _format(group)
            unknown = sorted(set(state) - {"step", *MOMENTS, *(f"{k}_scale" for k in MOMENTS)})
            if unknown:
                raise ValueError(f"optimizer state {unknown} of {name}: layout-free checkpoints hold AdamW's step, "
                                 f"exp_avg and exp_avg_sq (amsgrad and other variants are not supported)")
            first = pos + lo - m_lo
            last = first + hi - lo
            for key in MOMENTS:
                piece[key] = state[key].reshape(-1)[first:last]
                if block is not None:
                    piece[f"{key}_scale"] = state[f"{key}_scale"][first // block:(last - 1) // block + 1]
            step = state["step"]
            meta["state"] = {"step": int(step.item() if isinstance(step, Tensor) else step), "format": state_dtype,
                             "block": block, "block_first": first}
        tensors[name], metas[name] = piece, meta
    groups = [{k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in HYPER if k in g}
              for g in inner.param_groups]
    layout = {"world": mesh.world, "rank": mesh.rank, "tp": mesh.tp, "pp": mesh.pp, "hdp": mesh.hdp,
              "zero_stage": 0 if zero is None else zero.stage}
    return LayoutFreeState(tensors, {"layout": layout, "groups": groups, "params": metas})


def save_resharded(run_dir: str | os.PathLike, step: int, model: Model, optimizer: Optim,
                   mesh: Mesh, state: Mapping[str, Any], keep: int = 2) -> Path:
    """Save a checkpoint that ``load_resharded`` resumes at any layout; collective over the world.

    ``state`` holds the layout-independent keys, identical on every rank (e.g. ``lr_scheduler``,
    ``sampler``, ``extra``): rank 0 writes them once. Model, optimizer and this rank's RNG state
    are added here. Returns the published step directory.
    """
    clash = sorted({PIECES, RNG} & set(state))
    if clash:
        raise ValueError(f"state keys {clash} are reserved by save_resharded (it adds the model, optimizer and RNG)")
    free = layout_free_state(model, optimizer, mesh)
    return save_checkpoint(run_dir, step, {**state, PIECES: free.tensors, RNG: capture_rng_state()}, keep=keep,
                           shared_keys=tuple(state), index=free.index)


@dataclass
class _Source:
    file: str
    meta: dict[str, Any]

    @property
    def region(self) -> tuple[int | None, int, int, int, int]:
        dim, start, length, lo, hi = self.meta["region"]
        return dim, start, length, lo, hi

    def placement(self) -> Placement:
        dim, start, length, _, _ = self.region
        return Placement(tuple(self.meta["shape"]), dim, start, length)


def _overlap(a: Placement, b: Placement) -> tuple[int | None, int, int]:
    """(axis, first, end) of the full-parameter index range two slices share along their sliced axis."""
    if a.dim is not None and b.dim is not None and a.dim != b.dim:
        raise ValueError(f"sliced along dim {a.dim} in the checkpoint but along dim {b.dim} here")
    axis = a.dim if a.dim is not None else b.dim
    if axis is None:
        return None, 0, 0
    (a0, a1), (b0, b1) = a.span(axis), b.span(axis)
    return axis, max(a0, b0), min(a1, b1)


def _intersects(a: Placement, b: Placement) -> bool:
    axis, first, end = _overlap(a, b)
    return axis is None or end > first


def _index_sources(manifest: Mapping[str, Any]) -> tuple[dict[str, list[_Source]], dict[str, Any]]:
    index = manifest.get("index") or {}
    if not index:
        raise ValueError(f"the checkpoint of step {manifest.get('step')} has no layout-free index (it was written by "
                         f"save_checkpoint, not save_resharded); resume it at its own layout with load_latest")
    sources: dict[str, list[_Source]] = {}
    for file, entry in sorted(index.items()):
        for name, meta in entry["params"].items():
            sources.setdefault(name, []).append(_Source(file, meta))
    return sources, index


def _needed(sources: Mapping[str, list[_Source]], where: Mapping[str, Placement]) -> list[str]:
    return sorted({s.file for name, place in where.items() for s in sources.get(name, ())
                   if _intersects(s.placement(), place)} | {SHARED_FILE})


def needed_files(manifest: Mapping[str, Any], model: Model, mesh: Mesh) -> list[str]:
    """The files of a checkpoint (given its manifest) that this rank reads at the layout of ``model`` and ``mesh``:
    the shared state and every file with a piece that intersects a slice this rank holds."""
    return _needed(_index_sources(manifest)[0], placements(model, mesh))


def _check_names(sources: Mapping[str, list[_Source]], where: Mapping[str, Placement],
                 everyone: set[str]) -> None:
    """Raise a ValueError naming missing parameters, parameters nobody holds, and shape mismatches."""
    problems = []
    missing = sorted(set(where) - set(sources))
    if missing:
        problems.append(f"the checkpoint lacks parameter(s) {missing} that this model needs")
    unused = sorted(set(sources) - everyone)
    if unused:
        problems.append(f"the checkpoint has parameter(s) {unused} that no rank of this model holds")
    for name, place in where.items():
        for src in sources.get(name, [])[:1]:
            if tuple(src.meta["shape"]) != place.full_shape:
                problems.append(f"parameter {name} has shape {tuple(src.meta['shape'])} in the checkpoint but "
                                f"{place.full_shape} in this model")
    if problems:
        raise ValueError("; ".join(problems) + " -- resume with the model configuration the checkpoint was written "
                         "with, or start a fresh run_dir")


def _element_scales(scales: Tensor, first: int, n: int, block: int) -> Tensor:
    """Each element's block scale, for a piece whose element 0 sits at block-space position ``first``."""
    return scales[(torch.arange(n) + first) // block - first // block]


class _Assembler:
    """Builds the slice of one parameter this rank needs from the pieces of the files it mapped."""

    def __init__(self, payloads: Mapping[str, Mapping[str, Any]], sources: Mapping[str, list[_Source]]) -> None:
        self.payloads, self.sources = payloads, sources

    def _tensors(self, src: _Source, name: str) -> dict[str, Tensor]:
        return self.payloads[src.file][PIECES][name]

    def relevant(self, name: str, want: Placement) -> list[_Source]:
        return [s for s in self.sources[name] if _intersects(s.placement(), want)]

    def assemble(self, name: str, want: Placement, channel: Any, dtype: torch.dtype, fill: float = 0.0
                 ) -> tuple[Tensor, int]:
        """(tensor of ``want.shape``, number of its elements the pieces covered), from ``channel(src, tensors)``.

        ``channel`` returns a piece's 1-D values for its ``[lo, hi)``.
        """
        out = torch.full(want.shape, fill, dtype=dtype)
        covered = torch.zeros(want.shape, dtype=torch.bool)
        by_slice: dict[tuple, list[_Source]] = {}
        for src in self.relevant(name, want):
            by_slice.setdefault(src.region[:3], []).append(src)
        for srcs in by_slice.values():
            have = srcs[0].placement()
            saved = torch.full(have.shape, fill, dtype=dtype)
            saved_cov = torch.zeros(have.shape, dtype=torch.bool)
            for src in srcs:
                _, _, _, lo, hi = src.region
                saved.view(-1)[lo:hi] = channel(src, self._tensors(src, name))
                saved_cov.view(-1)[lo:hi] = True
            axis, first, end = _overlap(have, want)
            if axis is None:
                out.copy_(saved)
                covered |= saved_cov
                continue
            src_at, dst_at = first - have.span(axis)[0], first - want.span(axis)[0]
            out.narrow(axis, dst_at, end - first).copy_(saved.narrow(axis, src_at, end - first))
            covered.narrow(axis, dst_at, end - first).logical_or_(saved_cov.narrow(axis, src_at, end - first))
        return out.view(-1), int(covered.sum())


def _moment_values(key: str) -> Any:
    """Channel: a piece's moment as fp32 values (dequantized from codes and block scales)."""
    def values(src: _Source, tensors: Mapping[str, Tensor]) -> Tensor:
        st = src.meta["state"]
        fmt = _code_format(st["format"], key)
        if st["block"] is None:
            return tensors[key].to(torch.float32)
        scale = _element_scales(tensors[f"{key}_scale"], st["block_first"], tensors[key].numel(), st["block"])
        return dequantize_blocks(tensors[key].to(torch.float32).view(-1, 1), scale, fmt).view(-1)
    return values


def _moment_codes(key: str) -> Any:
    def codes(src: _Source, tensors: Mapping[str, Tensor]) -> Tensor:
        return tensors[key].view(torch.uint8)
    return codes


def _moment_scales(key: str) -> Any:
    def scales(src: _Source, tensors: Mapping[str, Tensor]) -> Tensor:
        st = src.meta["state"]
        return _element_scales(tensors[f"{key}_scale"], st["block_first"], tensors[key].numel(), st["block"])
    return scales


def _param_values(src: _Source, tensors: Mapping[str, Tensor]) -> Tensor:
    return tensors["param"]


@dataclass
class _NameState:
    """One parameter's saved optimizer state over this rank's slice, flattened."""

    step: int
    state_dtype: str
    values: dict[str, Tensor]  # key -> fp32 values
    codes: dict[str, Tensor]  # key -> uint8 view of the codes (scaled formats only)
    scales: dict[str, Tensor]  # key -> each element's saved block scale, NaN where nothing was saved


def _name_state(asm: _Assembler, name: str, want: Placement, copy_codes: bool) -> _NameState | None:
    srcs = asm.relevant(name, want)
    states = [s.meta["state"] for s in srcs]
    if all(st is None for st in states):
        return None
    kinds = {(st["format"], st["step"]) if st else None for st in states}
    if len(kinds) != 1:
        raise ValueError(f"the checkpoint's optimizer states of {name} disagree between ranks "
                         f"({sorted(map(str, kinds))})")
    st = states[0]
    out = _NameState(st["step"], st["format"], {}, {}, {})
    for key in MOMENTS:
        out.values[key], count = asm.assemble(name, want, _moment_values(key), torch.float32)
        if count != want.numel:
            raise ValueError(f"the checkpoint's {key} covers {count} of the {want.numel} elements of {name} this rank "
                             "needs; its files are incomplete")
        if copy_codes and st["block"] is not None:
            out.codes[key], _ = asm.assemble(name, want, _moment_codes(key), torch.uint8)
            out.scales[key], _ = asm.assemble(name, want, _moment_scales(key), torch.float32, fill=math.nan)
    return out


def _requantize(values: Tensor, codes: Tensor | None, scales: Tensor | None, fmt: CodeFormat, block: int
                ) -> tuple[Tensor, Tensor]:
    """Codes and block scales of ``values``: blocks whose elements share one saved scale keep codes and scale."""
    n = values.numel()
    blocks = padded_numel(n, block) // block
    x = torch.zeros(blocks * block, dtype=torch.float32)
    x[:n] = values
    q, scale = quantize_blocks(x.view(blocks, block), fmt, None)
    q = q.view(torch.uint8)
    if codes is not None:
        s = torch.full((blocks * block,), math.nan)
        s[:n] = scales
        s = s.view(blocks, block)
        has = ~s.isnan()
        ref = torch.where(has, s, -math.inf).amax(dim=1)
        keep = has.any(dim=1) & torch.where(has, s == ref[:, None], True).all(dim=1)
        c = torch.zeros(blocks * block, dtype=torch.uint8)
        c[:n] = codes
        # Elements without a saved value (padding between parameters in a ZeRO flat space) take the code
        # of zero, which does not depend on the scale: what the uninterrupted run's own step wrote there.
        q = torch.where(keep[:, None] & has, c.view(blocks, block), q)
        scale = torch.where(keep, ref, scale)
    return q.view(-1)[:n].view(fmt.dtype), scale


def _slot_state(slot: _Slot, group: Mapping[str, Any], names: Mapping[str, _NameState | None],
                fp8_optimizer: bool) -> dict[str, Any] | None:
    """The inner optimizer's state of one slot in its own format, from the members' saved states."""
    saved = [names[n] for n, *_ in slot.members if names[n] is not None]
    if not saved:
        return None
    state_dtype, block = _format(group)
    n = slot.tensor.numel()
    state: dict[str, Any] = {"step": max(s.step for s in saved)}
    for key in MOMENTS:
        fmt = _code_format(state_dtype, key)
        values = torch.zeros(n, dtype=torch.float32)
        copy = block is not None and all(s.state_dtype == state_dtype and key in s.codes for s in saved)
        codes = torch.zeros(n, dtype=torch.uint8) if copy else None
        scales = torch.full((n,), math.nan) if copy else None
        for name, lo, hi, pos in slot.members:
            ns = names[name]
            if ns is None:
                continue
            values[pos:pos + hi - lo] = ns.values[key][lo:hi]
            if copy:
                codes[pos:pos + hi - lo] = ns.codes[key][lo:hi]
                scales[pos:pos + hi - lo] = ns.scales[key][lo:hi]
        if block is not None:
            state[key], state[f"{key}_scale"] = _requantize(values, codes, scales, fmt, block)
        elif fp8_optimizer:
            state[key] = round_plain(values, fmt, None)
        else:
            state[key] = values.to(slot.tensor.dtype).view(slot.tensor.shape)
    if not fp8_optimizer:
        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    return state


def _reseed(seed: int, step: int, rank: int) -> None:
    digest = hashlib.sha256(f"seqmesh-resume/{seed}/{step}/{rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little")
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


@torch.no_grad()
def load_resharded(run_dir: str | os.PathLike, model: Model, optimizer: Optim,
                   mesh: Mesh, *, seed: int = 0) -> tuple[int, dict[str, Any]] | None:
    """Restore model, optimizer and RNG from the newest intact ``save_resharded`` checkpoint, whatever its layout.

    Collective over the world. Build ``model`` and ``optimizer`` at this run's layout first (TP
    applied, pipeline stage cut, ZeRO wrapped, lr scheduler constructed), then call this. Returns
    ``(step, state)`` with the layout-independent keys given to ``save_resharded`` (lr scheduler,
    sampler, extra) for the caller to load, or None when there is no checkpoint. A checkpoint that
    lacks a parameter this model needs, holds one no rank needs, or has another shape for one is a
    ``ValueError`` naming them. ``seed`` (the run's seed) re-seeds the RNGs after a layout change.
    """
    rank, world = _dist(None)
    where = placements(model, mesh)
    params = named_parameters(model)
    inner, zero, slots = _slots(optimizer, params, where)
    everyone = set().union(*_gather(sorted(where), None))
    chosen: dict[str, Any] = {}

    def select(manifest: dict[str, Any]) -> list[str]:
        sources, index = _index_sources(manifest)
        _check_names(sources, where, everyone)
        files = set(_needed(sources, where))
        own = f"rank{rank}.pt"
        layout = index.get(own, {}).get("layout", {})
        chosen.update(sources=sources, index=index, same=manifest["world_size"] == world and
                      (layout.get("tp"), layout.get("pp")) == (mesh.tp, mesh.pp))
        if chosen["same"]:
            files.add(own)
        return sorted(files | {SHARED_FILE})

    found = load_latest_files(run_dir, select, mmap=True)
    if found is None:
        return None
    step, _, payloads = found
    error = None
    try:
        _restore(payloads, chosen["sources"], chosen["index"], where, params, inner, slots,
                 isinstance(zero, Zero3Optimizer))
    except (ValueError, RuntimeError) as exc:  # raised on every rank below, so none waits in a collective
        error = f"{type(exc).__name__}: {exc}"
    _raise_if_any(_gather(error, None), f"load_resharded(step={step})")
    if chosen["same"]:
        restore_rng_state(payloads[f"rank{rank}.pt"][RNG])
    else:
        _reseed(seed, step, rank)
    return step, dict(payloads[SHARED_FILE])


def _restore(payloads: Mapping[str, Any], sources: Mapping[str, list[_Source]], index: Mapping[str, Any],
             where: Mapping[str, Placement], params: Mapping[str, nn.Parameter], inner: torch.optim.Optimizer,
             slots: list[_Slot], sharded: bool) -> None:
    saved_groups = next(iter(index.values()))["groups"]
    if len(saved_groups) != len(inner.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(inner.param_groups)}; build the optimizer as the checkpointed run did")
    asm = _Assembler(payloads, sources)
    held = {m[0]: (slot, m) for slot in slots for m in slot.members}
    for name, place in where.items():
        p = params[name]
        values, count = asm.assemble(name, place, _param_values, p.dtype)
        if count != place.numel:
            raise ValueError(f"the checkpoint covers {count} of the {place.numel} elements of {name} this rank needs; "
                             "its files are incomplete")
        if sharded:  # ZeRO-3: write this rank's shard of the parameter (it holds nothing else)
            if name in held:
                slot, (_, lo, hi, pos) = held[name]
                slot.tensor.detach().view(-1)[pos:pos + hi - lo].copy_(values[lo:hi])
            continue
        flat = p.detach().view(-1)
        flat[:place.numel].copy_(values)
        flat[place.numel:].zero_()

    fp8_optimizer = isinstance(inner, FP8AdamW)
    copy_codes = any(_format(g)[1] is not None for g in inner.param_groups)
    names = {name: _name_state(asm, name, place, copy_codes) for name, place in where.items()}
    state_dict = inner.state_dict()
    state_dict["state"] = {}
    for i, slot in enumerate(slots):
        st = _slot_state(slot, inner.param_groups[slot.group], names, fp8_optimizer)
        if st is not None:
            state_dict["state"][i] = st
    for group, saved in zip(state_dict["param_groups"], saved_groups):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    inner.load_state_dict(state_dict)
