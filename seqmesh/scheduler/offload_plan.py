"""Where parameters, gradients and optimizer states live (GPU, host, NVMe), from sizes, capacities and rates.

A Fuyou-style placement for ``offload.params=cpu|nvme``, decided once before the first step:

1. Device. The root (embeddings, final norm, head) lives on the device with its gradients and
   optimizer states; the activation working set of the longest micro-batch (``act_bytes``) and the
   streaming buffers (``1 + prefetch`` layers of weights, one layer of gradients) are reserved; every
   decoder layer that still fits with its weights, gradients and states is *resident* (lives on the
   device only: ``parallel/placed_zero.py``), the rest are *streamed*.
2. Host. The streamed layers' master weights and gradients live in host memory (ZeRO's flat buffers:
   the weights, the accumulated gradients and, except for ZeRO-1 on one rank, the reduced gradient
   shard). With ``offload.params=nvme`` these buffers are memory-mapped files under ``offload.path``
   instead (the page cache holds what RAM allows) and streamed layers arrive at ``min(PCIe, disk)``.
   Their optimizer states go to the host when they fit beside them, else to NVMe
   (``offload.optimizer=auto``).
3. Disk. Whatever lives on NVMe needs its bytes free under ``offload.path``.

The placement is disjoint, so the model is bounded by device, host and disk memory together, and
the more layers the device keeps the less the host and the link carry.

Under activation checkpointing the resident layers that fit in the device memory the placement leaves
keep their activations instead of being recomputed (``kept_layers``; the first ones, a recomputation
fewer each): MFU does not count recomputation, so that memory is worth a layer's forward each.

A placement that cannot hold the model raises ``OffloadPlanError`` naming the bytes needed, the
bytes available and the settings that change either, before any step runs.

The step time it predicts (reported at start-up) is the compute of one step plus what is not
hidden: a streamed layer's weights cross PCIe twice per micro-batch (forward and backward) and its
gradients once; each crossing hides behind the compute of the layer in flight, so each layer's
exposed time is ``max(0, transfer - compute)``, with backward's two crossings (weights in,
gradients out) priced one after the other at the host-to-device rate (an upper bound: the link is
full duplex, though both directions at once run slower than one alone). The optimizer step does not
overlap backward (global-norm clipping and the non-finite check need every gradient first). Before it
comes the host's sum of squares of the streamed layers' gradients, at a rate measured at start-up
(``grad_norm_ms``, ``norm_Mparams_s``: on an H100's host this pass, unpriced and single-threaded, took
7.7 s of a 9.0 s step of a 2.8B model). On one rank's ZeRO-1 the host sums each layer's squares as its
last gradients land, during the backward of the layers after it, so only what the rest of backward
cannot cover is priced (at least the last streamed layer's own pass); under sharded ZeRO it follows the
reduction, whole. The device's own parameters (root and resident layers) are
updated there by the fused kernel at memory speed, milliseconds, not priced. The clip's scaling
has no pass of its own: the update scales each piece as it reads it (``FP8AdamW.scale_grads_in_step``).
On one rank that update runs behind the next step's forward, in layer order (the resident layers read none
of it, and each streamed layer waits for its own chunks only), so all but the last layer's forward can
cover it, and only the rest is priced (``optimizer_hidden_ms``; an estimate: the streamed layers' fetches
share the link with the update and are not charged to it). The streamed layers' update runs where it is faster (``offload.update=auto``): on the host at the measured CPU rate, or
on the device, each chunk of weights, gradients and states copied over and back (10 bytes per parameter
with bf16 weights and fp8 states) at the measured link rate; states on NVMe are read and written during
a host update, overlapped chunk by chunk with the CPU arithmetic, so it takes the longer of the two
(weights and gradients in mapped files are read and written once by the step too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

GB = 1e9


def staging_bytes_for(layer_bytes: int) -> int:
    """Pinned host bytes for gradients on their way to the host: two layers' worth (one landing while the next
    is copied), each up to 1/8 larger in the pool's size classes, and at least 1 GiB."""
    return max(1 << 30, -(-9 * 2 * layer_bytes // 8))


class OffloadPlanError(ValueError):
    """The model does not fit the memory and disk the settings allow."""


@dataclass(frozen=True)
class OffloadInputs:
    """What the plan is made of. Bytes are per rank; rates in GB/s (``adam_Mparams_s``: the CPU optimizer's
    parameters per second, in millions); ``layer_ms``: one layer's forward + backward of the longest
    micro-batch on the device (without the recomputation, which streaming and checkpointing add: 1/3 more per
    recomputed layer)."""

    num_layers: int
    layer_params: int  # weights of one decoder layer (this rank's TP shard)
    root_params: int  # everything outside the layers
    param_bytes: int  # bytes per weight (and per gradient): 4 fp32 masters, 2 bf16 without masters
    state_bytes: float  # optimizer bytes per parameter this rank steps (after ZeRO sharding)
    state_share: float  # the share of the parameters this rank steps (1 / HDP under ZeRO-1/2)
    act_bytes: float  # activation working set of the longest micro-batch on the device
    device_bytes: float  # device memory the run may use
    host_bytes: float  # host memory this rank may use
    disk_bytes: float | None  # free bytes under offload.path (None: not measured)
    h2d_GBps: float
    disk_GBps: float | None
    adam_Mparams_s: float | None  # None only with update=device (the host never runs it)
    layer_ms: float
    norm_Mparams_s: float | None = None  # the host's sum of squares of gradients (clip norm); None: not priced
    micro_batches: int = 1
    prefetch: int = 2
    resident_layers: int | None = None  # None: as many as fit
    optimizer: str = "auto"  # auto | cpu | nvme
    staging_bytes: int | None = None  # pinned staging of gradients in flight (None: ``staging_bytes_for`` a layer)
    zero_stage: int = 1
    params: str = "cpu"  # cpu: weights and gradients in host memory | nvme: in memory-mapped files on the disk
    update: str = "host"  # where the optimizer's update runs: host | device (staged over the link) | auto (faster)
    checkpointing: bool = False  # the run checkpoints its layers (the resident ones recompute too, where they may)
    layer_act_bytes: float = 0.0  # device bytes a layer that is not recomputed keeps beyond its checkpointed input
    working_bytes: float = 0.0  # the step's fixed working sets beside the activations (loss and MLP tiles)
    host_states: bool = False  # layers may keep weights and gradients on the device and their states on the host
    # the staged update's own rates into the device, in the bytes the plan counts (None: the copy rate h2d_GBps):
    staged_GBps: float | None = None  # a streamed layer's: weights, gradients and states
    states_GBps: float | None = None  # a host-state layer's: states only


@dataclass(frozen=True)
class OffloadPlan:
    params: str  # cpu | nvme
    resident_layers: int
    streamed_layers: int
    optimizer: str  # cpu | nvme
    device_bytes: float  # weights, gradients and streaming buffers the device holds (activations not included)
    host_bytes: float
    disk_bytes: float
    compute_ms: float
    exposed_transfer_ms: float
    optimizer_ms: float
    grad_norm_ms: float = 0.0  # the host's pass over its gradients for the global norm
    host_free: float = 0.0  # host memory the plan leaves of its budget (activation offload's buffers get it)
    update: str = "host"  # host | device: where the optimizer's update runs
    optimizer_hidden_ms: float = 0.0  # the part of ``optimizer_ms`` behind the next step's forward
    kept_layers: int = 0  # device layers that keep their activations (not recomputed), in the memory left
    host_state_layers: int = 0  # after the resident ones: weights and gradients on the device, states on the host
    rates_GBps: dict[str, float] = field(default_factory=dict)  # the rates it priced the link's traffic at

    @property
    def step_ms(self) -> float:
        return self.compute_ms + self.exposed_transfer_ms + self.grad_norm_ms + self.optimizer_ms - \
            self.optimizer_hidden_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step_ms": self.step_ms}

    def report(self) -> str:
        gib = 2**30
        kept = f" ({self.kept_layers} of those on the device not recomputed)" if self.kept_layers else ""
        return (f"offload plan: {self.resident_layers} decoder layers resident on the device, {self.host_state_layers} "
                f"with their optimizer states on the host{kept}, {self.streamed_layers} streamed from {'host memory' if self.params == 'cpu' else 'NVMe (mapped files)'}; optimizer states "
                f"on {self.optimizer}; device {self.device_bytes / gib:.2f} "
                f"GiB of weights and gradients, host {self.host_bytes / gib:.2f} GiB, disk {self.disk_bytes / gib:.2f} GiB"
                f"; predicted step {self.step_ms:.0f} ms = compute {self.compute_ms:.0f} + exposed transfers "
                f"{self.exposed_transfer_ms:.0f} + gradient norm "
                f"{self.grad_norm_ms:.0f} + optimizer "
                f"{self.optimizer_ms:.0f} (update on the {self.update}) - {self.optimizer_hidden_ms:.0f} of it behind "
                "the next forward" + (f"; link GB/s: {', '.join(f'{k} {v:.1f}' for k, v in self.rates_GBps.items())}"
                                      if self.rates_GBps else ""))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _host_pass_ms(elements: float, Mparams_s: float | None) -> float:
    """One host pass over ``elements`` at a measured rate (None: not measured, not priced)."""
    return elements / (Mparams_s * 1e6) * 1e3 if Mparams_s else 0.0


def plan_offload(x: OffloadInputs) -> OffloadPlan:
    """The placement and its predicted step time; ``OffloadPlanError`` when the settings cannot hold the model.

    Every count of host-state layers (``x.host_states``; none otherwise) is tried with as many resident layers
    as then fit, and the fastest placement wins (the fewer host-state layers on a tie); a model no placement
    holds gets the error of the placement without them."""
    if x.optimizer not in ("auto", "cpu", "nvme"):
        raise ValueError(f"offload.optimizer={x.optimizer!r} is not known; choose auto, cpu or nvme")
    if x.update not in ("auto", "host", "device"):
        raise ValueError(f"offload.update={x.update!r} is not known; choose auto, host or device")
    if x.params not in ("cpu", "nvme"):
        raise ValueError(f"offload.params={x.params!r} is not planned here; choose cpu or nvme")
    for key in ("h2d_GBps", "layer_ms") + (() if x.update == "device" else ("adam_Mparams_s",)):
        if not (getattr(x, key) or 0) > 0:
            raise ValueError(f"offload plan: {key}={getattr(x, key)!r} must be > 0")
    first_error: OffloadPlanError | None = None
    best: OffloadPlan | None = None
    for host_state in range(x.num_layers + 1 if x.host_states else 1):
        if x.resident_layers is not None and x.resident_layers + host_state > x.num_layers:
            break
        try:
            plan = _placement(x, host_state)
        except OffloadPlanError as e:
            first_error = first_error or e
            continue
        if best is None or plan.step_ms < best.step_ms:
            best = plan
    if best is None:
        assert first_error is not None
        raise first_error
    return best


def _placement(x: OffloadInputs, host_state: int) -> OffloadPlan:
    """The placement with ``host_state`` layers whose states live on the host (after the resident ones), as many
    resident layers as fit (or ``x.resident_layers``) and the rest streamed, and its predicted step time."""
    layer_bytes = x.layer_params * x.param_bytes
    # Weights and gradients: the accumulated gradients (full), and beside them this rank's reduced shard unless
    # one buffer is both (ZeRO-1 on one rank); ZeRO-2 frees per-parameter gradients only after the reduction.
    grad_copies = 1.0 if x.zero_stage == 1 and x.state_share == 1.0 else 1.0 + x.state_share
    weights_grads = x.param_bytes * (1 + grad_copies)
    layer_states = x.layer_params * x.state_share * x.state_bytes
    per_param = weights_grads + x.state_share * x.state_bytes  # weights, gradients, states
    # Device: the root's and every resident layer's weights, gradients and states (they live there only), the
    # host-state layers' weights and gradients, the activations, and 1 + prefetch streamed layers of weights and
    # one layer of gradients (backward's, on its way to the host).
    held = x.root_params * per_param + host_state * x.layer_params * weights_grads  # root, host-state layers
    fixed = held + x.act_bytes
    per_layer = x.layer_params * per_param
    stream = (1 + x.prefetch) * layer_bytes + layer_bytes
    free = x.num_layers - host_state
    if x.device_bytes - fixed - free * per_layer >= 0:
        fits = free  # every other layer resident: nothing streams
    else:
        room = x.device_bytes - fixed - stream
        fits = max(0, min(free - 1, math.floor(room / per_layer))) if room > 0 else -1
    if fits < 0 or (x.resident_layers is not None and x.resident_layers > fits):
        want = x.resident_layers or 0
        need = fixed + stream + want * per_layer
        kept_whole = f", {host_state} layers' weights and gradients" if host_state else ""
        raise OffloadPlanError(
            f"offload.params=cpu: the device needs {_gib(need)} (root weights, gradients and optimizer states "
            f"{_gib(x.root_params * per_param)}, activations {_gib(x.act_bytes)}, streaming buffers "
            f"{_gib(stream)}{kept_whole}{f', {want} resident layers' if want else ''}) but may use "
            f"{_gib(x.device_bytes)}; lower offload.resident_layers, offload.prefetch or data.max_seq_len, or raise "
            "memory.limit_gb")
    resident = fits if x.resident_layers is None else x.resident_layers
    streamed = x.num_layers - resident - host_state
    device = held + resident * per_layer + (stream if streamed else 0)

    # Host: the streamed layers' weights and gradients (ZeRO's flat buffers) and their states, and the host-state
    # layers' states (pinned memory, always: they are staged over the link every step).
    host_params = streamed * x.layer_params
    weights = host_params * x.param_bytes * (1 + grad_copies)
    staging = 0 if not streamed else x.staging_bytes if x.staging_bytes is not None else staging_bytes_for(layer_bytes)
    masters = (weights if x.params == "cpu" else 0.0) + staging + host_state * layer_states
    states = host_params * x.state_share * x.state_bytes
    place = x.optimizer
    if place == "auto":
        place = "cpu" if masters + states <= x.host_bytes else "nvme"
    host = masters + (states if place == "cpu" else 0)
    if host > x.host_bytes:
        fixes = "raise offload.host_mem_gb (or free host memory)"
        if place == "cpu":
            fixes += ", set offload.optimizer=nvme"
        if x.param_bytes == 4:
            fixes += ", train bf16 weights without master copies (optim.master_weights=false)"
        raise OffloadPlanError(
            f"offload.params=cpu: host memory must hold {_gib(host)} for the {streamed} streamed layers (weights and "
            f"gradients {_gib(masters)}{f', optimizer states {_gib(states)}' if place == 'cpu' else ''}) but "
            f"offload.host_mem_gb allows {_gib(x.host_bytes)}; {fixes}, or spread the states over more ranks "
            "(parallel.zero_stage=1 with more workers)")
    disk = (states if place == "nvme" else 0.0) + (weights if x.params == "nvme" else 0.0)
    if disk and x.disk_bytes is not None and disk > x.disk_bytes:
        what = " and ".join(name for name, on in (("weights and gradients (offload.params=nvme)", x.params == "nvme"),
                                                  ("optimizer states (offload.optimizer=nvme)", place == "nvme")) if on)
        raise OffloadPlanError(
            f"the {what} need {_gib(disk)} under offload.path but only {_gib(x.disk_bytes)} are free there; point "
            "offload.path at a larger volume, choose a smaller optim.state_dtype (fp8: 2 bytes per parameter), "
            "keep them in host memory (offload.params=cpu, offload.optimizer=cpu), or spread the states over more "
            "ranks")

    # The layers on the device keep their activations in the memory the placement leaves (with checkpointing:
    # each one fewer recomputation); every other checkpointed layer, and every streamed one, is recomputed.
    on_device = resident + host_state
    left = x.device_bytes - device - x.act_bytes - x.working_bytes
    kept = min(on_device, math.floor(left / x.layer_act_bytes)) if x.checkpointing and x.layer_act_bytes > 0 \
        and left > 0 else 0
    recomputed = streamed + (on_device - kept if x.checkpointing else 0)
    compute = x.micro_batches * (x.num_layers + recomputed / 3) * x.layer_ms
    fwd_ms, bwd_ms = x.layer_ms / 3, x.layer_ms * 2 / 3 + x.layer_ms / 3
    link = x.h2d_GBps if x.params == "cpu" else min(x.h2d_GBps, x.disk_GBps or x.h2d_GBps)
    load_ms = layer_bytes / (link * GB) * 1e3
    exposed = x.micro_batches * streamed * (max(0.0, load_ms - fwd_ms) + max(0.0, 2 * load_ms - bwd_ms))
    stepped = host_params * x.state_share  # the device's own parameters update there, in milliseconds (unpriced)
    host_update = stepped / (x.adam_Mparams_s * 1e6) * 1e3 if x.adam_Mparams_s else math.inf
    # staged on the device a chunk at a time: weight, gradient and states in, weight and states out; the two
    # directions overlap (``adam_update.staged_step``), so the larger one (in) sets the time
    device_update = stepped * (2 * x.param_bytes + x.state_bytes) / ((x.staged_GBps or x.h2d_GBps) * GB) * 1e3
    if x.update == "device" and place == "nvme" and streamed:
        raise OffloadPlanError("offload.update=device stages optimizer states held in host memory, and the plan puts "
                               "them on NVMe; set offload.update=auto or host, or offload.optimizer=cpu with more "
                               "host memory (offload.host_mem_gb)")
    update = "device" if x.update == "device" or (x.update == "auto" and place == "cpu"
                                                  and device_update < host_update) else "host"
    adam = (device_update if update == "device" else host_update) if streamed else 0.0
    if disk:  # every byte on the disk is read and written once by the step (through the page cache for weights)
        disk_rate = x.disk_GBps or x.h2d_GBps
        adam = max(adam, 2 * disk / (disk_rate * GB) * 1e3)
    # a host-state layer's update stages its states only: in and out at once, each the states' bytes
    states_ms = layer_states / ((x.states_GBps or x.h2d_GBps) * GB) * 1e3
    optimizer = adam + host_state * states_ms
    norm = _host_pass_ms(stepped, x.norm_Mparams_s)
    if streamed and x.zero_stage == 1 and x.state_share == 1.0:  # layer by layer behind the rest of backward
        norm = max(norm / streamed, norm - (x.num_layers - 1) * bwd_ms)
    hidden = 0.0
    if x.state_share == 1.0 and optimizer:
        # One rank's update runs behind the next step's forward (``FP8AdamW.overlap_updates``) in layer order,
        # the host-state layers' first, a streamed layer's fetch after its update on the same link; each layer's
        # forward waits for its own part only. The wait is the furthest any layer's update runs past the forward
        # that reaches it.
        each = [states_ms] * host_state + \
            [adam / max(streamed, 1) + (load_ms if update == "device" else 0.0)] * streamed
        done, late = 0.0, 0.0
        for k, ms in enumerate(each):
            done += ms
            late = max(late, done - (resident + k) * fwd_ms)
        hidden = max(0.0, optimizer - late)
    return OffloadPlan(x.params, resident, streamed, place, device, host, disk, compute, exposed, optimizer,
                       grad_norm_ms=norm, host_free=x.host_bytes - host, update=update, optimizer_hidden_ms=hidden,
                       kept_layers=kept, host_state_layers=host_state, rates_GBps=_rates(x))


def _rates(x: OffloadInputs) -> dict[str, float]:
    """The link's rates the plan used: the copy's and, where measured, the staged updates'."""
    measured = {"staged update": x.staged_GBps, "states update": x.states_GBps}
    return {"copy": x.h2d_GBps, **{k: v for k, v in measured.items() if v is not None}}
