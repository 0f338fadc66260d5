"""Typed schema of a seqmesh run, and its validation.

Hydra composes YAML (conf/) into a dict once, in the driver; this module turns that dict into
frozen dataclasses and checks every value *before any worker starts*, so a typo fails in a second
with the key's name and the allowed values instead of minutes later inside a Ray worker.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from seqmesh.parallel.local_sgd import OuterConfig
from seqmesh.scheduler.links import ClusterFileError, load_cluster
from seqmesh.trainer.data.build import DataConfig


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


# Keys that moved (old dotted key -> new one). Given now (command line, a dict), they fail naming the new
# key; in a resumed run's saved config.yaml they are read as the new key, with a note
# (seqmesh/launch/config.py), so runs saved before the move still resume.
MOVED_KEYS = {
    "scheduler.mem_limit_gb": "memory.limit_gb",
    "scheduler.mem_headroom": "memory.headroom",
    "offload.loss_tile_tokens": "model.loss_tile_tokens",
    "offload.mlp_tile_tokens": "model.mlp_tile_tokens",
}


def moved_key_error(old: str) -> ConfigError:
    """The error for a key of ``MOVED_KEYS`` given under its old name."""
    new = MOVED_KEYS[old]
    return ConfigError(f"{old} moved to {new}; write {new}=... instead")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: Any, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if zero_ok else 'positive'} number")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family model; either built from these sizes or read from an HF directory (``hf_path``)."""

    name: str = "tiny"
    arch: str = "llama"
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int = 131072
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    hf_path: str | None = None
    dtype: str = "fp32"
    # The compute schedule (what is recomputed, how many tokens one kernel call covers); none of these
    # change the result beyond rounding.
    activation_checkpointing: bool = False
    mlp_tile_tokens: int = 0   # the MLP a tile of this many tokens at a time (ALST's TiledMLP; 0: off)
    loss_tile_tokens: int = 0  # the loss a tile at a time, logits never whole (0: off)
    # each decoder layer a tile of this many tokens at a time: its per-token parts, and attention too a tile
    # of queries at a time where it runs on this process (trainer/tiled_layer.py's TiledDecoderLayer; 0: off)
    layer_tile_tokens: int = 0
    # torch: the loss above; liger: Liger-Kernel's fused linear + cross-entropy (CUDA), chunks of
    # loss_tile_tokens (or 8192) tokens, three head products instead of the tiled loss's four.
    loss_kernel: str = "torch"
    # bf16: the linears compute in model.dtype like the rest; fp8: the decoder layers' large linears in
    # float8 (torchao's float8 training, tensorwise scales; CUDA, model.dtype=bf16), LM head kept in bf16.
    linear_dtype: str = "bf16"
    # each decoder layer's per-token halves around its attention core compiled by torch.compile (Inductor
    # fuses the norms, casts, residual adds, RoPE and SwiGLU around the GEMMs; trainer/compile_layers.py)
    compile_layers: bool = False
    # The residual stream (the embedding's output, each layer's input and output): fp32, as autocast over fp32
    # weights leaves it, or bf16 as Megatron-LM keeps it by default (no fp32_residual_connection) and as models
    # with bf16 weights do: half the bytes of every layer's saved input and of the stream's memory passes.
    # Needs model.dtype=bf16 (under fp32 the stream is fp32).
    residual_dtype: str = "fp32"

    def validate(self) -> None:
        _choice("model.arch", self.arch, ("llama", "qwen2"))
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))
        _choice("model.loss_kernel", self.loss_kernel, ("torch", "liger"))
        _choice("model.linear_dtype", self.linear_dtype, ("bf16", "fp8"))
        _choice("model.compile_layers", self.compile_layers, (True, False))
        if self.compile_layers and self.mlp_tile_tokens:
            raise ConfigError(f"model.compile_layers=true with model.mlp_tile_tokens={self.mlp_tile_tokens}: the tiled "
                              "MLP loops over tiles in Python inside an autograd function that recomputes them in "
                              "backward, which Dynamo cannot trace into the layer's graph (it breaks the graph there "
                              "and recompiles for every new token count); tile whole layers instead "
                              "(model.layer_tile_tokens, whose tiles run the compiled parts), or set "
                              "model.mlp_tile_tokens=0 or model.compile_layers=false")
        _choice("model.residual_dtype", self.residual_dtype, ("fp32", "bf16"))
        if self.residual_dtype == "bf16" and self.dtype != "bf16":
            raise ConfigError(f"model.residual_dtype=bf16 with model.dtype={self.dtype}: a bf16 residual stream is a "
                              "choice under bf16 autocast; set model.dtype=bf16 or model.residual_dtype=fp32")
        if self.linear_dtype == "fp8" and self.dtype != "bf16":
            raise ConfigError(f"model.linear_dtype=fp8 with model.dtype={self.dtype}: float8 linears train with bf16 "
                              "autocast around them; set model.dtype=bf16")
        _positive("model.mlp_tile_tokens", self.mlp_tile_tokens, zero_ok=True)
        _positive("model.loss_tile_tokens", self.loss_tile_tokens, zero_ok=True)
        _positive("model.layer_tile_tokens", self.layer_tile_tokens, zero_ok=True)
        for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _positive(f"model.{k}", getattr(self, k))
        if self.hf_path is None and self.hidden_size % self.num_heads and self.head_dim is None:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                              f"{self.num_heads}; change one, or set model.head_dim explicitly")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads="
                              f"{self.num_kv_heads} (grouped-query attention)")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and attention are split; the mesh is PP x HDP x TP (shared/DESIGN.md)."""

    tp: int = 1
    pp: int = 1
    pp_virtual: int = 1
    sp_mode: str = "ulysses"
    ulysses_degree: int | None = None
    attn_backend: str = "auto"
    warm_attention: bool = True
    zero_stage: int = 0
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 25.0
    # ZeRO-3: reduce-scatter a layer's gradient in every backward ("microbatch") or once after the step's
    # last micro-batch ("step", a full gradient of the rank's layers kept meanwhile); auto: step under PP.
    zero3_grad_reduce: str = "auto"
    # CO2 local updates (seqmesh/parallel/local_sgd.py): 0 off; else outer sync every N optimizer steps
    local_sgd_every: int = 0
    local_sgd_groups: int = 2
    local_sgd_outer_lr: float = 1.0
    local_sgd_outer_momentum: float = 0.0
    local_sgd_staleness_penalty: float = 0.0
    local_sgd_outer_clip: float = 0.0

    @property
    def zero3_reduce_per_step(self) -> bool:
        """Whether ZeRO-3 reduce-scatters layer gradients once per step (``zero3_grad_reduce``; auto: under PP)."""
        return self.zero3_grad_reduce == "step" or self.zero3_grad_reduce == "auto" and self.pp > 1

    def validate(self) -> None:
        _positive("parallel.tp", self.tp)
        _positive("parallel.local_sgd_every", self.local_sgd_every, zero_ok=True)
        if self.local_sgd_every:
            if self.local_sgd_groups < 2:
                raise ConfigError(f"parallel.local_sgd_groups={self.local_sgd_groups}: local updates need at least 2 "
                                  "node groups; set it to the number of nodes (or slow-link islands)")
            if self.tp > 1 or self.pp > 1 or self.zero_stage == 3:
                raise ConfigError(f"parallel.local_sgd_every={self.local_sgd_every} with tp={self.tp}, pp={self.pp}, "
                                  f"zero_stage={self.zero_stage}: local updates are built for tp=1, pp=1 and ZeRO 0-2; "
                                  "use that layout or set parallel.local_sgd_every=0")
            try:
                OuterConfig(self.local_sgd_every, self.local_sgd_outer_lr, self.local_sgd_outer_momentum,
                            self.local_sgd_staleness_penalty, self.local_sgd_outer_clip)
            except ValueError as e:
                raise ConfigError(f"parallel.local_sgd_*: {e}") from None
        _positive("parallel.grad_bucket_mb", self.grad_bucket_mb)
        _choice("parallel.overlap_grad_reduce", self.overlap_grad_reduce, (True, False))
        _positive("parallel.pp", self.pp)
        _positive("parallel.pp_virtual", self.pp_virtual)
        if self.pp_virtual > 1 and self.pp == 1:
            raise ConfigError(f"parallel.pp_virtual={self.pp_virtual} interleaves pipeline stages, which needs "
                              "parallel.pp > 1; set parallel.pp_virtual=1 or raise parallel.pp")
        _choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("parallel.zero3_grad_reduce", self.zero3_grad_reduce, ("auto", "microbatch", "step"))
        if self.zero3_grad_reduce != "auto" and self.zero_stage != 3:
            raise ConfigError(f"parallel.zero3_grad_reduce={self.zero3_grad_reduce} applies to parameter sharding "
                              f"only, but parallel.zero_stage={self.zero_stage}; set parallel.zero3_grad_reduce=auto "
                              "or parallel.zero_stage=3")
        _choice("parallel.sp_mode", self.sp_mode, ("ulysses", "ring", "tokenring", "hybrid", "auto"))
        _choice("parallel.attn_backend", self.attn_backend, ("auto", "flash_attn", "cudnn", "torch_flash", "cpu_flash", "math"))
        _choice("parallel.warm_attention", self.warm_attention, (True, False))


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step grouping: ``static`` (fixed SP degree ``sp``) or ``adaptive`` (re-planned every step)."""

    policy: str = "static"
    sp: int = 1
    group_sizes: tuple[int, ...] | None = None
    time_limit_s: float = 0.2
    cost_model: str | None = None
    refine_every: int = 0
    lookahead: int = 1
    cluster: str | None = None  # cluster file with link classes (seqmesh/scheduler/links.py; conf/clusters/)

    def validate(self) -> None:
        _choice("scheduler.policy", self.policy, ("static", "adaptive"))
        if self.cluster is not None:
            try:
                load_cluster(self.cluster)  # in the driver, before any worker starts
            except ClusterFileError as e:
                raise ConfigError(f"scheduler.cluster: {e}") from None
        _positive("scheduler.sp", self.sp)
        _positive("scheduler.time_limit_s", self.time_limit_s)
        _positive("scheduler.refine_every", self.refine_every, zero_ok=True)
        if self.lookahead < 0:
            raise ConfigError(f"scheduler.lookahead={self.lookahead} must be >= 0")


@dataclass(frozen=True)
class MemoryConfig:
    """Per-device memory the run may use: the planner's budget, and on CUDA the allocator's cap too."""

    limit_gb: float | None = None  # null: the device's memory
    headroom: float = 0.1  # share of the limit the planner leaves free (allocator slack, transients)

    @property
    def limit_bytes(self) -> int | None:
        return None if self.limit_gb is None else int(self.limit_gb * 2**30)

    def validate(self) -> None:
        if self.limit_gb is not None:
            _positive("memory.limit_gb", self.limit_gb)
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"memory.headroom={self.headroom} must be a fraction in [0, 1): the share "
                              "of the memory limit the planner leaves free (e.g. 0.1)")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    state_dtype: str = "fp32"
    nonfinite: str = "abort"  # a NaN/Inf loss or gradient norm: abort | skip (seqmesh/trainer/guards.py)
    # false: the weights themselves are bf16 (no fp32 master copy), updated with FP8AdamW's stochastic rounding;
    # with fp8 states the whole training state is 6 bytes per parameter (weights, gradients, moments)
    master_weights: bool = True

    def validate(self) -> None:
        _choice("optim.name", self.name, ("adamw",))
        _choice("optim.master_weights", self.master_weights, (True, False))
        if not self.master_weights and self.state_dtype == "fp32":
            raise ConfigError("optim.master_weights=false keeps bf16 weights, which only FP8AdamW updates (with "
                              "stochastic rounding); optim.state_dtype=fp32 is torch's AdamW: set optim.state_dtype "
                              "to fp8, int8 or bf16")
        _choice("optim.nonfinite", self.nonfinite, ("abort", "skip"))
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("optim.state_dtype", self.state_dtype, ("fp32", "bf16", "int8", "fp8"))
        _positive("optim.lr", self.lr)
        _positive("optim.warmup_steps", self.warmup_steps, zero_ok=True)
        _positive("optim.grad_clip", self.grad_clip, zero_ok=True)
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1={self.beta1}, optim.beta2={self.beta2}: both must lie in [0, 1)")


@dataclass(frozen=True)
class OffloadConfig:
    """Offload: where saved activations (``target``), parameters and gradients (``params``) and optimizer states
    (``optimizer``) live (seqmesh/parallel/offload).

    Tiling, which changes the compute schedule and not where data lives, is ``model.*_tile_tokens``."""

    target: str = "none"
    ratio: str = "auto"
    path: str = "/tmp/seqmesh-offload"
    host_mem_gb: float | None = None
    engine: str = "auto"
    h2d_GBps: float | None = None
    disk_GBps: float | None = None
    params: str = "none"  # none | cpu | nvme: master weights and gradients in host memory (nvme: mapped files)
    optimizer: str = "auto"  # auto | cpu | nvme: where the states of the host optimizer live (with params=cpu)
    update: str = "auto"  # auto | host | device: where the optimizer's update runs (device: staged on CUDA)
    resident_layers: str = "auto"  # auto (as many as fit) | a count of decoder layers kept on the device
    prefetch: int = 2  # streamed layers fetched ahead of use
    keep_activations: bool = True  # checkpointed resident layers that fit the memory left are not recomputed
    # layers may keep weights and gradients on the device, optimizer states on the host (README "Host-state layers")
    host_states: bool = True
    adam_Mparams_s: float | None = None  # the host optimizer's rate for the plan (null: measured at start)

    @property
    def resident_value(self) -> int | None:
        """The fixed number of resident decoder layers, or None for ``auto``."""
        return None if self.resident_layers == "auto" else int(self.resident_layers)

    @property
    def ratio_value(self) -> float | None:
        """The fixed share of layers to offload, or None for ``auto``."""
        return None if self.ratio == "auto" else float(self.ratio)

    def validate(self) -> None:
        _choice("offload.target", self.target, ("none", "cpu", "nvme"))
        _choice("offload.engine", self.engine, ("auto", "aio", "threads"))
        _choice("offload.params", self.params, ("none", "cpu", "nvme"))
        _choice("offload.optimizer", self.optimizer, ("auto", "cpu", "nvme"))
        _choice("offload.update", self.update, ("auto", "host", "device"))
        _positive("offload.prefetch", self.prefetch, zero_ok=True)
        if self.resident_layers != "auto" and not (str(self.resident_layers).isdigit()):
            raise ConfigError(f"offload.resident_layers={self.resident_layers!r} must be 'auto' or a count of decoder "
                              "layers (>= 0)")
        if self.params == "none" and self.update != "auto":
            raise ConfigError(f"offload.update={self.update} needs offload.params=cpu (or nvme): it places the update "
                              "of offloaded parameters; set offload.params=cpu or offload.update=auto")
        if self.params == "none" and self.optimizer != "auto":
            raise ConfigError(f"offload.optimizer={self.optimizer} needs offload.params=cpu (or nvme): the host "
                              "optimizer steps the master weights where they live; set offload.params=cpu or "
                              "offload.optimizer=auto")
        for key in ("host_mem_gb", "h2d_GBps", "disk_GBps", "adam_Mparams_s"):
            if getattr(self, key) is not None:
                _positive(f"offload.{key}", getattr(self, key))
        if self.ratio != "auto":
            try:
                r = float(self.ratio)
            except ValueError:
                raise ConfigError(f"offload.ratio={self.ratio!r} must be 'auto' or a number in [0, 1]") from None
            if not 0 <= r <= 1:
                raise ConfigError(f"offload.ratio={self.ratio!r} must be 'auto' or a number in [0, 1]")


@dataclass(frozen=True)
class LaunchConfig:
    """Where the job runs: a local Ray cluster by default, or ``address`` of an existing one."""

    num_workers: int = 4
    device: str = "auto"
    address: str | None = None
    object_store_mb: int = 256
    dashboard: bool = True
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    monitor_interval_s: float = 10.0
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int | None = 0
    verbose: bool = False  # show Ray's own log lines and the workers' output on the console

    def validate(self) -> None:
        _positive("launch.num_workers", self.num_workers)
        _choice("launch.device", self.device, ("auto", "cpu", "cuda"))
        _positive("launch.object_store_mb", self.object_store_mb)
        _positive("launch.cpus_per_worker", self.cpus_per_worker)
        _positive("launch.max_failures", self.max_failures, zero_ok=True)
        _positive("launch.monitor_interval_s", self.monitor_interval_s, zero_ok=True)
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise ConfigError(f"launch.prometheus_port={self.prometheus_port} must be a TCP port (1..65535), 0 for a "
                              f"free port per worker, or null for no endpoint")
        if self.prometheus_port is not None and self.monitor_interval_s == 0:
            raise ConfigError("launch.prometheus_port needs the monitor: set launch.monitor_interval_s > 0, or "
                              "launch.prometheus_port=null")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    steps: int = 300
    stop_at: int | None = None
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    ckpt_every: int = 100
    ckpt_keep: int = 2
    log_every: int = 1
    eval_every: int = 0  # validation loss every N steps and at the end (seqmesh.trainer.evaluate); 0: never
    peak_tflops: float | None = None

    def _validate_local_sgd(self, hdp: int) -> None:
        """Local updates: node groups of equal size that hold every SP group whole, and no checkpoints."""
        par, sch = self.parallel, self.scheduler
        if not par.local_sgd_every:
            return
        groups = par.local_sgd_groups
        if hdp % groups:
            raise ConfigError(f"parallel.local_sgd_groups={groups} does not divide the {hdp} HDP ranks; choose a "
                              "divisor (one group per node, or per island of fast links)")
        size = hdp // groups
        sizes = [sch.sp] if sch.policy == "static" else list(sch.group_sizes or ())
        bad = [d for d in sizes if size % d]
        if bad:
            raise ConfigError(f"SP group sizes {bad} do not divide the node groups of {size} ranks "
                              f"(parallel.local_sgd_groups={groups}): an SP group must lie inside one group, whose "
                              "model differs from the others'; use sizes that divide it")
        if self.ckpt_every:
            raise ConfigError(f"ckpt_every={self.ckpt_every} with parallel.local_sgd_every={par.local_sgd_every}: the "
                              "node groups hold different models and checkpoints do not yet save the outer state; "
                              "set ckpt_every=0")

    def _validate_layer_tiling(self) -> None:
        """``model.layer_tile_tokens`` computes the plain layer's projections and passes its own parameters to
        the tiled ops, and its attention core's saved tensors lie outside the modules activation offload scopes
        without checkpointing: what would change either is refused here, with the setting to change."""
        tile, par, off = self.model.layer_tile_tokens, self.parallel, self.offload
        if not tile:
            return
        if par.tp > 1:
            raise ConfigError(f"model.layer_tile_tokens={tile} with parallel.tp={par.tp}: tensor parallelism gathers "
                              "a layer's whole token shard once for its projections, which tiles would repeat; set "
                              "parallel.tp=1 or model.layer_tile_tokens=0")
        if par.zero_stage == 3:
            raise ConfigError(f"model.layer_tile_tokens={tile} with parallel.zero_stage=3: ZeRO-3 gathers a layer's "
                              "weights around its forward and backward, while the tiled ops recompute the layer "
                              "inside backward with the weights they were given; set parallel.zero_stage to 0-2 or "
                              "model.layer_tile_tokens=0")
        if off.params != "none":
            raise ConfigError(f"model.layer_tile_tokens={tile} with offload.params={off.params}: streamed layers "
                              "swap their weights around each use, while the tiled ops keep the weights of their "
                              "forward for backward; set offload.params=none or model.layer_tile_tokens=0")
        if off.target != "none" and not self.model.activation_checkpointing:
            raise ConfigError(f"model.layer_tile_tokens={tile} with offload.target={off.target} and no activation "
                              "checkpointing: without it activation offload moves what each attention module "
                              "saves, and a tiled layer runs its attention core outside that module; set "
                              "model.activation_checkpointing=true (recommended at long context) or "
                              "offload.target=none")

    def _validate_compile_layers(self) -> None:
        """``model.compile_layers`` compiles the split layer's halves (trainer/compile_layers.py) when the step
        runs the layer's own forward: what replaces that forward, or needs ``self_attn`` called as a module, is
        refused here."""
        if not self.model.compile_layers:
            return
        par, off = self.parallel, self.offload
        if par.zero_stage == 3:
            raise ConfigError("model.compile_layers=true with parallel.zero_stage=3: ZeRO-3 runs each layer's forward "
                              "inside its own autograd function that gathers the weights around it (and recomputes "
                              "it in backward), wrapped before the layers are compiled, so the compiled parts would "
                              "never run; set parallel.zero_stage to 0-2 or model.compile_layers=false")
        if off.params != "none":
            raise ConfigError(f"model.compile_layers=true with offload.params={off.params}: streamed layers run their "
                              "forward inside their own autograd function that moves the weights around it, wrapped "
                              "before the layers are compiled, so the compiled parts would never run; set "
                              "offload.params=none or model.compile_layers=false")
        if off.target != "none" and not self.model.activation_checkpointing:
            raise ConfigError(f"model.compile_layers=true with offload.target={off.target} and no activation "
                              "checkpointing: without it activation offload moves what each attention module "
                              "saves, and a compiled layer calls its attention core outside that module; set "
                              "model.activation_checkpointing=true or offload.target=none")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                try:
                    value.validate()
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(str(e)) from e
        _positive("steps", self.steps)
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ConfigError(f"stop_at={self.stop_at} must lie in 1..steps ({self.steps}), or be null")
        _positive("ckpt_every", self.ckpt_every, zero_ok=True)
        _positive("ckpt_keep", self.ckpt_keep)
        _positive("eval_every", self.eval_every, zero_ok=True)
        world = self.launch.num_workers
        if world % (self.parallel.tp * self.parallel.pp):
            raise ConfigError(f"launch.num_workers={world} is not divisible by parallel.tp x parallel.pp = "
                              f"{self.parallel.tp} x {self.parallel.pp}; change the worker count or the layout")
        hdp = world // (self.parallel.tp * self.parallel.pp)
        self._validate_local_sgd(hdp)
        tp, model = self.parallel.tp, self.model
        if model.hf_path is None and (model.num_heads % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads)
                                      or model.intermediate_size % tp):
            raise ConfigError(f"parallel.tp={tp} cannot split model.num_heads={model.num_heads}, model.num_kv_heads="
                              f"{model.num_kv_heads} (tp must divide them or be a multiple of them) and "
                              f"model.intermediate_size={model.intermediate_size}; choose a tp that divides the heads "
                              f"and the MLP width")
        if tp > 1 and model.loss_tile_tokens:
            raise ConfigError(f"model.loss_tile_tokens={model.loss_tile_tokens} with parallel.tp={tp}: the "
                              "tensor-parallel loss already splits the logits over the vocabulary and is not tiled; "
                              "set model.loss_tile_tokens=0")
        if tp > 1 and model.loss_kernel != "torch":
            raise ConfigError(f"model.loss_kernel={model.loss_kernel} with parallel.tp={tp}: the tensor-parallel "
                              "loss splits the logits over the vocabulary with its own kernel; set "
                              "model.loss_kernel=torch")
        if model.linear_dtype == "fp8" and (tp > 1 or self.parallel.zero_stage == 3):
            raise ConfigError(f"model.linear_dtype=fp8 with parallel.tp={tp}, parallel.zero_stage="
                              f"{self.parallel.zero_stage}: float8 linears replace nn.Linear modules, which tensor "
                              "parallelism and ZeRO-3 replace or shard themselves; use tp=1 and zero_stage<=2, or "
                              "model.linear_dtype=bf16")
        if model.linear_dtype == "fp8" and self.offload.params != "none":
            raise ConfigError(f"model.linear_dtype=fp8 with offload.params={self.offload.params}: streamed layers run "
                              "their weights outside the modules that float8 training converts; set "
                              "model.linear_dtype=bf16 or offload.params=none")
        if model.linear_dtype == "fp8" and self.launch.device == "cpu":
            raise ConfigError("model.linear_dtype=fp8 needs CUDA GPUs with float8 matrix units (Hopper or newer); "
                              "launch.device=cpu cannot run it: set model.linear_dtype=bf16")
        stages = self.parallel.pp * self.parallel.pp_virtual
        if model.hf_path is None and stages > model.num_layers:
            raise ConfigError(f"parallel.pp={self.parallel.pp} x parallel.pp_virtual={self.parallel.pp_virtual} = "
                              f"{stages} pipeline stages but model.num_layers={model.num_layers}; each stage needs a "
                              f"layer: lower them so that pp x pp_virtual <= {model.num_layers}")
        if self.parallel.pp > 1 and self.offload.target != "none":
            raise ConfigError(f"offload.target={self.offload.target} with parallel.pp={self.parallel.pp}: activation "
                              "offload scopes one micro-batch's forward and backward, which 1F1B interleaves with "
                              "other micro-batches'; set offload.target=none or parallel.pp=1")
        if self.parallel.zero_stage == 3 and (self.offload.target != "none" or model.activation_checkpointing):
            raise ConfigError("parallel.zero_stage=3 recomputes every decoder layer in backward (its weights are "
                              "gathered only then), which activation checkpointing would repeat and activation offload "
                              "cannot scope; set model.activation_checkpointing=false and offload.target=none")
        if self.offload.params != "none":
            par = self.parallel
            if par.zero_stage == 3:
                self._validate_zero3_host_shards()
            elif par.zero_stage not in (1, 2) or par.tp > 1 or par.pp > 1:
                raise ConfigError(f"offload.params={self.offload.params} with parallel.zero_stage={par.zero_stage}, "
                                  f"tp={par.tp}, pp={par.pp}: the master weights live in ZeRO-1/2's flat host buffer "
                                  "and are streamed for tp=pp=1; set parallel.zero_stage=1 (or 2), tp=1 and pp=1, or "
                                  "parallel.zero_stage=3 (host shards, at any tp and pp)")
            if par.local_sgd_every:
                raise ConfigError(f"offload.params={self.offload.params} with parallel.local_sgd_every="
                                  f"{par.local_sgd_every}: host-resident gradients are reduced over every HDP rank, "
                                  "not inside a node group; set offload.params=none or parallel.local_sgd_every=0")
            if self.offload.optimizer == "nvme" and self.optim.state_dtype == "fp32":
                raise ConfigError("offload.optimizer=nvme keeps FP8AdamW's states in files; optim.state_dtype=fp32 is "
                                  "torch's AdamW: set optim.state_dtype to fp8, int8 or bf16")
            if self.offload.update == "device" and self.optim.state_dtype == "fp32":
                raise ConfigError("offload.update=device stages FP8AdamW's update on the GPU; optim.state_dtype=fp32 "
                                  "is torch's AdamW: set optim.state_dtype to fp8, int8 or bf16, or offload.update=auto")
            if self.offload.target != "none" and not model.activation_checkpointing:
                raise ConfigError(f"offload.params={self.offload.params} with offload.target={self.offload.target}: "
                                  "streamed layers keep only their inputs for backward, which activation offload "
                                  "moves when every layer is checkpointed; set model.activation_checkpointing=true "
                                  "or offload.target=none")
            if self.offload.resident_value is not None and self.offload.resident_value > model.num_layers \
                    and model.hf_path is None:
                raise ConfigError(f"offload.resident_layers={self.offload.resident_layers} exceeds model.num_layers="
                                  f"{model.num_layers}")
        self._validate_layer_tiling()
        self._validate_compile_layers()
        if self.parallel.pp > 1 and self.scheduler.refine_every:
            raise ConfigError(f"scheduler.refine_every={self.scheduler.refine_every} with parallel.pp="
                              f"{self.parallel.pp}: the cost model is refitted from each group's measured time, "
                              "which 1F1B interleaves with other groups'; set scheduler.refine_every=0")
        if self.scheduler.policy == "static" and hdp % self.scheduler.sp:
            raise ConfigError(f"scheduler.sp={self.scheduler.sp} does not divide the {hdp} HDP ranks "
                              f"(num_workers / (tp x pp)); pick a divisor of {hdp}")
        if self.resume and self.overwrite:
            raise ConfigError("resume=true and overwrite=true contradict each other; pick one")

    def _validate_zero3_host_shards(self) -> None:
        """``offload.params=cpu`` under ZeRO-3: each rank's shards, gradients and states in host memory."""
        off, par = self.offload, self.parallel
        if off.params != "cpu":
            raise ConfigError(f"offload.params={off.params} with parallel.zero_stage=3: ZeRO-3's host shards live in "
                              "host memory, not in files; set offload.params=cpu (or parallel.zero_stage=1 for nvme)")
        if off.optimizer == "nvme":
            raise ConfigError("offload.optimizer=nvme with parallel.zero_stage=3: the optimizer's states stay beside "
                              "the host shards in memory; set offload.optimizer=auto (or cpu)")
        if par.zero3_grad_reduce == "step":
            raise ConfigError("parallel.zero3_grad_reduce=step with offload.params=cpu: a whole gradient per layer "
                              "would keep the whole model's gradients on the device; set parallel.zero3_grad_reduce="
                              "microbatch (or auto)")
        if off.resident_value is not None:
            raise ConfigError(f"offload.resident_layers={off.resident_layers} with parallel.zero_stage=3: ZeRO-3 "
                              "gathers every layer when it runs and keeps none resident; set offload.resident_layers="
                              "auto")

    @property
    def hdp(self) -> int:
        return self.launch.num_workers // (self.parallel.tp * self.parallel.pp)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if key in MOVED_KEYS:
            raise moved_key_error(key)
        close = difflib.get_close_matches(unknown[0], list(known), n=1, cutoff=0.6)
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {key!r}; {hint}known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a simple type hint (int, float, str, bool, Optional, tuple[int, ...])."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} may not be null")
    base = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not tuple else [hint]
    target = base[0]
    if typing.get_origin(target) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list of integers")
        return tuple(_coerce(f"{key}[{i}]", int, v) for i, v in enumerate(value))
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a plain (resolved) dict; raises ConfigError on the first bad key."""
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
