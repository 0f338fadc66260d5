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

import math
from dataclasses import dataclass, field

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
    """Concatenate ``tensors`` flattened, each followed by zeros up to its padded length."""
    pieces: list[torch.Tensor] = []
    for t, n, s in zip(tensors, numels, padded):
        pieces.append(t.reshape(-1))
        if s > n:
            pieces.append(t.new_zeros(s - n))
    return torch.cat(pieces)


def _per_element(values: list, padded: list[int], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor | float | int:
    """A per-tensor value broadcast to every element (a plain scalar when all tensors share it)."""
    if len(set(values)) == 1:
        return values[0]
    table = torch.tensor(values, dtype=dtype, device=device)
    return torch.repeat_interleave(table, torch.tensor(padded, device=device))


def _real(numels: list[int], padded: list[int], device: torch.device) -> torch.Tensor:
    """True at the flat buffer's real elements, False at padding."""
    return _flat([torch.ones(n, dtype=torch.bool, device=device) for n in numels], numels, padded)


def _split_back(flat: torch.Tensor, dests: list[torch.Tensor], numels: list[int], padded: list[int]) -> None:
    pieces = torch.split(flat, padded)
    torch._foreach_copy_(dests, [piece[:n].view(d.shape) for piece, n, d in zip(pieces, numels, dests)])


def torch_step(bucket: Bucket, hp: Hyper) -> None:
    """Update params and states of ``bucket`` in place (pure torch, any device)."""
    fmt, block = hp.fmt, hp.block_size
    numels = [p.numel() for p in bucket.params]
    padded = [padded_numel(n, block) for n in numels]
    device = bucket.params[0].device
    f32 = torch.float32

    g = _flat(bucket.grads, numels, padded).to(f32).view(-1, block)
    p = _flat(bucket.params, numels, padded).to(f32).view(-1, block)
    if fmt.packed:
        v_codes, m_scale, v_scale = unpack_scales(torch.cat(bucket.exp_avg_sq).view(-1, block), fmt.v.dtype)
        m = dequantize_blocks(_flat(bucket.exp_avg, numels, padded).view(-1, block), m_scale, fmt.m)
        v = dequantize_blocks(v_codes, v_scale, fmt.v)
    elif fmt.scaled:
        m = dequantize_blocks(_flat(bucket.exp_avg, numels, padded).view(-1, block),
                              torch.cat(bucket.exp_avg_scale), fmt.m)
        v = dequantize_blocks(_flat(bucket.exp_avg_sq, numels, padded).view(-1, block),
                              torch.cat(bucket.exp_avg_sq_scale), fmt.v)
    else:
        m = _flat(bucket.exp_avg, numels, padded).to(f32).view(-1, block)
        v = _flat(bucket.exp_avg_sq, numels, padded).to(f32).view(-1, block)

    step_size = _per_element([hp.step_size(s) for s in bucket.step], padded, f32, device)
    inv_sqrt_bc2 = _per_element([hp.inv_sqrt_bc2(s) for s in bucket.step], padded, f32, device)
    if isinstance(step_size, torch.Tensor):
        step_size = step_size.view(-1, block)
    if isinstance(inv_sqrt_bc2, torch.Tensor):
        inv_sqrt_bc2 = inv_sqrt_bc2.view(-1, block)

    p = p * hp.decay
    m = hp.beta1 * m + (1.0 - hp.beta1) * g
    v = hp.beta2 * v + (1.0 - hp.beta2) * (g * g)
    denom = sqrt_rn(v) * inv_sqrt_bc2 + hp.eps
    p = p - step_size * (m / denom)

    bf16_params = bucket.params[0].dtype == torch.bfloat16
    stochastic_p = hp.stochastic and bf16_params
    stochastic_v = hp.stochastic and fmt.v.dtype != f32
    bits_p = bits_v = None
    if stochastic_p or stochastic_v:
        steps = torch.tensor(bucket.step, dtype=torch.int64, device=device)
        salt = torch.repeat_interleave(tensor_salt(hp.seed, steps), torch.tensor(padded, device=device))
        starts = torch.tensor([0] + padded[:-1], device=device).cumsum(0)
        shift = torch.tensor(bucket.key_base, dtype=torch.int64, device=device) - starts
        index = torch.arange(sum(padded), dtype=torch.int64, device=device)
        index = index + torch.repeat_interleave(shift, torch.tensor(padded, device=device))
        salt, index = salt.view(-1, block), index.view(-1, block)
        bits_p = random_bits(salt, index, STREAM_PARAM) if stochastic_p else None
        bits_v = random_bits(salt, index, STREAM_V) if stochastic_v else None

    if bf16_params:
        p = round_plain(p, BF16, bits_p)
    _split_back(p.reshape(-1), bucket.params, numels, padded)
    if fmt.scaled:
        qm, sm = quantize_blocks(m, fmt.m, None)
        qv, sv = quantize_blocks(v, fmt.v, bits_v)
    else:
        qm, qv = round_plain(m, fmt.m, None), round_plain(v, fmt.v, bits_v)
    _split_back(qm.reshape(-1), bucket.exp_avg, numels, padded)
    if fmt.packed:
        # Padding lanes store code 0 (the floor would write a nonzero one), so they decode to v = 0.
        v_codes = qv.view(torch.uint8) if numels == padded else \
            torch.where(_real(numels, padded, device).view(-1, block), qv.view(torch.uint8), 0)
        _split_back(pack_scales(v_codes, sm, sv).reshape(-1), bucket.exp_avg_sq, padded, padded)
        return
    if fmt.scaled:
        nblocks = [s // block for s in padded]
        _split_back(sm, bucket.exp_avg_scale, nblocks, nblocks)
        _split_back(sv, bucket.exp_avg_sq_scale, nblocks, nblocks)
    _split_back(qv.reshape(-1), bucket.exp_avg_sq, numels, padded)


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


def chunked_step(bucket: Bucket, hp: Hyper, chunk_elems: int) -> None:
    """``torch_step`` a piece at a time (``chunks_of``): the same bits in bounded memory."""
    for piece in chunks_of(bucket, hp, chunk_elems):
        torch_step(piece, hp)
