"""The fused Triton kernel against the torch path: identical bits on the GPU, and against the CPU."""

from __future__ import annotations

import pytest
import torch

from seqmesh.trainer.optim import STATE_DTYPES, FP8AdamW

pytestmark = pytest.mark.gpu

# Odd sizes (partial quantization blocks and kernel chunks), vectors, one tensor of many chunks.
SHAPES = [(1000,), (64, 70), (5,), (4096 + 130,), (3, 4097), (128,), (2048, 1536)]


def _tensors(device: str, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=gen) * 0.05).to(device=device, dtype=dt) for s, dt in zip(SHAPES, dtypes)]


def _grads(step: int, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    # Heavy-tailed magnitudes spread each block over many binades, as real gradients do.
    return [(torch.randn(s, generator=gen) * torch.rand(s, generator=gen) ** 4 * 1e-2).to(dt)
            for s, dt in zip(SHAPES, dtypes)]


def _run(backend: str, device: str, state_dtype: str, dtypes: list[torch.dtype], stochastic: bool,
         steps: int = 3, update_device: str | None = None) -> FP8AdamW:
    params = _tensors(device, dtypes)
    opt = FP8AdamW([{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2,
                   betas=(0.9, 0.95), weight_decay=0.1, state_dtype=state_dtype, stochastic_rounding=stochastic,
                   seed=11, backend=backend, host_chunk_elems=4096, update_device=update_device,
                   staged_chunk_elems=4096)
    for step in range(steps):
        for p, g in zip(params, _grads(step, dtypes)):
            p.grad = None if (step == 1 and p.numel() == 5) else g.to(device)
        opt.step()
    return opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same(a: FP8AdamW, b: FP8AdamW) -> None:
    for ga, gb in zip(a.param_groups, b.param_groups):
        for pa, pb in zip(ga["params"], gb["params"]):
            assert pa.dtype == pb.dtype
            differ = int((_bits(pa) != _bits(pb)).sum())
            assert differ == 0, f"{differ} of {pa.numel()} parameter elements differ"
            sa, sb = a.state[pa], b.state[pb]
            assert sa["step"] == sb["step"]
            for key, value in sa.items():
                if isinstance(value, torch.Tensor):
                    differ = int((_bits(value) != _bits(sb[key])).sum())
                    assert differ == 0, f"{key}: {differ} of {value.numel()} elements differ"


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, None], ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_triton_kernel_equals_torch_path_bitwise(state_dtype, param_dtype, stochastic):
    dtypes = ([param_dtype] * len(SHAPES) if param_dtype is not None
              else [torch.float32, torch.bfloat16] * (len(SHAPES) // 2) + [torch.float32])
    fused = _run("triton", "cuda", state_dtype, dtypes, stochastic)
    _assert_same(fused, _run("torch", "cuda", state_dtype, dtypes, stochastic))
    _assert_same(fused, _run("torch", "cpu", state_dtype, dtypes, stochastic))


def test_auto_backend_uses_the_kernel_on_cuda():
    from seqmesh.trainer.optim.fp8_adamw import triton_available

    assert triton_available()
    dtypes = [torch.float32] * len(SHAPES)
    _assert_same(_run("auto", "cuda", "fp8", dtypes, True), _run("triton", "cuda", "fp8", dtypes, True))


def test_many_tensors_in_one_launch():
    """Hundreds of small tensors (one program each) update exactly as the torch path does."""
    def run(backend: str, device: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(17 + 31 * i, generator=gen).to(device) for i in range(300)]
        opt = FP8AdamW(params, lr=1e-2, state_dtype="fp8", backend=backend)
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        return [p.detach().cpu() for p in params]

    for a, b in zip(run("triton", "cuda"), run("torch", "cpu")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_host_parameters_updated_on_the_gpu_equal_the_host_update_bitwise(state_dtype):
    """``update_device='cuda'`` (parameter offload's update on the GPU): host tensors staged a chunk at a time
    through the Triton kernel give the host update's bits, parameters and states (so checkpoints and
    resumed runs do not depend on where the update ran)."""
    dtypes = [torch.bfloat16] * len(SHAPES)
    _assert_same(_run("auto", "cpu", state_dtype, dtypes, True), _run("auto", "cpu", state_dtype, dtypes, True,
                                                                      update_device="cuda"))


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_staged_update_holds_a_few_pieces_on_the_gpu_and_matches_the_host_update(in_flight):
    """The staged update overlaps a piece's copies in, its update and its copies out on three streams; the
    host throttles itself so that only ``staged_in_flight`` + 1 pieces occupy the device (a 2.8B-parameter
    model's states would not fit), and neither the overlap nor its depth changes a bit of the host update."""
    numel, chunk = 16 << 20, 1 << 20
    gen = torch.Generator().manual_seed(3)
    weights = (torch.randn(numel, generator=gen) * 0.05).to(torch.bfloat16)
    grads = [(torch.randn(numel, generator=gen) * 1e-2).to(torch.bfloat16) for _ in range(2)]

    def run(update_device: str | None) -> tuple[FP8AdamW, int]:
        p = weights.clone().pin_memory()
        opt = FP8AdamW([p], lr=1e-2, state_dtype="fp8", seed=5, host_chunk_elems=chunk, update_device=update_device,
                      staged_chunk_elems=chunk, staged_in_flight=in_flight)
        peak = 0
        for g in grads:
            p.grad = g.clone().pin_memory()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            opt.step()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        return opt, peak

    host, _ = run(None)
    staged, peak = run("cuda")
    _assert_same(host, staged)
    piece_bytes = chunk * (2 + 2 + 1 + 1) + chunk // 128 * 2 * 4  # weights, gradients, fp8 moments, block scales
    # in_flight + 1 pieces staged, and one more whose memory the caching allocator has not reused yet
    assert peak <= (in_flight + 2) * piece_bytes, f"the staged update held {peak / piece_bytes:.1f} pieces on the GPU"
