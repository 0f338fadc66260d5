"""ZeRO over the HDP plane: one gradient reduction per step, optimizer states (1) and gradients (2) sharded.

Stages (``ZeroOptimizer(stage=...)``):

* 0 -- replicated: gradients all-reduced (``grad_reduce.reduce_gradients``), every rank steps every
  parameter with the full optimizer state.
* 1 -- the parameters live in one flat buffer (the model's parameters become views of it) and so do
  their gradients; after the step's last backward one ``reduce_scatter_tensor`` (SUM) leaves each
  HDP rank the reduced gradient of its ``1/HDP`` slice, the rank steps only that slice with an
  optimizer built over it (its states are ``1/HDP`` of the full ones), and one
  ``all_gather_into_tensor`` brings every rank the updated parameters. Gradient memory stays full.
* 2 -- as 1, but backward writes ordinary per-parameter gradients and the reduction walks the
  flat space in buckets, freeing each parameter's gradient as soon as all of it has been reduced:
  after the reduction only the ``1/HDP`` gradient shard exists (also during the optimizer step and
  between steps).

Why seqmesh's own sharding and not DeepSpeed's ZeRO engine: DeepSpeed owns the backward and the
step (``engine.backward`` / ``engine.step``) and reduces gradients in hooks during backward, which
assumes every data-parallel rank runs the same number of micro-batches. seqmesh's plan gives ranks
different numbers (a rank in a large SP group runs fewer) and reduces exactly once per step after
each rank's last backward, so DeepSpeed's hooks would mismatch (a hang). The sharding itself is two
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
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seqmesh.parallel.grad_reduce import BUCKET_BYTES, reduce_gradients
from seqmesh.parallel.shard_spec import FlatShard

STAGES = (0, 1, 2)
MakeOptimizer = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


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
    """

    def __init__(self, param_groups: list[dict[str, Any]], make_optimizer: MakeOptimizer, *, stage: int,
                 group: dist.ProcessGroup | None = None, tp_group: dist.ProcessGroup | None = None,
                 norm_excluded: Collection[nn.Parameter] = (), align: int = 128,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
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
        if stage == 0:
            self._counted = [p for p in self.params if id(p) not in excluded]
            self.optimizer = make_optimizer(groups)
            return
        self._build_flat(groups, excluded, make_optimizer, bucket_bytes)

    def _build_flat(self, groups: list[dict[str, Any]], excluded: set[int], make_optimizer: MakeOptimizer,
                    bucket_bytes: int) -> None:
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) != 1:
            raise ValueError(f"ZeRO flattens all parameters into one buffer; they must share one dtype and device, "
                             f"got {sorted(map(str, kinds))}")
        (dtype, device), = kinds
        # Each group is a segment of the flat space: parameters counted in the norm first, then the
        # excluded ones (one contiguous range to leave out), padded to a whole number of ``align``.
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
                offset += p.numel()
            if excluded_start is not None:
                excluded_ranges.append((excluded_start, offset))
            offset = start + _round_up(offset - start, self.align)
            segments.append((start, offset))
        blocks = -(-offset // self.align)
        self.shard_size = -(-blocks // self.world) * self.align
        self.lo = self.rank * self.shard_size
        self.flat = torch.zeros(self.world * self.shard_size, dtype=dtype, device=device)
        with torch.no_grad():
            for p, o in zip(self._ordered, self._offsets):
                self.flat[o:o + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[o:o + p.numel()].view_as(p)
        self.shard_grad = torch.zeros(self.shard_size, dtype=dtype, device=device)
        if self.stage == 1:
            self.flat_grad = torch.zeros_like(self.flat)
            self._attach_grad_views()
        hi = self.lo + self.shard_size
        self._excluded_local = [(max(a, self.lo) - self.lo, min(b, hi) - self.lo) for a, b in excluded_ranges
                                if min(b, hi) > max(a, self.lo)]
        pieces = []
        for g, (start, end) in zip(groups, segments):
            a = min(max(start, self.lo), hi)
            b = max(min(end, hi), a)
            piece = self.flat[a:b]
            piece.grad = self.shard_grad[a - self.lo:b - self.lo]
            pieces.append({**g, "params": [piece], "index_offset": a})
        self.optimizer = make_optimizer(pieces)
        # stage 2: bucket ``i`` reduces elements [i*chunk, (i+1)*chunk) of every rank's shard at once
        self._chunk = max(self.align, _round_up(bucket_bytes // (self.world * self.flat.element_size()), self.align))
        self._done_after: dict[int, list[nn.Parameter]] = {}
        last_bucket = (self.shard_size - 1) // self._chunk
        for p, o in zip(self._ordered, self._offsets):
            last = o + p.numel() - 1
            # a parameter that crosses into the next rank's slice still has elements in this slice's last bucket
            same_slice = o // self.shard_size == last // self.shard_size
            bucket = (last % self.shard_size) // self._chunk if same_slice else last_bucket
            self._done_after.setdefault(bucket, []).append(p)

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
            a, b = group["index_offset"], group["index_offset"] + piece.numel()
            shards.append(FlatShard(piece, g, [(p, max(o, a) - o, min(o + p.numel(), b) - o, max(o, a) - a)
                                               for p, o in zip(self._ordered, self._offsets)
                                               if min(o + p.numel(), b) > max(o, a)]))
        return shards

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum the step's gradients over HDP: all of them (stage 0) or into this rank's shard (1, 2)."""
        if self.stage == 0:
            if self.world > 1:
                reduce_gradients(self.params, self.group)
        elif self.stage == 1:
            self._reduce_scatter(self.shard_grad, self.flat_grad)
        else:
            self._reduce_scatter_buckets()

    def _reduce_scatter(self, out: Tensor, full: Tensor) -> None:
        if self.world == 1:
            out.copy_(full)
        else:
            dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, group=self.group)

    def _reduce_scatter_buckets(self) -> None:
        size, chunk = self.shard_size, self._chunk
        for index, a in enumerate(range(0, size, chunk)):
            n = min(chunk, size - a)
            bucket = self.shard_grad.new_zeros(self.world * n)
            for r in range(self.world):
                self._copy_grads(r * size + a, bucket[r * n:(r + 1) * n])
            self._reduce_scatter(self.shard_grad[a:a + n], bucket)
            for p in self._done_after.get(index, ()):
                p.grad = None

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
        ``max_norm`` (``inf``: no scaling); returns the norm before scaling, as ``torch.nn.utils.clip_grad_norm_``."""
        if self.stage == 0:
            grads = [p.grad for p in self._counted if p.grad is not None]
            sq = sum((g.float().square().sum() for g in grads), torch.zeros((), device=self._device()))
        else:
            sq = self.shard_grad.float().square().sum()
            for a, b in self._excluded_local:
                sq = sq - self.shard_grad[a:b].float().square().sum()
            if self.world > 1:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        if self.tp_group is not None:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.tp_group)
        norm = sq.clamp(min=0).sqrt()
        if not math.isinf(max_norm):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if self.stage == 0:
                torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)
            else:
                self.shard_grad.mul_(coef.to(self.shard_grad.dtype))
        return norm

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's parameters (all of them at stage 0), then gather everyone's updated shards."""
        self.optimizer.step()
        if self.stage and self.world > 1:
            shard = self.flat[self.lo:self.lo + self.shard_size].clone()
            dist.all_gather_into_tensor(self.flat, shard, group=self.group)

    def zero_grad(self) -> None:
        if self.stage == 0:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.stage == 1:
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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
