"""``offload.params=cpu|nvme`` for a run: measure the rates, plan the placement, report it, attach the transform.

The plan (``seqmesh/scheduler/offload_plan.py``) is made before the first step from what this rank
holds and what the machine measures now: pinned host-to-device bandwidth, the disk under
``offload.path`` (when states may go there), the host optimizer's own rate (one FP8AdamW step on
the CPU, timed) and the rate of the host's pass over the gradients for the clip norm. A model that
host memory or disk cannot hold stops here with the bytes needed and the setting to change. The cost
model then counts only what stays on the device, so the planner places sequences in the memory that
parameter offload frees.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time
from typing import Callable

import torch
import torch.distributed as dist

from seqmesh.parallel.checkpointing import remove_activation_checkpointing
from seqmesh.parallel.offload.bandwidth import available_host_bytes, measure_disk_GBps, measure_h2d_GBps
from seqmesh.parallel.offload.host_states import attach_host_states, detach_host_states
from seqmesh.parallel.offload.params import attach_param_offload, detach_param_offload
from seqmesh.parallel.placed_zero import PlacedZero
from seqmesh.parallel.zero import MakeOptimizer, ZeroOptimizer, sum_of_squares
from seqmesh.scheduler import CostModel
from seqmesh.scheduler.offload_plan import OffloadInputs, OffloadPlan, plan_offload
from seqmesh.trainer.config import RunConfig
from seqmesh.trainer.memory_model import kept_layer_bytes_per_token
from seqmesh.trainer.optim import FP8AdamW
from seqmesh.trainer.optim.fp8_adamw import STAGED_CHUNK_ELEMS, STAGED_IN_FLIGHT, STATES_ONLY_PIECE, compiles

log = logging.getLogger(__name__)

STATE_BYTES = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0625, "fp8": 2.0}
HOST_SHARE = 0.8  # of MemAvailable, shared by the ranks on this host, when offload.host_mem_gb is unset


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, after one untimed call (allocation, page faults,
    compiles: what a run pays once, not every step)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_host_adam_Mparams_s(state_dtype: str, host_numel: int, numel: int = 1 << 22, repeats: int = 2) -> float:
    """Millions of parameters per second one host ``FP8AdamW`` step updates here, with the update the
    step over ``host_numel`` offloaded parameters will run (compiled or eager, ``fp8_adamw.compiles``);
    the compile of the untimed first step is found cached by the run's first step."""
    p = torch.zeros(numel)
    p.grad = torch.full((numel,), 1e-3)
    backend = "compiled" if compiles("auto", host_numel, p.device) else "torch"
    opt = FP8AdamW([p], state_dtype=state_dtype, backend=backend)
    return numel / _best_seconds(opt.step, repeats) / 1e6


def measure_host_norm_Mparams_s(dtype: torch.dtype, numel: int = 1 << 25, repeats: int = 2) -> float:
    """Millions of gradient elements per second the host's ``sum_of_squares`` (the clip norm) reads here."""
    g = torch.full((numel,), 1e-3, dtype=dtype)
    return numel / _best_seconds(lambda: sum_of_squares(g), repeats) / 1e6


def measure_staged_update_GBps(device: torch.device, state_dtype: str, param_dtype: torch.dtype,
                               states_only: bool, pieces: int = 8, repeats: int = 2,
                               chunk_elems: int = STAGED_CHUNK_ELEMS, in_flight: int = STAGED_IN_FLIGHT) -> float:
    """GB/s into ``device`` of ``FP8AdamW``'s staged update as the plan counts its bytes: a streamed layer's
    (weights, gradients and states staged from pinned host memory; ``2 * param + state`` bytes per parameter)
    or, with ``states_only``, a host-state layer's (weights and gradients on the device; ``state`` bytes).

    Why: the update behind the step is what the next forward waits for, and it runs below the plain copy rate
    (``measure_h2d_GBps``: copies both ways at once, each piece's launches and syncs, the kernel): on an H100 at
    8013153, 45 GB/s against 55. Timed over ``pieces`` of the update's own pieces (a states-only piece holds
    ``STATES_ONLY_PIECE`` times the elements), as the fill and drain of the three-stream pipeline weigh on a
    short run: there the states-only rate, timed over 3 pieces, came out at 33 GB/s, and a 13B step's update
    behind the step ran faster than the plan it gave (0.60 s against 0.70). ``chunk_elems`` and ``in_flight``:
    ``FP8AdamW``'s ``staged_chunk_elems`` and ``staged_in_flight`` (``bench/staged_update.py`` tries others)."""
    where = device if states_only else torch.device("cpu")
    numel = pieces * chunk_elems * (STATES_ONLY_PIECE if states_only else 1)  # ``FP8AdamW._run``'s pieces
    p = torch.zeros(numel, dtype=param_dtype, device=where, pin_memory=not states_only)
    p.grad = torch.full((numel,), 1e-3, dtype=param_dtype, device=where, pin_memory=not states_only)
    opt = FP8AdamW([p], state_dtype=state_dtype, update_device=None if states_only else device,
                   staged_chunk_elems=chunk_elems, staged_in_flight=in_flight)
    if states_only:
        opt.keep_states_on_host([p])

    def step() -> None:
        opt.step()
        torch.cuda.synchronize(device)

    seconds = _best_seconds(step, repeats)
    per_param = STATE_BYTES[state_dtype] + (0 if states_only else 2 * torch.finfo(param_dtype).bits / 8)
    return numel * per_param / seconds / 1e9


def plan_inputs(model: torch.nn.Module, cfg: RunConfig, cost_model: CostModel, device: torch.device,
                ranks_on_host: int) -> OffloadInputs:
    """The plan's inputs for this rank: sizes from ``model``, rates measured (unless configured)."""
    off = cfg.offload
    layers = list(model.model.layers)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    total = sum(p.numel() for p in model.parameters())
    root = total - sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
    param_bytes = next(model.parameters()).element_size()
    h2d = off.h2d_GBps or measure_h2d_GBps(device, 64 << 20)
    os.makedirs(off.path, exist_ok=True)
    disk_free = shutil.disk_usage(off.path).free
    disk_rate = off.disk_GBps
    if (off.optimizer != "cpu" or off.params == "nvme") and disk_rate is None:
        disk_rate = min(measure_disk_GBps(off.path, 64 << 20))
    # the model was built in host memory, which the placement hands on (to the device, or to ZeRO's host buffers)
    built = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    host = host_budget_bytes(cfg, ranks_on_host, built)
    tokens = cfg.data.max_seq_len
    checkpointing = cfg.model.activation_checkpointing
    kept_bytes = kept_layer_bytes_per_token(model.dims, cfg.model) * tokens if _may_keep_activations(cfg) else 0.0
    update = off.update
    if update != "host" and (device.type != "cuda" or cfg.optim.state_dtype == "fp32"):  # FP8AdamW on CUDA only
        if update == "device":
            raise ValueError(f"offload.update=device stages the update on a CUDA device; this run's device is "
                             f"{device.type}: set offload.update=auto or host")
        update = "host"
    host_states = off.host_states and device.type == "cuda" and cfg.optim.state_dtype != "fp32"
    dtype = next(model.parameters()).dtype
    staged = measure_staged_update_GBps(device, cfg.optim.state_dtype, dtype, states_only=False) \
        if update != "host" else None
    states = measure_staged_update_GBps(device, cfg.optim.state_dtype, dtype, states_only=True) \
        if host_states else None
    return OffloadInputs(
        num_layers=len(layers), layer_params=layer_params, root_params=root, param_bytes=param_bytes,
        state_bytes=STATE_BYTES[cfg.optim.state_dtype], state_share=1.0 / cfg.hdp,
        act_bytes=cost_model.act_bytes_per_token * tokens, device_bytes=cost_model.mem_limit_bytes,
        host_bytes=host, disk_bytes=disk_free, h2d_GBps=h2d, disk_GBps=disk_rate, staged_GBps=staged,
        states_GBps=states,
        # a host rate only where the host may run the update (measuring it compiles the host update)
        adam_Mparams_s=None if update == "device" else
        off.adam_Mparams_s or measure_host_adam_Mparams_s(cfg.optim.state_dtype, total),
        # the cost model prices a checkpointed layer with its recomputation (``default_cost_model``); the plan adds it
        layer_ms=float(cost_model.seq_ms(tokens, 1)) / len(layers) / (4 / 3 if checkpointing else 1.0),
        checkpointing=checkpointing, layer_act_bytes=kept_bytes, working_bytes=cost_model.mem_static_bytes,
        prefetch=off.prefetch,
        norm_Mparams_s=measure_host_norm_Mparams_s(dtype),
        resident_layers=off.resident_value, optimizer=off.optimizer, zero_stage=cfg.parallel.zero_stage,
        params=off.params, staging_bytes=None if device.type == "cuda" else 0,  # pinned staging: CUDA only
        update=update, host_states=host_states)


def host_shard_update(cfg: RunConfig, device: torch.device) -> torch.device | None:
    """Where ZeRO-3's host shards are updated (``offload.update``): staged through ``device`` (FP8AdamW on CUDA;
    ``auto`` takes it, which at 8B moved 2.8B parameters in 0.42 s against 4.8 s predicted for the host's update
    on an H100 machine), or on the host (None)."""
    stageable = device.type == "cuda" and cfg.optim.state_dtype != "fp32"
    if cfg.offload.update == "device" and not stageable:
        raise ValueError(f"offload.update=device stages FP8AdamW's update on a CUDA device; this run's device is "
                         f"{device.type} with optim.state_dtype={cfg.optim.state_dtype}: "
                         "set offload.update=auto or host")
    return device if stageable and cfg.offload.update != "host" else None


def host_budget_bytes(cfg: RunConfig, ranks_on_host: int, built: float = 0.0) -> float:
    """Host memory one rank may fill: ``offload.host_mem_gb``, else its share of 80% of free RAM plus ``built``,
    the bytes of the model just built on the host, which the placement hands on."""
    if cfg.offload.host_mem_gb:
        return cfg.offload.host_mem_gb * 2**30
    return HOST_SHARE * (available_host_bytes() + built) / ranks_on_host


def check_host_shards_fit(shard_numel: int, param_bytes: int, cfg: RunConfig, ranks_on_host: int,
                          built: float = 0.0) -> None:
    """Refuse, before the first step, host shards that this host's memory cannot hold: the rank's weights and
    gradients (``param_bytes`` each per element) and the optimizer's states, over every rank of the host
    (``built``: as for ``host_budget_bytes``)."""
    need = shard_numel * (2 * param_bytes + STATE_BYTES[cfg.optim.state_dtype])
    have = host_budget_bytes(cfg, ranks_on_host, built)
    if need > have:
        raise ValueError(f"ZeRO-3's host shards need {need / 2**30:.2f} GiB of host memory per rank (weights, "
                         f"gradients and {cfg.optim.state_dtype} states of {shard_numel / 1e9:.2f}B parameters), "
                         f"but {have / 2**30:.2f} GiB are available to each of this host's {ranks_on_host} ranks; "
                         "add ranks (more HDP shards), lower optim.state_dtype, set optim.master_weights=false, "
                         "or raise offload.host_mem_gb if the host has more")


def _may_keep_activations(cfg: RunConfig) -> bool:
    """Whether a resident layer may drop its checkpointing: where ``offload.keep_activations`` allows, and not
    where activation offload scopes every layer as checkpointed, nor where tiled layers count their working
    set as a checkpointed layer's."""
    return cfg.offload.keep_activations and cfg.offload.target == "none" and not cfg.model.layer_tile_tokens


def ranks_on_this_host() -> int:
    """How many ranks of the run share this machine's memory (``LOCAL_WORLD_SIZE`` under torchrun; otherwise
    counted from every rank's host name, a collective)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if not dist.is_initialized():
        return 1
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return names.count(socket.gethostname())


def device_owned(model: torch.nn.Module, resident_layers: int) -> list[torch.nn.Parameter]:
    """The parameters that live on the device for the whole run: the root's (everything outside the decoder
    layers) and those of the first ``resident_layers`` layers (the plan's resident and host-state layers)."""
    layers = list(model.model.layers)
    streamed = {id(p) for layer in layers[resident_layers:] for p in layer.parameters()}
    return [p for p in model.parameters() if id(p) not in streamed]


def apply_param_offload(model: torch.nn.Module, cfg: RunConfig, cost_model: CostModel, device: torch.device,
                        param_groups: list[dict], make_optimizer: MakeOptimizer, *,
                        device_group: dist.ProcessGroup | None = None, host_group: dist.ProcessGroup | None = None,
                        host_allocate: Callable[[int, torch.dtype], torch.Tensor] | None = None
                        ) -> tuple[PlacedZero, OffloadPlan, CostModel]:
    """Plan and report the placement, move the device's share there, build the optimizer over both places
    (``PlacedZero`` over ``param_groups``, ``make_optimizer`` over the pieces of both) and attach the streaming;
    returns the optimizer, the plan and the cost model of what the device now holds (the plan's weights,
    gradients, states and streaming buffers instead of the whole model). ``model`` was built on the host."""
    plan = plan_offload(plan_inputs(model, cfg, cost_model, device, ranks_on_this_host()))
    log.info("%s", plan.report())
    layers = list(model.model.layers)
    on_device = plan.resident_layers + plan.host_state_layers
    kept = {id(p) for p in device_owned(model, on_device)}
    states_away = {id(p) for layer in layers[plan.resident_layers:on_device] for p in layer.parameters()}
    # the device part's flat buffers are made on the device and filled from the host parameters
    optimizer = PlacedZero(param_groups, lambda p: id(p) in kept, make_optimizer, stage=cfg.parallel.zero_stage,
                           device=device, device_group=device_group, host_group=host_group,
                           host_allocate=host_allocate, states_on_host=lambda p: id(p) in states_away)
    with torch.no_grad():  # what ZeRO did not move: frozen parameters of the device's share, buffers (rotary tables)
        for p in device_owned(model, on_device):
            p.data = p.data.to(device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    inner = optimizer.optimizer
    if plan.optimizer == "nvme":
        from seqmesh.trainer.optim.state_files import swap_states_to_files

        if not isinstance(inner, FP8AdamW):
            raise ValueError(f"the offload plan puts the optimizer states on NVMe (they need {plan.disk_bytes / 2**30:.1f}"
                             " GiB there), which FP8AdamW's states support and torch's AdamW (optim.state_dtype=fp32) "
                             "does not: set optim.state_dtype to fp8, int8 or bf16, or raise offload.host_mem_gb")
        swap_states_to_files(inner, cfg.offload.path, engine=cfg.offload.engine)
    if plan.update == "device":
        inner.update_device = device
    # the first resident layers keep their activations: their checkpoint wrappers come off
    remove_activation_checkpointing(model.model.layers, plan.kept_layers)
    kept = plan.kept_layers * kept_layer_bytes_per_token(model.dims, cfg.model)
    layers = list(model.model.layers)  # the modules that run now (hooks on a removed wrapper would never fire)
    attach_host_states(model, layers[plan.resident_layers:on_device], optimizer)
    if optimizer.host_part is not None:
        attach_param_offload(model, layers[on_device:], optimizer.host_part, device,
                             prefetch=cfg.offload.prefetch, pin_masters=cfg.offload.params == "cpu",
                             leading=layers[:on_device])
    # What the device holds of the model states joins the cost model's static bytes (built without them,
    # ``build_cost_model(params_offloaded=True)``; its tp x pp share is 1 x 1 here), and the activations of the
    # layers that keep them its bytes per token.
    return optimizer, plan, dataclasses.replace(cost_model,
                                                mem_static_bytes=cost_model.mem_static_bytes + plan.device_bytes,
                                                mem_bytes_per_token=cost_model.mem_bytes_per_token + kept)


def close_param_offload(model: torch.nn.Module, optimizer: ZeroOptimizer | PlacedZero) -> None:
    """The end of a run (or of its failure): parameters back on their host masters, the worker thread stopped,
    the optimizer's state files deleted. A no-op without parameter offload. Explicit, because a worker process
    may end with ``os._exit``, which runs no finalizer."""
    detach_param_offload(model)
    detach_host_states(model)
    files = getattr(getattr(optimizer, "optimizer", None), "state_files", None)
    if files is not None:
        files.close()
