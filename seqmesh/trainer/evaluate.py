"""Validation loss: the held-out documents (``data.val_fraction``) through the same plan machinery as training.

Every ``eval_every`` steps and at the last step, the validation documents are planned in chunks of
``data.global_batch`` by the run's scheduler (so a document too long for one rank gets an SP group,
exactly as in training), each rank runs forward only (no grad) over its groups -- the training step's
runner in its forward-only mode (``LocalRunner.evaluate``), with the training step's layout and loss
(``trainer/microbatch.py``) -- and the token loss
sums are all-reduced over the HDP group and divided by the validation set's target count: the mean
next-token cross-entropy over every validation target, whatever the split over ranks (tested
against one process in tests/test_evaluate.py).

Plans are made on rank 0 and broadcast (a time-limited MILP need not answer the same on every
rank); they depend only on the validation lengths, so they are made once per run. Not evaluated
(``val_loss`` absent, a note in the log): an empty validation split, pipeline parallelism and ZeRO-3
(their forward passes are collectives over a whole micro-batch schedule the training step owns).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.step_runner import LocalRunner
from seqmesh.scheduler import CostModel, plan_step
from seqmesh.scheduler.plan import Plan
from seqmesh.trainer.config import ParallelConfig, SchedulerConfig
from seqmesh.trainer.data import DocumentDataset, num_targets
from seqmesh.trainer.microbatch import batch_layout

if TYPE_CHECKING:
    from seqmesh.trainer.config import RunConfig
    from seqmesh.trainer.metrics import MetricsLogger

log = logging.getLogger(__name__)


def validation_plans(val_set: DocumentDataset, global_batch: int, scheduler: SchedulerConfig, mesh: Mesh,
                     cost_model: CostModel) -> list[Plan]:
    """Plans of the validation documents in chunks of ``data.global_batch`` (ids relative to the chunk)."""
    lengths = val_set.lengths.tolist()
    return [plan_step(lengths[i:i + global_batch], mesh.hdp, cost_model, policy=scheduler.policy, sp=scheduler.sp,
                      group_sizes=scheduler.group_sizes, time_limit_s=scheduler.time_limit_s)
            for i in range(0, len(lengths), global_batch)]


def validation_loss(runner: LocalRunner, val_set: DocumentDataset, plans: list[Plan], global_batch: int,
                    parallel: ParallelConfig) -> float:
    """Mean token loss over every target of ``val_set``, run as ``plans`` lay it out (every rank calls it):
    the training step's runner in its forward-only mode (``LocalRunner.evaluate``), with the training step's
    layout and loss."""
    mesh, device = runner.mesh, runner.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for k, plan in enumerate(plans):
        first = k * global_batch
        layout = batch_layout(lambda g, first=first: [val_set[first + s] for s in g.sequences], parallel, device)
        loss_sum += runner.evaluate(plan, layout)
    dist.all_reduce(loss_sum, group=mesh.hdp_group)
    return float(loss_sum) / num_targets(val_set.lengths.tolist())


class Evaluator:
    """``maybe_run(step)``: the validation loss every ``cfg.eval_every`` steps and at the run's last step,
    handed to ``metrics`` for that step's record (``val_loss``) and the summary."""

    def __init__(self, cfg: "RunConfig", runner: Any, val_set: DocumentDataset, mesh: Mesh,
                 cost_model: CostModel, metrics: "MetricsLogger") -> None:
        self.cfg, self.runner, self.val_set, self.mesh, self.metrics = cfg, runner, val_set, mesh, metrics
        self.cost_model = cost_model
        self.plans: list[Plan] | None = None
        reason = ("eval_every=0" if not cfg.eval_every else "the validation split is empty" if len(val_set) == 0
                  else "parallel.pp > 1" if mesh.pp > 1 else "parallel.zero_stage=3" if cfg.parallel.zero_stage == 3
                  else None)
        self.enabled = reason is None  # then ``runner`` is the training step's LocalRunner
        if not self.enabled and cfg.eval_every and dist.get_rank() == 0:
            log.warning("no validation loss in this run: %s", reason)

    def due(self, step: int) -> bool:
        last = self.cfg.stop_at or self.cfg.steps
        return self.enabled and (step % self.cfg.eval_every == 0 or step == last)

    def maybe_run(self, step: int) -> float | None:
        if not self.due(step):
            return None
        if self.plans is None:
            made: list[Any] = [validation_plans(self.val_set, self.cfg.data.global_batch, self.cfg.scheduler, self.mesh,
                                                self.cost_model)
                               if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(made, src=0)
            self.plans = made[0]
        value = validation_loss(self.runner, self.val_set, self.plans, self.cfg.data.global_batch, self.cfg.parallel)
        self.metrics.note(val_loss=value)
        return value
