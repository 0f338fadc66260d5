"""The training step loop, top to bottom.

Every rank runs ``train`` (under Ray Train, or any launcher that initialised ``torch.distributed``).
One step:

1. take the global batch's document ids from the sampler (its lengths are known up front);
2. get the step's plan (planned one step ahead on rank 0, broadcast, digest-checked);
3. run this rank's share of the plan (``seqmesh.parallel.step_runner``, picked once per run by the
   mesh and config): for each of its (micro-batch, group) items pack the group's documents, lay them
   out over the group (its SP attention mode), forward, loss / global target count, backward --
   plain, ZeRO-3 (every rank walks every micro-batch, an idle one only joining the layer
   collectives) or through this rank's pipeline stages (``parallel.pp > 1``, 1F1B);
4. sum gradients over the HDP group (all-reduce, or reduce-scatter into ZeRO shards) and those of
   TP-replicated parameters over TP (the runner's ``reduce``), clip by the global norm, optimizer
   and lr step;
5. validation loss every ``eval_every`` steps (``Evaluator``);
6. metrics (rank 0; the step's timings, plan statistics and cost feedback: ``StepTelemetry``),
   checkpoint (every rank, atomically, layout-free: resumable at any layout).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.pipeline import PipelineModel, StageMicroBatch
from seqmesh.parallel.sequence import make_sp_batch, shard_tokens
from seqmesh.parallel.step_runner import (Layout, LocalRunner, PipelineRunner, StepRunner, Zero3Runner,
                                          forward_backward)
from seqmesh.parallel.tensor import tensor_parallel, vocab_parallel_cross_entropy
from seqmesh.parallel.zero import ZeroOptimizer
from seqmesh.scheduler import CostModel, plan_step
from seqmesh.scheduler.plan import Group, Plan
from seqmesh.trainer.build import (apply_memory_limit, apply_offload, build_cost_model, build_model,
                                   build_pipeline_model, build_schedule, build_sharded_optimizer, warm_attention)
from seqmesh.trainer.config import RunConfig, SchedulerConfig
from seqmesh.trainer.data import IGNORE_INDEX, build_data, make_sampler, num_targets, pack
from seqmesh.trainer.evaluate import Evaluator
from seqmesh.trainer.flops import peak_flops, train_flops
from seqmesh.trainer.guards import step_unless_nonfinite
from seqmesh.trainer.metrics import MetricsLogger
from seqmesh.trainer.plan_ahead import PlanAhead
from seqmesh.trainer.reshard import load_resharded, save_resharded
from seqmesh.trainer.step_telemetry import StepTelemetry
from seqmesh.trainer.tiled import lm_loss_sum


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def layout_group(docs: list[torch.Tensor], group: "dist.ProcessGroup | None", cfg: RunConfig,
                 device: torch.device) -> StageMicroBatch:
    """Pack one group's documents and lay them out over the group (its SP mode): this rank's ids and labels."""
    packed = pack(docs)
    mode = "local" if group is None else cfg.parallel.sp_mode
    meta = make_sp_batch(packed.seqlens, mode, group, ulysses_degree=cfg.parallel.ulysses_degree,
                         backend=cfg.parallel.attn_backend, device=device)
    return StageMicroBatch(shard_tokens(meta, packed.input_ids.to(device), 0),
                           shard_tokens(meta, packed.labels.to(device), IGNORE_INDEX), meta)


def loss_sum_of(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Token loss sum of final hidden states (vocabulary parallel under TP, tiled on request)."""
    tp = tensor_parallel(model)
    if tp is None:
        return lm_loss_sum(model, hidden, labels, cfg.model.loss_tile_tokens)
    return vocab_parallel_cross_entropy(model.logits(hidden), labels, tp, IGNORE_INDEX)


def batch_layout(docs_of: Callable[[Group], list[torch.Tensor]], cfg: RunConfig, device: torch.device) -> Layout:
    """The step runner's ``layout``: a plan group's documents (``docs_of``) packed and laid out over the group."""
    return lambda group, process_group: layout_group(docs_of(group), process_group, cfg, device)


def make_step_runner(model: torch.nn.Module, optimizer: ZeroOptimizer | None, mesh: Mesh, cfg: RunConfig,
                     device: torch.device) -> StepRunner:
    """The run's step runner: pipeline stages (``parallel.pp > 1``), ZeRO-3's aligned items, or plain."""
    kind = PipelineRunner if mesh.pp > 1 else Zero3Runner if cfg.parallel.zero_stage == 3 else LocalRunner
    return kind(model, optimizer, mesh, functools.partial(loss_sum_of, cfg=cfg), device,
                forward_context=functools.partial(_autocast, cfg.model.dtype, device))


def run_group(model: torch.nn.Module, docs: list[torch.Tensor], group: "dist.ProcessGroup | None", cfg: RunConfig,
              device: torch.device, denominator: int) -> torch.Tensor:
    """Forward + backward of one group's documents on this rank; returns the (undivided) loss sum."""
    return forward_backward(model, layout_group(docs, group, cfg, device), functools.partial(loss_sum_of, cfg=cfg),
                            denominator, functools.partial(_autocast, cfg.model.dtype, device))


def run_pipeline_step(model: PipelineModel, plan: Plan, docs_of: Callable[[Group], list[torch.Tensor]],
                      mesh: Mesh, cfg: RunConfig, device: torch.device, denominator: int) -> torch.Tensor:
    """Forward + backward of the step's plan through this rank's pipeline stages (1F1B); the loss sum on the last
    stage (``PipelineRunner.run``, without its gradient and loss reduction)."""
    return make_step_runner(model, None, mesh, cfg, device).run(plan, batch_layout(docs_of, cfg, device), denominator)


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
    mesh = Mesh(world, rank, cfg.parallel.tp, cfg.parallel.pp)
    torch.manual_seed(cfg.seed)
    apply_memory_limit(cfg.memory, device)

    tokenizer, train_set, val_set = build_data(cfg.data)
    sampler = make_sampler(train_set, cfg.data)
    if mesh.pp > 1:
        model = build_pipeline_model(cfg.model, cfg.parallel, cfg.data.max_seq_len, tokenizer.vocab_size, device, mesh)
    else:  # ZeRO-3: built on the host, only shards go to the device
        host = cfg.parallel.zero_stage == 3
        model = build_model(cfg.model, tokenizer.vocab_size, torch.device("cpu") if host else device, mesh.tp_group)
    optimizer = build_sharded_optimizer(model, cfg, mesh, device)
    schedule = build_schedule(optimizer.optimizer, cfg.optim, cfg.steps)
    cost_model = build_cost_model(cfg, model, device)
    apply_offload(model, cfg, cost_model, device)
    warm_attention(model, cfg, mesh, cost_model, device)
    runner = make_step_runner(model, optimizer, mesh, cfg, device)

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
    evaluator = Evaluator(cfg, model, val_set, mesh, cost_model, device, metrics)
    planner = make_planner(cfg.scheduler, mesh, cost_model)
    return Run(mesh, train_set, sampler, model, optimizer, schedule, runner, planner, telemetry, evaluator, metrics,
               start)


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

            layout = batch_layout(lambda g: [train_set[ids[s]] for s in g.sequences], cfg, device)
            loss_sum = runner.run(plan, layout, denominator, span=telemetry.span)
            with telemetry.span("reduce"):
                loss_sum = runner.reduce(loss_sum)
            with telemetry.span("optimizer"):
                grad_norm = optimizer.clip_grad_norm_(cfg.optim.grad_clip or float("inf"))
                lr = optimizer.param_groups[0]["lr"]
                skipped = step_unless_nonfinite(cfg.optim.nonfinite, step + 1, loss_sum, grad_norm, optimizer,
                                                run.schedule)
                runner.sync_weights()
                optimizer.zero_grad()

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
    finally:
        planner.close()
    return run.metrics.close({"resumed_from": run.start, "world": run.mesh.world})
