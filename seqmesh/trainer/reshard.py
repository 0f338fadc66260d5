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

Where the places come from. The resharder knows no module and no optimizer class: each transform
records how it sliced each parameter (``seqmesh.parallel.shard_spec``: a ``ShardSpec`` per
parameter from tensor parallelism and the pipeline, ``FlatShard``s from a ZeRO optimizer's
``flat_shards()``), and an optimizer with quantized moments exposes them through ``block_state``
and a ``StateCodec`` (``state_codec``). A plain torch optimizer is taken as it is (moments in the
parameter's dtype, replicated over HDP as ZeRO stage 0).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.shard_spec import FlatShard, Model, ShardSpec, StateCodec, named_parameters, shard_specs
from seqmesh.trainer.checkpoint import (SHARED_FILE, capture_rng_state, gather_objects, load_latest_files,
                                        raise_if_any, rank_and_world, restore_rng_state, save_checkpoint)

__all__ = ["load_resharded", "named_parameters", "needed_files", "save_resharded", "layout_free_state"]

PIECES = "layout_free"  # key of a rank's pieces in its checkpoint file
RNG = "rng"
MOMENTS = ("exp_avg", "exp_avg_sq")
HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")  # restored per param group
PLAIN = "plain"  # a torch optimizer's moments: tensors in the parameter's dtype
Channel = Callable[["_Source", Mapping[str, Tensor]], Tensor]


class _PlainCodec:
    """``StateCodec`` of a torch optimizer (AdamW): moments are numbers in the parameter's dtype."""

    name, block = PLAIN, None

    def decode(self, key: str, codes: Tensor, element_scales: Tensor | None) -> Tensor:
        return codes.to(torch.float32)

    def encode(self, step: int, moments: Mapping[str, tuple[Tensor, Tensor | None, Tensor | None]],
               like: Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.tensor(float(step), dtype=torch.float32)}
        state.update({key: values.to(like.dtype).view(like.shape) for key, (values, _, _) in moments.items()})
        return state


@dataclass
class _Slot:
    """One tensor the inner optimizer steps; ``members``: (name, lo, hi, pos) -- real elements ``[lo, hi)``
    of the parameter's slice sit at positions ``[pos, pos + hi - lo)`` of the slot."""

    tensor: Tensor
    group: int
    members: list[tuple[str, int, int, int]] = field(default_factory=list)


class _Optimizer:
    """What resharding sees of an optimizer: the inner torch optimizer, its slots, states and codecs.

    A ZeRO optimizer (anything with ``flat_shards()``) says which parameter elements each inner tensor
    holds; any other optimizer steps whole parameters, replicated over HDP.
    """

    def __init__(self, optimizer: Any, params: Mapping[str, nn.Parameter], where: Mapping[str, ShardSpec]) -> None:
        name_of = {id(p): n for n, p in params.items()}
        sharded = getattr(optimizer, "flat_shards", None)
        self.inner: torch.optim.Optimizer = optimizer.optimizer if sharded else optimizer
        self.stage = getattr(optimizer, "stage", 0)
        self.shards_state = bool(sharded and optimizer.shards_state)  # each element's state on one HDP rank
        self.shards_params = bool(sharded and optimizer.shards_params)  # the slots are the only copy of values
        self.state_params = {id(p) for p in optimizer.params} if self.shards_state else set()
        # the param group (as built, layout-free) each inner group belongs to: ``PlacedZero`` cuts groups in runs
        self.origins: list[int] = list(getattr(optimizer, "group_origins", range(len(self.inner.param_groups))))
        shards = sharded() if sharded else [FlatShard(p, g, [(p, 0, p.numel(), 0)])
                                             for g, group in enumerate(self.inner.param_groups)
                                             for p in group["params"]]
        self.slots = []
        for shard in shards:
            slot = _Slot(shard.tensor, shard.group)
            for p, lo, hi, pos in shard.members:
                if id(p) not in name_of:
                    raise ValueError(f"the optimizer steps a tensor of shape {tuple(p.shape)} that is not a parameter "
                                     "of the model; pass the model (or pipeline chunks) the optimizer was built over")
                name = name_of[id(p)]
                hi = min(hi, where[name].numel)  # vocabulary padding rows hold no state worth keeping
                if hi > lo:
                    slot.members.append((name, lo, hi, pos))
            self.slots.append(slot)
        self.held = {m[0]: (slot, m) for slot in self.slots for m in slot.members}

    def codec(self, group: Mapping[str, Any] | str, block: int | None = None) -> StateCodec:
        """The codec of a param group, or of a saved format ``group`` with ``block``."""
        if hasattr(self.inner, "state_codec"):
            return self.inner.state_codec(group, block)
        if isinstance(group, Mapping) or group == PLAIN or block is None:
            return _PlainCodec()
        raise ValueError(f"the checkpoint holds {group!r} optimizer moments (codes and block scales), which "
                         f"{type(self.inner).__name__} cannot decode; resume with the optimizer that wrote them")

    def block_state(self, t: Tensor) -> Mapping[str, Any] | None:
        """``t``'s state as codes plus per-block scales (the optimizer may store its scales otherwise)."""
        if hasattr(self.inner, "block_state"):
            return self.inner.block_state(t)
        return self.inner.state.get(t)


@dataclass
class LayoutFreeState:
    """One rank's pieces (``tensors``, for its checkpoint file) and their JSON description (``index``)."""

    tensors: dict[str, dict[str, Tensor]]
    index: dict[str, Any]


@torch.no_grad()
def layout_free_state(model: Model, optimizer: Any, mesh: Mesh) -> LayoutFreeState:
    """This rank's share of the model and optimizer, stored by full parameter name (see the module docstring).

    ``optimizer``: the loop's ``ZeroOptimizer`` (any stage), or a plain torch optimizer over the
    model's parameters (replicated over HDP, as ZeRO stage 0).
    """
    where = shard_specs(model, mesh.tp_rank)
    params = named_parameters(model)
    opt = _Optimizer(optimizer, params, where)
    tensors: dict[str, dict[str, Tensor]] = {}
    metas: dict[str, Any] = {}
    for name, spec in where.items():
        if not spec.writer:
            continue
        slot, (_, m_lo, m_hi, pos) = opt.held.get(name, (None, (name, 0, 0, 0)))
        if id(params[name]) in opt.state_params:  # ZeRO 1-3: this rank's shard of the flat space
            lo, hi = m_lo, m_hi
        else:  # every HDP rank holds the same values: each writes its 1/HDP share
            share = -(-spec.numel // mesh.hdp)
            lo, hi = min(mesh.hdp_rank * share, spec.numel), min((mesh.hdp_rank + 1) * share, spec.numel)
        if hi <= lo:
            continue
        # ZeRO-3 holds only its shard (the parameter itself is released between steps); the values are the same.
        piece = {"param": slot.tensor.detach().reshape(-1)[pos:pos + hi - lo] if opt.shards_params
                 else params[name].detach().reshape(-1)[lo:hi]}
        meta: dict[str, Any] = {"shape": list(spec.full_shape), "region": [spec.dim, spec.start, spec.length, lo, hi],
                                "state": None}
        state = None if slot is None else opt.block_state(slot.tensor)
        if state:
            codec = opt.codec(opt.inner.param_groups[slot.group])
            unknown = sorted(set(state) - {"step", *MOMENTS, *(f"{k}_scale" for k in MOMENTS)})
            if unknown:
                raise ValueError(f"optimizer state {unknown} of {name}: layout-free checkpoints hold AdamW's step, "
                                 f"exp_avg and exp_avg_sq (amsgrad and other variants are not supported)")
            first = pos + lo - m_lo
            last = first + hi - lo
            for key in MOMENTS:
                piece[key] = state[key].reshape(-1)[first:last]
                if codec.block is not None:
                    piece[f"{key}_scale"] = state[f"{key}_scale"][first // codec.block:(last - 1) // codec.block + 1]
            step = state["step"]
            meta["state"] = {"step": int(step.item() if isinstance(step, Tensor) else step), "format": codec.name,
                             "block": codec.block, "block_first": first}
        tensors[name], metas[name] = piece, meta
    firsts = [opt.inner.param_groups[opt.origins.index(i)] for i in range(max(opt.origins, default=-1) + 1)]
    groups = [{k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in HYPER if k in g} for g in firsts]
    layout = {"world": mesh.world, "rank": mesh.rank, "tp": mesh.tp, "pp": mesh.pp, "hdp": mesh.hdp,
              "zero_stage": opt.stage}
    return LayoutFreeState(tensors, {"layout": layout, "groups": groups, "params": metas})


def save_resharded(run_dir: str | os.PathLike, step: int, model: Model, optimizer: Any,
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

    def spec(self) -> ShardSpec:
        dim, start, length, _, _ = self.region
        return ShardSpec(tuple(self.meta["shape"]), dim, start, length)


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


def _needed(sources: Mapping[str, list[_Source]], where: Mapping[str, ShardSpec]) -> list[str]:
    return sorted({s.file for name, spec in where.items() for s in sources.get(name, ())
                   if s.spec().intersects(spec)} | {SHARED_FILE})


def needed_files(manifest: Mapping[str, Any], model: Model, mesh: Mesh) -> list[str]:
    """The files of a checkpoint (given its manifest) that this rank reads at the layout of ``model`` and ``mesh``:
    the shared state and every file with a piece that intersects a slice this rank holds."""
    return _needed(_index_sources(manifest)[0], shard_specs(model, mesh.tp_rank))


def _check_names(sources: Mapping[str, list[_Source]], where: Mapping[str, ShardSpec], everyone: set[str]) -> None:
    """Raise a ValueError naming missing parameters, parameters nobody holds, and shape mismatches."""
    problems = []
    missing = sorted(set(where) - set(sources))
    if missing:
        problems.append(f"the checkpoint lacks parameter(s) {missing} that this model needs")
    unused = sorted(set(sources) - everyone)
    if unused:
        problems.append(f"the checkpoint has parameter(s) {unused} that no rank of this model holds")
    for name, spec in where.items():
        for src in sources.get(name, [])[:1]:
            if tuple(src.meta["shape"]) != spec.full_shape:
                problems.append(f"parameter {name} has shape {tuple(src.meta['shape'])} in the checkpoint but "
                                f"{spec.full_shape} in this model")
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

    def relevant(self, name: str, want: ShardSpec) -> list[_Source]:
        return [s for s in self.sources[name] if s.spec().intersects(want)]

    def assemble(self, name: str, want: ShardSpec, channel: Channel, dtype: torch.dtype, fill: float = 0.0
                 ) -> tuple[Tensor, int]:
        """(tensor of ``want.shape``, number of its elements the pieces covered), from ``channel(src, tensors)``,
        which returns a piece's 1-D values for its ``[lo, hi)``."""
        out = torch.full(want.shape, fill, dtype=dtype)
        covered = torch.zeros(want.shape, dtype=torch.bool)
        by_slice: dict[tuple, list[_Source]] = {}
        for src in self.relevant(name, want):
            by_slice.setdefault(src.region[:3], []).append(src)
        for srcs in by_slice.values():
            have = srcs[0].spec()
            saved = torch.full(have.shape, fill, dtype=dtype)
            saved_cov = torch.zeros(have.shape, dtype=torch.bool)
            for src in srcs:
                _, _, _, lo, hi = src.region
                saved.view(-1)[lo:hi] = channel(src, self.payloads[src.file][PIECES][name])
                saved_cov.view(-1)[lo:hi] = True
            axis, first, end = have.overlap(want)
            if axis is None:
                out.copy_(saved)
                covered |= saved_cov
                continue
            src_at, dst_at = first - have.span(axis)[0], first - want.span(axis)[0]
            out.narrow(axis, dst_at, end - first).copy_(saved.narrow(axis, src_at, end - first))
            covered.narrow(axis, dst_at, end - first).logical_or_(saved_cov.narrow(axis, src_at, end - first))
        return out.view(-1), int(covered.sum())


def _piece_scales(src: _Source, tensors: Mapping[str, Tensor], key: str) -> Tensor:
    st = src.meta["state"]
    return _element_scales(tensors[f"{key}_scale"], st["block_first"], tensors[key].numel(), st["block"])


def _moment_values(opt: _Optimizer, key: str) -> Channel:
    """Channel: a piece's moment as fp32 values (decoded with the saved format's codec)."""
    def values(src: _Source, tensors: Mapping[str, Tensor]) -> Tensor:
        st = src.meta["state"]
        if st["block"] is None:  # plain numbers, whatever the format
            return tensors[key].to(torch.float32)
        return opt.codec(st["format"], st["block"]).decode(key, tensors[key], _piece_scales(src, tensors, key))
    return values


def _moment_codes(key: str) -> Channel:
    return lambda src, tensors: tensors[key].view(torch.uint8)


def _moment_scales(key: str) -> Channel:
    return lambda src, tensors: _piece_scales(src, tensors, key)


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


def _name_state(asm: _Assembler, opt: _Optimizer, name: str, want: ShardSpec, copy_codes: bool) -> _NameState | None:
    states = [s.meta["state"] for s in asm.relevant(name, want)]
    if all(st is None for st in states):
        return None
    kinds = {(st["format"], st["step"]) if st else None for st in states}
    if len(kinds) != 1:
        raise ValueError(f"the checkpoint's optimizer states of {name} disagree between ranks "
                         f"({sorted(map(str, kinds))})")
    st = states[0]
    out = _NameState(st["step"], st["format"], {}, {}, {})
    for key in MOMENTS:
        out.values[key], count = asm.assemble(name, want, _moment_values(opt, key), torch.float32)
        if count != want.numel:
            raise ValueError(f"the checkpoint's {key} covers {count} of the {want.numel} elements of {name} this rank "
                             "needs; its files are incomplete")
        if copy_codes and st["block"] is not None:
            out.codes[key], _ = asm.assemble(name, want, _moment_codes(key), torch.uint8)
            out.scales[key], _ = asm.assemble(name, want, _moment_scales(key), torch.float32, fill=math.nan)
    return out


def _slot_state(slot: _Slot, codec: StateCodec, names: Mapping[str, _NameState | None]) -> dict[str, Any] | None:
    """The inner optimizer's state of one slot in its own format, from the members' saved states."""
    saved = [names[n] for n, *_ in slot.members if names[n] is not None]
    if not saved:
        return None
    n = slot.tensor.numel()
    moments = {}
    for key in MOMENTS:
        values = torch.zeros(n, dtype=torch.float32)
        copy = codec.block is not None and all(s.state_dtype == codec.name and key in s.codes for s in saved)
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
        moments[key] = (values, codes, scales)
    return codec.encode(max(s.step for s in saved), moments, slot.tensor)


def _reseed(seed: int, step: int, rank: int) -> None:
    digest = hashlib.sha256(f"seqmesh-resume/{seed}/{step}/{rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little")
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


@torch.no_grad()
def load_resharded(run_dir: str | os.PathLike, model: Model, optimizer: Any,
                   mesh: Mesh, *, seed: int = 0) -> tuple[int, dict[str, Any]] | None:
    """Restore model, optimizer and RNG from the newest intact ``save_resharded`` checkpoint, whatever its layout.

    Collective over the world. Build ``model`` and ``optimizer`` at this run's layout first (TP
    applied, pipeline stage cut, ZeRO wrapped, lr scheduler constructed), then call this. Returns
    ``(step, state)`` with the layout-independent keys given to ``save_resharded`` (lr scheduler,
    sampler, extra) for the caller to load, or None when there is no checkpoint. A checkpoint that
    lacks a parameter this model needs, holds one no rank needs, or has another shape for one is a
    ``ValueError`` naming them. ``seed`` (the run's seed) re-seeds the RNGs after a layout change.
    """
    rank, world = rank_and_world()
    where = shard_specs(model, mesh.tp_rank)
    params = named_parameters(model)
    opt = _Optimizer(optimizer, params, where)
    everyone = set().union(*gather_objects(sorted(where)))
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
        _restore(payloads, chosen["sources"], chosen["index"], where, params, opt)
    except (ValueError, RuntimeError) as exc:  # raised on every rank below, so none waits in a collective
        error = f"{type(exc).__name__}: {exc}"
    raise_if_any(gather_objects(error), f"load_resharded(step={step})")
    if chosen["same"]:
        restore_rng_state(payloads[f"rank{rank}.pt"][RNG])
    else:
        _reseed(seed, step, rank)
    return step, dict(payloads[SHARED_FILE])


def _restore(payloads: Mapping[str, Any], sources: Mapping[str, list[_Source]], index: Mapping[str, Any],
             where: Mapping[str, ShardSpec], params: Mapping[str, nn.Parameter], opt: _Optimizer) -> None:
    inner = opt.inner
    saved_groups = next(iter(index.values()))["groups"]
    if len(saved_groups) != max(opt.origins, default=-1) + 1:
        raise ValueError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{max(opt.origins, default=-1) + 1}; build the optimizer as the checkpointed run did")
    asm = _Assembler(payloads, sources)
    for name, spec in where.items():
        p = params[name]
        values, count = asm.assemble(name, spec, _param_values, p.dtype)
        if count != spec.numel:
            raise ValueError(f"the checkpoint covers {count} of the {spec.numel} elements of {name} this rank needs; "
                             "its files are incomplete")
        if opt.shards_params:  # ZeRO-3: write this rank's shard of the parameter (it holds nothing else)
            if name in opt.held:
                slot, (_, lo, hi, pos) = opt.held[name]
                slot.tensor.detach().view(-1)[pos:pos + hi - lo].copy_(values[lo:hi])
            continue
        flat = p.detach().view(-1)
        flat[:spec.numel].copy_(values)
        flat[spec.numel:].zero_()

    codecs = [opt.codec(g) for g in inner.param_groups]
    copy_codes = any(c.block is not None for c in codecs)
    names = {name: _name_state(asm, opt, name, spec, copy_codes) for name, spec in where.items()}
    state_dict = inner.state_dict()
    state_dict["state"] = {}
    for i, slot in enumerate(opt.slots):
        st = _slot_state(slot, codecs[slot.group], names)
        if st is not None:
            state_dict["state"][i] = st
    for group, origin in zip(state_dict["param_groups"], opt.origins, strict=True):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_groups[origin].items()})
    inner.load_state_dict(state_dict)
