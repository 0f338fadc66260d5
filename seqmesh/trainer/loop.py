"""The training step loop, top to bottom.

Every rank runs ``train`` (under Ray Train, or any launcher that initialised ``torch.distributed``).
One step:

1. take the global batch's document ids from the sampler (its lengths are known up front);
2. get the step's plan (planned one step ahead on rank 0, broadcast, digest-checked);
3. run this rank's share of the plan (``seqmesh.parallel.step_runner``, picked once per run by the
   mesh and config; its layout and loss are ``trainer/microbatch.py``'s): for each of its (micro-batch, group) items pack the group's documents, lay them
   out over the group (its SP attention mode), forward, loss / global target count, backward --
   plain, ZeRO-3 (every rank walks every micro-batch, an idle one only joining the layer
   collectives) or through this rank's pipeline stages (``parallel.pp > 1``, 1F1B);
4. sum gradients over the HDP group in buckets (all-reduce, or a reduce into each ZeRO shard's
   owner; launched during the rank's last backward with ``parallel.overlap_grad_reduce``) and those
   of TP-replicated parameters over TP (the runner's ``reduce``), clip by the global norm, optimizer
   and lr step;
5. validation loss every ``eval_every`` steps (``Evaluator``);
6. metrics (rank 0; the step's timings, plan statistics and cost feedback: ``StepTelemetry``),
   checkpoint (every rank, atomically, layout-free: resumable at any layout).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from seqmesh.parallel.local_sgd import AllReduceLink, OuterConfig, OuterSync
from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.pipeline import PipelineModel
from seqmesh.parallel.step_runner import LocalRunner, PipelineRunner, StepRunner, Zero3Runner, forward_backward
from seqmesh.parallel.zero import ZeroOptimizer
from seqmesh.scheduler import CostModel, plan_step
from seqmesh.scheduler.plan import Group, Plan
from seqmesh.trainer.build import apply_memory_limit, build_parallel_model, build_schedule, warm_attention
from seqmesh.trainer.config import ModelConfig, ParallelConfig, RunConfig, SchedulerConfig
from seqmesh.trainer.data import build_data, make_sampler, num_targets
from seqmesh.trainer.evaluate import Evaluator
from seqmesh.trainer.flops import peak_flops, train_flops
from seqmesh.trainer.guards import step_unless_nonfinite
from seqmesh.trainer.metrics import MetricsLogger
from seqmesh.trainer.microbatch import autocast, batch_layout, layout_group, loss_sum_of
from seqmesh.trainer.param_offload import close_param_offload
from seqmesh.trainer.plan_ahead import PlanAhead
from seqmesh.trainer.reshard import load_resharded, save_resharded
from seqmesh.trainer.step_telemetry import StepTelemetry

__all__ = ["batch_layout", "layout_group", "loss_sum_of", "make_step_runner", "run_group", "run_pipeline_step",
           "setup_run", "train"]


def make_step_runner(model: torch.nn.Module, optimizer: ZeroOptimizer | None, mesh: Mesh, device: torch.device,
                     model_cfg: ModelConfig, zero_stage: int = 0) -> StepRunner:
    """The run's step runner: pipeline stages (``parallel.pp > 1``), ZeRO-3's aligned items, or plain; its loss
    tiled by ``model.loss_tile_tokens``, its forward in ``model.dtype``."""
    kind = PipelineRunner if mesh.pp > 1 else Zero3Runner if zero_stage == 3 else LocalRunner
    return kind(model, optimizer, mesh, functools.partial(loss_sum_of, loss_tile_tokens=model_cfg.loss_tile_tokens,
                                       loss_kernel=model_cfg.loss_kernel),
                device, forward_context=functools.partial(autocast, model_cfg.dtype, device))


def run_group(model: torch.nn.Module, docs: list[torch.Tensor], group: "dist.ProcessGroup | None",
              model_cfg: ModelConfig, parallel: ParallelConfig, device: torch.device, denominator: int) -> torch.Tensor:
    """Forward + backward of one group's documents on this rank; returns the (undivided) loss sum."""
    return forward_backward(model, layout_group(docs, group, parallel, device),
                            functools.partial(loss_sum_of, loss_tile_tokens=model_cfg.loss_tile_tokens,
                                       loss_kernel=model_cfg.loss_kernel),
                            denominator, functools.partial(autocast, model_cfg.dtype, device))


def run_pipeline_step(model: PipelineModel, plan: Plan, docs_of: Callable[[Group], list[torch.Tensor]], mesh: Mesh,
                      model_cfg: ModelConfig, parallel: ParallelConfig, device: torch.device,
                      denominator: int) -> torch.Tensor:
    """Forward + backward of the step's plan through this rank's pipeline stages (1F1B); the loss sum on the last
    stage (``PipelineRunner.run``, without its gradient and loss reduction)."""
    runner = make_step_runner(model, None, mesh, device, model_cfg)
    return runner.run(plan, batch_layout(docs_of, parallel, device), denominator)


@dataclass
class Run:
    """What a run holds across steps (``setup_run``)."""

    mesh: Mesh
    train_set: Any
    sampler: Any
    model: torch.nn.Module
    optimizer: ZeroOptimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    runner: StepRunner
    planner: PlanAhead
    telemetry: StepTelemetry
    evaluator: Evaluator  # val_loss every eval_every steps and at the end (seqmesh.trainer.evaluate)
    metrics: MetricsLogger
    start: int  # the first step to run (0, or the restored checkpoint's step)
    outer: OuterSync | None = None  # CO2 local updates (parallel.local_sgd_every)


def make_planner(scheduler: SchedulerConfig, mesh: Mesh, cost_model: CostModel) -> PlanAhead:
    """Plans each step (``plan_step``) one step ahead on rank 0 when ``scheduler.lookahead > 0``."""
    return PlanAhead(functools.partial(plan_step, gpus=mesh.hdp, cost_model=cost_model, policy=scheduler.policy,
                                       sp=scheduler.sp, group_sizes=scheduler.group_sizes,
                                       time_limit_s=scheduler.time_limit_s),
                     dist.get_rank(), background=scheduler.lookahead > 0)


def make_metrics(cfg: RunConfig, run_dir: str | Path, world: int, device: torch.device,
                 resume_step: int | None) -> MetricsLogger:
    """The metrics logger (writing on rank 0 only); MFU is always against the device's dense bf16 peak (the
    field's convention), whatever dtype runs."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return MetricsLogger(run_dir, num_devices=world, enabled=dist.get_rank() == 0, progress=False,
                         peak_flops_per_device=peak_flops(device_name, "bf16", override_tflops=cfg.peak_tflops),
                         total_steps=cfg.steps, resume_step=resume_step, device=device)


def setup_run(cfg: RunConfig, run_dir: str | Path, device: torch.device) -> Run:
    """Mesh, data, model, optimizer, cost model, planner and step runner of ``cfg``, restored from the newest
    checkpoint in ``run_dir`` when ``cfg.resume`` (at whatever layout it was saved)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    par = cfg.parallel
    mesh = Mesh(world, rank, par.tp, par.pp, local_groups=par.local_sgd_groups if par.local_sgd_every else 1)
    cfg = local_group_sizes(cfg, mesh)
    torch.manual_seed(cfg.seed)
    apply_memory_limit(cfg.memory, device)

    tokenizer, train_set, val_set = build_data(cfg.data)
    sampler = make_sampler(train_set, cfg.data)
    model, optimizer, cost_model = build_parallel_model(cfg, tokenizer.vocab_size, mesh, device)
    schedule = build_schedule(optimizer.optimizer, cfg.optim, cfg.steps)
    warm_attention(model, cfg.parallel, cfg.scheduler, mesh, cost_model, device, max_seq_len=cfg.data.max_seq_len,
                   dtype=cfg.model.dtype)
    runner = make_step_runner(model, optimizer, mesh, device, cfg.model, cfg.parallel.zero_stage)

    start = 0
    # Layout-free checkpoints: a run resumes at any (TP, PP, HDP, ZeRO) layout, whatever it was saved with.
    restored = load_resharded(run_dir, model, optimizer, mesh, seed=cfg.seed) if cfg.resume else None
    if restored is not None:
        start, state = restored  # model, optimizer and RNG are already restored
        schedule.load_state_dict(state["lr_scheduler"])
        sampler.load_state_dict(state["sampler"])
    runner.sync_weights()  # e.g. the last stage's copy of a tied embedding is not checkpointed

    metrics = make_metrics(cfg, run_dir, world, device, resume_step=start if restored else None)
    telemetry = StepTelemetry(mesh, device, cost_model, cfg.scheduler.refine_every, group_spans=runner.group_spans)
    evaluator = Evaluator(cfg, runner, val_set, mesh, cost_model, metrics)
    planner = make_planner(cfg.scheduler, mesh, cost_model)
    return Run(mesh, train_set, sampler, model, optimizer, schedule, runner, planner, telemetry, evaluator, metrics,
               start, make_outer_sync(model, par, mesh))


def local_group_sizes(cfg: RunConfig, mesh: Mesh) -> RunConfig:
    """Under local updates an SP group must lie inside one node group (the groups' models differ):
    the adaptive planner's default sizes become the powers of two that divide a group (aligned
    blocks of such a size never cross one); sizes given explicitly are checked by the config."""
    if mesh.local_groups == 1 or cfg.scheduler.policy != "adaptive" or cfg.scheduler.group_sizes:
        return cfg
    sizes = tuple(2 ** k for k in range(mesh.inner_size.bit_length()) if mesh.inner_size % 2 ** k == 0)
    return dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, group_sizes=sizes))


def make_outer_sync(model: torch.nn.Module, par: ParallelConfig, mesh: Mesh) -> OuterSync | None:
    """CO2's outer synchronisation over the node groups (``parallel.local_sgd_every``), or None."""
    if not par.local_sgd_every:
        return None
    config = OuterConfig(par.local_sgd_every, par.local_sgd_outer_lr, par.local_sgd_outer_momentum,
                         par.local_sgd_staleness_penalty, par.local_sgd_outer_clip)
    return OuterSync(list(model.parameters()), config, AllReduceLink(mesh.outer_group), groups=mesh.local_groups,
                     inner_group=mesh.inner_group, inner_size=mesh.inner_size, inner_rank=mesh.inner_rank)


def local_denominator(plan: Plan, lengths: list[int], mesh: Mesh) -> int:
    """Under local updates each node group steps on the mean over its own targets: the targets of
    the sequences the plan gives its ranks (at least 1: a group without any has no gradient)."""
    mine = mesh.inner_index(mesh.hdp_rank)
    return max(1, num_targets([lengths[s] for mb in plan.microbatches for g in mb.groups
                               if mesh.inner_index(g.first) == mine for s in g.sequences]))


def train(cfg: RunConfig, run_dir: str | Path, device: torch.device) -> dict[str, Any]:
    """Train ``cfg`` from step 0 or the newest checkpoint in ``run_dir``; returns the run summary."""
    run = setup_run(cfg, run_dir, device)
    train_set, sampler, planner, runner, optimizer, telemetry = (run.train_set, run.sampler, run.planner, run.runner,
                                                                 run.optimizer, run.telemetry)
    last = cfg.stop_at or cfg.steps
    try:
        for step in range(run.start, last):
            telemetry.begin_step()
            ids = next(sampler)
            lengths = train_set.lengths[ids].tolist()
            plan = planner.get(step, lengths)
            if step + 1 < cfg.steps:
                planner.prefetch(step + 1, train_set.lengths[sampler.peek(1)[0]].tolist())
            denominator = num_targets(lengths)

            layout = batch_layout(lambda g: [train_set[ids[s]] for s in g.sequences], cfg.parallel, device)
            scale = denominator if run.outer is None else local_denominator(plan, lengths, run.mesh)
            loss_sum = runner.run(plan, layout, scale, span=telemetry.span)
            with telemetry.span("reduce"):
                loss_sum = runner.reduce(loss_sum)
            with telemetry.span("optimizer"):
                grad_norm = optimizer.clip_grad_norm_(cfg.optim.grad_clip or float("inf"))
                lr = optimizer.param_groups[0]["lr"]
                skipped = step_unless_nonfinite(cfg.optim.nonfinite, step + 1, loss_sum, grad_norm, optimizer,
                                                run.schedule)
                runner.sync_weights()
                optimizer.zero_grad()
                if run.outer is not None:
                    run.outer.after_step(step + 1)

            record = telemetry.end_step(step, plan, lengths, planner.last_wait_ms)
            if record.refined is not None:
                planner.replace_plan_fn(functools.partial(planner.plan_fn, cost_model=record.refined))
            run.evaluator.maybe_run(step + 1)  # every eval_every steps and at the end: val_loss in this step's record
            run.metrics.log_step(step + 1, loss=float(loss_sum) / denominator, grad_norm=float(grad_norm), lr=lr,
                                 step_time_s=record.step_time_s, tokens=int(sum(lengths)),
                                 flops=train_flops(run.model.config, lengths), peak_mem_bytes=record.peak_mem_bytes,
                                 extra={**record.extra, "skipped_step": skipped})

            if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == last):
                save_resharded(run_dir, step + 1, run.model, optimizer, run.mesh, {
                    "lr_scheduler": run.schedule.state_dict(), "sampler": sampler.state_dict(),
                    "extra": {"step": step + 1, "plan_digest": plan.digest()}}, keep=cfg.ckpt_keep)
        if run.outer is not None:
            run.outer.finish()
    finally:
        planner.close()
        close_param_offload(run.model, optimizer)
    return run.metrics.close({"resumed_from": run.start, "world": run.mesh.world})
