"""ZeRO-3 over the HDP plane: parameters sharded too, gathered one decoder layer at a time.

Layout. The model's parameters fall into units: one per decoder layer and one "root" unit (the
embeddings, the final norm, the head). Each unit has its own flat space (its parameters per param
group, each group's segment padded to ``align``), sharded in ``1/HDP`` slices; this rank's slices
of every unit lie one after another in one local buffer (``shard``, with ``shard_grad`` beside it)
over which the inner optimizer steps. The parameters stay registered (names and shapes unchanged,
so checkpoints, the cost model and FLOP counts see the same model) as views of a per-unit full
buffer whose storage is released (``resize_(0)``) whenever the unit is not in use.

Per step. ``begin_step`` gathers the root unit for the whole step (its gradients accumulate like
ZeRO-2's and are reduce-scattered once by ``reduce_gradients``, after the step's last micro-batch).
A decoder layer runs as an ``OnDemandLayer`` (``on_demand_layer.py``, the path parameter offload's
streamed layers take too) with this optimizer as its ``WeightSource``: forward gathers the layer
(``all_gather_into_tensor``), runs it without autograd and frees it; backward gathers it again,
recomputes the layer with autograd, takes the gradients of its inputs and parameters,
reduce-scatters the parameter gradients into this rank's ``shard_grad`` slice (which accumulates
over the step's micro-batches; or keeps them for one reduce-scatter per step, below) and frees
the layer. ``step`` updates the shards only: nothing is gathered after it, so between steps a rank
holds ``1/HDP`` of the parameters.

Prefetch. While a layer computes, the gather of the layer its pass uses next (the next one in
forward, the previous one in backward, within one pipeline chunk) is already in flight
(``async_op``), so on GPUs the transfer hides behind the layer's compute; at most two layers are
whole at a time.

Host shards (``host_shards``; ``offload.params=cpu`` with ``parallel.zero_stage=3``: ZeRO-Infinity's placement).
The rank's shards and their gradients live in host memory (page-locked on CUDA), and with them the inner
optimizer's states, so a rank's device holds only the root and the layers in use, and its host ``1/HDP`` of
the model's states instead of all of its weights (as ZeRO-1/2's parameter offload needs). A gather first copies
the rank's own slice to its place in the layer's device buffer and gathers in place; a reduce-scatter's result
is added into the host gradient shard, in the same order and dtype as on the device, so the bits are those of
device shards. The update steps the host shards (FP8AdamW on the host, or staged through the device with its
``update_device``). What is not built yet: overlapping the reduce-scatter's way to the host with the backward
(each layer's copy back waits for its reduce-scatter) and a plan that keeps some layers whole on the device.

When layer gradients are reduced (``parallel.zero3_grad_reduce``). ``microbatch``: inside every
backward of the layer, as above -- a layer's gradient is never whole beyond its own backward, at
the price of one more transfer of its weights per micro-batch (three instead of two). ``step``
(``reduce_per_step``): each layer's full gradient accumulates over the step's micro-batches and
is reduce-scattered once, after the last one (``reduce_gradients``), as PyTorch's pipelining does
with FSDP2 (no gradient sync but on the last backward) -- two transfers per micro-batch plus one
per step, for a full gradient of every layer the rank holds. Under a pipeline, where a rank holds
only its stages' layers and 1F1B needs many micro-batches, that trade is the better one (``auto``
picks ``step`` there, ``microbatch`` without PP).

Alignment. The gathers and reduce-scatters are collectives over the whole HDP group, but the plan
gives ranks different numbers of micro-batches. The step loop therefore walks plan positions
(micro-batch k is item k on every HDP rank, as the pipeline does) and a rank that sits micro-batch
k out calls ``idle_item``: every layer's forward gather, then every layer's backward gather and a
reduce-scatter of zeros (per-micro-batch reduction only), in the order (prefetches included) an
active rank issues them.

Tensor parallelism. The model handed over is this rank's TP shard; each of its units is sharded
over the rank's HDP group (the ranks of the same TP index), so a rank holds ``1/(TP x HDP)`` of
every layer. TP gives every rank of a TP group the same local shapes, so the units' flat spaces
and their HDP slices coincide across TP ranks, and the partial gradients of TP-replicated
parameters (norm gains, a KV head several TP ranks share) are summed over TP on the pieces of the
gradient shard, once per step after the HDP reductions (``reduce_gradients``); the global norm
leaves out the copies the other TP ranks count.

Pipeline parallelism. The model is the rank's ``PipelineModel``: its units are its chunks' layers
plus a root of what its stages hold besides layers (the embedding on the first stage, the final
norm and head on the last, nothing in between), sharded over the HDP group of its stage. The
pipeline runner calls ``begin_step`` before its schedule and, where its schedule meets a
placeholder of the plan (this HDP index sits the micro-batch out), ``idle_layers`` with that op's
chunk: every HDP rank of a stage walks the same schedule, so the stage's collectives line up
under 1F1B and interleaved 1F1B alike. A tied embedding's copy on the last stage stays whole (as
without ZeRO-3, it is not the optimizer's); after each step the first stage's HDP ranks gather
their root to send the owner's weight to it (``root_gathered``).

Why seqmesh's own sharding and not FSDP2 (``fully_shard``): FSDP2 turns parameters into DTensors,
which ``reshard.py``'s layout-free checkpoints, ``FP8AdamW``'s block/``index_offset`` placement
and the ZeRO-1/2 flat-space bookkeeping do not take; its reduce-scatter runs in autograd hooks
after each backward, so an idle rank would have to fake a whole forward/backward (a zero-token
batch through SP attention) to take part; and skipping the sync on all but the last micro-batch
(``set_requires_gradient_sync``) keeps full gradients, which ZeRO-3 exists to avoid. An explicit
gather / recompute / reduce-scatter per layer is ~150 lines, makes the idle pass a plain loop of
collectives, and reuses the ZeRO-1/2 norm, checkpoint and optimizer paths unchanged.

Cost. Each layer runs forward twice (activation checkpointing's 4/3 of the compute, which long
contexts pay anyway) and its weights cross the HDP group three times per micro-batch (two gathers,
one reduce-scatter; with per-step reduction the reduce-scatter once per step). Limits: no
activation offload and no activation checkpointing (the config refuses them: the layers recompute
anyway); ``parallel.overlap_grad_reduce`` does not apply (the layers reduce in their own backward,
or all at once after the step's last one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seqmesh.parallel.on_demand_layer import run_on_demand
from seqmesh.parallel.shard_spec import FlatShard
from seqmesh.parallel.tensor import TensorParallel, sum_tensor_parallel_copies
from seqmesh.parallel.zero import MakeOptimizer, ZeroOptimizer, _round_up, _world


@dataclass
class _Unit:
    """One decoder layer (or the root): its parameters' places in its flat space and this rank's slice."""

    params: list[nn.Parameter]
    offsets: list[int]  # each parameter's start in the unit's flat space
    shard_size: int  # elements of the unit each rank holds
    local: int  # start of this rank's slice in the local shard buffer
    full: Tensor = field(default=None)  # the gathered flat space; storage released while unused
    # The unit the same pass uses next (the next layer of the same pipeline chunk in forward, the previous one
    # in backward), prefetched while this one computes; None at a chunk's end.
    next_forward: "_Unit | None" = None
    next_backward: "_Unit | None" = None
    pending: "dist.Work | None" = None  # a prefetch in flight
    grad: Tensor | None = None  # the step's full gradient, accumulated over micro-batches (per-step reduction)


def _release(t: Tensor) -> None:
    t.untyped_storage().resize_(0)


def _registered_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers as registered: a list, or a pipeline rank's ``ModuleDict`` keyed by layer index."""
    layers = model.model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def _passes(model: nn.Module) -> list[list[nn.Module]]:
    """The layer sequences one forward runs through: the whole model, or each pipeline chunk's layers
    (``PipelineModel.chunks``: a chunk's forward and backward are separate schedule ops)."""
    chunks = getattr(model, "chunks", None)
    if chunks is None:
        return [_registered_layers(model)]
    return [list(chunk.model.layers.values()) for chunk in chunks]


class Zero3Optimizer(ZeroOptimizer):
    """ZeRO stage 3 over ``model``'s decoder layers (``model.model.layers``); see the module docstring.

    Args:
        model: the model on the host (or any device); its shards, gathers and buffers go to ``device``.
            It may be tensor parallel (its TP shard is sharded further) and a pipeline rank's
            ``PipelineModel`` (its stages' layers; ``model.parameters()`` are the ones the rank owns).
        param_groups, make_optimizer, group, align: as for ``ZeroOptimizer``; the inner optimizer
            gets one param group per given group, holding this rank's slice of each unit.
        tp_group: the group the global gradient norm also sums over (TP, or PP x TP under a pipeline).
        tensor_parallel: the model's TP description (``tensor.tensor_parallel(model)``, narrowed to what
            the rank holds): the gradients of its TP-replicated parameters are summed over TP in the shard,
            and TP ranks other than the writer leave them out of the norm. None without TP.
        reduce_per_step: accumulate each layer's full gradient over the step's micro-batches and
            reduce-scatter it once in ``reduce_gradients`` (``parallel.zero3_grad_reduce=step``), instead of
            inside every backward of the layer (see the module docstring).
        host_shards: keep this rank's shards, their gradients and so the optimizer's states in host memory
            (page-locked on CUDA), ZeRO-Infinity's placement (``offload.params=cpu`` with ``parallel.zero_stage=3``):
            the device holds only the units in use (see "Host shards" in the module docstring).
    """

    def __init__(self, model: nn.Module, param_groups: list[dict[str, Any]], make_optimizer: MakeOptimizer, *,
                 device: torch.device, group: dist.ProcessGroup | None = None, align: int = 128,
                 tp_group: dist.ProcessGroup | None = None, tensor_parallel: TensorParallel | None = None,
                 reduce_per_step: bool = False, host_shards: bool = False) -> None:
        if host_shards and reduce_per_step:
            raise ValueError("ZeRO-3 with host shards reduce-scatters each layer's gradient in its own backward: a "
                             "gradient kept whole per layer (parallel.zero3_grad_reduce=step) would hold the whole "
                             "model's on the device; set parallel.zero3_grad_reduce=microbatch (or auto)")
        self.stage, self.group, self.tp_group, self.align = 3, group, tp_group, align
        self.device, self.host_shards = torch.device(device), host_shards  # where layers compute
        self.tensor_parallel, self.reduce_per_step = tensor_parallel, reduce_per_step
        self.world, self.rank = _world(group)
        # Layers reduce-scatter their gradients inside their own backward already; the root unit's are
        # reduced once after backward (``reduce_gradients``), so there is no bucketed reduction to overlap.
        self.reduction = None
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
        self.params = [p for g in groups for p in g["params"]]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears twice in the param groups; list shared (tied) parameters once")
        kinds = {p.dtype for p in self.params}
        if len(kinds) != 1:
            raise ValueError(f"ZeRO-3 flattens parameters into one buffer per layer; they must share one dtype, "
                             f"got {sorted(map(str, kinds))}")
        dtype, = kinds
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        layers = _registered_layers(model)
        in_layer = {id(p) for layer in layers for p in layer.parameters()}
        members = [list(layer.parameters()) for layer in layers]
        members.append([p for p in self.params if id(p) not in in_layer])

        # One virtual flat space: units one after another, each its whole (all ranks') space.
        self._ordered, self._offsets = [], []
        self.units: list[_Unit] = []
        pieces: list[list[tuple[int, int]]] = [[] for _ in groups]  # per group: (local start, length)
        self._piece_members: list[list[list[tuple[nn.Parameter, int, int, int]]]] = [[] for _ in groups]
        space, local = 0, 0
        for params in members:
            offsets, segments, offset = [], [], 0
            ordered = sorted((p for p in params if id(p) in group_of), key=lambda p: group_of[id(p)])
            for g in range(len(groups)):
                start = offset
                for p in ordered:
                    if group_of[id(p)] == g:
                        offsets.append(offset)
                        offset += p.numel()
                offset = start + _round_up(offset - start, align)
                segments.append((start, offset))
            shard_size = -(-offset // align // self.world) * align
            unit = _Unit(ordered, offsets, shard_size, local)
            lo, hi = self.rank * shard_size, (self.rank + 1) * shard_size
            for g, (start, end) in enumerate(segments):
                a, b = min(max(start, lo), hi), max(min(end, hi), min(max(start, lo), hi))
                pieces[g].append((local + a - lo, b - a))
                self._piece_members[g].append([(p, max(o, a) - o, min(o + p.numel(), b) - o, max(o, a) - a)
                                               for p, o in zip(ordered, offsets) if min(o + p.numel(), b) > max(o, a)])
            self._ordered += ordered
            self._offsets += [space + o for o in offsets]
            space += self.world * shard_size
            local += shard_size
            self.units.append(unit)
        where, pin = ("cpu", self.device.type == "cuda") if host_shards else (device, False)
        self.shard = torch.zeros(local, dtype=dtype, device=where, pin_memory=pin)
        self.shard_grad = torch.zeros(local, dtype=dtype, device=where, pin_memory=pin)
        with torch.no_grad():
            for unit in self.units:
                unit.full = torch.zeros(self.world * unit.shard_size, dtype=dtype, device=device)
                for p, o in zip(unit.params, unit.offsets):
                    unit.full[o:o + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = unit.full[o:o + p.numel()].view_as(p)
                lo = self.rank * unit.shard_size
                self.shard[unit.local:unit.local + unit.shard_size].copy_(unit.full[lo:lo + unit.shard_size])
                _release(unit.full)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
        # Where in ``shard_grad`` each parameter's elements lie (the same places on every TP rank: TP gives
        # every rank the same local shapes, so the units' flat spaces coincide).
        placed = [(p, start + pos, start + pos + hi - lo)
                  for g in range(len(groups)) for (start, _), member in zip(pieces[g], self._piece_members[g])
                  for p, lo, hi, pos in member]
        excluded = set() if tensor_parallel is None else {id(p) for p in tensor_parallel.norm_excluded()}
        self._excluded_local = [(a, b) for p, a, b in placed if id(p) in excluded]
        replicated = set() if tensor_parallel is None else {id(p) for p in tensor_parallel.replicated}
        kv_shared = set() if tensor_parallel is None else {id(p) for p in tensor_parallel.kv_shared}
        self._tp_replicated = [(a, b) for p, a, b in placed if id(p) in replicated]
        self._tp_kv_shared = [(a, b) for p, a, b in placed if id(p) in kv_shared]
        inner = []
        for g, opts in enumerate(groups):
            tensors = []
            for start, n in pieces[g]:
                piece = self.shard[start:start + n]
                piece.grad = self.shard_grad[start:start + n]
                tensors.append(piece)
            inner.append({**opts, "params": tensors})
        self.optimizer = make_optimizer(inner)
        self.root = self.units[-1]
        self.layers = layers
        self._unit_of = {id(layer): unit for layer, unit in zip(layers, self.units)}
        for run in _passes(model):
            units = [self._unit_of[id(layer)] for layer in run]
            for a, b in zip(units, units[1:]):
                a.next_forward, b.next_backward = b, a
        run_on_demand(layers, self.units, self)

    @property
    def shards_params(self) -> bool:
        return True

    def flat_shards(self) -> list[FlatShard]:
        """Per inner-optimizer tensor (state_dict order: one per param group and unit), the parameter elements
        it holds -- the checkpoint's map between parameters and shards."""
        members = iter(m for group in self._piece_members for m in group)
        return [FlatShard(piece, g, next(members))
                for g, group in enumerate(self.optimizer.param_groups) for piece in group["params"]]

    def gathered_bytes(self) -> int:
        """The most bytes of the model the device holds at once beside the shards: the root whole with its
        gradient for the step, two layers whole (the one computing and the next one's gather) and a layer's
        gradient twice while it is reduce-scattered (autograd's tensors and their flat copy); what the cost
        model counts under host shards."""
        size = self.shard.element_size()
        layer = max((u.full.numel() for u in self.units if u is not self.root), default=0)
        return size * (2 * self.root.full.numel() + 4 * layer)

    def _slice(self, unit: _Unit, t: Tensor) -> Tensor:
        return t[unit.local:unit.local + unit.shard_size]

    @torch.no_grad()
    def gather(self, unit: _Unit, prefetch: _Unit | None = None) -> None:
        """Bring the whole unit into its full buffer (a collective over HDP; nothing for a unit without
        parameters, such as a middle pipeline stage's root, on every HDP rank of that stage alike), waiting
        for its prefetch if one is in flight; then start gathering ``prefetch`` (the unit used next)."""
        if unit.pending is not None:
            unit.pending.wait()
            unit.pending = None
        else:
            self._launch(unit, async_op=False)
        if prefetch is not None and prefetch.pending is None and self.world > 1:
            prefetch.pending = self._launch(prefetch, async_op=True)

    def _launch(self, unit: _Unit, async_op: bool) -> "dist.Work | None":
        if not unit.shard_size:
            return None
        unit.full.untyped_storage().resize_(unit.full.numel() * unit.full.element_size())
        own = self._slice(unit, self.shard)
        if self.world == 1:
            unit.full.copy_(own, non_blocking=self.host_shards)
            return None
        if self.host_shards:  # this rank's slice crosses to its place in the whole first: the gather is in place
            own = unit.full[self.rank * unit.shard_size:(self.rank + 1) * unit.shard_size].copy_(own, non_blocking=True)
        return dist.all_gather_into_tensor(unit.full, own, group=self.group, async_op=async_op)

    # ------------------------------------------------------------------ as the layers' WeightSource

    def bring(self, unit: _Unit, backward: bool) -> None:
        """Gather ``unit`` and start gathering the unit its pass uses next, before its kernels are queued (the
        collective's stream waits for the work queued before it)."""
        self.gather(unit, unit.next_backward if backward else unit.next_forward)

    def queued(self, unit: _Unit, backward: bool) -> None:
        """Nothing: the next gather started in ``bring``."""

    def keep_after_forward(self, unit: _Unit) -> bool:
        return False

    def release(self, unit: _Unit, keep: bool = False) -> None:
        """Free ``unit``'s gathered weights (ZeRO-3 never keeps a layer whole between passes)."""
        _release(unit.full)

    @torch.no_grad()
    def reduce_scatter(self, unit: _Unit, grads: list[Tensor | None]) -> None:
        """Sum the unit's full gradients (None: zero) over HDP into this rank's ``shard_grad`` slice."""
        if not unit.shard_size:
            return
        self._reduce_scatter_flat(unit, self._flat_grad(unit, grads))

    def _flat_grad(self, unit: _Unit, grads: list[Tensor | None]) -> Tensor:
        full = torch.zeros_like(unit.full)
        for p, o, g in zip(unit.params, unit.offsets, grads):
            if g is not None:
                full[o:o + p.numel()].copy_(g.reshape(-1))
        return full

    def _reduce_scatter_flat(self, unit: _Unit, full: Tensor) -> None:
        out = self._slice(unit, self.shard_grad)
        if self.world == 1:
            out.add_(full.to(out.device))
            return
        part = torch.empty(out.shape, dtype=out.dtype, device=full.device)
        dist.reduce_scatter_tensor(part, full, op=dist.ReduceOp.SUM, group=self.group)
        out.add_(part.to(out.device))  # host shards: added where the gradient lives, as AccumulateGrad would

    @torch.no_grad()
    def take_grads(self, unit: _Unit, grads: Sequence[Tensor | None]) -> None:
        """One backward's gradients of a layer: reduce-scattered now, or added to the step's full gradient
        (``reduce_per_step``), which ``reduce_gradients`` reduce-scatters after the last micro-batch."""
        if not self.reduce_per_step:
            self.reduce_scatter(unit, grads)
        elif unit.shard_size:
            if unit.grad is None:
                unit.grad = self._flat_grad(unit, grads)
            else:
                for p, o, g in zip(unit.params, unit.offsets, grads):
                    if g is not None:
                        unit.grad[o:o + p.numel()].add_(g.reshape(-1))

    def begin_step(self) -> None:
        """Gather the root unit (embeddings, final norm, head) for the step's forwards and backwards."""
        self.gather(self.root)

    @contextmanager
    def root_gathered(self) -> Iterator[None]:
        """The root unit's parameters hold their values inside the block (a collective over HDP), e.g. for a
        pipeline's first stage to send its tied embedding to the last stage's copy after a step."""
        self.gather(self.root)
        try:
            yield
        finally:
            self.release(self.root)

    def idle_layers(self, layers: Sequence[nn.Module], backward: bool) -> None:
        """Take part in one forward (``backward`` False) or backward of ``layers`` without work: the gathers,
        and in backward the zero reduce-scatters (none with ``reduce_per_step``), in the order an active rank
        issues them (forward: the layers' order; backward: reversed)."""
        for layer in reversed(layers) if backward else layers:
            unit = self._unit_of[id(layer)]
            self.bring(unit, backward)
            if backward and not self.reduce_per_step:
                self.reduce_scatter(unit, [None] * len(unit.params))
            self.release(unit)

    def idle_item(self) -> None:
        """Take part in one micro-batch's layer collectives without work: gathers in forward order, then
        gather + zero reduce-scatter in backward order (what every active rank issues)."""
        self.idle_layers(self.layers, backward=False)
        self.idle_layers(self.layers, backward=True)

    def reduce_gradients(self) -> None:
        """Reduce-scatter the root's accumulated gradients into its shard and free the root (with
        ``reduce_per_step`` also every layer's, in registration order, zeros where a rank ran none); then sum
        the shard's pieces of TP-replicated parameters over TP (one all-reduce)."""
        if self.reduce_per_step:
            for unit in self.units[:-1]:
                if unit.shard_size:
                    grad = unit.grad if unit.grad is not None else torch.zeros_like(unit.full)
                    self._reduce_scatter_flat(unit, grad)
                unit.grad = None
        root = self.root
        self.reduce_scatter(root, [p.grad for p in root.params])
        for p in root.params:
            p.grad = None
        self.release(root)
        if self.tensor_parallel is not None:
            sum_tensor_parallel_copies(self.tensor_parallel, [self.shard_grad[a:b] for a, b in self._tp_replicated],
                                       [self.shard_grad[a:b] for a, b in self._tp_kv_shared])

    @torch.no_grad()
    def step(self) -> None:
        if self.host_shards and self.device.type == "cuda":
            # the copies out of the host shards (a gather's first leg) may still be queued; the update rewrites them
            torch.cuda.current_stream(self.device).synchronize()
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.shard_grad.zero_()
        for p in self.root.params:
            p.grad = None

    def _layout(self) -> dict[str, int]:
        return {"world": self.world, "rank": self.rank, "numel": self.shard.numel(), "align": self.align, "stage": 3}

    def _device(self) -> torch.device:
        return self.device
