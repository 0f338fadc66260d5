"""Validation loss: the held-out documents (``data.val_fraction``) through the same plan machinery as training.

Every ``eval_every`` steps and at the last step, the validation documents are planned in chunks of
``data.global_batch`` by the run's scheduler (so a document too long for one rank gets an SP group,
exactly as in training), each rank runs forward only (no grad) over its groups, and the token loss
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
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.offload import offload_session
from seqmesh.parallel.sequence import make_sp_batch, shard_tokens
from seqmesh.parallel.tensor import tensor_parallel, vocab_parallel_cross_entropy
from seqmesh.scheduler import CostModel, plan_step
from seqmesh.scheduler.plan import Plan
from seqmesh.trainer.data import IGNORE_INDEX, DocumentDataset, num_targets, pack
from seqmesh.trainer.tiled import lm_loss_sum

if TYPE_CHECKING:
    from seqmesh.trainer.config import RunConfig
    from seqmesh.trainer.metrics import MetricsLogger

log = logging.getLogger(__name__)


def validation_plans(val_set: DocumentDataset, cfg: "RunConfig", mesh: Mesh, cost_model: CostModel) -> list[Plan]:
    """Plans of the validation documents in chunks of ``data.global_batch`` (ids relative to the chunk)."""
    chunk = cfg.data.global_batch
    lengths = val_set.lengths.tolist()
    return [plan_step(lengths[i:i + chunk], mesh.hdp, cost_model, policy=cfg.scheduler.policy, sp=cfg.scheduler.sp,
                      group_sizes=cfg.scheduler.group_sizes, time_limit_s=cfg.scheduler.time_limit_s)
            for i in range(0, len(lengths), chunk)]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val_set: DocumentDataset, plans: list[Plan], cfg: "RunConfig",
                    mesh: Mesh, device: torch.device) -> float:
    """Mean token loss over every target of ``val_set``, run as ``plans`` lay it out (every rank calls it)."""
    chunk = cfg.data.global_batch
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tp = tensor_parallel(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.model.dtype == "bf16" else nullcontext()
    for k, plan in enumerate(plans):
        mesh.ensure_sp_groups((g.first, g.count) for mb in plan.microbatches for g in mb.groups)
        for _, group in plan.work_of(mesh.hdp_rank):
            packed = pack([val_set[k * chunk + s] for s in group.sequences])
            sp = mesh.sp_group(group.first, group.count)
            meta = make_sp_batch(packed.seqlens, "local" if sp is None else cfg.parallel.sp_mode, sp,
                                 ulysses_degree=cfg.parallel.ulysses_degree, backend=cfg.parallel.attn_backend,
                                 device=device)
            ids = shard_tokens(meta, packed.input_ids.to(device), 0)
            labels = shard_tokens(meta, packed.labels.to(device), IGNORE_INDEX)
            with offload_session(model, meta), autocast:
                hidden = model(ids, meta)
                if tp is None:
                    part = lm_loss_sum(model, hidden, labels, cfg.model.loss_tile_tokens)
                else:
                    part = vocab_parallel_cross_entropy(model.logits(hidden), labels, tp, IGNORE_INDEX)
            loss_sum += part.double()
    dist.all_reduce(loss_sum, group=mesh.hdp_group)
    model.train(was_training)
    return float(loss_sum) / num_targets(val_set.lengths.tolist())


class Evaluator:
    """``maybe_run(step)``: the validation loss every ``cfg.eval_every`` steps and at the run's last step,
    handed to ``metrics`` for that step's record (``val_loss``) and the summary."""

    def __init__(self, cfg: "RunConfig", model: torch.nn.Module, val_set: DocumentDataset, mesh: Mesh,
                 cost_model: CostModel, device: torch.device, metrics: "MetricsLogger") -> None:
        self.cfg, self.model, self.val_set, self.mesh, self.device, self.metrics = cfg, model, val_set, mesh, device, metrics
        self.cost_model = cost_model
        self.plans: list[Plan] | None = None
        reason = ("eval_every=0" if not cfg.eval_every else "the validation split is empty" if len(val_set) == 0
                  else "parallel.pp > 1" if mesh.pp > 1 else "parallel.zero_stage=3" if cfg.parallel.zero_stage == 3
                  else None)
        self.enabled = reason is None
        if not self.enabled and cfg.eval_every and dist.get_rank() == 0:
            log.warning("no validation loss in this run: %s", reason)

    def due(self, step: int) -> bool:
        last = self.cfg.stop_at or self.cfg.steps
        return self.enabled and (step % self.cfg.eval_every == 0 or step == last)

    def maybe_run(self, step: int) -> float | None:
        if not self.due(step):
            return None
        if self.plans is None:
            made: list[Any] = [validation_plans(self.val_set, self.cfg, self.mesh, self.cost_model)
                               if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(made, src=0)
            self.plans = made[0]
        value = validation_loss(self.model, self.val_set, self.plans, self.cfg, self.mesh, self.device)
        self.metrics.note(val_loss=value)
        return value
