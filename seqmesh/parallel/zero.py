"""ZeRO over the HDP plane: one gradient reduction per step, optimizer states (1) and gradients (2) sharded.

Stages (``ZeroOptimizer(stage=...)``):

* 0 -- replicated: gradients all-reduced (``grad_reduce.reduce_gradients``), every rank steps every
  parameter with the full optimizer state.
* 1 -- the parameters live in one flat buffer (the model's parameters become views of it) and so do
  their gradients; each HDP rank steps only its ``1/HDP`` slice with an optimizer built over it (its
  states are ``1/HDP`` of the full ones), after which one ``all_gather_into_tensor`` brings every
  rank the updated parameters. Gradient memory stays full.
* 2 -- as 1, but backward writes ordinary per-parameter gradients, each freed as soon as it has been
  copied into its bucket: after the reduction only the ``1/HDP`` gradient shard exists (also during
  the optimizer step and between steps).

Reduction (``seqmesh.parallel.grad_reduce.BucketedReduction``). Stage 0 all-reduces buckets of whole
parameters. Stages 1 and 2 cut the flat space into buckets that each lie inside one rank's slice and
sum each bucket into that rank (``dist.reduce``, SUM), as DeepSpeed's ZeRO-2 ``average_tensor`` does:
a bucket of consecutive parameters is then final as soon as backward has passed them, so it can be
reduced while backward runs on (``overlap``), whereas a ``reduce_scatter`` bucket holds a piece of
every rank's slice -- the embedding's and the first layers' among them, final only at the very end.
A reduce moves each element over the links as often as a reduce-scatter does. Buckets launch in the
order backward finishes their parameters (``grad_order``: registration order reversed), the same on
every rank.

Why seqmesh's own sharding and not DeepSpeed's ZeRO engine: DeepSpeed owns the backward and the
step (``engine.backward`` / ``engine.step``) and reduces gradients in hooks during backward, which
assumes every data-parallel rank runs the same number of micro-batches. seqmesh's plan gives ranks
different numbers (a rank in a large SP group runs fewer) and reduces exactly once per step, during
or after each rank's last backward (``grad_reduce``), so DeepSpeed's hooks would mismatch (a hang). The sharding itself is two
collectives over the HDP group (``mesh.hdp_group``) and composes with whatever the model is: TP
shards (the global gradient norm then also sums over TP, counting TP-replicated parameters once),
and any optimizer that takes 1-D tensors -- ``torch.optim.AdamW`` (fused on GPU) and ``FP8AdamW``,
whose shard borders fall on whole quantization blocks and whose ``index_offset`` places the shard in
the flat space, so from the same gradients a sharded FP8AdamW step equals an unsharded one over the
same flat buffer bit for bit.

Checkpoints: ``state_dict`` holds this rank's optimizer shard and the layout it belongs to
(``checkpoint.py`` writes it to the rank's own file); it loads into the same layout only.
``flat_shards`` records which parameter elements each tensor of the inner optimizer holds, from
which ``seqmesh.trainer.reshard`` saves and loads at any layout.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seqmesh.parallel.grad_reduce import BUCKET_BYTES, BucketedReduction, all_reduce_buckets
from seqmesh.parallel.shard_spec import FlatShard

STAGES = (0, 1, 2)
MakeOptimizer = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def squares_of(tensors: Sequence[Tensor], device: torch.device | str = "cpu") -> Tensor:
    """The sum of ``sum_of_squares`` over ``tensors``, an fp64 scalar on ``device``."""
    return sum((sum_of_squares(t) for t in tensors), torch.zeros((), dtype=torch.float64, device=device))


def sum_of_squares(x: Tensor, chunk: int | None = None) -> Tensor:
    """The sum of ``x``'s squared elements as an fp64 scalar, ``chunk`` elements at a time (default: 16M on a
    GPU, few launches; 1M on a CPU, whose 8 MB fp64 buffer stays in cache).

    Why fp64: with parameter offload the gradients of offloaded layers are summed by the host's CPU and the
    rest by the GPU, in different orders. Squares of fp32 (or bf16) values are exact in fp64 and their fp64
    sums agree to ~1e-16 relative, so the clip norm rounded to fp32, and hence every clipped gradient and
    update, comes out the same wherever the buffer lives (an fp32 sum differs by an ulp between devices,
    which moved some updated weights by one ulp on an H100). Why chunks: the host buffer of an offloaded
    model is billions of elements, and one long reduction of it is no more accurate than the sum of its
    chunks' sums.

    Why two ways: on a GPU ``torch.linalg.vector_norm`` with ``dtype=float64`` widens inside the reduction
    (no fp64 copy). On a CPU that widening reduction runs on one core, unvectorised: ~5 ns per element,
    the bulk of the 7.7 s that reduction and clipping took in an H100 step of an offloaded 2.8B-parameter
    model (its host is a 16-core Xeon). There each chunk is widened into one reused fp64 buffer (a
    vectorised, parallel copy) and summed by BLAS ``dot``: 0.27 ns per element on two cores with 1M-element
    chunks (0.89 with 16M, whose buffer falls out of cache), and it scales with them."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if x.device.type != "cpu":
        for piece in flat.split(chunk or 1 << 24):
            total += torch.linalg.vector_norm(piece, 2, dtype=torch.float64).square()
        return total
    chunk = chunk or 1 << 20
    wide = torch.empty(min(chunk, flat.numel()), dtype=torch.float64)
    for piece in flat.split(chunk):
        w = wide[:piece.numel()].copy_(piece)
        total += torch.dot(w, w)
    return total


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of ``group``; a process without torch.distributed is a world of one."""
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class ZeroOptimizer:
    """An optimizer over the HDP plane at ZeRO ``stage``; see the module docstring.

    Args:
        param_groups: ``[{"params": [...], **options}]`` as for a torch optimizer (e.g. weight decay
            on matrices only); the options are handed on unchanged.
        make_optimizer: builds the inner optimizer from param groups; with stage 1/2 each group holds
            one 1-D slice of the flat buffer and an ``index_offset`` (its position in the flat space).
        group: the HDP process group (None: the default group).
        tp_group: the TP group, over which the global gradient norm also sums (None without TP).
        norm_excluded: parameters that another TP rank holds identically and counts in the norm.
        align: shard and group borders in elements (FP8AdamW's block size keeps blocks whole).
        bucket_bytes: gradient bytes per reduction bucket (``parallel.grad_bucket_mb``).
        overlap: reduce each bucket during the rank's last backward of the step, once its gradients are final
            (``parallel.overlap_grad_reduce``; the runner calls ``overlap_next_backward``); the result is the
            same, bit for bit, as reducing after backward.
        grad_order: the parameters in the order backward finishes their gradients (default: the param groups'
            order reversed); it orders the buckets, the same on every rank.
        deferred: parameters whose gradient changes after backward (TP-replicated ones, summed over TP first):
            their buckets are reduced after backward only.
        grad_group: the group the buckets are reduced over (default: ``group``); a group that carries nothing
            else (``Mesh.grad_group``) keeps other collectives from interleaving with buckets in flight.
        allocate: makes the zero-filled flat buffers of stages 1/2 (``(numel, dtype) -> Tensor``), for host
            buffers that live elsewhere (``offload.params=nvme``: memory-mapped files); default ``torch.zeros``.
        device: where the flat buffers of stages 1/2 live (default: where the parameters are); parameters
            elsewhere are copied into it one at a time, so a model built on the host reaches the device
            without a second copy of it there.
        group_keys: the key (the inner optimizer's ``index_offset``: stochastic rounding draws by it) of each
            group's first element, where it is not its position here: ``PlacedZero`` cuts one flat space into
            two and keeps every element's key of the uncut one, so the draws do not depend on the placement.
    """

    def __init__(self, param_groups: list[dict[str, Any]], make_optimizer: MakeOptimizer, *, stage: int,
                 group: dist.ProcessGroup | None = None, tp_group: dist.ProcessGroup | None = None,
                 norm_excluded: Collection[nn.Parameter] = (), align: int = 128,
                 bucket_bytes: int = BUCKET_BYTES, overlap: bool = False,
                 grad_order: Sequence[nn.Parameter] | None = None, deferred: Collection[nn.Parameter] = (),
                 grad_group: dist.ProcessGroup | None = None,
                 allocate: Callable[[int, torch.dtype], Tensor] | None = None, device: torch.device | None = None,
                 group_keys: Sequence[int] | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r} "
                             "(stage 3, parameter sharding, is seqmesh.parallel.zero3.Zero3Optimizer)")
        if align < 1 or bucket_bytes < 1:
            raise ValueError(f"align and bucket_bytes must be positive, got {align}, {bucket_bytes}")
        self.stage, self.group, self.tp_group, self.align = stage, group, tp_group, align
        self.world, self.rank = _world(group)
        excluded = {id(p) for p in norm_excluded}
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
        self.params = [p for g in groups for p in g["params"]]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears twice in the param groups; list shared (tied) parameters once")
        order = self.params[::-1] if grad_order is None else [p for p in grad_order if p.requires_grad]
        if {id(p) for p in order} != {id(p) for p in self.params}:
            raise ValueError("grad_order must list exactly the optimizer's trainable parameters")
        late = {id(p) for p in deferred}
        # bucket launch order: parameters as backward finishes them, the deferred ones last
        rank_of = {id(p): len(order) if id(p) in late else i for i, p in enumerate(order)}
        self._grad_group = group if grad_group is None else grad_group
        self.reduction: BucketedReduction | None = None
        overlap = overlap and self.world > 1
        if stage == 0:
            self._counted = [p for p in self.params if id(p) not in excluded]
            self.optimizer = make_optimizer(groups)
            if self.world > 1:
                buckets = all_reduce_buckets(sorted(order, key=lambda p: rank_of[id(p)]), self._grad_group,
                                             bucket_bytes)
                self.reduction = BucketedReduction(buckets, overlap=overlap, deferred=deferred)
            return
        if group_keys is not None and len(group_keys) != len(groups):
            raise ValueError(f"group_keys: one key per param group, got {len(group_keys)} for {len(groups)}")
        self._build_flat(groups, excluded, make_optimizer, allocate, device, group_keys)
        self.reduction = BucketedReduction(self._shard_buckets(bucket_bytes, rank_of), overlap=overlap,
                                           deferred=deferred)

    def _build_flat(self, groups: list[dict[str, Any]], excluded: set[int], make_optimizer: MakeOptimizer,
                    allocate: Callable[[int, torch.dtype], Tensor] | None = None,
                    device: torch.device | None = None, group_keys: Sequence[int] | None = None) -> None:
        kinds = {(p.dtype, p.device if device is None else device) for p in self.params}
        if len(kinds) != 1:
            raise ValueError(f"ZeRO flattens all parameters into one buffer; they must share one dtype and device, "
                             f"got {sorted(map(str, kinds))}")
        (dtype, device), = kinds
        # Each group is a segment of the flat space: parameters counted in the norm first, then the
        # excluded ones (one contiguous range to leave out). Every parameter starts on a multiple of ``align``
        # (FP8AdamW's block), so no quantization block spans two parameters: a parameter's states then do not
        # depend on its neighbours, i.e. on the layout (``PlacedZero`` splits the model into two flat spaces).
        self._offsets: list[int] = []
        self._ordered: list[nn.Parameter] = []
        segments, excluded_ranges = [], []
        offset = 0
        for g in groups:
            start, excluded_start = offset, None
            for p in sorted(g["params"], key=lambda p: id(p) in excluded):
                if id(p) in excluded and excluded_start is None:
                    excluded_start = offset
                self._offsets.append(offset)
                self._ordered.append(p)
                offset += _round_up(p.numel(), self.align)
            if excluded_start is not None:
                excluded_ranges.append((excluded_start, offset))
            offset = start + _round_up(offset - start, self.align)
            segments.append((start, offset))
        blocks = -(-offset // self.align)
        self.shard_size = -(-blocks // self.world) * self.align
        self.lo = self.rank * self.shard_size
        if allocate is not None and device.type != "cpu":
            raise ValueError(f"ZeRO: an allocator is for host buffers, but the parameters are on {device}")
        zeros = allocate or (lambda n, dt: torch.zeros(n, dtype=dt, device=device))
        self.flat = zeros(self.world * self.shard_size, dtype)
        with torch.no_grad():
            for p, o in zip(self._ordered, self._offsets):
                self.flat[o:o + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[o:o + p.numel()].view_as(p)
        self.shard_grad = zeros(self.shard_size, dtype)
        if self.stage == 1:
            # On one rank the shard is the whole flat space, so the accumulated gradient already is the reduced one:
            # one buffer serves as both (a model-sized buffer less; a bucket's copy into the shard copies onto itself).
            self.flat_grad = self.shard_grad if self.world == 1 else zeros(self.flat.numel(), dtype)
            self._attach_grad_views()
        hi = self.lo + self.shard_size
        self._excluded_local = [(max(a, self.lo) - self.lo, min(b, hi) - self.lo) for a, b in excluded_ranges
                                if min(b, hi) > max(a, self.lo)]
        pieces = []
        self._piece_at: dict[int, int] = {}  # id of a piece -> its position in this flat space
        keys = group_keys if group_keys is not None else [start for start, _ in segments]
        for g, (start, end), key in zip(groups, segments, keys):
            a = min(max(start, self.lo), hi)
            b = max(min(end, hi), a)
            piece = self.flat[a:b]
            piece.grad = self.shard_grad[a - self.lo:b - self.lo]
            pieces.append({**g, "params": [piece], "index_offset": key + a - start})
            self._piece_at[id(piece)] = a
        self.optimizer = make_optimizer(pieces)

    def _shard_buckets(self, bucket_bytes: int, rank_of: dict[int, int]) -> list["_ShardBucket"]:
        """The flat space cut into buckets inside one rank's slice each, in launch order.

        A bucket ends at the first parameter end at least ``bucket_bytes`` in (at a slice border at the
        latest); a parameter over twice that size is cut, so buckets stay under ~2x ``bucket_bytes``.
        Launch order: by the last-finished parameter of each bucket (``rank_of``), then by position.
        """
        elems = max(1, bucket_bytes // self.flat.element_size())
        ends = sorted(o + p.numel() for p, o in zip(self._ordered, self._offsets))
        buckets = []
        for owner in range(self.world):
            start, stop = owner * self.shard_size, (owner + 1) * self.shard_size
            while start < stop:
                j = bisect.bisect_left(ends, start + elems)
                end = ends[j] if j < len(ends) else stop
                if end - start > 2 * elems:
                    end = start + elems
                end = min(end, stop)
                buckets.append(_ShardBucket(self, start, end, owner, self._members(start, end)))
                start = end
        buckets.sort(key=lambda b: (max((rank_of[id(p)] for p in b.params), default=-1), b.start))
        last_use = {id(p): b for b in buckets for p in b.params}  # stage 2 frees a gradient after its last bucket
        for b in buckets:
            b.release = [p for p in b.params if last_use[id(p)] is b]
        return buckets

    def _members(self, start: int, end: int) -> list[nn.Parameter]:
        """The parameters with elements in flat range ``[start, end)``."""
        i = max(bisect.bisect_right(self._offsets, start) - 1, 0)
        out = []
        while i < len(self._ordered) and self._offsets[i] < end:
            if self._offsets[i] + self._ordered[i].numel() > start:
                out.append(self._ordered[i])
            i += 1
        return out

    def _attach_grad_views(self) -> None:
        for p, o in zip(self._ordered, self._offsets):
            p.grad = self.flat_grad[o:o + p.numel()].view_as(p)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def shards_state(self) -> bool:
        """Whether each parameter element's optimizer state lives on exactly one HDP rank (stages 1-3)."""
        return self.stage > 0

    @property
    def shards_params(self) -> bool:
        """Whether the inner optimizer's tensors are the only copy of the parameter values (stage 3)."""
        return False

    def flat_shards(self) -> list[FlatShard]:
        """The inner optimizer's tensors in ``state_dict`` order, each with the parameter elements it holds."""
        if self.stage == 0:
            return [FlatShard(p, g, [(p, 0, p.numel(), 0)])
                    for g, group in enumerate(self.optimizer.param_groups) for p in group["params"]]
        shards = []
        for g, group in enumerate(self.optimizer.param_groups):
            piece, = group["params"]
            if id(piece) not in self._piece_at:  # another flat space's piece (``PlacedZero``)
                continue
            a = self._piece_at[id(piece)]
            b = a + piece.numel()
            shards.append(FlatShard(piece, g, [(p, max(o, a) - o, min(o + p.numel(), b) - o, max(o, a) - a)
                                               for p, o in zip(self._ordered, self._offsets)
                                               if min(o + p.numel(), b) > max(o, a)]))
        return shards

    # Callbacks of a transform that keeps parameters elsewhere between uses (``offload/params.py``): run
    # before the reduction (gradients to where the reduction reads them) and after the update.
    _before_reduce: tuple[Callable[[], None], ...] = ()
    _after_step: tuple[Callable[[], None], ...] = ()
    _before_last_backward: tuple[Callable[[], None], ...] = ()
    # stage 1: a transform that writes every gradient slot before it is read (its first landing a copy, not an
    # addition into zeros) and zeroes what it did not write; ``zero_grad`` then tells it instead of filling
    # billions of host elements with zeros each step
    _zeroes_grads: Callable[[], None] | None = None
    # this rank's local squared norm, summed before ``squared_norm`` asks for it (``provide_squared_norm``)
    _ready_sq: Callable[[], Tensor] | None = None

    def register_step_hooks(self, before_reduce: Callable[[], None] | None = None,
                            after_step: Callable[[], None] | None = None,
                            before_last_backward: Callable[[], None] | None = None,
                            zeroes_grads: Callable[[], None] | None = None) -> Callable[[], None]:
        """Call (each one given) ``before_reduce`` at the start of ``reduce_gradients``, ``after_step`` at the end
        of ``step``, ``before_last_backward`` in ``overlap_next_backward`` and, at stage 1, ``zeroes_grads`` in
        ``zero_grad`` instead of zeroing the gradient buffer (the caller then owns its zeros); returns the function
        that removes them again."""
        if self.reduction is not None and self.reduction.overlap:
            raise ValueError("a transform that moves gradients before the reduction cannot run with buckets reduced "
                             "during backward: set parallel.overlap_grad_reduce=false")
        if before_reduce is not None:
            self._before_reduce = (*self._before_reduce, before_reduce)
        if after_step is not None:
            self._after_step = (*self._after_step, after_step)
        if before_last_backward is not None:
            self._before_last_backward = (*self._before_last_backward, before_last_backward)
        if zeroes_grads is not None:
            if self.stage != 1 or self._zeroes_grads is not None:
                raise ValueError("only one transform can own a ZeRO-1 gradient buffer's zeros")
            self._zeroes_grads = zeroes_grads

        def remove() -> None:
            if zeroes_grads is not None and self._zeroes_grads is zeroes_grads:
                del self._zeroes_grads  # the class default again: zero_grad fills the buffer
            self._before_reduce = tuple(h for h in self._before_reduce if h is not before_reduce)
            self._after_step = tuple(h for h in self._after_step if h is not after_step)
            self._before_last_backward = tuple(h for h in self._before_last_backward if h is not before_last_backward)
        return remove

    def provide_squared_norm(self, ready: Callable[[], Tensor]) -> None:
        """``ready()`` gives ``sum_of_squares(self.shard_grad)`` of this step's final gradients, started early (a
        transform that knows when they are final: ``offload/params.py`` sums the host's while the device runs the
        rest of backward); ``squared_norm`` takes it instead of summing. Cleared by ``zero_grad``."""
        self._ready_sq = ready

    def overlap_next_backward(self) -> None:
        """The next backward is this rank's last of the step: reduce each bucket as soon as its gradients are
        final (with ``overlap``; otherwise nothing changes). ``reduce_gradients`` still completes the step."""
        for hook in self._before_last_backward:
            hook()
        if self.reduction is not None:
            self.reduction.arm()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum the step's gradients over HDP: all of them (stage 0) or into this rank's shard (1, 2). Launches
        the buckets not yet launched during backward and waits for all of them."""
        for hook in self._before_reduce:
            hook()
        if self.reduction is not None:
            self.reduction.finish()

    def _copy_grads(self, start: int, out: Tensor) -> None:
        """Copy the gradients that lie in flat range ``[start, start + len(out))`` into ``out`` (zeros elsewhere)."""
        end = start + out.numel()
        i = max(bisect.bisect_right(self._offsets, start) - 1, 0)
        while i < len(self._ordered) and self._offsets[i] < end:
            p, o = self._ordered[i], self._offsets[i]
            a, b = max(start, o), min(end, o + p.numel())
            if b > a and p.grad is not None:
                out[a - start:b - start].copy_(p.grad.reshape(-1)[a - o:b - o])
            i += 1

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the reduced gradients so their global L2 norm (over HDP shards and TP ranks) is at most
        ``max_norm`` (``inf``: no scaling); returns the norm before scaling, as ``torch.nn.utils.clip_grad_norm_``.
        A host shard stepped by ``FP8AdamW`` is scaled inside its next ``step`` instead (same bits)."""
        norm = self.squared_norm().clamp(min=0).sqrt().float()
        if not math.isinf(max_norm):
            self.scale_grads(clip_coefficient(norm, max_norm))
        return norm

    @torch.no_grad()
    def squared_norm(self) -> Tensor:
        """The squared L2 norm (fp64) of the reduced gradients, summed over HDP shards and TP ranks."""
        if self.stage == 0:
            grads = [p.grad for p in self._counted if p.grad is not None]
            sq = squares_of(grads, self._device())
        else:
            ready, self._ready_sq = self._ready_sq, None
            sq = ready() if ready is not None else sum_of_squares(self.shard_grad)
            for a, b in self._excluded_local:
                sq = sq - sum_of_squares(self.shard_grad[a:b])
            if self.world > 1 or self.tp_group is not None:  # a host shard's sum goes where the collectives run
                sq = sq.to(self._device())
            if self.world > 1:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        if self.tp_group is not None:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.tp_group)
        return sq

    @torch.no_grad()
    def scale_grads(self, coef: Tensor) -> None:
        """Multiply the reduced gradients by ``coef`` (``clip_coefficient``), now or inside the next ``step``."""
        if self.stage == 0:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)
        elif self.shard_grad.device.type != "cpu":
            self.shard_grad.mul_(coef.to(self.shard_grad.device, self.shard_grad.dtype))
        else:  # a host buffer (parameter offload: billions of elements): no pass of its own
            # a factor of exactly 1 (a norm under the limit) changes no bit, and otherwise the optimizer scales
            # each piece as its update reads it, where it can (``FP8AdamW.scale_grads_in_step``)
            factor = None if coef.item() == 1.0 else coef.to(self.shard_grad.device, self.shard_grad.dtype)
            if hasattr(self.optimizer, "scale_grads_in_step"):
                self.optimizer.scale_grads_in_step(factor)
            elif factor is not None:
                self.shard_grad.mul_(factor)

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's parameters (all of them at stage 0), then gather everyone's updated shards."""
        self.optimizer.step()
        self.finish_step()

    @torch.no_grad()
    def finish_step(self) -> None:
        """After the inner optimizer's step: everyone's updated shards gathered, the step hooks run."""
        if self.stage and self.world > 1:
            shard = self.flat[self.lo:self.lo + self.shard_size].clone()
            dist.all_gather_into_tensor(self.flat, shard, group=self.group)
        for hook in self._after_step:
            hook()

    def zero_grad(self) -> None:
        self._ready_sq = None
        if hasattr(self.optimizer, "scale_grads_in_step"):  # a step skipped (non-finite) leaves no factor behind
            self.optimizer.scale_grads_in_step(None)
        if self.stage == 0:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.stage == 1:
            if self._zeroes_grads is not None:
                self._zeroes_grads()
            else:
                self.flat_grad.zero_()
            self._attach_grad_views()
        else:
            for p in self.params:
                p.grad = None

    def _layout(self) -> dict[str, int]:
        return {"world": self.world, "rank": self.rank, "numel": self.flat.numel(), "align": self.align}

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state (this rank's shard at stage 1/2, with the layout it belongs to)."""
        if self.stage == 0:
            return self.optimizer.state_dict()
        return {"zero": self._layout(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("zero")
        if self.stage == 0 and saved is not None or self.stage and saved is None:
            raise ValueError(f"the checkpoint's optimizer was saved {'with' if saved else 'without'} ZeRO sharding "
                             f"but this run uses parallel.zero_stage={self.stage}; resume with the zero_stage it was "
                             "saved with, or resume through the run directory (train() loads it with "
                             "seqmesh.trainer.reshard.load_resharded, at any layout)")
        if saved is None:
            self.optimizer.load_state_dict(state)
            return
        if saved != self._layout():
            raise ValueError(f"the checkpoint's optimizer shard has layout {saved}, this rank's is {self._layout()}; "
                             "resume with the same HDP size, TP degree and model, or resume through the run directory "
                             "(train() loads it with seqmesh.trainer.reshard.load_resharded, at any layout)")
        self.optimizer.load_state_dict(state["optimizer"])


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """The factor that brings gradients of L2 ``norm`` to at most ``max_norm`` (1 when they are under it)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class _ShardBucket:
    """Flat range ``[start, end)`` of ``owner``'s slice, summed into ``owner``'s ``shard_grad`` (stages 1, 2)."""

    zero: ZeroOptimizer
    start: int
    end: int
    owner: int
    params: list[nn.Parameter]
    release: list[nn.Parameter] = field(default_factory=list)  # stage 2: gradients read for the last time here
    _buf: Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def launch(self) -> "dist.Work | None":
        z = self.zero
        if z.stage == 1:  # the gradients are views of flat_grad: reduce in place
            buf = z.flat_grad[self.start:self.end]
        else:
            if self.owner == z.rank:
                buf = z.shard_grad[self.start - z.lo:self.end - z.lo]
                buf.zero_()
            else:
                buf = z.shard_grad.new_zeros(self.end - self.start)
            z._copy_grads(self.start, buf)
            for p in self.release:
                p.grad = None
        self._buf = buf
        if z.world == 1:
            return None
        return dist.reduce(buf, op=dist.ReduceOp.SUM, group=z._grad_group, group_dst=self.owner, async_op=True)

    @torch.no_grad()
    def complete(self) -> None:
        z = self.zero
        if z.stage == 1 and self.owner == z.rank:
            z.shard_grad[self.start - z.lo:self.end - z.lo].copy_(self._buf)
        self._buf = None
