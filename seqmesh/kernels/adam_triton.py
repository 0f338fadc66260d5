"""Fused multi-tensor AdamW step with block-quantized states, in one Triton launch.

One launch updates every tensor of a bucket (``seqmesh.kernels.adam_update.Bucket``): a table on the
device holds, per tensor, the addresses of its parameter, gradient, state codes and scales, its
length, random-counter base and step; a second, cached table maps each program to (tensor, first
element) over fixed chunks of ``CHUNK`` elements. A program loads its chunk as a
[chunk / block_size, block_size] tile, dequantizes m and v, applies the AdamW update in fp32,
re-quantizes each block (absmax scale, rounding as ``seqmesh.kernels.fp8_codec``) and stores
parameter, codes and scales: every byte of state is read once and written once, which is why this
is faster than fp32 fused AdamW (16 instead of 28 bytes of traffic per fp32 parameter). fp8 keeps
its scales in the top bits of v's code bytes (``fp8_codec.pack_scales``): a program gathers them
with a masked sum across each block's first 64 lanes and scatters them back with shifts.

The kernel repeats the torch path (``adam_update.torch_step``) operation for operation: IEEE division and
square root (``div_rn``, ``sqrt_rn``), FMA contraction off, and rounding done on the fp32 bit pattern
before an exact cast, so both backends produce identical bits.

Host work per step is building the pointer table (a list of ``data_ptr()`` values and one pinned
host-to-device copy): gradients may be reallocated between steps (``zero_grad(set_to_none=True)``),
so their addresses are read fresh every time.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from seqmesh.kernels.adam_update import Bucket, Hyper
from seqmesh.kernels.fp8_codec import GOLDEN, STREAM_PARAM, STREAM_V, CodeFormat

# Elements per program and warps: 4 elements per thread. Compiled for sm_90 (ptxas -v), the fp8
# kernel then needs 74 registers (24 resident warps per SM); 8 elements per thread needed 160 (8 warps).
CHUNK = 1024
NUM_WARPS = 8
# Jitted code may read module globals only as constexprs.
_GOLDEN = tl.constexpr(GOLDEN)
_STREAM_PARAM = tl.constexpr(STREAM_PARAM)
_STREAM_V = tl.constexpr(STREAM_V)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float8_e4m3fn: tl.float8e4nv,
    torch.float8_e5m2: tl.float8e5,
    torch.int8: tl.int8,
    torch.uint8: tl.uint8,
}


@triton.jit
def _hash32(x):
    """Same hash as ``fp8_codec.hash32``, on uint32 (products wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _round_magnitude(y, bits, MANT: tl.constexpr, MIN_NORMAL: tl.constexpr, QMAX: tl.constexpr,
                     STOCH: tl.constexpr):
    """``fp8_codec.round_magnitude`` for y >= 0: MANT < 0 integer codes, else float codes."""
    if MANT < 0:
        if STOCH:
            u = (bits >> 16).to(tl.float32) * 1.52587890625e-05
        else:
            u = 0.5
        r = tl.minimum(tl.floor(y + u), QMAX)
    else:
        if MIN_NORMAL > 0:
            sub = y < MIN_NORMAL
            shifted = tl.where(sub, y + MIN_NORMAL, y)
        else:
            shifted = y
        raw = shifted.to(tl.int32, bitcast=True)
        if STOCH:
            off = (bits & ((1 << (23 - MANT)) - 1)).to(tl.int32)
        else:
            off = 1 << (22 - MANT)
        r = ((raw + off) & (-(1 << (23 - MANT)))).to(tl.float32, bitcast=True)
        if MIN_NORMAL > 0:
            r = tl.where(sub, r - MIN_NORMAL, r)
    return r


@triton.jit
def _load_f32(ptrs, mask, MASKED: tl.constexpr):
    # No `other=`: a constant cannot be cast to every code type; masked lanes are zeroed instead.
    if MASKED:
        x = tl.where(mask, tl.load(ptrs, mask=mask).to(tl.float32), 0.0)
    else:
        x = tl.load(ptrs).to(tl.float32)
    return x


@triton.jit
def _load_state(ptr, scale_ptr, offs, mask, blk, bmask, SCALED: tl.constexpr, SQRT: tl.constexpr,
                MASKED: tl.constexpr):
    x = _load_f32(ptr + offs, mask, MASKED)
    if SCALED:
        scale = _load_f32(scale_ptr + blk, bmask, MASKED)
        x = x * scale[:, None]
        if SQRT:
            x = x * x
    return x


@triton.jit
def _quantize_blocks(x, bits, QMAX: tl.constexpr, MANT: tl.constexpr, MIN_NORMAL: tl.constexpr,
                     FLOOR: tl.constexpr, SIGNED: tl.constexpr, SQRT: tl.constexpr, STOCH: tl.constexpr):
    """``fp8_codec.quantize_blocks``: (code values, exact in the code type; per-row scales)."""
    if SQRT:
        x = tl.sqrt_rn(x)
    a = tl.abs(x)
    absmax = tl.max(a, axis=1)
    scale = absmax * (1.0 / QMAX)
    inv = tl.where(absmax > 0, tl.div_rn(tl.full(absmax.shape, QMAX, tl.float32), absmax), 0.0)
    y = tl.minimum(a * inv[:, None], QMAX)
    if FLOOR > 0:
        y = tl.maximum(y, FLOOR)
    q = _round_magnitude(y, bits, MANT, MIN_NORMAL, QMAX, STOCH)
    if SIGNED:
        q = tl.where((x < 0) & (q > 0), -q, q)
    if MANT < 0:
        q = q.to(tl.int32)
    return q, scale


@triton.jit
def _unpack_scales(packed, QBLOCK: tl.constexpr):
    """``fp8_codec.unpack_scales``: m's and v's per-row scales from the top bits of v's packed bytes."""
    lane = tl.arange(0, QBLOCK)[None, :]
    bit = (packed >> 7).to(tl.uint32) << (lane & 31).to(tl.uint32)
    zero = tl.zeros_like(bit)
    m_word = tl.sum(tl.where(lane < 32, bit, zero), axis=1)
    v_word = tl.sum(tl.where((lane >= 32) & (lane < 64), bit, zero), axis=1)
    return m_word.to(tl.float32, bitcast=True), v_word.to(tl.float32, bitcast=True)


@triton.jit
def _pack_scales(codes, m_scale, v_scale, QBLOCK: tl.constexpr):
    """``fp8_codec.pack_scales``: v's code bytes with bit j of m's scale in lane j's top bit, v's in lane 32 + j."""
    lane = tl.arange(0, QBLOCK)[None, :]
    m_word = m_scale.to(tl.uint32, bitcast=True)[:, None]
    v_word = v_scale.to(tl.uint32, bitcast=True)[:, None]
    word = tl.where(lane < 32, m_word, tl.where(lane < 64, v_word, tl.zeros_like(v_word)))
    bit = (word >> (lane & 31).to(tl.uint32)) & 1
    return (codes.to(tl.uint32) | (bit << 7)).to(tl.uint8)


@triton.jit
def _store_state(x, bits, ptr, scale_ptr, offs, mask, blk, bmask,
                 DTYPE: tl.constexpr, SCALED: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr,
                 MIN_NORMAL: tl.constexpr, FLOOR: tl.constexpr, SIGNED: tl.constexpr,
                 SQRT: tl.constexpr, STOCH: tl.constexpr):
    """``fp8_codec.quantize_blocks`` (SCALED) or ``fp8_codec.round_plain``, then store."""
    if SCALED:
        q, scale = _quantize_blocks(x, bits, QMAX, MANT, MIN_NORMAL, FLOOR, SIGNED, SQRT, STOCH)
        tl.store(ptr + offs, q.to(DTYPE), mask=mask)
        tl.store(scale_ptr + blk, scale, mask=bmask)
    elif MANT == 23:
        tl.store(ptr + offs, x, mask=mask)
    else:
        mag = _round_magnitude(tl.abs(x), bits, MANT, 0.0, 0.0, STOCH)
        tl.store(ptr + offs, tl.where((x < 0) & (mag > 0), -mag, mag).to(DTYPE), mask=mask)


@triton.jit
def _update_chunk(
    p_ptr, g_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, start, numel, key_base, step, step_size, inv_sqrt_bc2,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, seed_hash,
    P_BF16: tl.constexpr, STOCH_P: tl.constexpr, STOCH_V: tl.constexpr, SCALED: tl.constexpr,
    PACKED: tl.constexpr,
    M_DTYPE: tl.constexpr, M_QMAX: tl.constexpr, M_MANT: tl.constexpr, M_MIN_NORMAL: tl.constexpr,
    M_FLOOR: tl.constexpr, M_SIGNED: tl.constexpr, M_SQRT: tl.constexpr,
    V_DTYPE: tl.constexpr, V_QMAX: tl.constexpr, V_MANT: tl.constexpr, V_MIN_NORMAL: tl.constexpr,
    V_FLOOR: tl.constexpr, V_SIGNED: tl.constexpr, V_SQRT: tl.constexpr,
    BLOCKS: tl.constexpr, QBLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    """The whole update of one chunk; MASKED only for a tensor's last, partial chunk, so that the
    full chunks (all but one per tensor) load and store in wide vectors. PACKED: v's bytes carry
    both block scales (``fp8_codec.pack_scales``) and span whole blocks, padding included."""
    rows = tl.arange(0, BLOCKS)
    offs = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    blk = start // QBLOCK + rows
    if MASKED:
        mask = offs < numel
        bmask = blk * QBLOCK < numel
        block_mask = (blk * QBLOCK < numel)[:, None] & (offs >= 0)
    else:
        mask = None
        bmask = None
        block_mask = None

    g = _load_f32(g_ptr + offs, mask, MASKED)
    p = _load_f32(p_ptr + offs, mask, MASKED)
    if PACKED:
        if MASKED:
            packed = tl.load(v_ptr + offs, mask=block_mask, other=0)
        else:
            packed = tl.load(v_ptr + offs)
        m_scale, v_scale = _unpack_scales(packed, QBLOCK)
        m = _load_f32(m_ptr + offs, mask, MASKED) * m_scale[:, None]
        v = (packed & 0x7F).to(tl.uint8).to(V_DTYPE, bitcast=True).to(tl.float32) * v_scale[:, None]
        if V_SQRT:
            v = v * v
    else:
        m = _load_state(m_ptr, ms_ptr, offs, mask, blk, bmask, SCALED, M_SQRT, MASKED)
        v = _load_state(v_ptr, vs_ptr, offs, mask, blk, bmask, SCALED, V_SQRT, MASKED)

    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p - step_size * tl.div_rn(m, denom)

    if STOCH_P or STOCH_V:
        salt = _hash32((step.to(tl.uint32) * _GOLDEN) ^ seed_hash.to(tl.uint32))
        counter = salt + (key_base + offs).to(tl.uint32) * 2
        bits_p = _hash32(counter + _STREAM_PARAM)
        bits_v = _hash32(counter + _STREAM_V)
    else:
        bits_p = offs.to(tl.uint32)
        bits_v = bits_p

    if P_BF16:
        mag = _round_magnitude(tl.abs(p), bits_p, 7, 0.0, 0.0, STOCH_P)
        tl.store(p_ptr + offs, tl.where((p < 0) & (mag > 0), -mag, mag).to(tl.bfloat16), mask=mask)
    else:
        tl.store(p_ptr + offs, p, mask=mask)
    if PACKED:
        qm, m_scale = _quantize_blocks(m, bits_v, M_QMAX, M_MANT, M_MIN_NORMAL, M_FLOOR, M_SIGNED, M_SQRT, False)
        tl.store(m_ptr + offs, qm.to(M_DTYPE), mask=mask)
        qv, v_scale = _quantize_blocks(v, bits_v, V_QMAX, V_MANT, V_MIN_NORMAL, V_FLOOR, V_SIGNED, V_SQRT, STOCH_V)
        codes = qv.to(V_DTYPE).to(tl.uint8, bitcast=True)
        if MASKED:  # padding lanes keep code 0 (v = 0); only their scale bits matter
            codes = tl.where(mask, codes, tl.zeros_like(codes))
        tl.store(v_ptr + offs, _pack_scales(codes, m_scale, v_scale, QBLOCK), mask=block_mask)
    else:
        _store_state(m, bits_v, m_ptr, ms_ptr, offs, mask, blk, bmask, M_DTYPE, SCALED, M_QMAX, M_MANT,
                     M_MIN_NORMAL, M_FLOOR, M_SIGNED, M_SQRT, False)
        _store_state(v, bits_v, v_ptr, vs_ptr, offs, mask, blk, bmask, V_DTYPE, SCALED, V_QMAX, V_MANT,
                     V_MIN_NORMAL, V_FLOOR, V_SIGNED, V_SQRT, STOCH_V)


@triton.jit(do_not_specialize=["num_tensors", "seed_hash"])
def _adamw_kernel(
    table, floats, chunk_tensor, chunk_start, num_tensors,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, seed_hash,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, P_BF16: tl.constexpr, STOCH_P: tl.constexpr,
    STOCH_V: tl.constexpr, SCALED: tl.constexpr, PACKED: tl.constexpr,
    M_DTYPE: tl.constexpr, M_QMAX: tl.constexpr, M_MANT: tl.constexpr, M_MIN_NORMAL: tl.constexpr,
    M_FLOOR: tl.constexpr, M_SIGNED: tl.constexpr, M_SQRT: tl.constexpr,
    V_DTYPE: tl.constexpr, V_QMAX: tl.constexpr, V_MANT: tl.constexpr, V_MIN_NORMAL: tl.constexpr,
    V_FLOOR: tl.constexpr, V_SIGNED: tl.constexpr, V_SQRT: tl.constexpr,
    BLOCKS: tl.constexpr, QBLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    # table rows (int64 [9, num_tensors]): param, grad, m codes, m scales, v codes, v scales
    # addresses; numel; key base; step. floats rows (fp32 [2, num_tensors]): step size, 1/sqrt(bc2).
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCKS * QBLOCK)
    p_ptr = tl.load(table + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table + num_tensors + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(table + 2 * num_tensors + t).to(tl.pointer_type(M_DTYPE))
    ms_ptr = tl.load(table + 3 * num_tensors + t).to(tl.pointer_type(tl.float32))
    if PACKED:
        v_ptr = tl.load(table + 4 * num_tensors + t).to(tl.pointer_type(tl.uint8))
    else:
        v_ptr = tl.load(table + 4 * num_tensors + t).to(tl.pointer_type(V_DTYPE))
    vs_ptr = tl.load(table + 5 * num_tensors + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every address is a multiple of 16 bytes (checked on the host): vector loads
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        ms_ptr = tl.multiple_of(ms_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vs_ptr = tl.multiple_of(vs_ptr, 16)
    numel = tl.load(table + 6 * num_tensors + t)
    key_base = tl.load(table + 7 * num_tensors + t)
    step = tl.load(table + 8 * num_tensors + t)
    step_size = tl.load(floats + t)
    inv_sqrt_bc2 = tl.load(floats + num_tensors + t)
    if start + BLOCKS * QBLOCK <= numel:
        _update_chunk(p_ptr, g_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, start, numel, key_base, step, step_size,
                      inv_sqrt_bc2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, seed_hash,
                      P_BF16, STOCH_P, STOCH_V, SCALED, PACKED,
                      M_DTYPE, M_QMAX, M_MANT, M_MIN_NORMAL, M_FLOOR, M_SIGNED, M_SQRT,
                      V_DTYPE, V_QMAX, V_MANT, V_MIN_NORMAL, V_FLOOR, V_SIGNED, V_SQRT,
                      BLOCKS, QBLOCK, False)
    else:
        _update_chunk(p_ptr, g_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, start, numel, key_base, step, step_size,
                      inv_sqrt_bc2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, seed_hash,
                      P_BF16, STOCH_P, STOCH_V, SCALED, PACKED,
                      M_DTYPE, M_QMAX, M_MANT, M_MIN_NORMAL, M_FLOOR, M_SIGNED, M_SQRT,
                      V_DTYPE, V_QMAX, V_MANT, V_MIN_NORMAL, V_FLOOR, V_SIGNED, V_SQRT,
                      BLOCKS, QBLOCK, True)


def _format_args(prefix: str, fmt: CodeFormat) -> dict:
    """A code format as the kernel's constexprs (MANT: -1 integer codes, 23 plain fp32)."""
    if fmt.dtype == torch.float32:
        mant = 23
    elif fmt.mantissa_bits is None:
        mant = -1
    else:
        mant = fmt.mantissa_bits
    return {
        f"{prefix}_DTYPE": _TL_DTYPES[fmt.dtype],
        f"{prefix}_QMAX": float(fmt.qmax),
        f"{prefix}_MANT": mant,
        f"{prefix}_MIN_NORMAL": float(fmt.min_normal),
        f"{prefix}_FLOOR": float(fmt.floor_code),
        f"{prefix}_SIGNED": fmt.signed,
        f"{prefix}_SQRT": fmt.sqrt_domain,
    }


@functools.lru_cache(maxsize=256)
def _chunk_table(numels: tuple[int, ...], chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index int32, first element int64) of every program; depends only on the shapes."""
    counts = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    firsts = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(firsts, counts)
    return tensor_idx.to(device), (local * chunk).to(device)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


def fused_step(bucket: Bucket, hp: Hyper) -> None:
    """One launch updating every tensor of ``bucket`` (same contract as ``adam_update.torch_step``)."""
    params = bucket.params
    grads = [g if g.is_contiguous() else g.contiguous() for g in bucket.grads]
    device = params[0].device
    fmt = hp.fmt
    separate = fmt.scaled and not fmt.packed  # else the scale rows are never read: any valid address
    m_scales = bucket.exp_avg_scale if separate else bucket.exp_avg
    v_scales = bucket.exp_avg_sq_scale if separate else bucket.exp_avg_sq
    rows = (params, grads, bucket.exp_avg, m_scales, bucket.exp_avg_sq, v_scales)
    table = [t.data_ptr() for row in rows for t in row]
    numels = [p.numel() for p in params]
    table += numels + bucket.key_base + bucket.step
    floats = [hp.step_size(s) for s in bucket.step] + [hp.inv_sqrt_bc2(s) for s in bucket.step]
    chunk = max(CHUNK, hp.block_size)  # both powers of two: whole blocks per chunk
    chunk_tensor, chunk_start = _chunk_table(tuple(numels), chunk, device)
    if chunk_tensor.numel() == 0:
        return
    bf16_params = params[0].dtype == torch.bfloat16
    aligned = all(address % 16 == 0 for address in table[: 6 * len(params)])
    _adamw_kernel[(chunk_tensor.numel(),)](
        _to_device(table, torch.int64, device), _to_device(floats, torch.float32, device),
        chunk_tensor, chunk_start, len(params),
        hp.decay, hp.beta1, 1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.eps, hp.seed_hash,
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype], P_BF16=bf16_params,
        STOCH_P=hp.stochastic and bf16_params, STOCH_V=hp.stochastic and fmt.v.dtype != torch.float32,
        SCALED=fmt.scaled, PACKED=fmt.packed, **_format_args("M", fmt.m), **_format_args("V", fmt.v),
        BLOCKS=chunk // hp.block_size, QBLOCK=hp.block_size, ALIGNED=aligned,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
