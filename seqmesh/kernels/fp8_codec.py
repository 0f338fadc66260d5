"""Block-wise quantization of optimizer states, written so that CPU and GPU round identically.

A state tensor is cut into blocks of ``block_size`` consecutive elements; each block keeps one fp32
scale (its absolute maximum over the format's largest code) and one code per element. Rounding is
done *before* the final cast, by adding an offset to the fp32 bit pattern and clearing the bits the
format does not keep: half an ULP for round-to-nearest (ties away from zero), or uniform random bits
for stochastic rounding. The cast that follows is then exact, so the result does not depend on how
a backend rounds its own fp32 -> fp8 conversion (the Triton interpreter and torch disagree), and
the Triton kernel in ``seqmesh/kernels/adam_triton.py`` reproduces these functions bit for bit.

Random bits come from a counter-based hash of (seed, step, element index, stream): no generator
state to carry, identical on every backend, and a resumed run draws exactly the bits it would have
drawn without the interruption.

The codec lives with its kernel (``kernels``, not the optimizer's package) because the kernel is
defined by it: ``adam_triton`` imports these formats and constants, and kernels import nothing above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
# Multipliers of a 32-bit integer hash (xorshift-multiply, from Wellons' "hash prospector" search).
# Both are below 2**31, so the products stay below 2**63 in torch's int64 arithmetic, and the low
# 32 bits equal the wrapping uint32 products the Triton kernel computes.
HASH_M1 = 0x21F0AAAD
HASH_M2 = 0x735A2D97
GOLDEN = 0x9E3779B9
# Random streams: one per quantity rounded stochastically (bf16 parameters, v), so their bits are
# independent. m is always rounded to nearest (see seqmesh/trainer/optim/fp8_adamw.py for the
# measurements behind this).
STREAM_PARAM, STREAM_V = 0, 1


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (torch's CPU ``sqrt`` is off by an ULP at times).

    The square root is taken in float64 and rounded once to fp32, which is exact rounding for
    sqrt since 53 >= 2 * 24 + 2 (no harmful double rounding); the Triton kernel uses ``sqrt_rn``.
    """
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of non-negative int64 values below 2**32 (result in the same range)."""
    x = x ^ (x >> 16)
    x = (x * HASH_M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_M2) & MASK32
    return x ^ (x >> 15)


def hash32_int(x: int) -> int:
    """``hash32`` on a Python int (host-side salts)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * HASH_M1) & MASK32
    x ^= x >> 15
    x = (x * HASH_M2) & MASK32
    return x ^ (x >> 15)


def tensor_salt(seed: int, step: torch.Tensor) -> torch.Tensor:
    """Per-tensor salt from the optimizer seed and each tensor's step count (int64 tensor)."""
    return hash32(((step * GOLDEN) & MASK32) ^ (hash32_int(seed)))


def random_bits(salt: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """32 random bits per element: hash of (salt + 2 * index + stream) modulo 2**32."""
    return hash32((salt + index * 2 + stream) & MASK32)


@dataclass(frozen=True)
class CodeFormat:
    """How one state is stored: a float or integer code, its largest magnitude, and its rounding grid.

    ``mantissa_bits``/``min_normal`` describe float codes (``None`` for integer codes);
    ``floor_code`` > 0 keeps a stored magnitude from rounding to zero (used for sqrt(v), where a
    zero would turn a tiny but nonzero first moment into an unbounded update).
    """

    dtype: torch.dtype
    qmax: float
    mantissa_bits: int | None
    min_normal: float
    floor_code: float
    signed: bool
    sqrt_domain: bool = False


E4M3 = CodeFormat(torch.float8_e4m3fn, 448.0, 3, 2.0**-6, 0.0, signed=True)
E4M3_FLOOR = CodeFormat(torch.float8_e4m3fn, 448.0, 3, 2.0**-6, 2.0**-9, signed=False)
E4M3_SQRT = CodeFormat(torch.float8_e4m3fn, 448.0, 3, 2.0**-6, 2.0**-9, signed=False, sqrt_domain=True)
E5M2 = CodeFormat(torch.float8_e5m2, 57344.0, 2, 2.0**-14, 0.0, signed=True)
E5M2_SQRT = CodeFormat(torch.float8_e5m2, 57344.0, 2, 2.0**-14, 2.0**-16, signed=False, sqrt_domain=True)
INT8 = CodeFormat(torch.int8, 127.0, None, 0.0, 0.0, signed=True)
UINT8_SQRT = CodeFormat(torch.uint8, 255.0, None, 0.0, 1.0, signed=False, sqrt_domain=True)
BF16 = CodeFormat(torch.bfloat16, 0.0, 7, 0.0, 0.0, signed=True)
FP32 = CodeFormat(torch.float32, 0.0, None, 0.0, 0.0, signed=True)


def round_magnitude(y: torch.Tensor, fmt: CodeFormat, bits: torch.Tensor | None) -> torch.Tensor:
    """Round non-negative fp32 ``y`` onto ``fmt``'s grid (stochastically when ``bits`` is given).

    Float codes: add an offset below the kept mantissa bits and clear them. Values under the
    smallest normal are first shifted up by it, so the same bit trick lands on the subnormal grid,
    then shifted back (exactly: both lie in one binade). Integer codes: floor(y + u).
    """
    if fmt.mantissa_bits is None:
        if bits is None:
            u = torch.full_like(y, 0.5)
        else:
            u = (bits >> 16).to(torch.float32) * 2.0**-16
        return torch.floor(y + u).clamp_(max=fmt.qmax)
    drop = 23 - fmt.mantissa_bits
    low = (1 << drop) - 1
    sub = y < fmt.min_normal
    shifted = torch.where(sub, y + fmt.min_normal, y) if fmt.min_normal > 0 else y
    raw = shifted.view(torch.int32).to(torch.int64)
    offset = (bits & low) if bits is not None else (1 << (drop - 1))
    rounded = ((raw + offset) & -(1 << drop)).to(torch.int32).view(torch.float32)
    if fmt.min_normal > 0:
        rounded = torch.where(sub, rounded - fmt.min_normal, rounded)
    return rounded


def quantize_blocks(x: torch.Tensor, fmt: CodeFormat, bits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 ``x`` [blocks, block_size] (padding must be zero) to (codes, fp32 scales [blocks]).

    For ``sqrt_domain`` formats ``x`` is v >= 0 and sqrt(v) is what gets stored.
    """
    if fmt.sqrt_domain:
        x = sqrt_rn(x)
    absmax = x.abs().amax(dim=1)
    # Multiplications by host constants and tensor/tensor divisions only: torch divides a tensor
    # by a scalar through its reciprocal on CUDA but not on CPU, which would split the backends.
    scale = absmax * (1.0 / fmt.qmax)
    inv = torch.where(absmax > 0, torch.full_like(absmax, fmt.qmax) / absmax, torch.zeros_like(absmax))
    y = (x.abs() * inv[:, None]).clamp_(max=fmt.qmax)
    if fmt.floor_code > 0:
        y = y.clamp_(min=fmt.floor_code)
    q = round_magnitude(y, fmt, bits)
    if fmt.signed:
        q = torch.where((x < 0) & (q > 0), -q, q)  # never -0: backends disagree on casting it
    if fmt.mantissa_bits is None:
        q = q.to(torch.int32)
    return q.to(fmt.dtype), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, fmt: CodeFormat) -> torch.Tensor:
    """fp32 values [blocks, block_size] from codes and per-block scales (v itself for sqrt formats)."""
    x = q.to(torch.float32) * scale[:, None]
    return x * x if fmt.sqrt_domain else x


def dequantize_flat(codes: torch.Tensor, scale: torch.Tensor, fmt: CodeFormat, block: int) -> torch.Tensor:
    """fp32 values of one tensor's 1-D codes (any length) with its per-block scales."""
    x = torch.zeros(scale.numel() * block, dtype=torch.float32, device=codes.device)
    x[: codes.numel()] = codes.to(torch.float32)
    return dequantize_blocks(x.view(-1, block), scale, fmt).view(-1)[: codes.numel()]


def round_plain(x: torch.Tensor, fmt: CodeFormat, bits: torch.Tensor | None) -> torch.Tensor:
    """Round fp32 ``x`` to a scale-free format (bf16, or fp32 as is) and cast."""
    if fmt.mantissa_bits is None:
        return x.to(fmt.dtype)
    mag = round_magnitude(x.abs(), fmt, bits)
    return torch.where((x < 0) & (mag > 0), -mag, mag).to(fmt.dtype)


# A packed block carries two fp32 scales (m's, then v's), one bit per element of v's codes.
PACKED_SCALE_BITS = 64


def pack_scales(v_codes: torch.Tensor, m_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """v's codes [blocks, block] as bytes whose top bits carry both block scales, bit for bit.

    v's float codes are magnitudes, so their sign bit is always 0: element j < 32 of a block lends
    it to bit j of m's scale, element 32 + j to bit j of v's. The scales then cost no byte at all
    and a block of 128 stores m and v in exactly 2 bytes per element (``block_size`` >= 64).
    """
    words = torch.stack([m_scale, v_scale], 1).contiguous().view(torch.int32).to(torch.int64) & MASK32
    shifts = torch.arange(32, device=v_codes.device)
    bits = ((words[:, :, None] >> shifts) & 1).view(-1, PACKED_SCALE_BITS)
    packed = v_codes.view(torch.uint8).to(torch.int64)
    packed[:, :PACKED_SCALE_BITS] |= bits << 7
    return packed.to(torch.uint8)


def unpack_scales(packed: torch.Tensor, v_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v codes as ``v_dtype``, m's scales, v's scales) of packed bytes [blocks, block] (``pack_scales``'s inverse)."""
    raw = packed.to(torch.int64)
    codes = (raw & 0x7F).to(torch.uint8).view(v_dtype)
    top = (raw[:, :PACKED_SCALE_BITS] >> 7).view(-1, 2, 32)
    words = (top << torch.arange(32, device=packed.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    scales = words.view(torch.float32)
    return codes, scales[:, 0].contiguous(), scales[:, 1].contiguous()


def pack_flat(v_codes: torch.Tensor, m_scale: torch.Tensor, v_scale: torch.Tensor, block: int) -> torch.Tensor:
    """One tensor's packed bytes (1-D, whole blocks) from its v codes (any length) and both block scales."""
    raw = torch.zeros(m_scale.numel() * block, dtype=torch.uint8, device=v_codes.device)
    raw[: v_codes.numel()] = v_codes.view(torch.uint8)
    return pack_scales(raw.view(-1, block), m_scale, v_scale).view(-1)


def unpack_flat(packed: torch.Tensor, numel: int, v_dtype: torch.dtype,
                block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v codes of the tensor's ``numel`` elements, m's scales, v's scales) from its packed bytes."""
    codes, m_scale, v_scale = unpack_scales(packed.view(-1, block), v_dtype)
    return codes.view(-1)[:numel], m_scale, v_scale


@dataclass(frozen=True)
class StateFormat:
    """The pair of codes one ``state_dtype`` stores m and v in; ``scaled`` formats keep block scales,
    ``packed`` ones inside v's codes (``pack_scales``) rather than in tensors of their own."""

    name: str
    m: CodeFormat
    v: CodeFormat
    scaled: bool
    packed: bool = False


FORMATS: dict[str, StateFormat] = {
    "fp8": StateFormat("fp8", E4M3, E4M3_FLOOR, scaled=True, packed=True),
    "int8": StateFormat("int8", INT8, UINT8_SQRT, scaled=True),
    "bf16": StateFormat("bf16", BF16, BF16, scaled=False),
    "fp32": StateFormat("fp32", FP32, FP32, scaled=False),
}
