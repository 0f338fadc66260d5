"""One AdamW step over a bucket of tensors, in plain torch: the CPU path and the reference math.

The bucket is flattened into one padded buffer (each tensor padded to whole quantization blocks,
so no block straddles two tensors), updated with whole-buffer ops, and split back with
``torch._foreach_copy_``: a handful of large ops per step instead of a dozen per tensor.

The Triton kernel (``seqmesh/kernels/adam_triton.py``) performs exactly these operations in the same
order, each rounded once to fp32 (it is compiled without FMA contraction and uses IEEE division and
square root), so the two backends agree bit for bit on the states and parameters they produce.
It sits beside the kernel for that reason (the kernel takes ``Bucket`` and ``Hyper`` from here);
``FP8AdamW`` (``seqmesh/trainer/optim``) drives both.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from seqmesh.kernels.fp8_codec import (
    BF16,
    STREAM_PARAM,
    STREAM_V,
    StateFormat,
    dequantize_blocks,
    hash32_int,
    pack_scales,
    quantize_blocks,
    random_bits,
    round_plain,
    sqrt_rn,
    tensor_salt,
    unpack_scales,
)


@dataclass(frozen=True)
class Hyper:
    """The settings one launch shares: a param group's hyperparameters and state format."""

    fmt: StateFormat
    block_size: int
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    seed: int
    stochastic: bool

    @property
    def decay(self) -> float:
        """Decoupled weight decay as one multiplier, applied before the Adam update (as torch's AdamW)."""
        return 1.0 - self.lr * self.weight_decay

    @property
    def seed_hash(self) -> int:
        return hash32_int(self.seed)

    def step_size(self, step: int) -> float:
        return self.lr / (1.0 - self.beta1**step)

    def inv_sqrt_bc2(self, step: int) -> float:
        return 1.0 / math.sqrt(1.0 - self.beta2**step)


@dataclass
class Bucket:
    """Tensors stepped together: one param group, one device, one (param, grad) dtype pair.

    ``key_base`` is each tensor's first element in its group's index space (random-bit counters);
    ``step`` the step each tensor is taking now (already incremented). Scale lists stay empty for
    unscaled and packed formats; a packed format's ``exp_avg_sq`` tensors are the bytes of
    ``fp8_codec.pack_scales``, padded to whole blocks.
    """

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_scale: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq_scale: list[torch.Tensor] = field(default_factory=list)
    key_base: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)


def padded_numel(numel: int, block: int) -> int:
    """``numel`` rounded up to whole blocks."""
    return -(-numel // block) * block


def _flat(tensors: list[torch.Tensor], numels: list[int], padded: list[int]) -> torch.Tensor:
    """Concatenate ``tensors`` flattened, each followed by zeros up to its padded length (a view when
    that is one whole tensor: the common host chunk, spared a copy)."""
    if len(tensors) == 1 and numels == padded:
        return tensors[0].reshape(-1)
    pieces: list[torch.Tensor] = []
    for t, n, s in zip(tensors, numels, padded):
        pieces.append(t.reshape(-1))
        if s > n:
            pieces.append(t.new_zeros(s - n))
    return torch.cat(pieces)


def _real(numels: list[int], padded: list[int], device: torch.device) -> torch.Tensor:
    """True at the flat buffer's real elements, False at padding."""
    return _flat([torch.ones(n, dtype=torch.bool, device=device) for n in numels], numels, padded)


def _split_back(flat: torch.Tensor, dests: list[torch.Tensor], numels: list[int], padded: list[int]) -> None:
    pieces = torch.split(flat, padded)
    torch._foreach_copy_(dests, [piece[:n].view(d.shape) for piece, n, d in zip(pieces, numels, dests)])


def _per_tensor(values: list, padded: list[int], dtype: torch.dtype, block: int,
                device: torch.device) -> torch.Tensor:
    """A per-tensor value as a 0-d tensor when all tensors share it, else broadcast to [blocks, block].

    Tensors rather than Python numbers, so that a compiled update takes each step's learning rate,
    step count and chunk offset without recompiling (compiled code specialises on Python numbers).
    """
    if len(set(values)) == 1:
        return torch.tensor(values[0], dtype=dtype, device=device)
    table = torch.tensor(values, dtype=dtype, device=device)
    return torch.repeat_interleave(table, torch.tensor(padded, device=device)).view(-1, block)


def torch_step(bucket: Bucket, hp: Hyper, update: Callable[..., tuple] | None = None) -> None:
    """Update params and states of ``bucket`` in place (pure torch, any device).

    ``update`` does the element-wise math for ``hp.fmt``: ``update_blocks`` (default), or its compiled
    form (``compiled_update(hp.fmt)``), which gives the same bits.
    """
    fmt, block = hp.fmt, hp.block_size
    numels = [p.numel() for p in bucket.params]
    padded = [padded_numel(n, block) for n in numels]
    device = bucket.params[0].device
    f32, i64 = torch.float32, torch.int64

    g = _flat(bucket.grads, numels, padded).view(-1, block)
    p = _flat(bucket.params, numels, padded).view(-1, block)
    m = _flat(bucket.exp_avg, numels, padded).view(-1, block)
    if fmt.packed:
        v = torch.cat(bucket.exp_avg_sq).view(-1, block)
        scales: tuple[torch.Tensor, ...] = ()
    else:
        v = _flat(bucket.exp_avg_sq, numels, padded).view(-1, block)
        scales = (torch.cat(bucket.exp_avg_scale), torch.cat(bucket.exp_avg_sq_scale)) if fmt.scaled else ()
    # Random-bit counters: element i of tensor t is number key_base[t] + (i - the start of t in the buffer).
    starts = [sum(padded[:i]) for i in range(len(padded))]
    out = (update or functools.partial(update_blocks, fmt=fmt))(
        g, p, m, v, *scales,
        padding=None if numels == padded or not fmt.packed else ~_real(numels, padded, device).view(-1, block),
        beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
        stochastic_p=hp.stochastic and p.dtype == torch.bfloat16, stochastic_v=hp.stochastic and fmt.v.dtype != f32,
        decay=torch.tensor(hp.decay, dtype=f32, device=device),
        step_size=_per_tensor([hp.step_size(s) for s in bucket.step], padded, f32, block, device),
        inv_sqrt_bc2=_per_tensor([hp.inv_sqrt_bc2(s) for s in bucket.step], padded, f32, block, device),
        salt=tensor_salt(hp.seed, _per_tensor(bucket.step, padded, i64, block, device)),
        shift=_per_tensor([k - s for k, s in zip(bucket.key_base, starts)], padded, i64, block, device))
    p_new, qm, qv = out[:3]
    _split_back(p_new.reshape(-1), bucket.params, numels, padded)
    _split_back(qm.reshape(-1), bucket.exp_avg, numels, padded)
    if fmt.packed:
        _split_back(qv.reshape(-1), bucket.exp_avg_sq, padded, padded)
        return
    if fmt.scaled:
        nblocks = [s // block for s in padded]
        _split_back(out[3], bucket.exp_avg_scale, nblocks, nblocks)
        _split_back(out[4], bucket.exp_avg_sq_scale, nblocks, nblocks)
    _split_back(qv.reshape(-1), bucket.exp_avg_sq, numels, padded)


def update_blocks(g: torch.Tensor, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  m_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                  padding: torch.Tensor | None, fmt: StateFormat, beta1: float, beta2: float, eps: float,
                  stochastic_p: bool, stochastic_v: bool, decay: torch.Tensor, step_size: torch.Tensor,
                  inv_sqrt_bc2: torch.Tensor, salt: torch.Tensor,
                  shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The element-wise AdamW step on [blocks, block] buffers in their stored dtypes: (new params,
    m codes, v codes or packed bytes[, m scales, v scales]). ``padding``: True at a packed buffer's
    padding lanes (they must store code 0); per-tensor values are 0-d or [blocks, block] tensors.

    A function of tensors alone, so ``torch.compile`` can fuse it into one pass over memory
    (``compiled_update``); eager, it is about a hundred whole-buffer passes, most of them the int64
    random-bit hash.
    """
    f32 = torch.float32
    param_dtype, block = p.dtype, g.shape[1]
    g, p = g.to(f32), p.to(f32)
    if fmt.packed:
        v_codes, m_scale, v_scale = unpack_scales(v, fmt.v.dtype)
        m = dequantize_blocks(m, m_scale, fmt.m)
        v = dequantize_blocks(v_codes, v_scale, fmt.v)
    elif fmt.scaled:
        m, v = dequantize_blocks(m, m_scale, fmt.m), dequantize_blocks(v, v_scale, fmt.v)
    else:
        m, v = m.to(f32), v.to(f32)

    p = p * decay
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    denom = sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p - step_size * (m / denom)

    bits_p = bits_v = None
    if stochastic_p or stochastic_v:
        index = torch.arange(g.numel(), dtype=torch.int64, device=g.device).view(-1, block) + shift
        bits_p = random_bits(salt, index, STREAM_PARAM) if stochastic_p else None
        bits_v = random_bits(salt, index, STREAM_V) if stochastic_v else None
    if param_dtype == torch.bfloat16:
        p = round_plain(p, BF16, bits_p)
    if not fmt.scaled:
        return p, round_plain(m, fmt.m, None), round_plain(v, fmt.v, bits_v)
    qm, sm = quantize_blocks(m, fmt.m, None)
    qv, sv = quantize_blocks(v, fmt.v, bits_v)
    if not fmt.packed:
        return p, qm, qv, sm, sv
    v_bytes = qv.view(torch.uint8)
    if padding is not None:
        v_bytes = torch.where(padding, 0, v_bytes)  # decodes to v = 0 (the floor would write a nonzero code)
    return p, qm, pack_scales(v_bytes, sm, sv)


@functools.cache
def cpp_compiler_available() -> bool:
    """Whether Inductor finds the C++ compiler it builds host kernels with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure to locate one means "no compiler" here
        return False
    return True


@functools.cache
def compiled_update(fmt: StateFormat) -> Callable[..., tuple]:
    """``update_blocks`` for ``fmt``, compiled by Inductor: on a CPU, one vectorised OpenMP loop nest.

    The host optimizer step of an offloaded model runs over every parameter each step; eager it
    managed a few million parameters per second on 2 cores; compiled it is 8.5x faster there and
    14.7x on a 16-core host (``bench/optim.py --host``, README). Floating-point contraction stays off
    (Inductor's default), so every operation rounds as in eager mode: ``tests/test_optim_fp8_adamw.py`` checks the bits. Shapes are
    made dynamic only once a second chunk length appears (torch's default), and the format is a
    closure constant, not an argument: its bit widths must stay plain integers (torch 2.11 fails on
    shifts by symbolic ones, which ``dynamic=True`` made of them).
    """
    def update(*args: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return update_blocks(*args, fmt=fmt, **kwargs)

    return torch.compile(update)


def chunks_of(bucket: Bucket, hp: Hyper, chunk_elems: int) -> list[Bucket]:
    """``bucket`` cut into buckets of about ``chunk_elems`` elements, each piece a block-aligned slice of one tensor.

    Every operation of ``torch_step`` acts on whole blocks (quantization scales) or single elements
    (the update, the random bits, counted from ``key_base``), so stepping the pieces gives the same
    bits as stepping the whole bucket, with temporaries of one piece instead of the whole bucket:
    what a host step over tens of gigabytes of parameters needs.
    """
    block, packed = hp.block_size, hp.fmt.packed
    if chunk_elems < block:
        raise ValueError(f"chunk_elems={chunk_elems} must be at least one block ({block})")
    step = chunk_elems // block * block
    out: list[Bucket] = []
    current, size = Bucket(), 0
    for i, p in enumerate(bucket.params):
        n = p.numel()
        for o in range(0, n, step):
            c = min(step, n - o)
            pc = padded_numel(c, block)
            current.params.append(p.view(-1)[o:o + c])
            current.grads.append(bucket.grads[i].view(-1)[o:o + c])
            current.exp_avg.append(bucket.exp_avg[i][o:o + c])
            current.exp_avg_sq.append(bucket.exp_avg_sq[i][o:o + pc] if packed else bucket.exp_avg_sq[i][o:o + c])
            if bucket.exp_avg_scale:
                current.exp_avg_scale.append(bucket.exp_avg_scale[i][o // block:(o + pc) // block])
                current.exp_avg_sq_scale.append(bucket.exp_avg_sq_scale[i][o // block:(o + pc) // block])
            current.key_base.append(bucket.key_base[i] + o)
            current.step.append(bucket.step[i])
            size += pc
            if size >= step:
                out.append(current)
                current, size = Bucket(), 0
    if current.params:
        out.append(current)
    return out


# What a staged piece takes to the device, and what comes back (everything the update writes).
_STAGED_IN = ("params", "grads", "exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")
_STAGED_OUT = ("params", "exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")


def scale_grads(bucket: Bucket, factor: torch.Tensor | None) -> Bucket:
    """``bucket`` with its gradients multiplied in place by ``factor`` (a 0-dim tensor in the gradients' dtype;
    None: unchanged): the clip's scaling done on the piece the update is about to read (see
    ``FP8AdamW.scale_grads_in_step``)."""
    if factor is not None:
        for g in bucket.grads:
            g.mul_(factor.to(g.device))
    return bucket


def staged_step(bucket: Bucket, hp: Hyper, chunk_elems: int, device: torch.device,
                step_on_device: Callable[[Bucket], None], grad_scale: torch.Tensor | None = None,
                on_done: Callable[[Bucket], None] | None = None, *, in_flight: int) -> None:
    """A host-resident ``bucket`` stepped on ``device`` a piece at a time (``chunks_of``): each piece's
    parameters, gradients and states copied there, stepped by ``step_on_device``, parameters and states
    copied back into the host tensors (those already on ``device``, such as the weights and gradients of
    ``FP8AdamW.keep_states_on_host``, are neither copied nor copied back: only the states travel). ``grad_scale`` multiplies each piece's gradients on ``device``, where it
    costs nothing next to the copies.

    Why: under parameter offload the update of every parameter runs each step; the host's compiled
    update reaches about 0.5G parameters/s on 16 cores (``bench/optim.py --host``), while a piece's round
    trip moves about 10 bytes per parameter (bf16 weights and gradients in, weights out, fp8 moments both
    ways), some 5G parameters/s over a 50 GB/s link, and the GPU's kernel is bit for bit the host's, so
    states and checkpoints do not depend on where the update ran. On a GPU the copies in, the update and
    the copies out run on three streams (``_pipelined_on_cuda``). The host tensors hold the update when
    this returns; ``on_done(piece)`` is called, in order, once a piece's host tensors hold theirs (a reader of
    the first pieces need not wait for the last). ``in_flight``: on a GPU, the pieces staged ahead of the one whose
    copy back the host waits for (``_pipelined_on_cuda``)."""
    pieces = chunks_of(bucket, hp, chunk_elems)
    if device.type == "cuda":
        _pipelined_on_cuda(pieces, device, step_on_device, grad_scale, in_flight=in_flight, on_done=on_done)
        return
    for piece in pieces:
        staged = _copied_in(piece, device)
        step_on_device(scale_grads(staged, grad_scale))
        _copy_back(piece, staged)
        if on_done is not None:
            on_done(piece)


def _copied_in(piece: Bucket, device: torch.device, non_blocking: bool = False) -> Bucket:
    """What the update reads of ``piece`` (``_STAGED_IN``), copied to ``device`` (a tensor there already is taken
    as it is: the update then writes it in place)."""
    return Bucket(**{name: [t if t.device == device else t.to(device, copy=True, non_blocking=non_blocking)
                            for t in getattr(piece, name)]
                     for name in _STAGED_IN}, key_base=piece.key_base, step=piece.step)


def _copy_back(piece: Bucket, staged: Bucket, non_blocking: bool = False) -> list[torch.Tensor]:
    """What the update wrote (``_STAGED_OUT``) copied from ``staged`` into ``piece``'s host tensors; returns the
    staged tensors read."""
    read = []
    for name in _STAGED_OUT:
        for host, moved in zip(getattr(piece, name), getattr(staged, name)):
            if moved is not host:
                host.copy_(moved, non_blocking=non_blocking)
                read.append(moved)
    return read


def _pipelined_on_cuda(pieces: list[Bucket], device: torch.device, step_on_device: Callable[[Bucket], None],
                       grad_scale: torch.Tensor | None, in_flight: int,
                       on_done: Callable[[Bucket], None] | None = None) -> None:
    """``staged_step``'s loop with piece i+1 copied in while piece i is updated and piece i-1 copied out.

    Why: the link copies each direction on its own engine, so in sequence the step costs the copies in
    plus the copies out, while overlapped it costs the larger of the two (the update kernel is a few
    percent of either): 0.90 -> 0.42 s for 2.8B parameters on an H100 (``bench/offload_params.py``). The
    host waits for piece i's copy back before it stages piece i+``in_flight``, so at most ``in_flight`` + 1
    pieces occupy the device whatever the bucket's size."""
    compute = torch.cuda.current_stream(device)
    inbound, outbound = torch.cuda.Stream(device), torch.cuda.Stream(device)
    inbound.wait_stream(compute)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device)  # once, not a blocking copy per piece
    returned: collections.deque[tuple[torch.cuda.Event, Bucket]] = collections.deque()

    def landed() -> None:
        event, piece = returned.popleft()
        event.synchronize()
        if on_done is not None:
            on_done(piece)

    for piece in pieces:
        if len(returned) >= in_flight:
            landed()
        with torch.cuda.stream(inbound):
            staged = _copied_in(piece, device, non_blocking=True)
        compute.wait_stream(inbound)
        for name in _STAGED_IN:
            for moved in getattr(staged, name):
                moved.record_stream(compute)
        step_on_device(scale_grads(staged, grad_scale))
        outbound.wait_stream(compute)
        with torch.cuda.stream(outbound):
            for moved in _copy_back(piece, staged, non_blocking=True):
                moved.record_stream(outbound)
            returned.append((outbound.record_event(), piece))
    while returned:
        landed()


def chunked_step(bucket: Bucket, hp: Hyper, chunk_elems: int, update: Callable[..., tuple] | None = None,
                 grad_scale: torch.Tensor | None = None) -> None:
    """``torch_step`` a piece at a time (``chunks_of``): the same bits in bounded memory (``grad_scale``: each
    piece's gradients scaled first, while they are in cache)."""
    for piece in chunks_of(bucket, hp, chunk_elems):
        torch_step(scale_grads(piece, grad_scale), hp, update)
