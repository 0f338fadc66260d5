"""How one rank runs a step's plan: one interface, one implementation per execution mode.

A ``StepRunner`` takes the step's ``Plan`` and runs forward and backward of this rank's share of it
(``run``), then makes the step's gradients and loss global (``reduce``), and after the optimizer
step (or a checkpoint load) makes copies of shared weights equal again (``sync_weights``):

* ``LocalRunner``: this rank's groups in plan order, each laid out over its SP group; before the last
  one it tells the optimizer that the next backward is the step's last, so gradient buckets can be
  reduced during it (``parallel.overlap_grad_reduce``, ``seqmesh.parallel.grad_reduce``); its
  ``evaluate`` is the forward-only (no-grad) mode of the same walk, for the validation loss;
* ``Zero3Runner``: one item per plan micro-batch (``aligned_items``), so every HDP rank issues each
  micro-batch's per-layer gathers and reduce-scatters at the same position; a rank that sits a
  micro-batch out joins its collectives empty (``Zero3Optimizer.idle_item``);
* ``PipelineRunner``: the same aligned items through this rank's pipeline stages (1F1B,
  ``run_pipeline``), the loss on the last stage; a tied embedding's gradient is summed into its owner
  before the HDP reduction, and its updated weight sent back to the copy after the step. Its buckets
  are reduced after the pipeline (1F1B interleaves a stage's last backward with other micro-batches'
  sends, and the tied gradient is summed after it), so the trainer builds its optimizer without overlap.
  Under ZeRO-3 a placeholder item is not skipped by the stage's layer collectives: where the schedule
  would run it, the rank joins that chunk's gathers (and, in backward, per-micro-batch reduce-scatters)
  empty.

TP-replicated parameters' partial gradients are summed over TP once per step, after the last
backward: on the parameters' gradients (ZeRO 0-2, ``reduce_tensor_parallel_gradients``), or, under
ZeRO-3, whose layer gradients are reduce-scattered over HDP before (in each backward or once per
step), on the pieces of the gradient shard (``Zero3Optimizer.reduce_gradients``).

The runner knows nothing of data or configs: the trainer passes what is its own as callables --
``layout(group, process_group)`` packs a group's documents and lays them out over the group's SP
process group (``StageMicroBatch``), ``loss_fn(module, hidden, labels)`` is the token loss sum, and
``forward_context()`` wraps each forward and loss (autocast). The trainer picks the runner once.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import nn

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.offload import offload_session
from seqmesh.parallel.pipeline import PipelineModel, StageMicroBatch, run_pipeline
from seqmesh.parallel.tensor import reduce_tensor_parallel_gradients
from seqmesh.parallel.zero import ZeroOptimizer
from seqmesh.parallel.zero3 import Zero3Optimizer
from seqmesh.scheduler.plan import Group, Plan

Layout = Callable[[Group, "dist.ProcessGroup | None"], StageMicroBatch]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# ``span("group")`` times the work inside it (the trainer's span timer); the default times nothing.
Span = Callable[[str], ContextManager]


def _no_span(name: str) -> ContextManager:
    return nullcontext()


class StepRunner(Protocol):
    """Runs one rank's share of a step (see the module docstring)."""

    # True when each "group" span times one plan group (the cost model's feedback needs that); False
    # when one span covers the step's whole compute (a pipeline interleaves its groups).
    group_spans: bool

    def run(self, plan: Plan, layout: Layout, denominator: int, span: Span = _no_span) -> torch.Tensor:
        """Forward + backward of this rank's items of ``plan``, each loss divided by ``denominator`` (the step's
        global target count) before backward; returns this rank's (undivided) loss sum."""
        ...

    def reduce(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Sum the step's gradients over the ranks that share parameters; returns the global loss sum
        (on every rank)."""
        ...

    def sync_weights(self) -> None:
        """Make copies of one weight equal after an optimizer step or a checkpoint load."""
        ...


def forward_loss(model: nn.Module, mb: StageMicroBatch, loss_fn: LossFn,
                 forward_context: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
    """Forward of one laid-out (micro-batch, group) item to its token loss sum (inside an offload session)."""
    with forward_context():
        return loss_fn(model, model(mb.input_ids, mb.meta), mb.labels)


def forward_backward(model: nn.Module, mb: StageMicroBatch, loss_fn: LossFn, denominator: int,
                     forward_context: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
    """Forward + backward of one laid-out (micro-batch, group) item; returns the (undivided) loss sum."""
    with offload_session(model, mb.meta):
        loss_sum = forward_loss(model, mb, loss_fn, forward_context)
        (loss_sum / denominator).backward()
    return loss_sum.detach()


def aligned_items(plan: Plan, hdp_rank: int) -> list[Group | None]:
    """One item per plan micro-batch: the group that holds ``hdp_rank``, None where the rank sits it out.

    Item k is micro-batch k's group, never the k-th group the rank takes part in: the ranks of one
    SP group then meet its collectives at the same position, whichever other groups each ran before,
    and ranks that share per-item collectives (ZeRO-3's layer gathers, a pipeline line's messages)
    walk the same positions.
    """
    return [next((g for g in mb.groups if hdp_rank in g.ranks), None) for mb in plan.microbatches]


class LocalRunner:
    """Each of this rank's groups in plan order, forward and backward on the whole (TP-sharded) model."""

    group_spans = True

    def __init__(self, model: nn.Module, optimizer: ZeroOptimizer | None, mesh: Mesh, loss_fn: LossFn,
                 device: torch.device, forward_context: Callable[[], ContextManager] = nullcontext) -> None:
        self.model, self.optimizer, self.mesh, self.loss_fn = model, optimizer, mesh, loss_fn
        self.device, self.forward_context = device, forward_context

    def items(self, plan: Plan) -> list[Group | None]:
        """This rank's items in execution order (None: sit the item out)."""
        return [group for _, group in plan.work_of(self.mesh.hdp_rank)]

    def begin(self) -> None:
        """Before the step's first item."""

    def idle(self) -> None:
        """Sit one item out (nothing to do without per-item collectives)."""

    def run(self, plan: Plan, layout: Layout, denominator: int, span: Span = _no_span) -> torch.Tensor:
        self.mesh.ensure_sp_groups((g.first, g.count) for mb in plan.microbatches for g in mb.groups)
        self.begin()
        loss_sum = torch.zeros((), device=self.device)
        items = self.items(plan)
        last = max((i for i, group in enumerate(items) if group is not None), default=None)
        for i, group in enumerate(items):
            if group is None:
                self.idle()
                continue
            if i == last and self.optimizer is not None:
                self.optimizer.overlap_next_backward()  # its buckets reduce during this backward
            with span("group"):
                mb = layout(group, self.mesh.sp_group(group.first, group.count))
                loss_sum += forward_backward(self.model, mb, self.loss_fn, denominator, self.forward_context)
        return loss_sum

    @torch.no_grad()
    def evaluate(self, plan: Plan, layout: Layout) -> torch.Tensor:
        """Forward only (no grad, eval mode) of this rank's groups of ``plan``, laid out as ``run`` lays them
        out; returns this rank's loss sum in float64, not reduced over ranks. The model is left in the mode it
        was in. Plain (TP-sharded) models only: ZeRO-3's and a pipeline's forwards are collectives over a
        whole step's items, which only ``run`` walks."""
        self.mesh.ensure_sp_groups((g.first, g.count) for mb in plan.microbatches for g in mb.groups)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        was_training = self.model.training
        self.model.eval()
        try:
            for _, group in plan.work_of(self.mesh.hdp_rank):
                mb = layout(group, self.mesh.sp_group(group.first, group.count))
                with offload_session(self.model, mb.meta):
                    loss_sum += forward_loss(self.model, mb, self.loss_fn, self.forward_context).double()
        finally:
            self.model.train(was_training)
        return loss_sum

    def reduce(self, loss_sum: torch.Tensor) -> torch.Tensor:
        if not self.optimizer.shards_params:  # ZeRO-3 sums TP copies in its shard
            reduce_tensor_parallel_gradients(self.model)
        self.optimizer.reduce_gradients()
        dist.all_reduce(loss_sum, group=self.mesh.hdp_group)
        return loss_sum

    def sync_weights(self) -> None:
        """Nothing is held twice."""


class Zero3Runner(LocalRunner):
    """ZeRO-3: parameters are gathered layer by layer for every item, so every HDP rank walks every micro-batch."""

    optimizer: Zero3Optimizer

    def items(self, plan: Plan) -> list[Group | None]:
        return aligned_items(plan, self.mesh.hdp_rank)

    def begin(self) -> None:
        self.optimizer.begin_step()  # gathers the root unit (embeddings, final norm, head) for the step

    def idle(self) -> None:
        self.optimizer.idle_item()


class PipelineRunner:
    """This rank's pipeline stages over the plan's aligned items (1F1B); the loss comes from the last stage.

    A placeholder item (the rank's HDP index sits the micro-batch out) is skipped by every stage of
    the pipeline line -- all of them hold the same HDP index and walk the same plan, so they agree:
    no compute, no message (under ZeRO-3 only the layer collectives over HDP, ``Zero3Optimizer.idle_layers``).
    One span covers the whole pipeline (groups interleave, none runs alone).
    """

    group_spans = False

    def __init__(self, model: PipelineModel, optimizer: ZeroOptimizer | None, mesh: Mesh, loss_fn: LossFn,
                 device: torch.device, forward_context: Callable[[], ContextManager] = nullcontext) -> None:
        self.model, self.optimizer, self.mesh, self.loss_fn = model, optimizer, mesh, loss_fn
        self.device, self.forward_context = device, forward_context

    def run(self, plan: Plan, layout: Layout, denominator: int, span: Span = _no_span) -> torch.Tensor:
        mesh = self.mesh
        mesh.ensure_sp_groups((g.first, g.count) for mb in plan.microbatches for g in mb.groups)
        idle = None
        if isinstance(self.optimizer, Zero3Optimizer):
            zero, chunks = self.optimizer, self.model.chunks
            zero.begin_step()  # gathers the root unit (this rank's embedding, or final norm and head)

            def idle(op: str, chunk: int) -> None:
                zero.idle_layers(list(chunks[chunk].model.layers.values()), backward=op == "B")
        with span("group"):
            items = [None if g is None else layout(g, mesh.sp_group(g.first, g.count))
                     for g in aligned_items(plan, mesh.hdp_rank)]
            return run_pipeline(self.model.chunks, items, self.loss_fn, denominator, mesh.pp_ranks(),
                                activation_dtype=self.model.residual_dtype or next(self.model.parameters()).dtype,
                                channels=mesh.pipeline_channels, forward_context=self.forward_context, idle=idle)

    def reduce(self, loss_sum: torch.Tensor) -> torch.Tensor:
        if not self.optimizer.shards_params:  # ZeRO-3 sums TP copies in its shard
            reduce_tensor_parallel_gradients(self.model)
        self.model.reduce_tied_gradient()
        self.optimizer.reduce_gradients()
        # The last stage holds the loss, once per TP group; everyone gets it.
        if self.mesh.pp_rank != self.mesh.pp - 1 or self.mesh.tp_rank:
            loss_sum.zero_()
        dist.all_reduce(loss_sum)
        return loss_sum

    def sync_weights(self) -> None:
        """The owner's (first stage's) tied embedding to the last stage's copy; under ZeRO-3 the owner's HDP
        ranks gather it for the send (between steps they hold only their shards)."""
        if isinstance(self.optimizer, Zero3Optimizer) and self.model.tied_weight is not None \
                and self.model.chunks[0].is_first:
            with self.optimizer.root_gathered():
                self.model.sync_tied_weight()
        else:
            self.model.sync_tied_weight()
