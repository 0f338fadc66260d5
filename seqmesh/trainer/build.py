"""Turn the run configuration into the objects of a run: model, optimizer, lr schedule, cost model.

``build_parallel_model`` is the one place that says in which order the model becomes this rank's parallel
model (the transforms themselves are in ``trainer/parallelize.py``); every other function takes only the
config sections it reads."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch
import transformers

from seqmesh.kernels.attention import warm_cudnn_graphs
from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.pipeline import PipelineModel, split_model
from seqmesh.parallel.tensor import tensor_parallel
from seqmesh.parallel.zero import ZeroOptimizer
from seqmesh.parallel.zero3 import Zero3Optimizer
from seqmesh.parallel.sequence import sp_degrees
from seqmesh.parallel.sequence.ulysses import rank_head_counts
from seqmesh.scheduler import CostModel, default_cost_model
from seqmesh.scheduler.links import load_cluster
from seqmesh.scheduler.sp_comm import AttentionComm
from seqmesh.scheduler.simulate import plannable_sizes
from seqmesh.trainer.config import (MemoryConfig, ModelConfig, OffloadConfig, OptimConfig, ParallelConfig, RunConfig,
                                    SchedulerConfig)
from seqmesh.trainer.float8 import apply_float8_linears
from seqmesh.trainer.hf_io import load_hf
from seqmesh.trainer.memory_model import (activation_bytes_per_token, layer_tile_working_bytes, loss_working_bytes,
                                         mlp_tile_working_bytes)
from seqmesh.trainer.lr_schedule import build_lr_scheduler
from seqmesh.trainer.model import Transformer
from seqmesh.trainer.parallelize import apply_tiling_and_offload, parallelize

log = logging.getLogger(__name__)

# Sustained (not peak) FLOP/s used by the default cost model when no profile exists; a CPU core
# running fp32 GEMMs of this model's sizes sustains roughly this (measured on the CI machine).
CPU_SUSTAINED_FLOPS = 2.0e10
# All-to-all bandwidth between CPU workers on gloo (loopback TCP), as the cost model counts it (bytes one
# rank sends / time), measured on the 2-core CI machine with 4 processes and fp32 [tokens, 256] tensors:
# 0.14 GB/s at 256 tokens, 0.47 at 1K, 0.64 at 4K (2 processes: 0.08 / 0.22 / 0.38). 0.2 stands for the
# per-layer messages of the default job's documents (a few hundred tokens per rank, latency-bound). With it
# SP on CPUs pays for itself only where it evens out a step that one long document would dominate.
CPU_LINK_GBPS = 0.2
# Activation offload beside parameter offload needs at least this much host memory for its buffers (one
# micro-batch's layer inputs of a few hundred MiB at long context; below it, every layer would stay put).
ACTIVATION_HOST_MIN_BYTES = 256 << 20


def hf_config(cfg: ModelConfig, vocab_size: int) -> transformers.PretrainedConfig:
    """The transformers config of ``cfg`` (vocabulary from the tokenizer unless set)."""
    values = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        vocab_size=cfg.vocab_size or vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
    )
    if cfg.head_dim is not None:
        values["head_dim"] = cfg.head_dim
    return transformers.AutoConfig.for_model(cfg.arch, **values)


def build_model(cfg: ModelConfig, vocab_size: int, device: torch.device,
                tp_group: "torch.distributed.ProcessGroup | None" = None) -> Transformer:
    """The model after phase 1 of ``parallelize`` (see ``build_parallel_model``): tensor parallel over ``tp_group``
    when given, sequence-parallel attention, activation checkpointing when configured."""
    model = load_hf(cfg.hf_path) if cfg.hf_path else Transformer(hf_config(cfg, vocab_size))
    if model.dims.vocab_size < vocab_size:
        raise ValueError(f"the model's vocabulary ({model.dims.vocab_size}) is smaller than the tokenizer's "
                         f"({vocab_size}); set model.vocab_size >= {vocab_size} or data.vocab_size lower")
    model.residual_dtype = torch.bfloat16 if cfg.residual_dtype == "bf16" else None
    parallelize(model, tp_group=tp_group, activation_checkpointing=cfg.activation_checkpointing)
    return model.to(device)


def build_pipeline_model(cfg: ModelConfig, parallel: ParallelConfig, seq_len: int, vocab_size: int,
                         device: torch.device, mesh: Mesh) -> PipelineModel:
    """This rank's pipeline chunks (``parallel.pp`` x ``parallel.pp_virtual`` stages), tensor parallel within.

    Every rank builds the whole model on the host (identical everywhere: same seed or same HF
    weights, as without PP), shards it over TP, then keeps and moves to ``device`` only its own
    stages, so device memory holds one stage. Layers are split by ``stage_layers`` (balanced by
    FLOPs at documents of ``seq_len`` tokens: the data's ``max_seq_len``).
    """
    model = build_model(cfg, vocab_size, torch.device("cpu"), mesh.tp_group)
    tied_group = mesh.embedding_group if model.dims.tie_embeddings else None
    return split_model(model, mesh.pp_rank, mesh.pp, parallel.pp_virtual, seq_len, device, tied_group)


def apply_offload(model: Transformer, model_cfg: ModelConfig, off: OffloadConfig, cost_model: CostModel,
                  device: torch.device, host_left_bytes: float | None = None) -> None:
    """Phase 2 of ``parallelize`` (see ``build_parallel_model``), once the cost model exists: the tiled MLP
    (``model.mlp_tile_tokens``), tiled decoder layers (``model.layer_tile_tokens``), activation offload
    (``offload``) and compiled layers (``model.compile_layers``); parameter names are unchanged.

    ``host_left_bytes``: host memory that parameter offload's plan leaves (activation buffers get that)."""
    offload = None
    if off.target != "none":
        host_limit = int(off.host_mem_gb * 2**30) if off.host_mem_gb else None
        if host_left_bytes is not None:
            if host_left_bytes < ACTIVATION_HOST_MIN_BYTES:
                raise ValueError(f"offload.target={off.target}: parameter offload's plan leaves "
                                 f"{max(0.0, host_left_bytes) / 2**30:.2f} GiB of host memory for activations; raise "
                                 "offload.host_mem_gb, move the optimizer states to disk (offload.optimizer=nvme), or "
                                 "set offload.target=none")
            host_limit = int(host_left_bytes)
        offload = dict(device=device, target=off.target, ratio=off.ratio_value, cost_model=cost_model, path=off.path,
                       engine=off.engine, host_limit_bytes=host_limit,
                       h2d_GBps=off.h2d_GBps, disk_GBps=off.disk_GBps,
                       compute_dtype=torch.bfloat16 if model_cfg.dtype == "bf16" else None)
    apply_tiling_and_offload(model, mlp_tile_tokens=model_cfg.mlp_tile_tokens,
                             layer_tile_tokens=model_cfg.layer_tile_tokens, offload=offload,
                             compile_layers=model_cfg.compile_layers)


def apply_weight_dtype(model: torch.nn.Module, cfg: OptimConfig) -> None:
    """``optim.master_weights=false``: the weights (and so their gradients) become bf16, with no fp32 copy anywhere;
    FP8AdamW rounds each update stochastically, so small updates survive in expectation."""
    if not cfg.master_weights:
        model.to(torch.bfloat16)


def _param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only (norm gains and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.state_dtype == "fp32":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, fused=fused or None, **kwargs)
    from seqmesh.trainer.optim import FP8AdamW

    return FP8AdamW(groups, state_dtype=cfg.state_dtype, **kwargs)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (fp32 states, fused on GPU) or FP8AdamW (``optim.state_dtype``) over every parameter."""
    return _make_optimizer(_param_groups(model, cfg), cfg)


def build_sharded_optimizer(model: torch.nn.Module, optim: OptimConfig, zero_stage: int, mesh: Mesh,
                            device: torch.device | None = None, *, overlap: bool = False,
                            bucket_mb: float = 25.0, zero3_reduce_per_step: bool = False,
                            host_shards: bool = False) -> ZeroOptimizer:
    """The step loop's optimizer: ZeRO ``parallel.zero_stage`` over the HDP group, its gradient norm global
    over TP and PP (a pipeline rank's ``parameters()`` are the ones it owns, so stages count each once).

    Stage 3 shards ``model`` itself (built on the host, so the whole model never sits on ``device``):
    its shards and gathers go to ``device`` (default: where the parameters are). Its layers reduce-scatter
    their gradients inside their own backward, or once per step with ``zero3_reduce_per_step``
    (``parallel.zero3_grad_reduce``), so ``overlap`` does not apply to it. ``host_shards``: its shards, their
    gradients and the optimizer's states in host memory (``offload.params=cpu`` under ZeRO-3).

    Stages 0-2 reduce gradients in buckets of ``bucket_mb`` MiB (``parallel.grad_bucket_mb``), ordered by
    the model's parameter registration reversed (the order backward finishes them); ``overlap``
    (``parallel.overlap_grad_reduce``) reduces them during the step's last backward, over a group of their
    own (``Mesh.grad_group``). Not under PP: the pipeline reduces after its schedule (``PipelineRunner``).
    TP-replicated parameters are summed over TP after backward, so their buckets wait for it.

    Under parameter offload the optimizer is built by the plan instead (``trainer/param_offload.py``)."""
    tp = tensor_parallel(model)
    norm_group = mesh.model_parallel_group if mesh.pp > 1 else None if tp is None else tp.group
    if zero_stage == 3:
        return Zero3Optimizer(model, _param_groups(model, optim), lambda groups: _make_optimizer(groups, optim),
                              device=device or next(model.parameters()).device, group=mesh.hdp_group,
                              tp_group=norm_group, tensor_parallel=tp, reduce_per_step=zero3_reduce_per_step,
                              host_shards=host_shards)
    overlap = overlap and mesh.pp == 1 and mesh.inner_size > 1
    # under local updates (mesh.local_groups > 1) gradients and shards stay inside the node group
    return ZeroOptimizer(_param_groups(model, optim), lambda groups: _make_optimizer(groups, optim),
                         stage=zero_stage, group=mesh.inner_group, tp_group=norm_group,
                         norm_excluded=() if tp is None else tp.norm_excluded(),
                         bucket_bytes=max(1, int(bucket_mb * 2**20)), overlap=overlap,
                         grad_order=list(model.parameters())[::-1],
                         deferred=() if tp is None else tp.replicated + tp.kv_shared,
                         grad_group=mesh.inner_grad_group if overlap else None)


def _mapped_allocator(path: str) -> Callable[[int, torch.dtype], torch.Tensor]:
    """ZeRO's flat buffers as memory-mapped files under ``path`` (``offload.params=nvme``)."""
    from seqmesh.parallel.offload.mapped import mapped_zeros

    return lambda numel, dtype: mapped_zeros(numel, dtype, path)


def apply_memory_limit(memory: MemoryConfig, device: torch.device) -> None:
    """Cap this process's CUDA allocations at ``memory.limit_gb`` (a no-op otherwise)."""
    if memory.limit_gb is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if memory.limit_gb * 2**30 > total:
        raise ValueError(f"memory.limit_gb={memory.limit_gb} exceeds the device's "
                         f"{total / 2**30:.1f} GiB; lower it or leave it null")
    torch.cuda.set_per_process_memory_fraction(memory.limit_gb * 2**30 / total, device)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule of ``optim`` over the run's ``total_steps``."""
    return build_lr_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                              schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)


def build_cost_model(model: Transformer, device: torch.device, model_cfg: ModelConfig, parallel: ParallelConfig,
                     memory: MemoryConfig, *, hdp: int, profile: str | None = None,
                     state_dtype: str = "fp32", cluster: str | None = None,
                     params_offloaded: bool = False) -> CostModel:
    """The run's cost model (``_base_cost_model``), pricing the run's SP mode (``sp_attention``) on
    the links of ``cluster`` (``scheduler.cluster``, a cluster file) when one is given.
    ``params_offloaded``: the weights, gradients and optimizer states live off the device
    (``offload.params``); the offload plan adds what the device holds of them (``apply_param_offload``),
    so a model larger than the device is not refused here."""
    cm = _base_cost_model(model, device, model_cfg, parallel, memory, hdp=hdp, profile=profile,
                          state_dtype=state_dtype, params_offloaded=params_offloaded)
    cm = dataclasses.replace(cm, attention=sp_attention(cm, model, model_cfg, parallel))
    return cm.with_links(load_cluster(cluster)) if cluster else cm


def sp_attention(cm: CostModel, model: Transformer, model_cfg: ModelConfig, parallel: ParallelConfig) -> AttentionComm:
    """What the planner prices SP attention by: Ulysses' all-to-all (also for ``hybrid``, whose
    Ulysses part moves the same bytes), the ring modes' overlapped transfers from the model's
    head shapes, or under ``auto`` the fastest of the three for each group (the plan then names
    each group's mode). The ring modes' point-to-point bandwidth is taken as the all-to-all one the
    cost model lists (``seqmesh profile`` measures all-to-all only; NOTES.md's p2p is faster at
    every size, so this does not favour the ring modes); a cluster file replaces both."""
    if parallel.sp_mode not in ("ring", "tokenring", "auto"):
        return cm.attention
    dims = model.dims
    auto = parallel.sp_mode == "auto"
    return AttentionComm(mode="ulysses" if auto else parallel.sp_mode, q_heads=dims.num_heads,
                         kv_heads=dims.num_kv_heads, head_dim=dims.head_dim, layers=dims.num_layers,
                         act_bytes=2 if model_cfg.dtype == "bf16" else 4,
                         forward_passes=2 if model_cfg.activation_checkpointing or parallel.zero_stage == 3 else 1,
                         p2p_GBps=dict(cm.a2a_GBps), choose=("ulysses", "ring", "tokenring") if auto else ())


def counted_model_config(model_cfg: ModelConfig, zero3: bool, weight_dtype: torch.dtype) -> ModelConfig:
    """The model config the memory count (``trainer/memory_model.py``) reads for this run: ZeRO-3 recomputes every
    layer, as checkpointing does; with bf16 weights (``optim.master_weights=false``) the residual stream is bf16
    whatever ``model.residual_dtype`` says (the embedding gives bf16 and every add is bf16 + bf16), so each
    checkpointed layer input takes 2 bytes a value, not 4."""
    residual = "bf16" if weight_dtype == torch.bfloat16 else model_cfg.residual_dtype
    return dataclasses.replace(model_cfg, activation_checkpointing=model_cfg.activation_checkpointing or zero3,
                               residual_dtype=residual)


def _base_cost_model(model: Transformer, device: torch.device, model_cfg: ModelConfig, parallel: ParallelConfig,
                     memory: MemoryConfig, *, hdp: int, profile: str | None = None,
                     state_dtype: str = "fp32", params_offloaded: bool = False) -> CostModel:
    """The profiled cost model when the config names one, else one derived from FLOPs and the device,
    priced for the run's TP x PP layout (``CostModel.with_layout``).

    ``memory.limit_gb`` replaces the device's memory in either (``apply_memory_limit``
    enforces the same figure on CUDA), less ``memory.headroom``. ``model`` is what this
    rank holds: its TP shard, and under PP its stages (``PipelineModel``). ``profile``: the
    ``scheduler.cost_model`` file; ``hdp``: the HDP size; ``state_dtype``: ``optim.state_dtype``;
    ``params_offloaded``: no model states on the device (a profile's static bytes, which measured them, are
    dropped).
    """
    tp, pp = parallel.tp, parallel.pp
    # The planner fills memory only up to (1 - memory.headroom) of the limit: the allocator's slack and
    # transient buffers are not in the per-token figure (on an H200, a plan filled to the 36 GiB
    # limit failed with 34.3 GiB allocated plus 1.6 GiB reserved when it asked for 1.3 GiB more).
    usable = 1.0 - memory.headroom
    limit = None if memory.limit_gb is None else memory.limit_gb * 2**30 * usable
    if profile:
        model_cm = CostModel.load(profile).for_layout(tp, pp)
        if params_offloaded:
            model_cm = dataclasses.replace(model_cm, mem_static_bytes=0.0)
        return model_cm if limit is None else dataclasses.replace(model_cm, mem_limit_bytes=limit)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        from seqmesh.trainer.flops import peak_flops

        flops = 0.5 * (peak_flops(props.name, "bf16") or 4e14)
        mem = usable * props.total_memory
    else:
        flops, mem = CPU_SUSTAINED_FLOPS, 8 * 2**30
    link = {} if device.type == "cuda" else {"link_GBps": CPU_LINK_GBPS}
    mem = limit or mem
    zero3 = parallel.zero_stage == 3  # everything sharded, and every layer recomputed in backward
    # Activations counted from the model's own modules (trainer/memory_model.py), not a generic block.
    counted_cfg = counted_model_config(model_cfg, zero3, next(model.parameters()).dtype)
    # The cost model takes the whole model and divides by the layout itself: a TP shard multiplies
    # through 1/tp of the weights (each rank its heads and MLP slice) and a stage through ~1/pp of
    # the layers (stages are balanced by FLOPs), so tp x pp times this rank's count stands for the
    # whole model. Optimizer moments: 8 bytes per parameter in fp32, 4 in bf16, ~2 in FP8/int8.
    # TP's collectives have no measured bandwidth here, so they stay part of alpha (tp_GBps=0).
    return default_cost_model(params=model.num_params(exclude_embeddings=True) * tp * pp,
                              hidden_size=model.dims.hidden_size, num_layers=model.dims.num_layers,
                              device_flops=flops, mem_limit_bytes=mem, max_group=max(2, hdp), **link,
                              act_bytes=2 if model_cfg.dtype == "bf16" else 4,  # activations and SP messages
                              dp_shards=hdp, zero_stage=None if zero3 else parallel.zero_stage,
                              optim_state_bytes={"fp32": 8.0, "bf16": 4.0}.get(state_dtype, 2.0),
                              whole_grads=zero3 and parallel.zero3_reduce_per_step,
                              checkpointing=model_cfg.activation_checkpointing or zero3,
                              mem_bytes_per_token=activation_bytes_per_token(model.dims, counted_cfg),
                              mem_reserved_bytes=loss_working_bytes(model.dims, counted_cfg)
                              + mlp_tile_working_bytes(model.dims, counted_cfg)
                              + layer_tile_working_bytes(model.dims, counted_cfg),
                              model_states=not params_offloaded).with_layout(tp, pp, tp_GBps=0.0)


def warm_attention(model: torch.nn.Module, parallel: ParallelConfig, scheduler: SchedulerConfig, mesh: Mesh,
                   cost_model: CostModel, device: torch.device, *, max_seq_len: int, dtype: str = "fp32") -> int:
    """Build the attention kernels' per-shape graphs for every document length and SP group size the
    run can meet, before its first step (``warm_cudnn_graphs``; nothing happens off cuDNN or with
    ``parallel.warm_attention=false``). Returns the number of length buckets run.

    A group of d ranks runs Ulysses over u of them (``parallel.sp_mode``), each rank with 1/u of its
    TP shard's heads (one more on some ranks when u does not divide them), and holds documents of
    at most ``cost_model.capacity(d)`` tokens (and ``data.max_seq_len``): only those (heads, length) pairs are
    built, in ``model.dtype`` (``dtype``).
    """
    attn = next((m for m in model.modules() if hasattr(m, "num_heads") and hasattr(m, "head_dim")), None)
    if not parallel.warm_attention or attn is None or device.type != "cuda":
        return 0
    if scheduler.policy == "adaptive":
        sizes = plannable_sizes(mesh.hdp, cost_model, scheduler.group_sizes)
    else:
        sizes = (scheduler.sp,)
    longest: dict[tuple[int, int], int] = {}
    for d in sizes:
        top = min(max_seq_len, cost_model.capacity(d))
        modes = cost_model.modes(d) if parallel.sp_mode == "auto" else (parallel.sp_mode,)
        for u in {1 if d == 1 else sp_degrees(m, d, parallel.ulysses_degree, attn.num_heads)[0] for m in modes}:
            for heads in rank_head_counts(attn.num_heads, attn.num_kv_heads, u):
                longest[heads] = max(longest.get(heads, 0), top)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else next(model.parameters()).dtype
    t0 = time.perf_counter()
    built = warm_cudnn_graphs(longest, attn.head_dim, attn.head_dim**-0.5, torch_dtype, device, parallel.attn_backend)
    if built:
        log.info("built cuDNN attention graphs for %d length buckets (per-rank heads: longest document %s) in %.1f s",
                 built, longest, time.perf_counter() - t0)
    return built


def build_parallel_model(cfg: RunConfig, vocab_size: int, mesh: Mesh,
                         device: torch.device) -> tuple[torch.nn.Module, ZeroOptimizer, CostModel]:
    """This rank's model, its sharded optimizer and the run's cost model: every transform, in order.

    Phase 1 (``parallelize``, in ``build_model``): (1) tensor parallel, (2) sequence-parallel attention,
    (3) activation checkpointing, on the whole model;
    then (4) pipeline stages: this rank keeps its chunks (``split_model``, ``parallel.pp > 1``);
    float8 linears (``model.linear_dtype=fp8``, ``trainer/float8.py``) on what this rank holds;
    (5) ZeRO: the optimizer over the HDP group (stage 3 also shards the parameters and wraps each layer);
    the cost model, priced from what this rank now holds;
    (8) parameter offload (``offload.params``, ``trainer/param_offload.py``), in place of (5): the plan from the
    cost model and measured rates, the optimizer over the device's share and the host's (``PlacedZero``), the host
    layers streamed, the cost model reduced to what the device holds; under ZeRO-3 instead (5) with its shards,
    gradients and states on the host (``_zero3_host_shards``);
    phase 2 (``apply_tiling_and_offload``, in ``apply_offload``): (6) tiled MLP and layers, (7) activation offload, whose
    ``ratio=auto`` policy needs that cost model, (9) compiled layers (``model.compile_layers``).
    """
    host_params = cfg.offload.params != "none"
    # ZeRO-3 and parameter offload build (and pipeline-split) on the host; only shards or streamed layers go to
    # the device.
    host = torch.device("cpu") if cfg.parallel.zero_stage == 3 or host_params else device
    if mesh.pp > 1:
        model = build_pipeline_model(cfg.model, cfg.parallel, cfg.data.max_seq_len, vocab_size, host, mesh)
    else:
        model = build_model(cfg.model, vocab_size, host, mesh.tp_group)
    apply_weight_dtype(model, cfg.optim)
    if cfg.model.linear_dtype == "fp8":
        log.info("float8 linears: %d modules", len(apply_float8_linears(model, device)))
    host_left = None
    if host_params and cfg.parallel.zero_stage == 3:  # ZeRO-Infinity: each rank's shards and states on the host
        optimizer, cost_model = _zero3_host_shards(model, cfg, mesh, device)
    elif host_params:  # step 8: parameter offload, planned from the cost model and measured rates, builds the optimizer
        cost_model = build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=cfg.hdp,
                                      profile=cfg.scheduler.cost_model, state_dtype=cfg.optim.state_dtype,
                                      cluster=cfg.scheduler.cluster, params_offloaded=True)
        from seqmesh.trainer.param_offload import apply_param_offload

        # host-resident gradients are reduced where they live: over gloo when the device's backend is NCCL
        host_group = torch.distributed.new_group(backend="gloo") if device.type == "cuda" and mesh.hdp > 1 \
            else mesh.inner_group
        optimizer, plan, cost_model = apply_param_offload(
            model, cfg, cost_model, device, _param_groups(model, cfg.optim),
            lambda groups: _make_optimizer(groups, cfg.optim), device_group=mesh.inner_group, host_group=host_group,
            host_allocate=_mapped_allocator(cfg.offload.path) if cfg.offload.params == "nvme" else None)
        host_left = plan.host_free
    else:
        optimizer = build_sharded_optimizer(model, cfg.optim, cfg.parallel.zero_stage, mesh, device,
                                            overlap=cfg.parallel.overlap_grad_reduce,
                                            bucket_mb=cfg.parallel.grad_bucket_mb,
                                            zero3_reduce_per_step=cfg.parallel.zero3_reduce_per_step)
        cost_model = build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=cfg.hdp,
                                      profile=cfg.scheduler.cost_model, state_dtype=cfg.optim.state_dtype,
                                      cluster=cfg.scheduler.cluster)
    copy = model.tied_copy if isinstance(model, PipelineModel) else None
    if copy is not None and copy.device != device:  # the last stage's tied copy is whole and not sharded
        copy.data = copy.data.to(device)
    apply_offload(model, cfg.model, cfg.offload, cost_model, device, host_left_bytes=host_left)
    return model, optimizer, cost_model


def _zero3_host_shards(model: torch.nn.Module, cfg: RunConfig, mesh: Mesh,
                       device: torch.device) -> tuple[ZeroOptimizer, CostModel]:
    """ZeRO-3 with host shards (``offload.params=cpu``): checked against host memory before it is built, updated
    where ``offload.update`` says, and priced with only the gathered units on the device."""
    from seqmesh.trainer.param_offload import check_host_shards_fit, host_shard_update, ranks_on_this_host

    update_device = host_shard_update(cfg, device)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    built = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    check_host_shards_fit(-(-numel // cfg.hdp), next(model.parameters()).element_size(), cfg, ranks_on_this_host(),
                          built)
    optimizer = build_sharded_optimizer(model, cfg.optim, 3, mesh, device, host_shards=True)
    if update_device is not None:
        optimizer.optimizer.update_device = update_device
    cost_model = build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=cfg.hdp,
                                  profile=cfg.scheduler.cost_model, state_dtype=cfg.optim.state_dtype,
                                  cluster=cfg.scheduler.cluster, params_offloaded=True)
    static = cost_model.mem_static_bytes + optimizer.gathered_bytes()
    return optimizer, dataclasses.replace(cost_model, mem_static_bytes=static)
