"""``seqmesh profile``: measure the cost model on the devices at hand, and refine it from steps.

    seqmesh profile --out cost.json [--hidden 4096 --layers 32 --heads 32 --ffn 11008 --vocab 32000]
                    [--lengths 1024,2048,...] [--checkpointing] [--dp-shards K] [--mem-limit-bytes X]
    torchrun --nproc-per-node N -m seqmesh profile ...   # also all-to-all bandwidth and speed factors

One decoder layer of the given shape (q/k/v/o projections, causal SDPA attention, SwiGLU MLP),
built from plain torch ops, runs forward+backward at each length, and so does its attention
alone. Attention is fitted to ``a1 s^2 + c s + b`` and the rest of the layer (the difference) to
``a s + b'`` by non-negative least squares; fitting the whole layer to one quadratic let the
short, launch-bound lengths of a small layer on a fast GPU push the linear term to zero (seen on
an H200: alpha2 = 0 for hidden 1024 at 1K-8K tokens), while the projections and MLP are linear in
the tokens by construction. Scaled to the model: ``alpha1 = layers * a1``, ``alpha2 = layers *
(a + c)`` plus the LM head's per-token time, ``beta = layers * (b + b')``, times 4/3 with
activation checkpointing (the forward runs twice). Memory per token is the measured slope of
the layer's peak memory on CUDA (a formula on CPU, which has no allocator statistics). Under
torchrun each rank profiles its own device; the ranks' relative speeds become the per-rank speed
factors, and all-to-all is timed on the first d ranks for every power of two d.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import nnls

from seqmesh.scheduler.cost_model import CostModel


def _median_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


class _Layer(torch.nn.Module):
    """A Llama-style decoder layer, enough to time its matmuls and attention."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, h = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).view(1, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, s, h)
        x = x + self.o(a)
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


def fit_quadratic(lengths: Sequence[float], ms: Sequence[float]) -> tuple[float, float, float]:
    """Non-negative least squares of ``ms ~ a1 s^2 + a2 s + b`` (relative errors weigh equally)."""
    s = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    coef, _ = nnls(np.stack([s * s, s, np.ones_like(s)], axis=1) * w[:, None], y * w)
    return float(coef[0]), float(coef[1]), float(coef[2])


def fit_linear(lengths: Sequence[float], ms: Sequence[float]) -> tuple[float, float]:
    """Non-negative least squares of ``ms ~ a s + b`` (relative errors weigh equally)."""
    s = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    w = 1.0 / np.maximum(np.abs(y), 1e-9)
    coef, _ = nnls(np.stack([s, np.ones_like(s)], axis=1) * w[:, None], y * w)
    return float(coef[0]), float(coef[1])


def profile_attention(hidden: int, heads: int, lengths: Sequence[int], device: torch.device, dtype: torch.dtype,
                      repeats: int = 3) -> list[float]:
    """Forward+backward ms of the layer's causal attention alone, per length."""
    times = []
    for s in lengths:
        q, k, v = (torch.randn(1, heads, s, hidden // heads, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))

        def step() -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

        times.append(_median_ms(step, repeats, device))
    return times


def profile_layer(hidden: int, heads: int, ffn: int, lengths: Sequence[int], device: torch.device,
                  dtype: torch.dtype, repeats: int = 3) -> tuple[list[float], list[float]]:
    """Forward+backward ms of one layer per length, and its peak memory bytes (CUDA; else empty)."""
    torch.manual_seed(0)
    layer = _Layer(hidden, heads, ffn).to(device=device, dtype=dtype)
    times, peaks = [], []
    for s in lengths:
        x = torch.randn(1, s, hidden, device=device, dtype=dtype, requires_grad=True)

        def step() -> None:
            layer(x).float().sum().backward()

        times.append(_median_ms(step, repeats, device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            peaks.append(float(torch.cuda.max_memory_allocated(device) - base))
    return times, peaks


def profile_head(hidden: int, vocab: int, lengths: Sequence[int], device: torch.device, dtype: torch.dtype,
                 repeats: int = 3) -> float:
    """Per-token ms of the LM head and loss (fitted slope)."""
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device=device, dtype=dtype)
    times = []
    for s in lengths:
        x = torch.randn(s, hidden, device=device, dtype=dtype, requires_grad=True)
        target = torch.randint(0, vocab, (s,), device=device)

        def step() -> None:
            F.cross_entropy(head(x).float(), target).backward()

        times.append(_median_ms(step, repeats, device))
    return fit_linear(lengths, times)[0]


def measure_a2a(nbytes: int, repeats: int = 5) -> dict[int, float]:
    """All-to-all bus bandwidth (GB/s) of the first d ranks of the default process group.

    Every rank must call this (subgroup creation is collective); returns the same dict everywhere.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out: dict[int, float] = {}
    d = 2
    while d <= world:
        group = dist.new_group(list(range(d)))
        result = torch.zeros(1, dtype=torch.float64)
        if rank < d:
            elems = max(d, nbytes // 4 // d * d)
            send, recv = torch.ones(elems, device=device), torch.empty(elems, device=device)
            ms = _median_ms(lambda: dist.all_to_all_single(recv, send, group=group), repeats, device)
            result[0] = elems * 4 * (d - 1) / d / (ms * 1e6)
        gathered = result.to(device)
        dist.broadcast(gathered, src=0)
        out[d] = float(gathered.cpu()[0])
        d *= 2
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqmesh profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="cost-model JSON to write")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lengths", default=None, help="comma-separated token lengths to time (default by device)")
    p.add_argument("--checkpointing", action="store_true", help="the trainer recomputes activations (x 4/3 time)")
    p.add_argument("--dp-shards", type=int, default=1, help="ZeRO shards of the 16 B/parameter model states")
    p.add_argument("--mem-limit-bytes", type=float, default=None, help="default: 95%% of device memory")
    p.add_argument("--a2a-bytes", type=int, default=64 << 20, help="all-to-all message size per rank")
    p.add_argument("--repeats", type=int, default=3)
    return p


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _memory_limit(device: torch.device) -> float:
    if device.type == "cuda":
        return 0.95 * torch.cuda.get_device_properties(device).total_memory
    return 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def profile_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        for key in ("hidden", "layers", "heads", "ffn", "vocab", "dp_shards", "repeats", "a2a_bytes"):
            if getattr(args, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
        if args.hidden % args.heads:
            raise ValueError(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
        device = _device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        default = "1024,2048,4096,8192,16384" if device.type == "cuda" else "128,256,512,1024"
        try:
            lengths = [int(x) for x in (args.lengths or default).split(",")]
        except ValueError:
            raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
        if len(lengths) < 3 or min(lengths) < 1:
            raise ValueError("--lengths needs at least 3 positive lengths to fit a quadratic")
        cost = _profile(args, lengths, device, dtype)
    except ValueError as e:
        print(f"seqmesh profile: error: {e}", file=sys.stderr)
        return 2
    if cost is not None:
        cost.save(args.out)
        print(json.dumps({"out": args.out, **{k: v for k, v in cost.to_dict().items() if k != "source"}}))
    return 0


def _profile(args: argparse.Namespace, lengths: list[int], device: torch.device, dtype: torch.dtype) -> CostModel | None:
    """The cost model on rank 0 (None on other ranks under torchrun)."""
    times, peaks = profile_layer(args.hidden, args.heads, args.ffn, lengths, device, dtype, args.repeats)
    attention = profile_attention(args.hidden, args.heads, lengths, device, dtype, args.repeats)
    a1, c, b_attn = fit_quadratic(lengths, attention)
    a_rest, b_rest = fit_linear(lengths, [t - a for t, a in zip(times, attention)])
    a2, b = a_rest + c, b_attn + b_rest
    head = profile_head(args.hidden, args.vocab, lengths, device, dtype, args.repeats)
    recompute = 4 / 3 if args.checkpointing else 1.0
    act_bytes = torch.finfo(dtype).bits // 8
    if peaks:
        per_layer = fit_quadratic(lengths, peaks)[1]
    else:
        per_layer = 34 * args.hidden * act_bytes / 2
    # Checkpointed layer inputs live in the residual stream's dtype: fp32 under autocast with fp32
    # master weights (the trainer's bf16 mode), whatever dtype the matmuls run in.
    mem_per_token = (4 * args.hidden * args.layers + per_layer) if args.checkpointing \
        else per_layer * args.layers
    params = args.layers * (4 * args.hidden ** 2 + 3 * args.hidden * args.ffn) + 2 * args.vocab * args.hidden
    speed: list[float] = []
    a2a: dict[int, float] = {}
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        ref = torch.tensor([float(np.median(np.asarray(times) / np.asarray(lengths)))], device=device)
        every = [torch.zeros_like(ref) for _ in range(dist.get_world_size())]
        dist.all_gather(every, ref)
        per_rank = np.array([float(t.cpu()[0]) for t in every])
        speed = (np.median(per_rank) / per_rank).tolist()
        a2a = measure_a2a(args.a2a_bytes, args.repeats)
        dist.destroy_process_group()
    if rank != 0:
        return None
    passes = 3 if args.checkpointing else 2
    return CostModel(
        alpha1_ms_per_tok2=args.layers * a1 * recompute,
        alpha2_ms_per_tok=(args.layers * a2 + head) * recompute,
        beta_ms=args.layers * b * recompute,
        a2a_GBps=a2a,
        comm_bytes_per_token=float(4 * args.hidden * act_bytes * passes * args.layers),
        mem_bytes_per_token=float(mem_per_token),
        mem_static_bytes=16.0 * params / args.dp_shards,
        mem_limit_bytes=float(args.mem_limit_bytes or _memory_limit(device)),
        speed=tuple(speed),
        source=f"seqmesh profile on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
               f"hidden={args.hidden} layers={args.layers} heads={args.heads} ffn={args.ffn} vocab={args.vocab} "
               f"lengths={lengths} checkpointing={args.checkpointing}",
    )


Observation = tuple[Sequence[int], int, float]


def _columns(cost_model: CostModel, lengths: Sequence[int], d: int, sizes: Sequence[int]) -> list[float]:
    """One observation's row of the linear system in (alpha1, alpha2, beta, c_k for k in sizes)."""
    s = np.asarray(lengths, dtype=np.float64)
    shard = d * cost_model.tp * cost_model.pp  # compute and all-to-all are split over d ranks, TP and stages
    return [float((s * s).sum()) / shard, float(s.sum()) / shard, 1.0 / cost_model.pp] + \
        [float(s.sum()) / shard if d == k else 0.0 for k in sizes]


def _own_coefficients(cost_model: CostModel, sizes: Sequence[int]) -> np.ndarray:
    """``cost_model``'s values of the unknowns ``refine`` solves for: ``_columns @ this == group_ms`` exactly
    (TP's collectives, a per-token cost at a fixed ``tp``, sit in alpha2 as the refit puts them)."""
    alpha2 = cost_model.alpha2_ms_per_tok
    if cost_model.tp > 1 and cost_model.tp_GBps:
        alpha2 += cost_model.comm_bytes_per_token * (cost_model.tp - 1) / (cost_model.tp_GBps * 1e6)
    comm = [cost_model.comm_bytes_per_token / (cost_model.bandwidth_GBps(k) * 1e6) if cost_model.a2a_GBps else 0.0
            for k in sizes]
    return np.asarray([cost_model.alpha1_ms_per_tok2, alpha2, cost_model.beta_ms, *comm])


def _fit(a_rel: np.ndarray, prior: np.ndarray | None = None, prior_weight: float = 0.0) -> np.ndarray:
    """NNLS of ``a_rel @ x ~ 1`` (relative errors), with one pseudo-observation per coefficient pulling it towards
    ``prior`` (its relative deviation weighted by ``prior_weight`` against the observations' relative errors)."""
    a, b = a_rel, np.ones(len(a_rel))
    if prior is not None and prior_weight > 0:
        held = np.flatnonzero(prior > 0)
        rows = np.zeros((held.size, a.shape[1]))
        rows[np.arange(held.size), held] = np.sqrt(prior_weight) / prior[held]
        a, b = np.vstack([a, rows]), np.concatenate([b, np.full(held.size, np.sqrt(prior_weight))])
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    coef, _ = nnls(a / scale, b)
    return coef / scale


# Relative timing noise assumed where the observations are too few to measure their own.
ASSUMED_NOISE = 0.05


def refine(cost_model: CostModel, observations: Sequence[Observation], *, prior_sd: float | None = None,
           outlier_sigmas: float | None = None) -> CostModel:
    """Refit alpha1, alpha2, beta and per-size all-to-all bandwidth from measured group timings.

    Each observation is (lengths of one group's micro-batch, group size d, measured ms at nominal
    speed), e.g. from the trainer's per-group timers. The issue-4 formula is linear in alpha1,
    alpha2, beta and c_d = comm_bytes_per_token / (a2a_GBps[d] * 1e6), so one non-negative
    least-squares solve fits them all (relative errors weigh equally); sizes never observed keep
    their bandwidth.

    ``prior_sd`` anchors the fit to ``cost_model``'s *shape*: a Gaussian prior on each coefficient
    around its value in ``cost_model`` times the one factor that fits the observations best (the
    profile's proportions, the machine's level), with this relative standard deviation, against
    the timings' relative noise (measured from the residuals of the plain fit when there are more
    timings than unknowns, else ``ASSUMED_NOISE``). Why: a few steps of one plan family pin some
    combinations of the coefficients and leave others free (under static SP=2, alpha2 and c_2 are
    one column; short single-rank groups barely see alpha1), and a plain fit then sets the free
    ones to whatever the noise says -- which the planner reads back when it prices the plans it
    did not run. Where the timings determine a coefficient they outweigh the prior; where they do
    not, the rescaled profile stays. With the prior, one timing is enough to refit.

    ``outlier_sigmas``: when the timings alone determine a fit, those whose relative residual lies
    more than this many robust standard deviations (1.4826 x MAD, at least 1%) from the median
    residual are dropped -- a group that paid a one-off cost (a communicator's first use, allocator
    growth) must not drag the coefficients every later plan is priced with.

    Under a TP x PP layout an observation is one device's time (one TP rank of one stage), as
    ``group_ms`` predicts it, and the coefficients stay those of the whole model. TP's own
    collectives grow with the tokens exactly like ``alpha2``'s term at this ``tp``, so the fit
    folds them into ``alpha2`` and the result prices them no more (``tp_GBps = 0``).
    """
    if (prior_sd is not None and prior_sd <= 0) or (outlier_sigmas is not None and outlier_sigmas <= 0):
        raise ValueError(f"refine: prior_sd={prior_sd} and outlier_sigmas={outlier_sigmas} must be > 0 (or None)")
    sizes = sorted({int(d) for _, d, _ in observations if int(d) > 1})
    unknowns = 3 + len(sizes)
    needed = 1 if prior_sd else unknowns
    if len(observations) < needed:
        why = "" if prior_sd else " (3 + one per SP size seen)"
        raise ValueError(f"refine needs at least {needed} observations{why}, got {len(observations)}")
    for lengths, d, ms in observations:
        if d < 1 or ms <= 0 or len(lengths) == 0:
            raise ValueError(f"refine: bad observation (d={d}, ms={ms}, {len(lengths)} sequences)")
    a = np.asarray([_columns(cost_model, lengths, int(d), sizes) for lengths, d, _ in observations])
    a_rel = a / np.asarray([float(ms) for _, _, ms in observations])[:, None]
    noise, dropped = ASSUMED_NOISE, 0
    if len(observations) >= unknowns:
        coef = _fit(a_rel)
        res = a_rel @ coef - 1.0
        if outlier_sigmas is not None:
            dev = np.abs(res - np.median(res))
            keep = dev <= outlier_sigmas * max(1.4826 * float(np.median(dev)), 0.01)
            if not keep.all() and keep.sum() >= unknowns:
                dropped, a_rel = int((~keep).sum()), a_rel[keep]
                coef = _fit(a_rel)
                res = a_rel @ coef - 1.0
        if len(a_rel) > unknowns:
            noise = max(float(np.sqrt(res @ res / (len(a_rel) - unknowns))), 1e-3)
    if prior_sd:
        own = _own_coefficients(cost_model, sizes)
        pred = a_rel @ own
        prior = own * (pred.sum() / (pred @ pred)) if pred.any() else None
        coef = _fit(a_rel, prior, (noise / prior_sd) ** 2)
    bw = dict(cost_model.a2a_GBps)
    if cost_model.comm_bytes_per_token > 0:
        # c_k = 0 (all of the size's time explained by compute) is an all-to-all too fast to see: keeping the
        # old bandwidth would add back a communication time the fit just removed.
        bw.update({k: cost_model.comm_bytes_per_token / (max(float(c), 1e-12) * 1e6) for k, c in zip(sizes, coef[3:])})
    d = cost_model.to_dict()
    note = f"refined on {len(a_rel)} timings" + (f" ({dropped} outliers dropped)" if dropped else "")
    d.update(alpha1_ms_per_tok2=float(coef[0]), alpha2_ms_per_tok=float(coef[1]), beta_ms=float(coef[2]),
             a2a_GBps={str(k): v for k, v in bw.items()}, tp_GBps=0.0,
             source=(cost_model.source + "; " if cost_model.source else "") + note)
    return CostModel.from_dict(d)


def predicted_error(cost_model: CostModel, observations: Sequence[Observation]) -> float:
    """Mean absolute relative error of the model on observations (the GPU benchmark's figure)."""
    errs = [abs(cost_model.group_ms(lengths, d) - ms) / ms for lengths, d, ms in observations]
    return float(np.mean(errs)) if errs else math.nan
