"""Gradient reduction over the HDP group in buckets, launched in one fixed order, optionally during backward.

Why not DDP's or DeepSpeed's hooks as they are: ranks run different numbers of micro-batches (a
rank in a large SP group runs fewer), so a reduction per backward would pair one rank's second
micro-batch with another's fifth. seqmesh reduces once per step, and ``BucketedReduction`` decides
*when* within the step:

* without overlap, every bucket is launched after the rank's last backward (``finish``);
* with overlap (``parallel.overlap_grad_reduce``), the runner calls ``arm`` just before the rank's
  last micro-batch; from then on a post-accumulate-grad hook marks each parameter whose gradient is
  final, and a bucket whose parameters are all final is launched at once (``async_op=True``), so
  the reduction runs while backward computes the layers below. ``finish`` launches what is left
  (a rank idle all step launches everything there) and waits for all of it before the optimizer.

Ordering (why this cannot deadlock or pair the wrong buffers). The buckets and their launch order
are a pure function of the model's structure and the layout (parameter registration order, bucket
size, HDP size), identical on every HDP rank of a plane. A bucket is launched only after every
bucket before it in that order (a bucket that is ready early waits for its predecessors, as in
DDP's reducer), so every rank issues exactly the same sequence of collectives on the reduction
group, whichever micro-batch it is in and whenever its hooks fire; the group carries nothing else
(``Mesh.grad_group``), so no other collective can interleave with the buckets in flight. The
launches never block: SP collectives of later layers (on their own groups) keep running in the
same backward, and a rank only waits for the buckets in ``finish``, after all its own backward
work -- which depends on SP peers only, whose progress never waits on a bucket. Every rank
eventually reaches ``finish`` and issues the remaining buckets in the same order, so every
launched collective completes.

Bitwise identity. Overlapped and non-overlapped paths run the same collectives on the same buffers
(same buckets, same flattening, same order), so they give the same bits by construction, at any
number of ranks (the tests check it at 4, where a sum's order would matter).

On CUDA the collectives run on the process group's own stream (c10d's NCCL stream waits for the
gradients on the compute stream with an event at launch, and ``Work.wait`` makes the compute stream
wait for the result), so the flattening copy stays on the compute stream and needs no
``record_stream``: the DDP design. The loss is already divided by the global token count, so
gradients are *summed* (never averaged) to give exactly the single-process gradient.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# DDP's default bucket (25 MiB): large enough that each collective runs near link bandwidth, small
# enough that the first bucket is ready early in backward and the last one leaves little to wait for.
BUCKET_BYTES = 25 * 1024 * 1024


class Bucket(Protocol):
    """One collective of the step's reduction."""

    params: Sequence[nn.Parameter]  # the parameters whose final gradients the bucket reads

    def launch(self) -> "dist.Work | None":
        """Read the gradients and start the collective (None: nothing to wait for)."""
        ...

    def complete(self) -> None:
        """After the collective finished: put its result where the optimizer reads it."""
        ...


@dataclass
class AllReduceBucket:
    """Replicated gradients (ZeRO-0): flatten, all-reduce (SUM), copy back; a missing gradient counts as zeros."""

    params: Sequence[nn.Parameter]
    group: "dist.ProcessGroup | None"
    _flat: torch.Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def launch(self) -> "dist.Work | None":
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._flat = _flatten_dense_tensors([p.grad for p in self.params])
        return dist.all_reduce(self._flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    @torch.no_grad()
    def complete(self) -> None:
        grads = [p.grad for p in self.params]
        for g, reduced in zip(grads, _unflatten_dense_tensors(self._flat, grads)):
            g.copy_(reduced)
        self._flat = None


def all_reduce_buckets(params: Sequence[nn.Parameter], group: "dist.ProcessGroup | None",
                       bucket_bytes: int = BUCKET_BYTES) -> list[AllReduceBucket]:
    """Consecutive runs of ``params`` (in the order given: the order backward finishes them) of at least
    ``bucket_bytes`` each (the last may be smaller)."""
    buckets, run, size = [], [], 0
    for p in params:
        run.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(AllReduceBucket(run, group))
            run, size = [], 0
    if run:
        buckets.append(AllReduceBucket(run, group))
    return buckets


class BucketedReduction:
    """The step's bucket collectives, launched in list order, during the last backward when ``overlap``.

    Args:
        buckets: in launch order (the same on every rank; see the module docstring).
        overlap: hook every parameter not in ``deferred`` so that ``arm`` can launch buckets during backward.
        deferred: parameters whose gradient is still changed after backward (e.g. TP-replicated ones, summed
            over TP by the runner before the HDP reduction): never marked final by a hook, so their buckets
            (and those after them) wait for ``finish``.
    """

    def __init__(self, buckets: Sequence[Bucket], *, overlap: bool,
                 deferred: Collection[nn.Parameter] = ()) -> None:
        self.buckets, self.overlap = list(buckets), overlap
        self._buckets_of: dict[int, list[int]] = {}
        for i, bucket in enumerate(self.buckets):
            for p in bucket.params:
                self._buckets_of.setdefault(id(p), []).append(i)
        self._armed = False
        self._pending: list[int] = []
        self._final: set[int] = set()
        self._works: list[tuple[int, "dist.Work | None"]] = []
        self.overlapped = 0  # how many of the last step's buckets were launched during backward
        if overlap:
            skip = {id(p) for p in deferred}
            hooked = {id(p): p for b in self.buckets for p in b.params if id(p) not in skip}
            for p in hooked.values():
                p.register_post_accumulate_grad_hook(self._on_final)

    def arm(self) -> None:
        """The next backward is this rank's last of the step: launch each bucket once its gradients are final."""
        if not self.overlap:
            return
        self._armed = True
        self._pending = [len({id(p) for p in b.params}) for b in self.buckets]
        self._final.clear()
        self._pump()

    def _on_final(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        if id(p) in self._final:
            raise RuntimeError("a parameter's gradient was accumulated twice in the step's last backward, after its "
                               "bucket may have been reduced; run one backward per micro-batch")
        self._final.add(id(p))
        for i in self._buckets_of[id(p)]:
            self._pending[i] -= 1
        self._pump()

    def _pump(self) -> None:
        while len(self._works) < len(self.buckets) and self._pending[len(self._works)] == 0:
            self._launch_next()

    def _launch_next(self) -> None:
        i = len(self._works)
        self._works.append((i, self.buckets[i].launch()))

    def finish(self) -> None:
        """Launch the buckets not launched yet (in order), wait for all, and complete them."""
        self.overlapped = len(self._works)
        while len(self._works) < len(self.buckets):
            self._launch_next()
        for i, work in self._works:
            if work is not None:
                work.wait()
            self.buckets[i].complete()
        self._works.clear()
        self._armed = False


def reduce_gradients(params: Sequence[nn.Parameter], group: "dist.ProcessGroup | None" = None,
                     bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum ``.grad`` of ``params`` over ``group`` now (no overlap); a parameter without a gradient contributes
    zeros. Buckets follow ``params`` reversed (the order backward finishes them), as ZeRO-0's do."""
    params = [p for p in params if p.requires_grad]
    if dist.get_world_size(group) == 1:
        return
    BucketedReduction(all_reduce_buckets(params[::-1], group, bucket_bytes), overlap=False).finish()
