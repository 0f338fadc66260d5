"""AdamW with block-quantized moments: about 2 bytes of state per parameter, one fused launch per step.

Formats (``state_dtype``; bytes/param from the state tensors, block_size 128 with fp32 scales):

========  ==========================  ==========================================  ===========
name      m (first moment)            v (second moment)                           bytes/param
========  ==========================  ==========================================  ===========
fp8       E4M3, block absmax scale    E4M3 of v, block absmax scale, floor code   2.0
int8      int8, block absmax scale    uint8 of sqrt(v), block absmax scale, floor 2.0625
bf16      bf16                        bf16                                        4
fp32      fp32                        fp32                                        8
========  ==========================  ==========================================  ===========

Where fp8's scales go. v's E4M3 codes are magnitudes, so the sign bit of every one of them is 0:
a block of 128 codes has 128 spare bits, and the block's two fp32 scales (m's and v's, 64 bits)
are stored in them (``fp8_codec.pack_scales``). The scales stay exact fp32 -- the update's math is
that of separate scale tensors, bit for bit -- and the state is 2 bytes per parameter instead of
2.0625 (E8M0 power-of-two scales would still cost 2.016 and round every scale). v's tensor is then
one byte per element padded to whole blocks (``block_size`` >= 64 for fp8); a padding element
stores code 0. int8's codes use all eight bits, so its scales keep tensors of their own.

Why these choices. ``bench/optim.py --quant-error`` (results in ``bench/results/optim_quant_error_cpu.json``)
trains a small byte-level Llama with fp32 AdamW on standard-library text and feeds every step's
gradient also to shadow moments stored in candidate formats; the figure is the relative L2 error of
the shadow's update m^/(sqrt(v^)+eps) against the fp32 one, mean of the last 50 of 150 steps, block
128, for beta2 = 0.999 / 0.95:

* m in E4M3, round to nearest: 5.3% / 5.6% (E5M2 10.6% / 11.1%, int8 7.2% / 7.7%). Stochastic
  rounding of m is *worse* (7.4% / 7.4%): with beta1 = 0.9 each step moves m by 10%, more than half
  an E4M3 step, so nearest rounding does not stall and random rounding only adds noise.
* v with round-to-nearest stalls: beta2 = 0.999 moves v by 0.1% a step, far below half an E4M3
  step (3-6%), so v freezes relative to its block maximum and the error grows as training goes on
  (E4M3 of sqrt(v), nearest: mean 12.1% over all steps, 17.1% over the last 50). Stochastic
  rounding makes each rounding unbiased, so v follows its EMA in expectation.
* v itself rather than sqrt(v): the relative error of sqrt(v) is half that of v, while the square
  root doubles the error of what it stores; the range the transform buys is not needed with
  per-block scales. Whole fp8 format (m E4M3 nearest): v in E4M3 with stochastic rounding 9.0% /
  7.6%, nearest 10.6% / 7.9%; sqrt(v) in E4M3 stochastic 13.3% / 10.9%, nearest 17.1% / 11.9%;
  both in E5M2 with sqrt(v) 28.5% / 21.7%. int8 (int8 m, uint8 sqrt(v), stochastic): 10.3% / 9.8%;
  bf16: 0.7% / 0.5%.
* A zero code for v is never written: a block's smallest entries are floored at the smallest code.
  An element whose v rounds to 0 while its m does not would get an update of m/eps; in an earlier
  run on transformers' LlamaForCausalLM this showed up as update-error spikes of 73% (the run above
  had no such element, and the floor changed nothing there). With the floor, such an element gets a
  slightly damped update instead. int8 stores sqrt(v) because uint8 codes of v itself would floor
  everything under 1/255 of the block maximum.
* COAT's per-group dynamic range expansion (|x|^k) needs a transcendental pow per element, which no
  two backends round alike (it would break the CPU/GPU bit equality below), and one more number per
  block.

Updates: decoupled weight decay (p *= 1 - lr*wd, then the Adam step, as ``torch.optim.AdamW``);
m and v are updated in fp32 from their dequantized values, the update uses the fresh fp32 values,
and only then are they re-quantized. Parameters are fp32 (master weights; compute in bf16 through
autocast) or bf16 updated in place with stochastic rounding, so no fp32 copy exists at all.
Random bits come from a counter-based hash of (seed, step, element index): nothing to carry, and a
resumed run is bitwise identical to an uninterrupted one. An element's index is its position in its
group's flat space (``index_offset`` plus the block-padded lengths of the group's earlier
parameters), so a ZeRO shard placed by ``index_offset`` draws the bits the unsharded run would.

Backends: ``torch`` (any device; flattened multi-tensor ops, ``adam_update.torch_step``), ``compiled``
(the same ops fused by Inductor: on a host, one vectorised loop nest instead of about a hundred
passes, several times faster for offloaded parameters) and ``triton`` (CUDA; one launch per group and
dtype, ``seqmesh/kernels/adam_triton.py``). They compute the same operations in the same order with
IEEE rounding and produce identical bits, so states and checkpoints move between them.

Sharding (ZeRO-1): a parameter may be any tensor, including a 1-D slice of a flat buffer. A rank
that owns ``flat[lo:hi]`` of a flat fp32 parameter buffer (and the matching slice of the reduced
gradient, set as that slice's ``.grad``) builds ``FP8AdamW([{"params": [shard], "index_offset": lo}])``
and steps only its shard; ``sharding.zero1_shard`` gives block-aligned ``lo, hi``, with which the
sharded states and parameters equal an unsharded run's bit for bit.

Checkpoints: ``state_dict`` holds per-parameter ``step`` (int) and the state tensors as stored:
``exp_avg``/``exp_avg_sq`` codes (1-D, the parameter's length), for int8 their fp32 block scales,
for fp8 ``exp_avg_sq`` as the packed bytes. ``load_state_dict`` keeps them bit-exact (torch's own
would cast them to the parameter dtype), works on a fresh optimizer and also takes fp8 state in
the unpacked form of ``block_state`` (codes plus ``exp_avg_scale``/``exp_avg_sq_scale``), which
resharding checkpoints exchange.
``dequantized_state_dict`` exports plain fp32 moments in ``torch.optim.AdamW``'s format.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from copy import deepcopy
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from seqmesh.kernels.fp8_codec import (
    FORMATS,
    MASK32,
    PACKED_SCALE_BITS,
    CodeFormat,
    StateFormat,
    dequantize_blocks,
    dequantize_flat,
    pack_flat,
    quantize_blocks,
    round_plain,
    unpack_flat,
)
from seqmesh.kernels.adam_update import (
    Bucket,
    Hyper,
    chunked_step,
    chunks_of,
    compiled_update,
    cpp_compiler_available,
    padded_numel,
    scale_grads,
    staged_step,
    torch_step,
)
from seqmesh.trainer.optim.state_files import StateFiles, materialized
from seqmesh.trainer.optim.written import WrittenRanges

STATE_DTYPES = tuple(FORMATS)
BACKENDS = ("auto", "torch", "compiled", "triton")
# ``auto`` compiles the host update for buckets from this size on: there one eager step costs more
# (about 1 s per 16M elements on 2 cores) than the one-off compile, which small models never repay.
HOST_COMPILE_MIN_ELEMS = 1 << 24
STAGED_CHUNK_ELEMS = 1 << 24  # the default ``staged_chunk_elems``
# a piece of a states-only staging (``keep_states_on_host``) holds this many times ``staged_chunk_elems``: only the
# moments cross the link, 2 of a full staging's 6 bytes per element of fp8 states and bf16 weights, so it takes
# the same device memory and a third of the pieces' fixed host cost
STATES_ONLY_PIECE = 3
# the default ``staged_in_flight``: on an H100 at 1dcd789 (``bench/results/staged_update_h100.json``) the states-only
# update ran at 40.1 GB/s with 2 pieces ahead and 43.2 with 3 (4: 43.3), the link carrying 50.6 each way with both
# directions busy; a streamed layer's update, 47 GB/s, did not move. One more piece is ~0.1 GB of the device.
STAGED_IN_FLIGHT = 3
PARAM_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compiles(backend: str, numel: int, device: torch.device) -> bool:
    """Whether ``backend``'s step over a bucket of ``numel`` elements on ``device``, off Triton, runs the
    compiled update (a host path: on a GPU the Triton kernel is the fused one)."""
    if backend == "compiled":
        if device.type != "cpu":
            raise RuntimeError(f"backend='compiled' steps parameters on the host, got some on {device}; "
                               "use backend='auto' (Triton on CUDA)")
        if not cpp_compiler_available():
            raise RuntimeError("backend='compiled' needs the C++ compiler torch.compile builds host code with "
                               "(g++ or $CXX); install one or use backend='torch'")
        return True
    return backend == "auto" and device.type == "cpu" and numel >= HOST_COMPILE_MIN_ELEMS and \
        cpp_compiler_available()


def _check_group(group: dict[str, Any]) -> None:
    """Reject settings the update cannot honour, naming the setting and the fix."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a non-negative Python float, got {lr!r}")
    betas = group["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not isinstance(group["eps"], (int, float)) or group["eps"] < 0:
        raise ValueError(f"eps must be a non-negative float, got {group['eps']!r}")
    if not isinstance(group["weight_decay"], (int, float)) or group["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be a non-negative float, got {group['weight_decay']!r}")
    if group["state_dtype"] not in FORMATS:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {group['state_dtype']!r}")
    block = group["block_size"]
    if not isinstance(block, int) or block < 16 or block > 4096 or block & (block - 1):
        raise ValueError(f"block_size must be a power of two in [16, 4096], got {block!r}")
    if FORMATS[group["state_dtype"]].packed and block < PACKED_SCALE_BITS:
        raise ValueError(f"state_dtype {group['state_dtype']!r} stores each block's two fp32 scales in the spare "
                         f"bits of its {block} v codes, which needs block_size >= {PACKED_SCALE_BITS}; got {block}")
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"stochastic_rounding must be True or False, got {group['stochastic_rounding']!r}")
    for key in ("seed", "index_offset"):
        if not isinstance(group[key], int) or group[key] < 0:
            raise ValueError(f"{key} must be a non-negative int, got {group[key]!r}")
    for p in group["params"]:
        if not p.is_contiguous():
            raise ValueError(f"FP8AdamW needs contiguous parameters, got one of shape {tuple(p.shape)} with strides "
                             f"{p.stride()}; make it contiguous before building the optimizer")
        if p.dtype not in PARAM_DTYPES:
            raise ValueError(f"FP8AdamW updates fp32 or bf16 parameters, got one of dtype {p.dtype}; keep fp32 "
                             "master weights (compute in low precision with autocast) or convert the model to bf16")


class FP8AdamW(Optimizer):
    """AdamW keeping m and v in ``state_dtype`` (fp8 | int8 | bf16 | fp32); see the module docstring.

    Every constructor setting after ``*`` except ``backend``, the chunk sizes and ``update_device`` is a
    param-group default, stored in each group (and so in checkpoints); a group may override any of them.

    Args:
        state_dtype: storage format of both moments.
        block_size: elements per quantization block (one fp32 scale per block and moment).
        stochastic_rounding: round v (and bf16 parameters) stochastically; m is always rounded to
            nearest.
        seed: seed of the rounding's random bits.
        index_offset: position of the group's first element in a larger flat parameter space, for
            a ZeRO shard to draw the same random bits as an unsharded run.
        backend: ``auto`` (Triton on CUDA when importable; on a CPU ``compiled`` for buckets of
            ``HOST_COMPILE_MIN_ELEMS`` or more when a C++ compiler is found, else torch), ``torch``,
            ``compiled`` or ``triton``.
        host_chunk_elems: the torch backend on a CPU steps this many elements at a time (the same bits,
            temporaries of one chunk: parameters offloaded to the host are tens of gigabytes).
        update_device: step host parameters on this device instead, a chunk at a time copied there and
            back (``staged_step``: the same bits; their states then live in pinned memory); None: on the host.
        staged_chunk_elems: elements per chunk staged on ``update_device``. Larger than the host's: each
            chunk costs the host a fixed few launches and syncs (0.22 s for 668 chunks of 4M elements against
            0.31 s of link time on an H100), and the four chunks of 16M on the device at once
            (``staged_in_flight`` + 1) take ~0.4 GB of it.
        staged_in_flight: pieces of a staged update copied in ahead of the one whose copy back the host waits
            for; the device holds ``staged_in_flight + 1`` pieces (``bench/staged_update.py`` measures the rate
            each gives).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 state_dtype: str = "fp8", block_size: int = 128, stochastic_rounding: bool = True, seed: int = 0,
                 index_offset: int = 0, backend: str = "auto", host_chunk_elems: int = 1 << 22,
                 update_device: torch.device | str | None = None, staged_chunk_elems: int = STAGED_CHUNK_ELEMS,
                 staged_in_flight: int = STAGED_IN_FLIGHT) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(host_chunk_elems, int) or host_chunk_elems < 4096:
            raise ValueError(f"host_chunk_elems must be an int >= 4096, got {host_chunk_elems!r}")
        if not isinstance(staged_chunk_elems, int) or staged_chunk_elems < 4096:
            raise ValueError(f"staged_chunk_elems must be an int >= 4096, got {staged_chunk_elems!r}")
        if not isinstance(staged_in_flight, int) or staged_in_flight < 1:
            raise ValueError(f"staged_in_flight must be an int >= 1 (pieces copied in ahead), got {staged_in_flight!r}")
        self.backend = backend
        self.host_chunk_elems = host_chunk_elems
        self.staged_chunk_elems = staged_chunk_elems
        self.staged_in_flight = staged_in_flight
        # parameter offload's plan sets it when the link beats the host's update (trainer/param_offload.py)
        self.update_device = torch.device(update_device) if update_device is not None else None
        self.state_files: StateFiles | None = None  # moments in files (``state_files.swap_states_to_files``)
        self._grad_scale: torch.Tensor | None = None  # ``scale_grads_in_step``
        self._overlapped: set[int] = set()  # ``overlap_updates``: ids of the tensors stepped behind ``step``
        self._host_states: set[int] = set()  # ``keep_states_on_host``: ids of device tensors whose moments live on the host
        self._updater: cf.ThreadPoolExecutor | None = None
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[cf.Future] = []
        self.behind_s = 0.0  # wall time of the last update behind the step, from ``step`` to its last piece written
        self._written = WrittenRanges()  # what the update behind the step has finished (``wait_for``)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        block_size=block_size, stochastic_rounding=stochastic_rounding, seed=seed,
                        index_offset=index_offset)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def keep_states_on_host(self, tensors: Iterable[torch.Tensor]) -> None:
        """Keep the moments of ``tensors`` (CUDA tensors this optimizer steps, before their first step or load) in
        pinned host memory, and update them on their device a chunk at a time: each chunk's moments copied there
        and back (``staged_step``); weights and gradients stay where they are.

        Why: parameter offload's middle placement (``scheduler/offload_plan.py``). A layer whose weights and
        gradients fit on the device but whose states do not costs the link 2 bytes per parameter each way per
        step (fp8 moments) instead of a streamed layer's 10 in and 6 out. The kernel is the same, so are the
        bits, the states' format and checkpoints. (Host tensors' states are on the host already.)"""
        tensors = list(tensors)
        if any(self.state.get(t) for t in tensors):
            raise RuntimeError("keep_states_on_host must come before the first step or load: some of these "
                               "tensors already have states on their device")
        self._host_states |= {id(t) for t in tensors}

    def overlap_updates(self, tensors: Iterable[torch.Tensor], overlap: bool = True) -> None:
        """Step ``tensors`` (tensors this optimizer steps: host ones, or ones with ``keep_states_on_host``) on a
        thread of their own from now on: ``step`` returns once the others are updated, and whatever reads them
        first calls ``wait_for`` or ``synchronize``. ``overlap=False``: they are stepped inside ``step`` again.

        Why: under parameter offload the streamed layers' update goes over the link or through the host's CPU
        (hundreds of milliseconds for billions of parameters) while the device idles, and the next step's
        forward of the resident layers, which comes first, reads none of it; ``parallel/offload/params.py``
        waits, before it fetches each streamed layer, for that layer's part of it (``wait_for``). The
        arithmetic is the same, so are the bits."""
        self.synchronize()
        ids = {id(t) for t in tensors}
        self._overlapped = self._overlapped | ids if overlap else self._overlapped - ids
        if self._overlapped and self._updater is None:
            self._updater = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqmesh-host-update")
        elif not self._overlapped and self._updater is not None:
            self._updater.shutdown(wait=True)
            self._updater = None

    def wait_for(self, tensors: Iterable[torch.Tensor]) -> None:
        """Wait until the update behind the step has written ``tensors`` (host tensors it steps, or views of them),
        not for the rest of it; a failure of the update is re-raised once it has stopped."""
        if self._pending and not self._written.wait(tensors):
            self.synchronize()  # not written (not stepped, or the update failed): the whole update, its error

    def synchronize(self) -> None:
        """Wait for the updates ``step`` left running (``overlap_updates``), all of them, then re-raise the first
        failure (nothing runs on after the error surfaces)."""
        pending, self._pending = self._pending, []
        cf.wait(pending)
        for future in pending:
            future.result()

    def _run_behind(self, bucket: Bucket, hp: Hyper, device: torch.device, scale: torch.Tensor | None,
                    stepped: Any = None) -> None:
        """``_run`` on the update thread, saying which pieces are written as it goes (``wait_for``); a staged
        update's copies and kernels on a side stream of the device, so that they run beside the compute stream's
        next forward (after ``stepped``, the compute stream's event at ``step``, for gradients made there)."""
        target = device if device.type == "cuda" else self.update_device
        done = lambda piece: self._written.mark(piece.params)  # noqa: E731
        with torch.no_grad():  # grad mode is per thread
            if target is None or target.type != "cuda":
                self._run(bucket, hp, device, scale, on_done=done)
            else:
                stream = self._side.setdefault(target, torch.cuda.Stream(target))
                with torch.cuda.device(target), torch.cuda.stream(stream):
                    if stepped is not None:
                        stream.wait_event(stepped)
                    self._run(bucket, hp, device, scale, on_done=done)
        self._written.mark(bucket.params)  # the paths that do not report their pieces

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        self.synchronize()
        if self.update_device is not None and self.state_files is not None:
            raise RuntimeError("FP8AdamW: update_device stages states held in host memory, and these are in files "
                               "(state_files); set update_device=None or keep the states in memory")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, self._grad_scale = self._grad_scale, None
        behind = [job for group in self.param_groups for job in self._step_group(group, scale)]
        if behind:
            # the small buckets first (a layer's norm weights sit in a group of their own: a reader of the first
            # layer would otherwise wait for every layer's matrices), then the others in group order, each in flat
            # order: layer order (a device's parameters come before the host's, ``PlacedZero``)
            self._written.begin()
            began = time.perf_counter()
            devices = {job[2] for job in behind if job[2].type == "cuda"}
            stepped = {d: torch.cuda.current_stream(d).record_event() for d in devices}
            for job in sorted(behind, key=self._behind_order):
                self._pending.append(self._updater.submit(self._run_behind, *job, stepped.get(job[2])))
            self._pending.append(self._updater.submit(self._finish_behind, began))  # runs after a failure too
        return loss

    def _finish_behind(self, began: float) -> None:
        self._written.finish()
        self.behind_s = time.perf_counter() - began

    def _behind_order(self, job: tuple) -> tuple[bool, int]:
        """Buckets under one staged chunk by size, then the larger ones as given (``step``'s order)."""
        n = sum(p.numel() for p in job[0].params)
        return (n >= self.staged_chunk_elems, n if n < self.staged_chunk_elems else 0)

    def scale_grads_in_step(self, factor: torch.Tensor | None) -> None:
        """Multiply every gradient by ``factor`` (0-dim, the gradients' dtype; None: no scaling) inside the next
        ``step``, a piece at a time as the update reads it, instead of in a pass of its own.

        Why: with parameter offload the gradients are a host buffer of billions of elements, and the clip's
        ``mul_`` over it took about as long as the whole staged update's copies on an H100's host. A staged
        update scales each piece on the GPU after copying it there; a host update scales each piece while it is
        in cache. Each element meets the same one multiplication in its own dtype, so the bits are those of
        scaling first. ``ZeroOptimizer.clip_grad_norm_`` calls this for host shards; ``zero_grad`` clears it."""
        self._grad_scale = factor

    def _step_group(self, group: dict[str, Any], scale: torch.Tensor | None
                    ) -> list[tuple[Bucket, Hyper, torch.device, torch.Tensor | None]]:
        """Step ``group``'s tensors; returns the buckets of those overlapped behind the step, for ``step`` to
        hand to the update thread."""
        fmt: StateFormat = FORMATS[group["state_dtype"]]
        block = group["block_size"]
        beta1, beta2 = group["betas"]
        hp = Hyper(fmt=fmt, block_size=block, lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                   beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                   seed=group["seed"] & MASK32, stochastic=group["stochastic_rounding"])
        buckets: dict[tuple, Bucket] = {}
        key = group["index_offset"]
        for p in group["params"]:
            key_base, key = key, key + padded_numel(p.numel(), block)
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FP8AdamW does not support sparse gradients; use dense embeddings")
            if grad.shape != p.shape:
                raise RuntimeError(f"a gradient of shape {tuple(grad.shape)} was set on a parameter of shape "
                                   f"{tuple(p.shape)}; they must match")
            state = self.state[p]
            if not state:
                # states in files are the host's (a device parameter's stay beside it, ``PlacedZero``)
                _init_state(state, p, fmt, block, self.state_files if p.device.type == "cpu" else None,
                            pin=self._stages_to_cuda(p), host=id(p) in self._host_states)
            state["step"] += 1
            bucket = buckets.setdefault((p.device, p.dtype, grad.dtype, id(p) in self._overlapped,
                                         id(p) in self._host_states), Bucket())
            bucket.params.append(p)
            bucket.grads.append(grad)
            bucket.exp_avg.append(state["exp_avg"])
            bucket.exp_avg_sq.append(state["exp_avg_sq"])
            if fmt.scaled and not fmt.packed:
                bucket.exp_avg_scale.append(state["exp_avg_scale"])
                bucket.exp_avg_sq_scale.append(state["exp_avg_sq_scale"])
            bucket.key_base.append(key_base)
            bucket.step.append(state["step"])
        behind = []
        for (device, _, _, overlapped, _), bucket in buckets.items():
            if overlapped:
                behind.append((bucket, hp, device, scale))
            else:
                self._run(bucket, hp, device, scale)
        return behind

    def _stages_to_cuda(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s update is staged on a GPU: its states then live in pinned memory, which the link
        copies at full rate (pageable memory goes through a driver bounce buffer)."""
        if p.device.type == "cuda":
            return id(p) in self._host_states
        return self.update_device is not None and self.update_device.type == "cuda"

    def _run(self, bucket: Bucket, hp: Hyper, device: torch.device, scale: torch.Tensor | None,
             on_done: Callable[[Bucket], None] | None = None) -> None:
        if device.type == "cuda" and bucket.exp_avg and bucket.exp_avg[0].device.type == "cpu":
            # moments kept on the host (``keep_states_on_host``): only they cross the link
            staged_step(bucket, hp, STATES_ONLY_PIECE * self.staged_chunk_elems, device,
                        lambda piece: self._step_on(piece, hp, device), grad_scale=scale, on_done=on_done,
                        in_flight=self.staged_in_flight)
            return
        if device.type == "cpu" and self.update_device is not None:
            staged_step(bucket, hp, self.staged_chunk_elems, self.update_device,
                        lambda piece: self._step_on(piece, hp, self.update_device), grad_scale=scale,
                        on_done=on_done, in_flight=self.staged_in_flight)
            return
        self._step_on(bucket, hp, device, scale)

    def _step_on(self, bucket: Bucket, hp: Hyper, device: torch.device, scale: torch.Tensor | None = None) -> None:
        if self.backend == "triton" and device.type != "cuda":
            raise RuntimeError(f"backend='triton' needs CUDA parameters, got some on {device}; use backend='auto'")
        if self.backend == "triton" or (self.backend == "auto" and device.type == "cuda" and triton_available()):
            from seqmesh.kernels.adam_triton import fused_step

            fused_step(scale_grads(bucket, scale), hp)
            return
        update = compiled_update(hp.fmt) if compiles(self.backend, sum(p.numel() for p in bucket.params),
                                                         device) else None
        if device.type == "cpu" and self.state_files is not None:
            self.state_files.run(chunks_of(bucket, hp, self.host_chunk_elems),
                                 lambda piece: torch_step(scale_grads(piece, scale), hp, update))
        elif device.type == "cpu":
            chunked_step(bucket, hp, self.host_chunk_elems, update, grad_scale=scale)
        else:
            torch_step(scale_grads(bucket, scale), hp, update)

    def state_bytes_per_param(self) -> float:
        """Bytes of optimizer state per parameter, summed over the state tensors (scales included; in files too)."""
        self.synchronize()
        nbytes = numel = 0
        for p, state in self.state.items():
            numel += p.numel()
            nbytes += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        if numel == 0:
            raise RuntimeError("the optimizer has no state yet: call step() or load_state_dict() first")
        return nbytes / numel

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with moments kept in files read into memory (each state its own dict)."""
        self.synchronize()
        with materialized(self):
            sd = super().state_dict()
            sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    def block_state(self, p: torch.Tensor) -> dict[str, Any]:
        """``p``'s state with codes of ``p``'s length and, for quantized formats, one fp32 scale per block
        and moment (``exp_avg_scale``, ``exp_avg_sq_scale``), whatever the storage: the form a reader
        of codes and scales (a resharding checkpoint) needs. Empty if ``p`` has no state yet."""
        self.synchronize()
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        with materialized(self):
            return _block_state(self.state.get(p), p, FORMATS[group["state_dtype"]], group["block_size"])

    def state_codec(self, group: Mapping[str, Any] | str, block: int | None = None) -> BlockCodec:
        """How a param group (or the format ``group`` with ``block``) stores the moments: the codec a
        resharding checkpoint decodes saved moments with and encodes a new layout's moments with."""
        if isinstance(group, Mapping):
            group, block = group["state_dtype"], group["block_size"]
        if group not in FORMATS:
            raise ValueError(f"unknown optimizer state format {group!r}; FP8AdamW stores {STATE_DTYPES}")
        return BlockCodec(group, block if FORMATS[group].scaled else None)

    def dequantized_state_dict(self) -> dict[str, Any]:
        """The moments as fp32 tensors shaped like their parameters, in ``torch.optim.AdamW``'s state-dict format.

        For inspection, conversion, or continuing with ``torch.optim.AdamW`` (``v`` is v itself, not a code).
        """
        self.synchronize()
        with materialized(self):
            return self._dequantized_state_dict()

    def _dequantized_state_dict(self) -> dict[str, Any]:
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = []
        index = 0
        for group in self.param_groups:
            fmt, block = FORMATS[group["state_dtype"]], group["block_size"]
            ids = []
            for p in group["params"]:
                st = _block_state(self.state.get(p), p, fmt, block)
                if st:
                    if fmt.scaled:
                        m = dequantize_flat(st["exp_avg"], st["exp_avg_scale"], fmt.m, block)
                        v = dequantize_flat(st["exp_avg_sq"], st["exp_avg_sq_scale"], fmt.v, block)
                    else:
                        m = st["exp_avg"].to(torch.float32, copy=True)
                        v = st["exp_avg_sq"].to(torch.float32, copy=True)
                    state[index] = {"step": torch.tensor(float(st["step"])), "exp_avg": m.view(p.shape),
                                    "exp_avg_sq": v.view(p.shape)}
                ids.append(index)
                index += 1
            groups.append({"lr": group["lr"], "betas": group["betas"], "eps": group["eps"],
                           "weight_decay": group["weight_decay"], "amsgrad": False, "maximize": False,
                           "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                           "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See ``_load_state_dict``; moments kept in files are written there again after loading."""
        self.synchronize()
        with materialized(self):
            self._load_state_dict(state_dict)

    @torch._disable_dynamo
    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of an FP8AdamW with the same groups, keeping every state tensor's bits.

        Unlike ``Optimizer.load_state_dict`` nothing is cast to the parameter dtype (that would turn
        fp8 codes into fp32 numbers); tensors only move to their parameter's device. Group settings
        (lr, betas, ...) are taken from the checkpoint, as torch does; the storage format must match.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} parameter groups, this optimizer {len(groups)}")
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"parameter group {i} has {len(group['params'])} parameters here but "
                                 f"{len(saved['params'])} in the checkpoint")
            if "state_dtype" not in saved:
                raise ValueError(f"parameter group {i} of the checkpoint has no state_dtype: it was not written by "
                                 "FP8AdamW (torch.optim.AdamW?), whose moments cannot be loaded as FP8AdamW codes")
            for key in ("state_dtype", "block_size"):
                if saved.get(key) != group[key]:
                    raise ValueError(f"parameter group {i}: the checkpoint was written with {key}={saved.get(key)!r} "
                                     f"but this optimizer uses {group[key]!r}; construct it with {key}="
                                     f"{saved.get(key)!r} (or convert through dequantized_state_dict())")
        id_map = {saved_id: p for group, saved in zip(groups, saved_groups)
                  for saved_id, p in zip(saved["params"], group["params"])}
        format_of = {id(p): (FORMATS[g["state_dtype"]], g["block_size"]) for g in groups for p in g["params"]}
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in id_map:
                raise ValueError(f"the checkpoint has state for parameter index {saved_id}, which no group holds")
            p = id_map[saved_id]
            fmt, block = format_of[id(p)]
            state[p] = _restore_state(saved_state, p, fmt, block, saved_id,
                                      torch.device("cpu") if id(p) in self._host_states else p.device)
            if self._stages_to_cuda(p):
                state[p] = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in state[p].items()}
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _block_state(state: dict[str, Any] | None, p: torch.Tensor, fmt: StateFormat, block: int) -> dict[str, Any]:
    """``FP8AdamW.block_state`` given ``p``'s format: packed scales taken out of v's bytes."""
    if not state:
        return {}
    if not fmt.packed:
        return dict(state)
    codes, m_scale, v_scale = unpack_flat(state["exp_avg_sq"], p.numel(), fmt.v.dtype, block)
    return {"step": state["step"], "exp_avg": state["exp_avg"], "exp_avg_sq": codes,
            "exp_avg_scale": m_scale, "exp_avg_sq_scale": v_scale}


def _expected_state(p: torch.Tensor, fmt: StateFormat, block: int) -> dict[str, tuple[torch.dtype, int]]:
    n = p.numel()
    if fmt.packed:
        return {"exp_avg": (fmt.m.dtype, n), "exp_avg_sq": (torch.uint8, padded_numel(n, block))}
    expected = {"exp_avg": (fmt.m.dtype, n), "exp_avg_sq": (fmt.v.dtype, n)}
    if fmt.scaled:
        blocks = padded_numel(n, block) // block
        expected.update(exp_avg_scale=(torch.float32, blocks), exp_avg_sq_scale=(torch.float32, blocks))
    return expected


def _init_state(state: dict[str, Any], p: torch.Tensor, fmt: StateFormat, block: int,
                files: StateFiles | None = None, pin: bool = False, host: bool = False) -> None:
    """Zero moments of ``p`` beside it (``host``: in host memory), page-locked with ``pin``, or in ``files``."""
    state["step"] = 0
    for key, (dtype, n) in _expected_state(p, fmt, block).items():
        state[key] = torch.zeros(n, dtype=dtype, device="cpu" if host else p.device, pin_memory=pin) \
            if files is None else files.fresh((n,), dtype)


def _restore_state(saved: dict[str, Any], p: torch.Tensor, fmt: StateFormat, block: int,
                   saved_id: int, device: torch.device) -> dict[str, Any]:
    if fmt.packed and "exp_avg_sq_scale" in saved:  # the unpacked form of ``block_state``
        unpacked = _restore_state(saved, p, dataclasses.replace(fmt, packed=False), block, saved_id, device)
        return {"step": unpacked["step"], "exp_avg": unpacked["exp_avg"],
                "exp_avg_sq": pack_flat(unpacked["exp_avg_sq"], unpacked["exp_avg_scale"],
                                        unpacked["exp_avg_sq_scale"], block)}
    expected = _expected_state(p, fmt, block)
    missing = sorted((set(expected) | {"step"}) - set(saved))
    if missing:
        raise ValueError(f"the checkpoint's state of parameter {saved_id} lacks {missing} (has {sorted(saved)}); "
                         f"was it written by torch.optim.AdamW or another state_dtype than {fmt.name!r}?")
    restored: dict[str, Any] = {"step": int(saved["step"])}
    for key, (dtype, n) in expected.items():
        value = saved[key]
        if value.dtype != dtype or value.shape != (n,):
            raise ValueError(f"the checkpoint's {key} of parameter {saved_id} is {value.dtype} {tuple(value.shape)}, "
                             f"state_dtype {fmt.name!r} needs {dtype} ({n},)")
        restored[key] = value.to(device=device, copy=True)
    return restored



@dataclasses.dataclass(frozen=True)
class BlockCodec:
    """One ``state_dtype``'s storage of the moments, as ``seqmesh.parallel.shard_spec.StateCodec`` describes it:
    resharding moves moments between layouts through it without knowing the codes."""

    name: str
    block: int | None  # None: an unscaled format (bf16 / fp32 numbers)

    def _format(self, key: str) -> CodeFormat:
        fmt = FORMATS[self.name]
        return fmt.m if key == "exp_avg" else fmt.v

    def decode(self, key: str, codes: torch.Tensor, element_scales: torch.Tensor | None) -> torch.Tensor:
        if self.block is None:
            return codes.to(torch.float32)
        return dequantize_blocks(codes.to(torch.float32).view(-1, 1), element_scales, self._format(key)).view(-1)

    def encode(self, step: int, moments: Mapping[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
               like: torch.Tensor) -> dict[str, Any]:
        """The unpacked ``block_state`` form, which ``load_state_dict`` takes."""
        state: dict[str, Any] = {"step": int(step)}
        for key, (values, codes, scales) in moments.items():
            fmt = self._format(key)
            if self.block is None:
                state[key] = round_plain(values, fmt, None)
            else:
                state[key], state[f"{key}_scale"] = _requantize(values, codes, scales, fmt, self.block)
        return state


def _requantize(values: torch.Tensor, codes: torch.Tensor | None, scales: torch.Tensor | None, fmt: CodeFormat,
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and block scales of ``values``: blocks whose elements share one saved scale keep codes and scale."""
    n = values.numel()
    blocks = padded_numel(n, block) // block
    x = torch.zeros(blocks * block, dtype=torch.float32)
    x[:n] = values
    q, scale = quantize_blocks(x.view(blocks, block), fmt, None)
    q = q.view(torch.uint8)
    if codes is not None:
        s = torch.full((blocks * block,), math.nan)
        s[:n] = scales
        s = s.view(blocks, block)
        has = ~s.isnan()
        ref = torch.where(has, s, -math.inf).amax(dim=1)
        keep = has.any(dim=1) & torch.where(has, s == ref[:, None], True).all(dim=1)
        c = torch.zeros(blocks * block, dtype=torch.uint8)
        c[:n] = codes.view(torch.uint8)
        # Elements without a saved value (padding between parameters in a ZeRO flat space) take the code
        # of zero, which does not depend on the scale: what the uninterrupted run's own step wrote there.
        q = torch.where(keep[:, None] & has, c.view(blocks, block), q)
        scale = torch.where(keep, ref, scale)
    return q.view(-1)[:n].view(fmt.dtype), scale
