"""The training step loop, top to bottom.

Every rank runs this function (under Ray Train, or any launcher that initialised
``torch.distributed``). One step:

1. take the global batch's document ids from the sampler (its lengths are known up front);
2. get the step's plan (planned one step ahead on rank 0, broadcast, digest-checked);
3. for each (micro-batch, group) of this rank in the plan: pack the group's documents, lay them
   out over the group (its SP attention mode), forward, loss / global target count, backward
   (with ``parallel.pp > 1``: the same items through this rank's pipeline stages, 1F1B);
   (ZeRO-3: every rank walks every plan micro-batch, an idle one only joining the layer collectives);
4. sum gradients over the HDP group (all-reduce, or reduce-scatter into ZeRO shards) and those of
   TP-replicated parameters over TP, clip by the global norm, optimizer and lr step;
5. metrics (rank 0), checkpoint (every rank, atomically, layout-free: resumable at any layout).
"""

from __future__ import annotations

import collections
import functools
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from seqmesh import first_use
from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.offload import offload_session
from seqmesh.parallel.pipeline import PipelineModel, StageMicroBatch, run_pipeline
from seqmesh.parallel.sequence import make_sp_batch, shard_tokens
from seqmesh.parallel.tensor import reduce_tensor_parallel_gradients, tensor_parallel, vocab_parallel_cross_entropy
from seqmesh.scheduler import CostModel, plan_step
from seqmesh.scheduler.plan import Group, Plan
from seqmesh.trainer.build import (apply_memory_limit, apply_offload, build_cost_model, build_model,
                                   build_pipeline_model, build_schedule, build_sharded_optimizer, warm_attention)
from seqmesh.trainer.config import RunConfig
from seqmesh.trainer.evaluate import Evaluator
from seqmesh.trainer.data import IGNORE_INDEX, build_data, make_sampler, num_targets, pack
from seqmesh.trainer.flops import peak_flops, train_flops
from seqmesh.trainer.guards import step_unless_nonfinite
from seqmesh.trainer.metrics import MetricsLogger, aggregate_rank_timings, peak_memory
from seqmesh.trainer.cost_feedback import CostFeedback
from seqmesh.trainer.plan_ahead import PlanAhead
from seqmesh.trainer.reshard import load_resharded, save_resharded
from seqmesh.trainer.tiled import lm_loss_sum
from seqmesh.trainer.timing import SpanTimer


def _autocast(cfg: RunConfig, device: torch.device):
    if cfg.model.dtype == "bf16":
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
        return lm_loss_sum(model, hidden, labels, cfg.offload.loss_tile_tokens)
    return vocab_parallel_cross_entropy(model.logits(hidden), labels, tp, IGNORE_INDEX)


def run_group(model: torch.nn.Module, docs: list[torch.Tensor], group: "dist.ProcessGroup | None", cfg: RunConfig,
              device: torch.device, denominator: int) -> torch.Tensor:
    """Forward + backward of one group's documents on this rank; returns the (undivided) loss sum."""
    mb = layout_group(docs, group, cfg, device)
    with offload_session(model, mb.meta):
        with _autocast(cfg, device):
            loss_sum = loss_sum_of(model, model(mb.input_ids, mb.meta), mb.labels, cfg)
        (loss_sum / denominator).backward()
    return loss_sum.detach()


def run_pipeline_step(model: PipelineModel, plan: Plan, docs_of: Callable[[Group], list[torch.Tensor]],
                      mesh: Mesh, cfg: RunConfig, device: torch.device, denominator: int) -> torch.Tensor:
    """Forward + backward of the step's plan through this rank's pipeline stages (1F1B); the loss sum on the last.

    Work item k is the group of plan micro-batch k that holds this rank's HDP index, or a
    placeholder when the rank sits micro-batch k out -- never the k-th group the rank takes part
    in. 1F1B orders forwards and backwards by item position, and the ranks of one SP group must
    issue the group's collectives in the same order: with positions taken from the plan, a
    group's members meet it at the same position of the same schedule, whichever other groups
    each ran before. A placeholder is skipped by every stage of the pipeline line (all of them
    hold the same HDP index and walk the same plan, so they agree): no compute, no message.
    """
    items = []
    for mb in plan.microbatches:
        group = next((g for g in mb.groups if mesh.hdp_rank in g.ranks), None)
        items.append(None if group is None else
                     layout_group(docs_of(group), mesh.sp_group(group.first, group.count), cfg, device))
    return run_pipeline(model.chunks, items, functools.partial(loss_sum_of, cfg=cfg), denominator, mesh.pp_ranks(),
                        activation_dtype=next(model.parameters()).dtype, channels=mesh.pipeline_channels,
                        forward_context=functools.partial(_autocast, cfg, device))


def work_items(plan: Plan, mesh: Mesh, aligned: bool) -> list[Group | None]:
    """This rank's groups in execution order; ``aligned`` (ZeRO-3): one item per plan micro-batch, None where
    the rank sits it out, so every HDP rank issues the per-layer gathers and reduce-scatters of every
    micro-batch at the same position (as ``run_pipeline_step`` aligns pipeline items)."""
    if not aligned:
        return [group for _, group in plan.work_of(mesh.hdp_rank)]
    return [next((g for g in mb.groups if mesh.hdp_rank in g.ranks), None) for mb in plan.microbatches]


def train(cfg: RunConfig, run_dir: str | Path, device: torch.device) -> dict[str, Any]:
    """Train ``cfg`` from step 0 or the newest checkpoint in ``run_dir``; returns the run summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = Mesh(world, rank, cfg.parallel.tp, cfg.parallel.pp)
    torch.manual_seed(cfg.seed)
    apply_memory_limit(cfg, device)

    tokenizer, train_set, val_set = build_data(cfg.data)
    sampler = make_sampler(train_set, cfg.data)
    sharded = cfg.parallel.zero_stage == 3  # ZeRO-3: built on the host, only shards go to the device
    if mesh.pp > 1:
        model = build_pipeline_model(cfg, tokenizer.vocab_size, device, mesh)
    else:
        model = build_model(cfg.model, tokenizer.vocab_size, torch.device("cpu") if sharded else device, mesh.tp_group)
    optimizer = build_sharded_optimizer(model, cfg, mesh, device)
    schedule = build_schedule(optimizer.optimizer, cfg)
    cost_model = build_cost_model(cfg, model, device)
    apply_offload(model, cfg, cost_model, device)
    warm_attention(model, cfg, mesh, cost_model, device)
    planner = PlanAhead(functools.partial(plan_step, gpus=mesh.hdp, cost_model=cost_model,
                                          policy=cfg.scheduler.policy, sp=cfg.scheduler.sp,
                                          group_sizes=cfg.scheduler.group_sizes,
                                          time_limit_s=cfg.scheduler.time_limit_s),
                        rank, background=cfg.scheduler.lookahead > 0)

    start = 0
    # Layout-free checkpoints: a run resumes at any (TP, PP, HDP, ZeRO) layout, whatever it was saved with.
    restored = load_resharded(run_dir, model, optimizer, mesh, seed=cfg.seed) if cfg.resume else None
    if restored is not None:
        start, state = restored  # model, optimizer and RNG are already restored
        schedule.load_state_dict(state["lr_scheduler"])
        sampler.load_state_dict(state["sampler"])
    if mesh.pp > 1:
        model.sync_tied_weight()  # the last stage's copy of a tied embedding is not checkpointed

    # MFU is always against the device's dense bf16 peak (the field's convention), whatever dtype runs.
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    metrics = MetricsLogger(run_dir, num_devices=world, enabled=rank == 0, progress=False,
                            peak_flops_per_device=peak_flops(device_name, "bf16", override_tflops=cfg.peak_tflops),
                            total_steps=cfg.steps, resume_step=start if restored else None, device=device)
    timer = SpanTimer(device)
    evaluator = Evaluator(cfg, model, val_set, mesh, cost_model, device, metrics)  # val_loss (seqmesh.trainer.evaluate)
    feedback = CostFeedback(cost_model, cfg.scheduler.refine_every)
    try:
        for step in range(start, cfg.stop_at or cfg.steps):
            t_step = time.perf_counter()
            first_use_before = first_use.counts()
            ids = next(sampler)
            lengths = train_set.lengths[ids].tolist()
            plan = planner.get(step, lengths)
            if step + 1 < cfg.steps:
                planner.prefetch(step + 1, train_set.lengths[sampler.peek(1)[0]].tolist())
            mesh.ensure_sp_groups((g.first, g.count) for mb in plan.microbatches for g in mb.groups)
            denominator = num_targets(lengths)

            loss_sum = torch.zeros((), device=device)
            if mesh.pp > 1:
                # One span for the whole pipeline (groups interleave in 1F1B, so none is timed alone).
                timer.start("group")
                loss_sum += run_pipeline_step(model, plan, lambda g: [train_set[ids[s]] for s in g.sequences], mesh,
                                              cfg, device, denominator)
                timer.stop("group")
            else:
                if sharded:
                    optimizer.begin_step()
                for group in work_items(plan, mesh, aligned=sharded):
                    if group is None:
                        optimizer.idle_item()
                        continue
                    docs = [train_set[ids[s]] for s in group.sequences]
                    timer.start("group")
                    loss_sum += run_group(model, docs, mesh.sp_group(group.first, group.count), cfg, device,
                                          denominator)
                    timer.stop("group")
            timer.start("reduce")
            reduce_tensor_parallel_gradients(model)
            if mesh.pp > 1:
                model.reduce_tied_gradient()
            optimizer.reduce_gradients()
            if mesh.pp > 1:
                # The last stage holds the loss, once per TP group; everyone gets it (rank 0 logs).
                if mesh.pp_rank != mesh.pp - 1 or mesh.tp_rank:
                    loss_sum.zero_()
                dist.all_reduce(loss_sum)
            else:
                dist.all_reduce(loss_sum, group=mesh.hdp_group)
            timer.stop("reduce")
            timer.start("optimizer")
            grad_norm = optimizer.clip_grad_norm_(cfg.optim.grad_clip or float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            skipped = step_unless_nonfinite(cfg.optim.nonfinite, step + 1, loss_sum, grad_norm, optimizer, schedule)
            if mesh.pp > 1:
                model.sync_tied_weight()
            optimizer.zero_grad()
            timer.stop("optimizer")

            spans = timer.elapsed_ms()
            group_ms = [ms for name, ms in spans if name == "group"]
            timings = {"compute_s": sum(group_ms) / 1e3, "reduce_s": dict(spans)["reduce"] / 1e3,
                       "optimizer_s": dict(spans)["optimizer"] / 1e3, "plan_wait_s": planner.last_wait_ms / 1e3,
                       "peak_mem_bytes": peak_memory(device)[0] or 0,
                       "group_ms": group_ms, "hdp_rank": mesh.hdp_rank, "first_use": first_use.since(first_use_before)}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, timings)
            step_time = time.perf_counter() - t_step
            # Every rank's group spans, in its plan order (one pipeline span under PP: no per-group times).
            rank_spans = [(t.pop("hdp_rank"), t.pop("group_ms")) for t in gathered]
            # One-off work (cuDNN graphs, compiles, new process groups) on any rank keeps the step out of refits.
            one_off = sum((collections.Counter(t.pop("first_use")) for t in gathered), collections.Counter())
            diagnostics = feedback.observe_step(plan, lengths, None if mesh.pp > 1 else rank_spans,
                                                1e3 * step_time, one_off) if rank == 0 else {}
            refined = feedback.maybe_refine(step) if rank == 0 else None
            if refined is not None:
                planner.replace_plan_fn(functools.partial(planner.plan_fn, cost_model=refined))
            evaluator.maybe_run(step + 1)  # every eval_every steps and at the end: val_loss in this step's record
            metrics.log_step(step + 1, loss=float(loss_sum) / denominator, grad_norm=float(grad_norm), lr=lr,
                             step_time_s=step_time, tokens=int(sum(lengths)), flops=train_flops(model.config, lengths),
                             peak_mem_bytes=max(t["peak_mem_bytes"] for t in gathered),
                             extra={**_plan_stats(plan, step_time), **_timing_stats(gathered), "skipped_step": skipped,
                                    "rank_predicted_ms": _rank_work_ms(plan, lengths, feedback.cost_model, mesh),
                                    "cost_model_refits": feedback.refits, "cost_feedback": diagnostics})

            if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == (cfg.stop_at or cfg.steps)):
                save_resharded(run_dir, step + 1, model, optimizer, mesh, {
                    "lr_scheduler": schedule.state_dict(), "sampler": sampler.state_dict(),
                    "extra": {"step": step + 1, "plan_digest": plan.digest()}}, keep=cfg.ckpt_keep)
    finally:
        planner.close()
    return metrics.close({"resumed_from": start, "world": world})


def _plan_stats(plan: Plan, step_time_s: float) -> dict[str, Any]:
    sizes = plan.group_sizes()
    return {"plan_microbatches": len(plan.microbatches), "plan_groups": len(sizes), "plan_max_group": max(sizes),
            "plan_predicted_ms": plan.predicted_ms, "plan_lower_bound_ms": plan.lower_bound_ms,
            "plan_error": abs(plan.predicted_ms - 1e3 * step_time_s) / (1e3 * step_time_s),
            "plan_group_sizes": sorted(sizes)}


def _rank_work_ms(plan: Plan, lengths: list[int], cost_model: CostModel, mesh: Mesh) -> list[float]:
    """The cost model's time of each rank's share of the plan at nominal speed, in world rank order:
    the yardstick of the per-rank speed factors (seqmesh.launch.stragglers)."""
    per_hdp = [0.0] * plan.gpus
    for mb in plan.microbatches:
        for g in mb.groups:
            ms = cost_model.group_ms([lengths[s] for s in g.sequences], g.count)
            for r in g.ranks:
                per_hdp[r] += ms
    return [round(per_hdp[Mesh(mesh.world, r, mesh.tp, mesh.pp).hdp_rank], 3) for r in range(mesh.world)]


def _timing_stats(per_rank: list[dict[str, float]]) -> dict[str, Any]:
    agg = aggregate_rank_timings([{k: v for k, v in t.items() if k != "peak_mem_bytes"} for t in per_rank])
    # The per-rank values too (rank order), for the straggler breakdown and speed factors.
    return {**{f"ranks_{k}": v for k, v in agg.items()},
            "rank_timings": {k: [round(t[k], 6) for t in per_rank]
                             for k in ("compute_s", "reduce_s", "optimizer_s", "plan_wait_s")}}
