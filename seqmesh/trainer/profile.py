"""``seqmesh profile``: measure the cost model on the devices at hand.

    seqmesh profile --out cost.json [--hidden 4096 --layers 32 --heads 32 --ffn 11008 --vocab 32000]
                    [--lengths 1024,2048,...] [--checkpointing] [--dp-shards K] [--mem-limit-bytes X]
    torchrun --nproc-per-node N -m seqmesh profile ...   # also all-to-all bandwidth and speed factors
    torchrun --nnodes M ... -m seqmesh profile ... --cluster-out cluster.yaml   # and a cluster file

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

The fits are ``seqmesh.scheduler.fitting``'s (pure numbers, shared with the refit from step timings);
the measuring lives here, above the scheduler, because it needs devices and torch.distributed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.fitting import fit_linear, fit_quadratic
from seqmesh.trainer.cluster_probe import probe_cluster


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
    p.add_argument("--cluster-out", default=None, help="also write a cluster file (link classes and their measured "
                   "bandwidths, seqmesh/trainer/cluster_probe.py) for scheduler.cluster; needs torchrun over "
                   "every node of the job")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to measure (auto: this rank's GPU when there is one)")
    return p


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu or run on a GPU machine")
    if choice != "cpu" and torch.cuda.is_available():
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
        device = _device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        default = "1024,2048,4096,8192,16384" if device.type == "cuda" else "128,256,512,1024"
        try:
            lengths = [int(x) for x in (args.lengths or default).split(",")]
        except ValueError:
            raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
        if len(lengths) < 3 or min(lengths) < 1:
            raise ValueError("--lengths needs at least 3 positive lengths to fit a quadratic")
        if args.cluster_out and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError("--cluster-out measures links between ranks: run under torchrun over the job's nodes "
                             "(torchrun --nnodes N --nproc-per-node G -m seqmesh profile ...)")
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        ref = torch.tensor([float(np.median(np.asarray(times) / np.asarray(lengths)))], device=device)
        every = [torch.zeros_like(ref) for _ in range(dist.get_world_size())]
        dist.all_gather(every, ref)
        per_rank = np.array([float(t.cpu()[0]) for t in every])
        speed = (np.median(per_rank) / per_rank).tolist()
        a2a = measure_a2a(args.a2a_bytes, args.repeats)
        if args.cluster_out:
            text = probe_cluster(device, args.a2a_bytes, args.repeats)
            if rank == 0:
                Path(args.cluster_out).write_text(text)
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
