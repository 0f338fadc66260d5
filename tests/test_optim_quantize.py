"""Block quantization of optimizer states: error bounds per block, rounding, random bits."""

from __future__ import annotations

import pytest
import torch

from seqmesh.kernels.fp8_codec import (
    BF16,
    E4M3,
    E4M3_FLOOR,
    INT8,
    UINT8_SQRT,
    dequantize_blocks,
    dequantize_flat,
    hash32,
    hash32_int,
    pack_scales,
    quantize_blocks,
    random_bits,
    round_magnitude,
    round_plain,
    sqrt_rn,
    unpack_scales,
)

BLOCK = 128


def _blocks(signed: bool, seed: int = 0) -> torch.Tensor:
    """Blocks whose magnitudes span ~6 decades, each block with its own scale (one all-zero block)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, BLOCK, generator=g) * torch.rand(64, BLOCK, generator=g) ** 6
    x = x * torch.logspace(-8, 3, 64)[:, None]
    x[5] = 0.0
    return x if signed else x.abs()


def _step_bound(x: torch.Tensor, scale: torch.Tensor, fmt, stochastic: bool) -> torch.Tensor:
    """Largest allowed |error| per element: half a code step (a whole one when stochastic)."""
    factor = 1.0 if stochastic else 0.5
    if fmt.mantissa_bits is None:
        return factor * scale[:, None].expand_as(x)
    mag = x.abs() / scale[:, None].clamp(min=1e-38)
    exponent = torch.floor(torch.log2(mag.clamp(min=fmt.min_normal)))
    code_step = 2.0 ** (exponent - fmt.mantissa_bits)
    return factor * code_step * scale[:, None] * (1 + 1e-6)


@pytest.mark.parametrize("fmt", [E4M3, INT8], ids=["e4m3", "int8"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_signed_block_error_bound(fmt, stochastic):
    x = _blocks(signed=True)
    bits = random_bits(torch.tensor(7), torch.arange(x.numel()).view_as(x), 1) if stochastic else None
    q, scale = quantize_blocks(x, fmt, bits)
    assert q.dtype == fmt.dtype and scale.shape == (x.shape[0],)
    y = dequantize_blocks(q, scale, fmt)
    assert torch.all((y - x).abs() <= _step_bound(x, scale, fmt, stochastic) + 1e-45)
    # The block maximum is stored exactly (up to fp32 rounding of the scale).
    top = x.abs().argmax(dim=1, keepdim=True)
    torch.testing.assert_close(y.gather(1, top), x.gather(1, top), rtol=1e-6, atol=0)
    assert torch.all(y[5] == 0) and scale[5] == 0


@pytest.mark.parametrize("fmt", [E4M3_FLOOR, UINT8_SQRT], ids=["e4m3_floor", "uint8_sqrt"])
def test_second_moment_codes_never_zero(fmt):
    """v's small entries are floored at the smallest code: a zero would make m/sqrt(v) unbounded."""
    v = _blocks(signed=False) ** 2
    q, scale = quantize_blocks(v, fmt, None)
    y = dequantize_blocks(q, scale, fmt)
    live = scale > 0
    assert torch.all(y[live] > 0)
    stored = sqrt_rn(v) if fmt.sqrt_domain else v
    big = stored >= stored.amax(dim=1, keepdim=True) * 0.05
    err = (sqrt_rn(y) - sqrt_rn(v)).abs() / sqrt_rn(v).clamp(min=1e-30)
    limit = 0.07 if fmt is E4M3_FLOOR else 0.05
    assert err[big & live[:, None]].max() < limit


def test_e4m3_nearest_matches_torch_cast_off_ties():
    x = (torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 60).clamp(-448, 448)
    mine = torch.where(x < 0, -round_magnitude(x.abs(), E4M3, None), round_magnitude(x.abs(), E4M3, None))
    assert torch.equal(mine, x.to(torch.float8_e4m3fn).float())


def test_stochastic_rounding_is_unbiased():
    """Each value rounds up with the probability of its distance to the lower code."""
    x = torch.full((64, BLOCK), 0.3)
    x[:, 0] = 1.03  # block max: 0.3 maps to code 130.5, between the E4M3 codes 128 and 144
    index = torch.arange(x.numel()).view_as(x)
    means = torch.stack([
        dequantize_blocks(*quantize_blocks(x, E4M3, random_bits(torch.tensor(s), index, 1)), E4M3)
        for s in range(8)
    ]).mean(0)
    assert abs(means[:, 1:].mean().item() - 0.3) < 0.3 * 2e-3
    bits = random_bits(torch.tensor(3), torch.arange(100_000), 0)
    plain = round_plain(torch.full((100_000,), 1.0 + 2.0**-10), BF16, bits)
    assert abs(plain.float().mean().item() - (1.0 + 2.0**-10)) < 2.0**-7 * 0.02


def test_hash_matches_python_and_spreads_bits():
    values = torch.tensor([0, 1, 2, 12345, 2**31, 2**32 - 1])
    assert hash32(values).tolist() == [hash32_int(int(v)) for v in values]
    bits = random_bits(torch.tensor(99), torch.arange(1 << 16), 0)
    assert bits.min() >= 0 and bits.max() < 2**32
    for shift in (0, 8, 16, 24, 31):
        assert abs(((bits >> shift) & 1).float().mean().item() - 0.5) < 0.01
    assert not torch.equal(bits, random_bits(torch.tensor(99), torch.arange(1 << 16), 1))


def test_dequantize_flat_handles_partial_last_block():
    codes_src = torch.randn(300)
    pad = torch.zeros(384)
    pad[:300] = codes_src
    q, scale = quantize_blocks(pad.view(-1, BLOCK), E4M3, None)
    flat = dequantize_flat(q.view(-1)[:300].clone(), scale, E4M3, BLOCK)
    assert flat.shape == (300,)
    assert torch.equal(flat, dequantize_blocks(q, scale, E4M3).view(-1)[:300])


def test_sqrt_rn_is_correctly_rounded():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 1e-3
    ref = torch.sqrt(x.double())
    got = sqrt_rn(x).double()
    lower = torch.nextafter(got.float(), torch.tensor(0.0)).double()
    upper = torch.nextafter(got.float(), torch.tensor(1.0)).double()
    assert torch.all((ref - got).abs() <= (ref - lower).abs()) and torch.all((ref - got).abs() <= (ref - upper).abs())


def test_packed_scales_round_trip_bit_for_bit():
    """Every v code and any fp32 scale (zero, subnormal, huge) come back exactly from the packed bytes."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 0x7F, (6, BLOCK), generator=g, dtype=torch.uint8)  # every magnitude code
    m_scale = torch.tensor([0.0, 1e-40, 3.5e-12, 1.0, 2.0**100, 448.0 / 3])
    v_scale = torch.tensor([7e-45, 0.0, 1e30, 1.5, 2.0**-126, 1e-8])
    packed = pack_scales(codes.view(torch.float8_e4m3fn), m_scale, v_scale)
    assert packed.dtype == torch.uint8 and packed.shape == codes.shape
    got_codes, got_m, got_v = unpack_scales(packed, torch.float8_e4m3fn)
    assert torch.equal(got_codes.view(torch.uint8), codes)
    assert torch.equal(got_m.view(torch.int32), m_scale.view(torch.int32))
    assert torch.equal(got_v.view(torch.int32), v_scale.view(torch.int32))
