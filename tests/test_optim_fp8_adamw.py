"""FP8AdamW on CPU: reference math, state size, checkpoints, bf16 weights, ZeRO-1 shards, bad input."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from torch import nn

from seqmesh.kernels.adam_update import cpp_compiler_available, padded_numel
from seqmesh.trainer.optim import STATE_DTYPES, FP8AdamW, zero1_shard
from tests.distributed import run_distributed

BLOCK = 128


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 160), nn.LayerNorm(160), nn.GELU(), nn.Linear(160, 40)).to(dtype)


def _groups(model: nn.Module) -> list[dict]:
    """Matrices decayed at one lr, vectors undecayed at another (as the trainer builds them)."""
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": 5e-3}]


def _backward(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    first = model[0]
    x = torch.randn(32, 96, generator=g, dtype=first.weight.dtype)
    target = torch.randn(32, 40, generator=g, dtype=first.weight.dtype)
    (model(x) - target).pow(2).mean().backward()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sched=None) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        _backward(model, step)
        if step == 1:
            model[1].bias.grad = None  # a parameter that skips a step: its own step count lags
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        if sched is not None:
            sched.step()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_state_bitwise(a: FP8AdamW, b: FP8AdamW) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k]["step"] == sb[k]["step"]
        for key, value in sa[k].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sb[k][key].dtype
                assert torch.equal(_bits(value), _bits(sb[k][key])), key


# Largest |stored - exact| of one quantization, per format and moment: (relative part, part of the
# block's largest magnitude). v is rounded stochastically (a whole code step), m to nearest (half).
STATE_BOUNDS = {
    "fp8": {"exp_avg": (2.0**-4, 2.0**-10 / 448), "exp_avg_sq": (2.0**-3, 2.0**-9 / 448)},
    "int8": {"exp_avg": (0.0, 0.5 / 127), "exp_avg_sq_root": (0.0, 1.0 / 255)},
    "bf16": {"exp_avg": (2.0**-8, 0.0), "exp_avg_sq": (2.0**-7, 0.0)},
    "fp32": {"exp_avg": (1e-6, 1e-6), "exp_avg_sq": (1e-6, 1e-6)},  # torch rounds m = lerp(m, g) differently
}


def _check_bound(got: torch.Tensor, ref: torch.Tensor, rel: float, of_max: float) -> None:
    n = ref.numel()
    pad = -n % BLOCK
    blocks = torch.cat([ref.reshape(-1), ref.new_zeros(pad)]).view(-1, BLOCK)
    block_max = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks).reshape(-1)[:n]
    bound = rel * ref.reshape(-1).abs() + of_max * block_max
    err = (got.reshape(-1) - ref.reshape(-1)).abs()
    assert torch.all(err <= bound * 1.001 + 1e-12), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_one_step_matches_reference_adamw_within_quantization_bound(state_dtype):
    """From the same (dequantized) moments, one step equals torch's AdamW; the new moments it stores
    are torch's within one quantization of each format. Clipping, param groups, an lr schedule and a
    parameter whose step count lags are all in play."""
    model = _model()
    opt = FP8AdamW(_groups(model), lr=1e-2, betas=(0.9, 0.95), state_dtype=state_dtype)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(model, opt, range(4), sched)

    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(_groups(ref_model), foreach=False)
    ref.load_state_dict(opt.dequantized_state_dict())
    assert [g["lr"] for g in ref.param_groups] == [g["lr"] for g in opt.param_groups]
    _train(model, opt, range(4, 5))
    _train(ref_model, ref, range(4, 5))

    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
    exported = opt.dequantized_state_dict()["state"]
    bounds = STATE_BOUNDS[state_dtype]
    ordered = [p for group in ref.param_groups for p in group["params"]]
    for index, p in enumerate(ordered):
        mine, theirs = exported[index], ref.state[p]
        assert float(mine["step"]) == float(theirs["step"])
        _check_bound(mine["exp_avg"], theirs["exp_avg"], *bounds["exp_avg"])
        if "exp_avg_sq_root" in bounds:
            _check_bound(mine["exp_avg_sq"].sqrt(), theirs["exp_avg_sq"].sqrt(), *bounds["exp_avg_sq_root"])
        else:
            _check_bound(mine["exp_avg_sq"], theirs["exp_avg_sq"], *bounds["exp_avg_sq"])


def test_fp8_state_is_two_bytes_per_parameter_with_its_scales():
    """Llama-like shapes (every size a multiple of the block): m's codes plus v's packed bytes, nothing else."""
    model = nn.Sequential(nn.Embedding(512, 256), nn.Linear(256, 768, bias=False), nn.RMSNorm(256))
    opt = FP8AdamW(model.parameters(), state_dtype="fp8")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state_bytes_per_param() == 2.0
    assert sorted(opt.state[model[0].weight]) == ["exp_avg", "exp_avg_sq", "step"]


@pytest.mark.parametrize("state_dtype, limit", [("fp8", 2.001), ("int8", 2.1), ("bf16", 4.0), ("fp32", 8.0)])
def test_state_bytes_per_param(state_dtype, limit):
    model = nn.Sequential(nn.Embedding(1000, 256), nn.Linear(256, 704), nn.LayerNorm(704), nn.Linear(704, 256))
    opt = FP8AdamW(model.parameters(), state_dtype=state_dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    per_param = opt.state_bytes_per_param()
    assert per_param <= limit
    assert per_param >= {"fp8": 2.0, "int8": 2.0, "bf16": 4.0, "fp32": 8.0}[state_dtype]


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_resume_from_checkpoint_is_bitwise_identical(state_dtype, param_dtype):
    """Save after 3 steps, load into a fresh model and a fresh optimizer (before its first step), and
    the next 3 steps are bit-identical to the uninterrupted run (stochastic rounding included)."""
    model = _model(dtype=param_dtype)
    opt = FP8AdamW(_groups(model), lr=1e-2, state_dtype=state_dtype, seed=5)
    _train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _train(model, opt, range(3, 6))

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _model(seed=1, dtype=param_dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = FP8AdamW(_groups(resumed), lr=0.5, state_dtype=state_dtype, seed=5)
    opt2.load_state_dict(ckpt["optim"])
    for saved, loaded in zip(ckpt["optim"]["state"].values(), opt2.state_dict()["state"].values()):
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                assert loaded[key].dtype == value.dtype and torch.equal(_bits(loaded[key]), _bits(value))
    assert opt2.param_groups[0]["lr"] == 1e-2
    _train(resumed, opt2, range(3, 6))

    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
    _assert_state_bitwise(opt, opt2)


def test_bf16_weights_accumulate_updates_below_half_an_ulp_with_stochastic_rounding():
    """An update of 1e-4 on a bf16 weight of 1.0 (half an ULP is 2e-3) vanishes with nearest
    rounding; with stochastic rounding 100 of them move the weight by 1e-2 on average."""
    results = {}
    for stochastic in (False, True):
        p = nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = FP8AdamW([p], lr=1e-4, weight_decay=0.0, state_dtype="fp8", stochastic_rounding=stochastic)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        results[stochastic] = p.float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - 0.99) < 5e-4


def test_dequantized_export_continues_in_torch_adamw():
    model = _model()
    opt = FP8AdamW(model.parameters(), lr=1e-2, state_dtype="fp8")
    _train(model, opt, range(3))
    exported = opt.dequantized_state_dict()
    for index, p in enumerate(model.parameters()):
        st = exported["state"][index]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == p.shape
        assert torch.all(st["exp_avg_sq"] > 0)
    adamw = torch.optim.AdamW(copy.deepcopy(model).parameters())
    adamw.load_state_dict(exported)
    assert adamw.param_groups[0]["lr"] == 1e-2


def test_optim_config_maps_to_fp8adamw():
    from seqmesh.trainer.build import build_optimizer
    from seqmesh.trainer.config import OptimConfig

    model = _model()
    opt = build_optimizer(model, OptimConfig(state_dtype="int8", lr=2e-3, weight_decay=0.1, beta1=0.8, beta2=0.95,
                                             eps=1e-6))
    assert isinstance(opt, FP8AdamW)
    group = opt.param_groups[0]
    assert (group["state_dtype"], group["lr"], group["betas"], group["eps"], group["weight_decay"]) == \
        ("int8", 2e-3, (0.8, 0.95), 1e-6, 0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(state_dtype="fp16"), "state_dtype"),
    (dict(block_size=100), "block_size"),
    (dict(block_size=8), "block_size"),
    (dict(block_size=32), "block_size >= 64"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(lr=-1.0), "lr"),
    (dict(lr=torch.tensor(1e-3)), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(eps=-1e-8), "eps"),
    (dict(seed=-1), "seed"),
    (dict(stochastic_rounding="yes"), "stochastic_rounding"),
    (dict(backend="cuda"), "backend"),
    (dict(staged_in_flight=0), "staged_in_flight must be an int >= 1"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FP8AdamW(_model().parameters(), **kwargs)


def test_bad_parameters_and_groups_are_rejected():
    with pytest.raises(ValueError, match="fp32 or bf16"):
        FP8AdamW(_model(dtype=torch.float16).parameters())
    with pytest.raises(ValueError, match="contiguous"):
        FP8AdamW([nn.Parameter(torch.zeros(4, 6).t())])
    opt = FP8AdamW(_model().parameters())
    with pytest.raises(ValueError, match="block_size"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "block_size": 3})
    assert len(opt.param_groups) == 1
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(RuntimeError, match="CUDA"):
        cpu_triton = FP8AdamW([p], backend="triton")
        p.grad = torch.ones(4)
        cpu_triton.step()


def test_fp8_loads_its_state_unpacked_as_block_state_gives_it():
    """Resharding checkpoints carry codes plus per-block scales: loading that form packs it again, bit for bit."""
    model = _model()
    opt = FP8AdamW(_groups(model), lr=1e-2, state_dtype="fp8", block_size=64)
    _train(model, opt, range(3))
    packed = opt.state_dict()
    unpacked = copy.deepcopy(packed)
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        block = opt.block_state(p)
        assert block["exp_avg_sq"].dtype == torch.float8_e4m3fn and block["exp_avg_sq"].numel() == p.numel()
        assert block["exp_avg_scale"].numel() == block["exp_avg_sq_scale"].numel() == -(-p.numel() // 64)
        unpacked["state"][i] = block
    fresh = FP8AdamW(_groups(_model()), state_dtype="fp8", block_size=64)
    fresh.load_state_dict(unpacked)
    for saved, loaded in zip(packed["state"].values(), fresh.state_dict()["state"].values()):
        assert torch.equal(_bits(loaded["exp_avg"]), _bits(saved["exp_avg"]))
        assert torch.equal(loaded["exp_avg_sq"], saved["exp_avg_sq"])


def test_fp8_padding_codes_stay_zero():
    """A tensor that ends inside a block keeps code 0 (v = 0) in the padding, where only scale bits live."""
    p = nn.Parameter(torch.randn(130))
    opt = FP8AdamW([p], state_dtype="fp8", block_size=64)
    for _ in range(3):
        p.grad = torch.randn(130)
        opt.step()
    packed = opt.state[p]["exp_avg_sq"]
    assert packed.numel() == 192
    assert torch.all(packed[130:] & 0x7F == 0)
    assert torch.all(opt.block_state(p)["exp_avg_sq"].view(torch.uint8) > 0)  # floored, never 0


def test_checkpoint_of_another_format_or_optimizer_is_rejected():
    model = _model()
    fp8 = FP8AdamW(model.parameters(), state_dtype="fp8")
    _train(model, fp8, range(1))
    with pytest.raises(ValueError, match="state_dtype='fp8'"):
        FP8AdamW(model.parameters(), state_dtype="int8").load_state_dict(fp8.state_dict())
    adamw = torch.optim.AdamW(model.parameters())
    _train(model, adamw, range(1))
    with pytest.raises(ValueError, match="not written by FP8AdamW"):
        FP8AdamW(model.parameters(), state_dtype="fp8").load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match="parameter groups"):
        FP8AdamW(_groups(model), state_dtype="fp8").load_state_dict(fp8.state_dict())


def test_zero1_shard_bounds():
    shards = [zero1_shard(1000, 3, r, 128) for r in range(3)]
    assert [(s.lo, s.hi) for s in shards] == [(0, 384), (384, 768), (768, 1000)]
    assert all(s.size == 384 and s.padded_total == 1152 for s in shards)
    assert zero1_shard(100, 4, 3, 128)[:2] == (100, 100)
    with pytest.raises(ValueError, match="rank"):
        zero1_shard(100, 2, 2, 128)


N_FLAT = 1000


def _flat_grad(step: int, rank: int) -> torch.Tensor:
    return torch.randn(N_FLAT, generator=torch.Generator().manual_seed(100 * step + rank))


def _zero1_worker(rank: int, world: int, steps: int) -> tuple[torch.Tensor, dict]:
    import torch.distributed as dist

    shard = zero1_shard(N_FLAT, world, rank, BLOCK)
    flat = torch.zeros(shard.padded_total)
    flat[:N_FLAT] = torch.randn(N_FLAT, generator=torch.Generator().manual_seed(0))
    piece = flat[shard.lo:shard.hi]
    opt = FP8AdamW([{"params": [piece], "index_offset": shard.lo}], lr=1e-2, weight_decay=0.1, state_dtype="fp8")
    for step in range(steps):
        full = torch.zeros(shard.padded_total)
        full[:N_FLAT] = _flat_grad(step, rank)
        mine = torch.empty(shard.size)
        dist.reduce_scatter_tensor(mine, full, op=dist.ReduceOp.SUM)
        piece.grad = mine[: shard.hi - shard.lo] / world
        opt.step()
        dist.all_gather_into_tensor(flat, flat[rank * shard.size:(rank + 1) * shard.size].clone())
    # fp8 tensors do not survive plain pickling (how results come back): return their bits.
    return flat[:N_FLAT].clone(), {k: _bits(v) if isinstance(v, torch.Tensor) else v
                                   for k, v in opt.state_dict()["state"][0].items()}


def test_zero1_sharded_step_equals_unsharded_bitwise():
    world, steps = 2, 3
    results = run_distributed(_zero1_worker, world, steps)

    param = torch.randn(N_FLAT, generator=torch.Generator().manual_seed(0))
    opt = FP8AdamW([param], lr=1e-2, weight_decay=0.1, state_dtype="fp8")
    for step in range(steps):
        param.grad = (_flat_grad(step, 0) + _flat_grad(step, 1)) / world
        opt.step()
    full = opt.state_dict()["state"][0]
    for rank, (flat, state) in enumerate(results):
        assert torch.equal(flat, param)
        shard = zero1_shard(N_FLAT, world, rank, BLOCK)
        assert state["step"] == full["step"]
        assert torch.equal(state["exp_avg"], _bits(full["exp_avg"][shard.lo:shard.hi]))
        # v's packed bytes carry both block scales: whole blocks, the last one padded.
        packed = slice(shard.lo, shard.lo + padded_numel(shard.hi - shard.lo, BLOCK))
        assert torch.equal(state["exp_avg_sq"], full["exp_avg_sq"][packed])



def _assert_trained_alike(state_dtype: str, param_dtype: torch.dtype, a: dict, b: dict) -> None:
    """Two FP8AdamW configurations (keyword arguments ``a``, ``b``) train the same model 4 steps under a
    halving lr (a bias skips step 1, so its step count lags) to the same bits: parameters and states."""
    runs = []
    for kwargs in (a, b):
        model = _model(dtype=param_dtype)
        opt = FP8AdamW(_groups(model), lr=1e-2, state_dtype=state_dtype, seed=5, **kwargs)
        _train(model, opt, range(4), torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
    _assert_state_bitwise(opt_a, opt_b)


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile needs a C++ compiler for host code")
@pytest.mark.parametrize("state_dtype,param_dtype,chunk", [("fp8", torch.bfloat16, 4096),
                                                           ("int8", torch.float32, 1 << 22),
                                                           ("bf16", torch.bfloat16, 1 << 22)])
def test_compiled_host_update_equals_eager_bitwise(state_dtype, param_dtype, chunk):
    """The compiled host update (``backend='compiled'``, what offloaded parameters step with) and the
    eager torch ops give the same bits: every operation rounds once to fp32 in both (no contraction),
    the random bits are integer arithmetic. Covers the packed fp8 format with padding lanes and chunks
    cut inside tensors, a parameter whose step count lags (per-tensor values) and a changing lr."""
    from torch._inductor import config

    # what "rounds once" rests on: Inductor's C++ flags, which environment variables can change
    assert config.cpp.enable_floating_point_contract_flag == "off" and not config.cpp.enable_unsafe_math_opt_flag, \
        "Inductor compiles host code with FP contraction or unsafe math (TORCHINDUCTOR_CPP_ENABLE_*_FLAG): unset them"
    _assert_trained_alike(state_dtype, param_dtype, dict(backend="torch", host_chunk_elems=chunk),
                          dict(backend="compiled", host_chunk_elems=chunk))


def test_host_backend_choice_and_missing_compiler(monkeypatch):
    """``auto`` compiles the host update only for large buckets and only with a C++ compiler; ``compiled``
    without one stops with the fix named."""
    from seqmesh.trainer.optim import fp8_adamw

    monkeypatch.setattr(fp8_adamw, "cpp_compiler_available", lambda: True)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not fp8_adamw.compiles("auto", fp8_adamw.HOST_COMPILE_MIN_ELEMS - 1, cpu)
    assert fp8_adamw.compiles("auto", fp8_adamw.HOST_COMPILE_MIN_ELEMS, cpu)
    assert not fp8_adamw.compiles("auto", fp8_adamw.HOST_COMPILE_MIN_ELEMS, gpu)
    assert not fp8_adamw.compiles("torch", 1 << 40, cpu)
    with pytest.raises(RuntimeError, match="on the host.*backend='auto'"):
        fp8_adamw.compiles("compiled", 1, gpu)
    monkeypatch.setattr(fp8_adamw, "cpp_compiler_available", lambda: False)
    assert not fp8_adamw.compiles("auto", 1 << 40, cpu)
    p = nn.Parameter(torch.zeros(300))
    p.grad = torch.ones(300)
    opt = FP8AdamW([p], backend="compiled")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*backend='torch'"):
        opt.step()


@pytest.mark.parametrize("state_dtype,param_dtype", [("fp8", torch.bfloat16), ("int8", torch.float32)])
def test_update_staged_on_another_device_equals_the_host_update_bitwise(state_dtype, param_dtype):
    """``update_device``: each chunk's parameters, gradients and states are copied out, stepped there and
    copied back (here to the CPU itself, as copies: what the GPU path does over PCIe). Chunks cut inside
    tensors, a lagging step count and a changing lr give the host update's bits, parameters and states."""
    _assert_trained_alike(state_dtype, param_dtype, dict(backend="torch", host_chunk_elems=4096),
                          dict(backend="torch", host_chunk_elems=4096, update_device="cpu",
                               staged_chunk_elems=4096))


def test_update_device_refuses_states_in_files(tmp_path):
    from seqmesh.trainer.optim.state_files import swap_states_to_files

    p = nn.Parameter(torch.zeros(4096))
    p.grad = torch.ones(4096)
    opt = FP8AdamW([p], update_device="cpu")
    opt.step()
    swap_states_to_files(opt, str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="update_device=None"):
            opt.step()
    finally:
        opt.state_files.close()


def test_updates_overlapped_behind_step_are_bitwise_and_waited_for(monkeypatch):
    """``overlap_updates``: the chosen tensors are stepped on a thread after ``step`` returns (the lr schedule moves
    on meanwhile: each step keeps the lr it was called with); ``synchronize``, the next ``step`` and
    ``state_dict`` wait for it. Same bits as stepping everything inside ``step``; a failure comes out at the wait."""
    ref_model, model = _model(), _model()
    ref_opt = FP8AdamW(_groups(ref_model), lr=1e-2, backend="torch")
    opt = FP8AdamW(_groups(model), lr=1e-2, backend="torch")
    behind = [model[0].weight, model[1].bias]
    opt.overlap_updates(behind)
    for step in range(3):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad(set_to_none=True)
            o.wait_for(behind)  # the next forward reads them: as parameter offload's fetch, wait for their update
            _backward(m, step)
            o.step()
            for g in o.param_groups:
                g["lr"] *= 0.5  # a schedule stepping while the update still runs
    _assert_state_bitwise(ref_opt, opt)  # state_dict waits
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(_bits(a.detach()), _bits(b.detach()))
    run = opt._run

    def fail_behind(*args, **kwargs):
        if threading.current_thread().name.startswith("seqmesh-host-update"):
            raise OSError("the link went away")
        run(*args, **kwargs)
    monkeypatch.setattr(opt, "_run", fail_behind)  # the update behind fails: step returns, the wait says so
    _backward(model, 3)
    opt.step()
    with pytest.raises(OSError, match="link went away"):
        opt.synchronize()
    opt.overlap_updates(behind, False)
    assert opt._updater is None


def test_a_reader_of_some_tensors_waits_for_their_update_only(monkeypatch):
    """``wait_for``: the small bucket (the vectors' group) is stepped first, and a reader of it goes on while the
    matrices' update is still held; a reader of a matrix waits for it. A failed update is re-raised to a reader
    of what it did not write."""
    model = _model()
    opt = FP8AdamW(_groups(model), lr=1e-2, backend="torch")
    opt.overlap_updates(list(model.parameters()))
    release = threading.Event()
    run = opt._run

    def held(bucket, *args, **kwargs):
        if any(p is model[0].weight for p in bucket.params):
            assert release.wait(30)
        run(bucket, *args, **kwargs)
    monkeypatch.setattr(opt, "_run", held)
    _backward(model, 0)
    before = model[0].weight.detach().clone()
    opt.step()
    opt.wait_for([model[1].bias, model[3].bias])  # the vectors: written while the matrices are held
    assert not release.is_set() and torch.equal(model[0].weight.detach(), before)
    release.set()
    opt.wait_for([model[0].weight[3:5]])  # a view of a matrix
    assert not torch.equal(model[0].weight.detach(), before)
    opt.synchronize()

    def fail(bucket, *args, **kwargs):
        if any(p is model[0].weight for p in bucket.params):
            raise OSError("the link went away")
        run(bucket, *args, **kwargs)
    monkeypatch.setattr(opt, "_run", fail)
    _backward(model, 1)
    opt.step()
    opt.wait_for([model[1].bias])
    with pytest.raises(OSError, match="link went away"):
        opt.wait_for([model[0].weight])
    opt.overlap_updates(list(model.parameters()), False)


def test_written_ranges_merge_and_cover():
    from seqmesh.trainer.optim.written import WrittenRanges

    flat = torch.zeros(100)
    w = WrittenRanges()
    w.begin()
    w.mark([flat[40:60], flat[0:10]])
    w.mark([flat[10:20], flat[60:70]])  # joins both neighbours
    assert w._starts == [flat[0:].data_ptr(), flat[40:].data_ptr()] and len(w._ends) == 2
    w.mark([flat[20:40]])  # closes the gap: one range
    assert len(w._starts) == 1 and w.wait([flat[5:65], flat[0:70]])
    w.finish()
    assert not w.wait([flat[69:71]])  # finished without it


def test_a_staged_update_behind_the_step_marks_each_piece_as_it_lands():
    """Staged a chunk at a time, the update behind the step says so piece by piece, in flat order, before the
    bucket ends: a reader of the first elements is not held by the last."""
    model = _model()
    opt = FP8AdamW(_groups(model), lr=1e-2, backend="torch", update_device="cpu", staged_chunk_elems=4096)
    opt.overlap_updates(list(model.parameters()))
    marks = []
    mark = opt._written.mark

    def record(tensors):
        tensors = list(tensors)
        marks.append([(t.data_ptr(), t.numel()) for t in tensors])
        mark(tensors)
    opt._written.mark = record
    _backward(model, 0)
    opt.step()
    opt.synchronize()
    # the matrices (21,760 elements) go in several pieces: beyond each bucket's mark when it ends, more than one
    # piece's mark of the two buckets
    assert len(marks) - 2 > 2
    opt.overlap_updates(list(model.parameters()), False)
