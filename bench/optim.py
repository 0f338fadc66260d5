"""Optimizer step time, state memory and convergence of FP8AdamW against torch's fused AdamW.

    python bench/optim.py --out DIR                 # GPU: Llama-3.2-1B shapes, 1000-step convergence, 12 seeds
    python bench/optim.py --smoke --out DIR         # CPU: tiny sizes, checks that the script runs
    python bench/optim.py --quant-error --out DIR   # the quantization study behind fp8_adamw.py's formats
    python bench/optim.py --host --out DIR          # any machine: the host step of offloaded parameters

Host step (``--host``): what an offloaded model's optimizer costs on the CPU, every step. The first
``--host-params`` parameters (default 512M) of a Llama-3-8B shape's decoder layers in model order (bf16 weights
without masters, fp8 states, gradients fixed and random), stepped by FP8AdamW's eager torch backend
(the baseline) and its ``compiled`` backend (the same ops fused by Inductor) with all of the host's
cores, in the same run; the median of the timed steps after one warm-up step (the compile), and
whether both gave the same bits (they must).

Step time: every parameter tensor of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, GQA 32/8
heads, intermediate 8192, tied vocab 128256: 148 tensors, 1.24B fp32 parameters) with fixed random
gradients; the median of CUDA-event-timed ``step()`` calls after warm-up, for torch's
``AdamW(fused=True)`` (the baseline) and ``foreach``, FP8AdamW in each state format (Triton kernel;
its torch path, made for CPUs, would need tens of GB of temporaries at this size), and torchao's
``AdamWFp8``/``AdamW8bit`` when importable. Bytes of state per parameter are summed over the state
tensors each optimizer actually holds.

Convergence: the default tiny Llama (conf/model/tiny.yaml's shape) on byte-level text of the Python
standard library (the default corpus, without the BPE step), the project's default schedule
(lr 3e-3, beta2 0.95, weight decay 0.1 on matrices, 20 warm-up steps, cosine to 10%, clip 1.0),
the same batches for every optimizer; the final loss is the mean over the last 20 steps, and a
format's loss gap is its final loss against fp32 AdamW's *of the same seed*, in percent.

A run is an (optimizer, seed) pair. A seed sets the model's initialization and which batches come
in which order (``train_lm``'s ``seed``), never the optimizer (FP8AdamW's rounding seed is 0 but in
the fp8 rerun below). fp32 AdamW (the reference) and FP8AdamW fp8 run on every seed (``--seeds``,
default 12); int8 and bf16 on seed 0, and on every seed if named in ``--extra-seed-formats``; the
two reruns below on seed 0. The runs are trained in spawned worker processes (CUDA cannot be
forked), ``--jobs`` at a time (default 6 per visible GPU, the k-th worker on GPU k mod count; 1 on
CPU). Each run seeds itself and uses one intra-op thread, so its losses do not depend on how many
run at once (on CPU ``--jobs 1`` and ``--jobs 2`` give bitwise equal losses).

The gap and its uncertainty. Every seed gives one paired gap: fp8 and fp32 AdamW start from the same
weights and see the same batches, so what differs between seeds (initialization, the difficulty of
the last 20 batches: several % of loss) cancels within a pair. ``loss_gap_pct`` is the mean of the
paired gaps over seeds, ``loss_gap_pct_stderr`` its standard error and ``loss_gap_pct_ci95`` its 95%
confidence interval (Student t with seeds - 1 degrees of freedom). A gap within 1% is shown when the
interval lies inside [-1, +1]; a real bias of fp8 shows as an interval that excludes 0.
``loss_gap_abs_pct_mean`` is the mean |paired gap|, the size of one run's gap whatever its sign: next
to the mean it says how much of a single run is noise. ``fp8_wins`` counts the seeds where fp8
ended lower (about half of them for an optimizer without bias), ``loss_gap_pct_per_seed`` has every
paired gap of every format and ``loss_gap_pct_by_format`` each format's mean.

Choosing ``--seeds`` and ``--steps``. Single paired gaps scatter with a standard deviation of 2.7%
on the GPU (``bench/results/optim_h200x2.json``: 12 seeds, -5.5% to +4.8%), so with 12 seeds the
interval's half-width, t(0.975, 11) * sd / sqrt(12) ~= 0.64 * sd, is 1.7%: enough to see a 2-3%
bias, not to bound the gap to 1% (that takes ~40 seeds; halving the interval takes four times the
seeds). Keep ``--steps`` at 1000 for the goal's figure: after fewer steps the loss still falls
fast, and a gap there measures how fast an optimizer gets going more than where it ends; the time
of a run grows linearly with its steps.

Budget: the step-time section takes ~1.5 minutes on an H200. Convergence is 12 seeds x 2 runs + 4
runs on seed 0 (int8, bf16, the two reruns) = 28 runs; on two H200s at 6 runs per GPU they took
169 s (31-72 s a run; one alone takes 40-50 s and leaves its GPU mostly idle: the tiny model is
launch-bound). On one GPU expect about twice that; ``--seeds 8`` cuts 8 runs.

Three yardsticks of the same run say how far two equally good runs end apart:

* ``fp32_seed_spread_pct``: (max - min) / mean of fp32 AdamW's final losses over the seeds. It
  mixes initializations and the difficulty of the last 20 batches, which differ between seeds (and
  a range grows with the number of seeds), so it is an upper yardstick; the paired gaps do not
  carry it, and the two below keep the seed (initialization and batches) and change only the update.
* ``fp32_rerun_gap_pct``: fp32 AdamW again on the first seed, ``torch.optim.AdamW(fused=True)``
  instead of the default kernel. Both are torch's own AdamW, the same formula, checked against each
  other by torch's tests; the fused kernel only orders its floating-point operations differently,
  so the runs part in the last bits within the first steps (``identical_loss_steps``) and nothing
  favours either. It says how far float rounding alone carries two runs apart. On CPU (300 steps,
  the test's model) it was 2e-5%: this training is not chaotic, last-bit differences stay last-bit,
  so this yardstick alone would call any gap significant. ``foreach=True`` vs ``foreach=False``
  would be no perturbation at all (the same elementwise ops: bitwise identical runs on CPU), and
  FP8AdamW's own fp32 path vs torch would let a systematic difference of the code under test pass
  as noise (on CPU it matched torch to 3e-5%).
* ``fp8_rerun_gap_pct``: FP8AdamW fp8 again on the first seed with rounding seed 1 instead of 0.
  Stochastic rounding is unbiased, so the two runs are equally good by construction; they differ in
  exactly the kind of perturbation the format brings (each update carries ~5-10% quantization
  error, the study below), so their distance, |gap(rounding seed 1) - gap(rounding seed 0)|, is how
  far two equally good fp8 runs end apart. On CPU fp8's gaps under rounding seeds 0/1/2 were
  -0.88/-0.69/+0.03%: a gap of that size is fp8's own run-to-run noise, not a bias.
  ``step_loss_diff_pct`` (mean |loss - fp32 loss| / fp32 loss over the last 20 steps, same batches)
  shows how far each run's model has moved from the reference's, whatever the window mean says.

Quantization study (``--quant-error``): the tiny model is trained with fp32 AdamW; every step's
gradient also feeds shadow moments stored in candidate formats, and the relative L2 error of the
shadow update m^/(sqrt(v^)+eps) against the fp32 one is recorded (same gradients, so only the
storage differs).
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from seqmesh.kernels import fp8_codec as Q  # noqa: E402
from seqmesh.parallel.sequence import make_sp_batch  # noqa: E402
from seqmesh.trainer.data.packing import pack  # noqa: E402
from seqmesh.trainer.loss import token_loss_sum  # noqa: E402
from seqmesh.trainer.lr_schedule import build_lr_scheduler  # noqa: E402
from seqmesh.trainer.model import Transformer, tiny_config  # noqa: E402
from seqmesh.trainer.optim import FP8AdamW  # noqa: E402

LLAMA_1B = dict(hidden=2048, intermediate=8192, layers=16, vocab=128256, kv_dim=8 * 64)
SMOKE_SHAPES = dict(hidden=64, intermediate=176, layers=2, vocab=512, kv_dim=32)
TINY_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
BETAS = (0.9, 0.95)
LR = 3e-3
WINDOW = 20


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv_dim: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a tied-embedding Llama, in model order."""
    layer = [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
             (intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return [(vocab, hidden), *layer * layers, (hidden,)]


def state_bytes(opt: torch.optim.Optimizer) -> float:
    """Bytes of state per parameter, over the tensors each optimizer holds (tensor subclasses unpacked)."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    total = sum(nbytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return total / sum(p.numel() for p in opt.state)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Milliseconds per ``step()``: CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def step_time_candidates(device: torch.device) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    fused = device.type == "cuda"
    kw = dict(lr=LR, betas=BETAS, weight_decay=0.1)
    candidates: dict[str, Callable] = {
        "torch AdamW fused (fp32)": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "torch AdamW foreach (fp32)": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
    }
    backend = "triton" if fused else "torch"
    for fmt in ("fp8", "int8", "bf16", "fp32"):
        candidates[f"FP8AdamW {fmt} ({backend})"] = functools.partial(FP8AdamW, state_dtype=fmt, backend=backend, **kw)
    try:
        from torchao.optim import AdamW8bit, AdamWFp8
    except ImportError:
        return candidates
    candidates["torchao AdamWFp8"] = lambda ps: AdamWFp8(ps, **kw)
    candidates["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps, **kw)
    return candidates


def bench_step_time(shapes: list[tuple[int, ...]], device: torch.device, warmup: int,
                    steps: int) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) * 1e-3 for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    rows = []
    for name, make in step_time_candidates(device).items():
        opt = make(params)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        first_s = time.perf_counter() - t0
        times = time_steps(opt, device, warmup, steps)
        rows.append({"section": "step_time", "optimizer": name, "params": sum(p.numel() for p in params),
                     "tensors": len(params), "step_ms_median": statistics.median(times), "step_ms_min": min(times),
                     "first_step_s": first_s, "state_bytes_per_param": state_bytes(opt)})
        print(rows[-1], flush=True)
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        rows += bench_kernel_variants(params, device, warmup, steps)
    return rows


# (state format, stochastic rounding of v, elements per program, warps): the launch shapes and
# rounding modes around the kernel's defaults, so a slow format shows where its time goes.
KERNEL_VARIANTS = [(fmt, stoch, chunk, warps) for fmt in ("fp8", "int8") for stoch, chunk, warps in
                   [(False, 1024, 8), (True, 1024, 4), (True, 2048, 8), (True, 512, 4), (True, 4096, 16)]]


def bench_kernel_variants(params: list[torch.Tensor], device: torch.device, warmup: int,
                          steps: int) -> list[dict[str, Any]]:
    from seqmesh.kernels import adam_triton

    rows, defaults = [], (adam_triton.CHUNK, adam_triton.NUM_WARPS)
    try:
        for fmt, stoch, chunk, warps in KERNEL_VARIANTS:
            adam_triton.CHUNK, adam_triton.NUM_WARPS = chunk, warps
            opt = FP8AdamW(params, lr=LR, betas=BETAS, weight_decay=0.1, state_dtype=fmt, backend="triton",
                           stochastic_rounding=stoch)
            times = time_steps(opt, device, warmup, steps)
            rows.append({"section": "kernel_variant", "optimizer": f"FP8AdamW {fmt}", "stochastic": stoch,
                         "chunk": chunk, "num_warps": warps, "step_ms_median": statistics.median(times)})
            print(rows[-1], flush=True)
            del opt
            torch.cuda.empty_cache()
    finally:
        adam_triton.CHUNK, adam_triton.NUM_WARPS = defaults
    return rows


@functools.cache
def corpus_bytes(max_bytes: int = 4_000_000) -> torch.Tensor:
    """Byte tokens of the Python standard library's sources (sorted, so every machine reads the same text)."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = bytearray()
    for f in files:
        data += f.read_bytes()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(data[:max_bytes], dtype=torch.uint8).long()


def train_lm(make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], *, steps: int, model: dict[str, int],
             docs_per_step: int, doc_len: int, device: torch.device, seed: int = 0,
             on_step: Callable[[torch.optim.Optimizer], None] | None = None) -> list[float]:
    """Train a byte-level Llama on stdlib text; returns the per-step training losses.

    Weight decay on matrices only, warm-up then cosine schedule, clipping at 1.0; batches depend
    only on ``seed``, so every optimizer sees the same tokens. ``on_step`` runs after each backward.
    On CUDA the forward runs under bf16 autocast over fp32 weights (the project's default, and what
    the flash attention kernels need); on CPU in fp32.
    """
    torch.manual_seed(seed)
    net = Transformer(tiny_config(vocab_size=256, **model)).to(device)
    groups = [{"params": [p for p in net.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in net.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = make_optimizer(groups)
    sched = build_lr_scheduler(opt, warmup_steps=min(20, steps // 10), total_steps=steps, schedule="cosine",
                               min_lr_ratio=0.1)
    data = corpus_bytes()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - doc_len, (docs_per_step,), generator=gen).tolist()
        batch = pack([data[s:s + doc_len] for s in starts]).to(device)
        meta = make_sp_batch(batch.seqlens, "local", None, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net.logits(net(batch.input_ids, meta))
        loss = token_loss_sum(logits, batch.labels) / batch.num_targets
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        if on_step is not None:
            on_step(opt)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def window_mean(losses: list[float]) -> float:
    return statistics.fmean(losses[-WINDOW:])


REFERENCE = "torch AdamW (fp32)"
RERUN = "torch AdamW fused (fp32), rerun"
FP8_RERUN = "FP8AdamW fp8, rounding seed 1"
FORMATS = ("fp8", "int8", "bf16")
JOBS_PER_GPU = 6  # the tiny model is launch-bound: one run leaves its GPU mostly idle

# Every optimizer a convergence run can use, by name: spawned workers receive the name, never a
# function (lambdas do not pickle), and build the optimizer from this table.
OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    REFERENCE: lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS),
    **{f"FP8AdamW {fmt}": functools.partial(FP8AdamW, lr=LR, betas=BETAS, state_dtype=fmt) for fmt in FORMATS},
    RERUN: lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, fused=True),
    FP8_RERUN: functools.partial(FP8AdamW, lr=LR, betas=BETAS, state_dtype="fp8", seed=1),
}


@dataclass(frozen=True)
class ConvRun:
    """One convergence run: an optimizer of ``OPTIMIZERS`` on one seed (model initialization and batches)."""

    optimizer: str
    seed: int


@dataclass(frozen=True)
class TrainSetup:
    """What every convergence run of one benchmark shares (``train_lm``'s arguments but optimizer and seed)."""

    steps: int
    model: dict[str, int]
    docs_per_step: int
    doc_len: int
    device_type: str


@dataclass(frozen=True)
class RunResult:
    """A finished run: its per-step losses, how long it took, and where it ran."""

    run: ConvRun
    losses: list[float]
    wall_s: float
    device: str


def convergence_plan(formats: tuple[str, ...], seeds: int, extra_seed_formats: tuple[str, ...]) -> list[ConvRun]:
    """fp32 AdamW and FP8AdamW fp8 on every seed, the other formats on seed 0 (and on every seed where
    named in ``extra_seed_formats``), the two reruns on seed 0."""
    plan = []
    for seed in range(seeds):
        names = [REFERENCE] + [f"FP8AdamW {fmt}" for fmt in formats
                               if seed == 0 or fmt == "fp8" or fmt in extra_seed_formats]
        plan += [ConvRun(name, seed) for name in names + ([RERUN, FP8_RERUN] if seed == 0 else [])]
    return plan


_worker_device = torch.device("cpu")


def _init_worker(device_type: str, started: Any) -> None:
    """Give this worker process its device: the k-th worker started takes GPU k mod the GPU count.

    One intra-op thread per run: a CPU run's float results then do not depend on how many runs share
    the machine (``--jobs``), and on GPU the runs' host threads do not oversubscribe the cores.
    """
    global _worker_device
    torch.set_num_threads(1)
    if device_type == "cuda":
        with started.get_lock():
            index = started.value
            started.value += 1
        _worker_device = torch.device("cuda", index % torch.cuda.device_count())
        torch.cuda.set_device(_worker_device)


def _train_run(run: ConvRun, setup: TrainSetup) -> RunResult:
    """One run in a worker process; ``train_lm`` seeds it, so its result is that of a run alone."""
    t0 = time.perf_counter()
    losses = train_lm(OPTIMIZERS[run.optimizer], steps=setup.steps, model=setup.model,
                      docs_per_step=setup.docs_per_step, doc_len=setup.doc_len, device=_worker_device, seed=run.seed)
    return RunResult(run, losses, time.perf_counter() - t0, str(_worker_device))


def run_convergence(plan: list[ConvRun], setup: TrainSetup, jobs: int) -> dict[ConvRun, RunResult]:
    """Train every run of ``plan``, ``jobs`` at a time in spawned worker processes (CUDA cannot be forked),
    printing a line per finished run."""
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Value("i", 0)
    results: dict[ConvRun, RunResult] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(jobs, len(plan)), mp_context=ctx, initializer=_init_worker,
                             initargs=(setup.device_type, started)) as pool:
        futures = [pool.submit(_train_run, run, setup) for run in plan]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                res = future.result()
                results[res.run] = res
                print(f"[{done}/{len(plan)} runs, {time.perf_counter() - t0:.0f} s] {res.run.optimizer}, seed "
                      f"{res.run.seed}, {res.device}: final loss {window_mean(res.losses):.4f} ({res.wall_s:.1f} s)",
                      flush=True)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def convergence_rows(plan: list[ConvRun], results: dict[ConvRun, RunResult]) -> list[dict[str, Any]]:
    """One row per run in plan order, each compared with fp32 AdamW's run of the same seed."""
    rows = []
    for run in plan:
        res, ref_losses = results[run], results[ConvRun(REFERENCE, run.seed)].losses
        losses, steps = res.losses, len(res.losses)
        final, ref = window_mean(losses), window_mean(ref_losses)
        same = next((i for i, (a, b) in enumerate(zip(losses, ref_losses)) if a != b), steps)
        step_diff = statistics.fmean(abs(a - b) / b for a, b in zip(losses[-WINDOW:], ref_losses[-WINDOW:]))
        rows.append({"section": "convergence", "optimizer": run.optimizer, "seed": run.seed, "steps": steps,
                     "final_loss": final, "loss_gap_pct": 100.0 * (final - ref) / ref,
                     "identical_loss_steps": same, "step_loss_diff_pct": 100.0 * step_diff,
                     "wall_s": res.wall_s, "device": res.device, "loss_curve_every_50": losses[::50]})
    return rows


def gap_statistics(gaps: list[float]) -> dict[str, Any]:
    """Mean of the per-seed paired gaps with its standard error and 95% confidence interval (Student t,
    n - 1 degrees of freedom: the seeds are few and their spread is estimated from themselves), and the
    mean |gap|, the size of a single run's gap whatever its sign. Stderr and interval need 2 seeds."""
    if not gaps:
        raise ValueError("gap_statistics: no gaps given (no seed trained FP8AdamW fp8)")
    from scipy import stats

    mean, n = statistics.fmean(gaps), len(gaps)
    stderr = statistics.stdev(gaps) / math.sqrt(n) if n > 1 else None
    half = stats.t.ppf(0.975, n - 1) * stderr if stderr is not None else None
    return {"loss_gap_pct": mean, "loss_gap_pct_stderr": stderr,
            "loss_gap_pct_ci95": [mean - half, mean + half] if half is not None else None,
            "loss_gap_abs_pct_mean": statistics.fmean(abs(g) for g in gaps)}


def convergence_summary(rows: list[dict[str, Any]], formats: tuple[str, ...]) -> dict[str, Any]:
    """fp8's mean paired gap with its uncertainty, gaps per format, and the noise yardsticks of the module docstring."""
    conv = [r for r in rows if r["section"] == "convergence"]
    per_seed = {fmt: {str(r["seed"]): r["loss_gap_pct"] for r in conv if r["optimizer"] == f"FP8AdamW {fmt}"}
                for fmt in formats}
    fp8_gaps = list(per_seed["fp8"].values())
    fp32 = [r["final_loss"] for r in conv if r["optimizer"] == REFERENCE]
    rerun = next(r for r in conv if r["optimizer"] == RERUN)
    fp8_rerun = next(r for r in conv if r["optimizer"] == FP8_RERUN)
    return {
        **gap_statistics(fp8_gaps),
        "fp8_wins": sum(g < 0 for g in fp8_gaps),
        "loss_gap_pct_by_format": {fmt: statistics.fmean(gaps.values()) for fmt, gaps in per_seed.items()},
        "loss_gap_pct_per_seed": per_seed,
        "fp32_seed_spread_pct": 100.0 * (max(fp32) - min(fp32)) / statistics.fmean(fp32) if len(fp32) > 1 else None,
        "fp32_rerun_gap_pct": abs(rerun["loss_gap_pct"]),
        "fp32_rerun_step_diff_pct": rerun["step_loss_diff_pct"],
        "fp8_rerun_gap_pct": abs(fp8_rerun["loss_gap_pct"] - per_seed["fp8"]["0"]),
        "seeds": len(fp32),
    }


# name: (m format, v format, rounded stochastically: "" | "v" | "mv")
QUANT_CANDIDATES = {
    "m e4m3 only, nearest": (Q.E4M3, Q.FP32, ""),
    "m e4m3 only, stochastic": (Q.E4M3, Q.FP32, "mv"),
    "m e5m2 only, nearest": (Q.E5M2, Q.FP32, ""),
    "m int8 only, nearest": (Q.INT8, Q.FP32, ""),
    "m e4m3 / v e4m3 (floor), v stochastic [fp8]": (Q.E4M3, Q.E4M3_FLOOR, "v"),
    "m e4m3 / v e4m3 (floor), nearest": (Q.E4M3, Q.E4M3_FLOOR, ""),
    "m e4m3 / v e4m3 (no floor), nearest": (Q.E4M3, Q.E4M3, ""),
    "m e4m3 / sqrt(v) e4m3, v stochastic": (Q.E4M3, Q.E4M3_SQRT, "v"),
    "m e4m3 / sqrt(v) e4m3, nearest": (Q.E4M3, Q.E4M3_SQRT, ""),
    "m e5m2 / sqrt(v) e5m2, nearest": (Q.E5M2, Q.E5M2_SQRT, ""),
    "m int8 / sqrt(v) uint8, v stochastic [int8]": (Q.INT8, Q.UINT8_SQRT, "v"),
    "m bf16 / v bf16, v stochastic [bf16]": (Q.BF16, Q.BF16, "v"),
}


class ShadowStates:
    """Moments stored in one candidate format, updated from the reference run's gradients."""

    def __init__(self, m_fmt: Q.CodeFormat, v_fmt: Q.CodeFormat, stochastic: str, numel: int, block: int) -> None:
        self.m_fmt, self.v_fmt, self.stochastic, self.block = m_fmt, v_fmt, stochastic, block
        self.m = torch.zeros(numel // block, block)
        self.v = torch.zeros(numel // block, block)
        self.index = torch.arange(numel, dtype=torch.int64).view(-1, block)

    def _store(self, x: torch.Tensor, fmt: Q.CodeFormat, bits: torch.Tensor | None) -> torch.Tensor:
        if fmt.qmax == 0:
            return Q.round_plain(x, fmt, bits).float()
        return Q.dequantize_blocks(*Q.quantize_blocks(x, fmt, bits), fmt)

    def update(self, g: torch.Tensor, step: int, beta2: float) -> torch.Tensor:
        """Advance the moments with ``g``; return this step's update (from the unquantized fp32 moments)."""
        m = BETAS[0] * self.m + (1 - BETAS[0]) * g
        v = beta2 * self.v + (1 - beta2) * g * g
        update = (m / (1 - BETAS[0] ** step)) / ((v / (1 - beta2**step)).sqrt() + 1e-8)
        salt = Q.tensor_salt(0, torch.tensor(step))
        bits_m = Q.random_bits(salt, self.index, Q.STREAM_PARAM) if "m" in self.stochastic else None
        bits_v = Q.random_bits(salt, self.index, Q.STREAM_V) if "v" in self.stochastic else None
        self.m, self.v = self._store(m, self.m_fmt, bits_m), self._store(v, self.v_fmt, bits_v)
        return update


def bench_quant_error(steps: int, model: dict[str, int], block: int, betas2: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    for beta2 in betas2:
        errors: dict[str, list[float]] = {name: [] for name in QUANT_CANDIDATES}
        shadows: dict[str, ShadowStates] = {}

        def flat_grads(opt: torch.optim.Optimizer) -> torch.Tensor:
            pieces = []
            for group in opt.param_groups:
                for p in group["params"]:
                    g = p.grad.reshape(-1)
                    pieces += [g, g.new_zeros(-g.numel() % block)]
            return torch.cat(pieces).view(-1, block)

        def observe(opt: torch.optim.Optimizer) -> None:
            g = flat_grads(opt)
            step = len(next(iter(errors.values()))) + 1
            if not shadows:
                shadows.update({name: ShadowStates(*spec, g.numel(), block) for name, spec in QUANT_CANDIDATES.items()})
                shadows["fp32"] = ShadowStates(Q.FP32, Q.FP32, "", g.numel(), block)
            ref = shadows["fp32"].update(g, step, beta2)
            for name in QUANT_CANDIDATES:
                update = shadows[name].update(g, step, beta2)
                errors[name].append(((update - ref).norm() / ref.norm()).item())

        train_lm(lambda gr: torch.optim.AdamW(gr, lr=LR, betas=(BETAS[0], beta2)), steps=steps, model=model,
                 docs_per_step=8, doc_len=128, device=torch.device("cpu"), on_step=observe)
        for name, errs in errors.items():
            rows.append({"section": "quant_error", "format": name, "beta2": beta2, "block_size": block, "steps": steps,
                         "update_rel_err_mean": statistics.fmean(errs),
                         "update_rel_err_last50": statistics.fmean(errs[-50:])})
            print(rows[-1], flush=True)
    return rows


def cpu_model() -> str:
    """The host CPU's model name (Linux), which sets the host step's rate."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def bench_host_step(numel: int, steps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and summary of ``--host`` (see the module docstring)."""
    from seqmesh.trainer.optim import FP8AdamW

    shapes, total = [], 0
    for shape in llama_shapes(hidden=4096, intermediate=14336, layers=32, vocab=128256, kv_dim=1024)[1:]:
        n = math.prod(shape)
        if total + n > numel:
            break
        shapes.append(shape)
        total += n
    if not shapes:
        raise SystemExit(f"--host-params {numel}: the first tensor alone has {4096 * 4096} elements")
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=g) * 1e-3).to(torch.bfloat16) for s in shapes]
    rows, finals = [], {}
    for backend in ("torch", "compiled"):
        params = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt = FP8AdamW(params, lr=1e-4, state_dtype="fp8", backend=backend)
        t0 = time.perf_counter()
        opt.step()  # states allocated, the compile
        first_s = time.perf_counter() - t0
        ms = time_steps(opt, torch.device("cpu"), warmup=0, steps=steps)
        median_s = statistics.median(ms) / 1e3
        rows.append({"section": "host_step", "backend": backend, "params": total, "tensors": len(shapes),
                     "threads": torch.get_num_threads(), "first_step_s": first_s, "step_s_median": median_s,
                     "Mparams_per_s": total / median_s / 1e6})
        finals[backend] = [p.view(torch.int16).clone() for p in params]
    same = all(torch.equal(a, b) for a, b in zip(finals["torch"], finals["compiled"]))
    eager, compiled = rows
    return rows, {"host_compiled_speedup": eager["step_s_median"] / compiled["step_s_median"],
                  "host_compiled_Mparams_per_s": compiled["Mparams_per_s"],
                  "host_eager_Mparams_per_s": eager["Mparams_per_s"], "host_bitwise_equal": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="result folder (default bench/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    parser.add_argument("--quant-error", action="store_true", help="run the quantization-format study instead")
    parser.add_argument("--host", action="store_true", help="time the host (CPU) optimizer step instead")
    parser.add_argument("--host-params", type=int, default=512 << 20, help="parameters of --host's step")
    parser.add_argument("--steps", type=int, default=None, help="convergence steps (default 1000; smoke 30)")
    parser.add_argument("--seeds", type=int, default=12,
                        help="convergence seeds (model init and batches) of fp32 AdamW and fp8 (default 12)")
    parser.add_argument("--extra-seed-formats", default="",
                        help="FP8AdamW formats besides fp8 also trained on every seed: comma-separated, or 'all' "
                             "(default none: int8 and bf16 on seed 0 only)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="convergence runs at once, spread over the visible GPUs "
                             f"(default {JOBS_PER_GPU} per GPU; 1 on CPU)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: need at least 1 seed")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: need at least 1 concurrent run")

    if args.quant_error:
        steps = args.steps or (20 if args.smoke else 150)
        model = SMOKE_MODEL if args.smoke else dict(TINY_MODEL, num_hidden_layers=2, hidden_size=128,
                                                     intermediate_size=352, num_attention_heads=4,
                                                     num_key_value_heads=2)
        rows = bench_quant_error(steps, model, block=128, betas2=(0.95, 0.999))
        chosen = [r for r in rows if r["format"].endswith("[fp8]")]
        summary = {f"fp8_update_rel_err_beta2_{r['beta2']}": r["update_rel_err_last50"] for r in chosen}
        write_result("optim_quant_error", {"steps": steps, "model": model, "block_size": 128}, rows, summary,
                     device="cpu", out_dir=args.out)
        return

    if args.host:
        steps = args.steps or (2 if args.smoke else 3)
        rows, summary = bench_host_step(1 << 25 if args.smoke else args.host_params, steps)
        write_result("optim_host", {"model": "llama-3-8b decoder-layer tensors in model order", "param_dtype": "bf16",
                                    "state_dtype": "fp8", "timed_steps": steps, "smoke": args.smoke,
                                    "cpu": cpu_model(), "cores": os.cpu_count()},
                     rows, summary, out_dir=args.out)
        return

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("bench/optim.py needs a CUDA GPU; use --smoke on CPU")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    jobs = args.jobs or (JOBS_PER_GPU * gpus if gpus else 1)
    shapes = llama_shapes(**(SMOKE_SHAPES if args.smoke else LLAMA_1B))
    steps = args.steps or (30 if args.smoke else 1000)
    model = SMOKE_MODEL if args.smoke else TINY_MODEL
    docs, doc_len = (4, 64) if args.smoke else (16, 512)
    formats = ("fp8",) if args.smoke else FORMATS
    extra = formats if args.extra_seed_formats == "all" else tuple(f for f in args.extra_seed_formats.split(",") if f)
    if not set(extra) <= set(formats):
        parser.error(f"--extra-seed-formats {args.extra_seed_formats}: this run trains only {','.join(formats)} "
                     "(or pass 'all')")

    rows = bench_step_time(shapes, device, warmup=2 if args.smoke else 5, steps=5 if args.smoke else 20)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    plan = convergence_plan(formats, args.seeds, extra)
    t0 = time.perf_counter()
    results = run_convergence(plan, TrainSetup(steps, model, docs, doc_len, device.type), jobs)
    convergence_wall_s = time.perf_counter() - t0
    rows += convergence_rows(plan, results)

    times = {r["optimizer"]: r for r in rows if r["section"] == "step_time"}
    backend = "triton" if device.type == "cuda" else "torch"
    fp8 = times[f"FP8AdamW fp8 ({backend})"]
    summary = {
        "state_bytes_per_param": fp8["state_bytes_per_param"],
        "step_time_vs_fused_adamw": fp8["step_ms_median"] / times["torch AdamW fused (fp32)"]["step_ms_median"],
        **convergence_summary(rows, formats),
        "convergence_wall_s": convergence_wall_s,
    }
    config = {"shapes": "smoke" if args.smoke else "llama-3.2-1b", "params": fp8["params"], "tensors": fp8["tensors"],
              "convergence_steps": steps, "model": model, "docs_per_step": docs, "doc_len": doc_len,
              "seeds": args.seeds, "extra_seed_formats": list(extra),
              "reruns": [f"{RERUN}, seed 0", f"{FP8_RERUN}, seed 0"], "convergence_runs": len(plan),
              "jobs": jobs, "gpus": gpus, "lr": LR, "betas": BETAS, "torch": torch.__version__}
    write_result("optim", config, rows, summary, out_dir=args.out)


if __name__ == "__main__":
    main()
