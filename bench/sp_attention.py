"""Sequence-parallel attention speed: seqmesh's modes against single-GPU flash and two peers.

Launch one process per GPU:

    python -m torch.distributed.run --nproc_per_node 2 bench/sp_attention.py --out DIR

Every case is causal bf16 attention with Llama-8B heads (32 query, 8 KV, dim 128), forward +
backward, at a number of tokens per GPU (one document of ``tokens * W``), plus a variable-length
mix. seqmesh's modes: Ulysses (unpipelined and in 2 or 4 head chunks), zigzag ring (K/V round the
ring), TokenRing (queries one way, block results the other) and hybrid. Figures are TFLOP/s per GPU
and the percentage of single-GPU flash attention on the same total work (single-GPU time for the
whole batch / W), measured in the same run. Peers, same shapes, same
local kernel where they take one: PyTorch's ``context_parallel`` (ring, both rotate methods) and
DeepSpeed's ``DistributedAttention`` (Ulysses). A peer that fails records its error in its row.

``--smoke`` runs tiny shapes on CPU with gloo, so the script is known to work without GPUs. With
fewer than two processes, or fewer GPUs than processes on a node, it says so and exits 0 without a
result: sequence parallelism over one GPU is single-GPU attention.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from seqmesh.kernels.attention import resolve_backend, varlen_attention  # noqa: E402
from seqmesh.parallel.sequence import make_sp_batch, shard_tokens, sp_attention  # noqa: E402

class Unsupported(Exception):
    """A case a peer cannot run at all (recorded, not traced)."""


VARLEN_FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 64)  # of the batch's tokens


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="result directory (default bench/results)")
    p.add_argument("--tokens", default="8192,32768,131072", help="tokens per GPU, comma separated")
    p.add_argument("--varlen-tokens", type=int, default=32768, help="tokens per GPU of the varlen mix (0: skip)")
    p.add_argument("--heads", default="32,8", help="query heads, KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed iterations per measurement")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run over gloo (checks the script, not speed)")
    a = p.parse_args()
    if a.smoke:
        a.tokens, a.varlen_tokens, a.heads, a.head_dim, a.min_time = "32,64", 64, "8,4", 16, 0.0
    return a


def _label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _causal_flops(seqlens: list[int], heads: int, dim: int) -> float:
    """Forward + backward FLOPs of causal attention (FlashAttention's convention: the forward is
    two matmuls over half the score matrix, the backward 2.5 times the forward)."""
    forward = sum(4 * n * n * dim * heads / 2 for n in seqlens)
    return 3.5 * forward


def _time(step: Callable[[], None], device: torch.device, min_time: float, group) -> float:
    """Median seconds per call (after a warm-up call), the slowest rank's."""
    step()
    times: list[float] = []
    while len(times) < 3 or sum(times) < min_time:
        dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dout: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for x in inputs:
            x.grad = None
        fn(*inputs).backward(dout)
    return step


def _single_gpu(q, k, v, cu, max_len, backend):
    def fn(q, k, v):
        return varlen_attention(q, k, v, cu, max_len, True, backend=backend)[0]
    return fn, _leaves(q, k, v)


def _seqmesh(mode, seqlens, q, k, v, dout, group, ulysses, chunks):
    meta = make_sp_batch(seqlens, mode, group, ulysses_degree=ulysses, device=q.device, ulysses_chunks=chunks)
    inputs = _leaves(*(shard_tokens(meta, x, 0) for x in (q, k, v)))

    def fn(q, k, v):
        return sp_attention(q, k, v, meta, meta.group, meta.mode, causal=True)
    return fn, inputs, shard_tokens(meta, dout, 0), meta.local_index


def _deepspeed(seqlens, q, k, v, dout, group, backend):
    """DeepSpeed Ulysses ([s/p, b, h, d] layout, heads scattered, sequence gathered) around the same
    local varlen kernel; it shards the packed batch contiguously (lengths divisible by W here)."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend=dist.get_backend(group), verbose=False)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cu = torch.tensor([0, *seqlens], device=q.device).cumsum(0).to(torch.int32)

    def local(q, k, v):  # squeeze/unsqueeze are views both ways (indexing [:, 0] would add a zero-filled backward)
        out = varlen_attention(q.squeeze(1), k.squeeze(1), v.squeeze(1), cu, max(seqlens), True, backend=backend)[0]
        return out.unsqueeze(1)
    attn = DistributedAttention(local, group, scatter_idx=2, gather_idx=0)
    n = q.shape[0] // world
    shard = slice(rank * n, (rank + 1) * n)
    inputs = _leaves(*(x[shard].unsqueeze(1) for x in (q, k, v)))

    def fn(q, k, v):
        return attn(q, k, v, 1)
    return fn, inputs, dout[shard].unsqueeze(1)


@functools.cache
def _cp_mesh(device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dist.get_world_size(),))


def _context_parallel(q, k, v, dout, rotate: str, device: torch.device, time_fn):
    """PyTorch's ring attention: SDPA under ``context_parallel`` (its own causal load balancing).
    GQA goes in as ``enable_gqa``; if the flash kernel refuses it, K/V are expanded to all heads
    (and the row says so)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_rotate_method(rotate)
    mesh = _cp_mesh(device.type)
    bufs = [x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v, dout)]  # [1, H, S, D]
    note = {}
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(bufs)):
        ql, kl, vl = _leaves(*bufs[:3])
        expand = False

        def fn(q, k, v):
            if expand:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)
        try:
            _fwd_bwd(fn, [ql, kl, vl], bufs[3])()
        except RuntimeError as e:
            note["kv_heads_expanded"] = f"enable_gqa refused: {str(e).splitlines()[0][:160]}"
            expand = True
        return time_fn(_fwd_bwd(fn, [ql, kl, vl], bufs[3])), note


def _skip_reason(cuda: bool) -> str | None:
    """Why this launch cannot measure sequence parallelism (None: it can)."""
    world, local = (int(os.environ.get(name, 1)) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if world < 2:
        return f"needs at least 2 processes (one per GPU) and got {world}: launch it with torchrun --nproc_per_node N"
    if cuda and torch.cuda.device_count() < local:
        return f"{local} processes per node but {torch.cuda.device_count()} GPUs visible: one GPU per process needed"
    return None


def main() -> None:
    a = _args()
    cuda = torch.cuda.is_available() and not a.smoke
    skip = _skip_reason(cuda)
    if skip:
        print(f"sp_attention skipped: {skip}", flush=True)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    hq, hkv = (int(x) for x in a.heads.split(","))
    d = a.head_dim
    ulysses_hybrid = max((u for u in range(2, world) if world % u == 0 and u <= hkv), default=None)
    cases = [(_label(t), [t * world]) for t in (int(x) for x in a.tokens.split(","))]
    if a.varlen_tokens:
        total = a.varlen_tokens * world
        lens = [max(world, int(total * f) // world * world) for f in VARLEN_FRACTIONS]
        lens[0] += total - sum(lens)
        cases.append((f"varlen {_label(a.varlen_tokens)}", lens))
    backend = resolve_backend("auto", torch.zeros(1, hq, d, device=device, dtype=dtype))
    time_fn = lambda step: _time(step, device, a.min_time, group)  # noqa: E731
    rows: list[dict] = []

    for name, seqlens in cases:
        torch.manual_seed(0)
        total = sum(seqlens)
        q, k, v, dout = (torch.randn(total, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv, hq))
        flops = _causal_flops(seqlens, hq, d)
        cu = torch.tensor([0, *seqlens], device=device).cumsum(0).to(torch.int32)
        base = dict(case=name, tokens_per_gpu=total // world, num_docs=len(seqlens), gpus=world)

        fn, inputs = _single_gpu(q, k, v, cu, max(seqlens), backend)
        t_single = time_fn(_fwd_bwd(fn, inputs, dout))
        with torch.no_grad():
            ref_out = fn(*inputs)
        del inputs
        rows.append({**base, "impl": "single_gpu_flash", "backend": backend, "time_ms": 1e3 * t_single,
                     "tflops_per_gpu": flops / t_single / 1e12})

        def record(impl: str, run: Callable[[], tuple[float, dict]]) -> None:
            row = {**base, "impl": impl}
            try:
                t, extra = run()
                row.update(time_ms=1e3 * t, tflops_per_gpu=flops / t / world / 1e12,
                           pct_of_single_gpu_flash=100 * (t_single / world) / t, **extra)
            except Exception as e:  # noqa: BLE001 - a failing peer is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if rank == 0 and not isinstance(e, Unsupported):
                    traceback.print_exc()
            rows.append(row)
            if rank == 0:
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

        # (impl, mode, ulysses degree, head chunks of pure Ulysses' overlapped transfers; 1 is the default)
        modes = [("ulysses", "ulysses", None, 1), ("ulysses_2chunks", "ulysses", None, 2),
                 ("ulysses_4chunks", "ulysses", None, 4), ("ring", "ring", None, 1),
                 ("tokenring", "tokenring", None, 1)]
        if ulysses_hybrid:
            modes.append(("hybrid", "hybrid", ulysses_hybrid, 1))
        for impl, mode, u, chunks in modes:
            def run_mode(mode=mode, u=u, chunks=chunks):
                fn, inputs, dl, index = _seqmesh(mode, seqlens, q, k, v, dout, group, u, chunks)
                t = time_fn(_fwd_bwd(fn, inputs, dl))
                with torch.no_grad():
                    err = (fn(*inputs).float() - ref_out[index].float()).abs().max()
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                return t, {"mode": mode, "ulysses_degree": u or (world if mode == "ulysses" else 1),
                           "ulysses_chunks": chunks, "max_abs_err_vs_single_gpu": err.item()}
            record(f"seqmesh_{impl}", run_mode)

        def run_ds():
            fn, inputs, dl = _deepspeed(seqlens, q, k, v, dout, group, backend)
            return time_fn(_fwd_bwd(fn, inputs, dl)), {}
        record("deepspeed_ulysses", run_ds)

        for rotate in ("allgather", "alltoall"):
            def run_cp(rotate=rotate):
                if len(seqlens) > 1:
                    raise Unsupported("context_parallel has no variable-length (document mask) support for SDPA")
                t, note = _context_parallel(q, k, v, dout, rotate, device, time_fn)
                return t, {"rotate_method": rotate, **note}
            record(f"torch_context_parallel_{rotate}", run_cp)
        del q, k, v, dout, ref_out
        if cuda:
            torch.cuda.empty_cache()

    summary = _summary(rows, cases)
    config = dict(heads_q=hq, heads_kv=hkv, head_dim=d, dtype=str(dtype).removeprefix("torch."), causal=True,
                  gpus=world, cases={n: s for n, s in cases}, backend=backend, smoke=a.smoke,
                  torch=torch.__version__, min_time_s=a.min_time)
    if rank == 0:
        write_result("sp_attention", config, rows, summary, out_dir=a.out)
    dist.barrier()
    dist.destroy_process_group()


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _summary(rows: list[dict], cases: list[tuple[str, list[int]]]) -> dict:
    """Per case, the best seqmesh mode against single-GPU flash and the best configuration of each
    peer; the headline figures are geometric means over the cases (speed ratios: >1 = seqmesh faster,
    or TokenRing faster for ``tokenring_vs_*``)."""
    best_pct, vs_cp, vs_ds, best_mode = [], [], [], {}
    tokenring_vs: dict[str, list[float]] = {"ring": [], "ulysses": []}
    for name, _ in cases:
        ok = [r for r in rows if r["case"] == name and "time_ms" in r]
        ms = {r["impl"]: r["time_ms"] for r in ok}
        for other in tokenring_vs:
            if "seqmesh_tokenring" in ms and f"seqmesh_{other}" in ms:
                tokenring_vs[other].append(ms[f"seqmesh_{other}"] / ms["seqmesh_tokenring"])
        ours = [r for r in ok if r["impl"].startswith("seqmesh_")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["time_ms"])
        best_mode[name] = {"mode": best["impl"], "pct_of_single_gpu_flash": round(best["pct_of_single_gpu_flash"], 1)}
        best_pct.append(best["pct_of_single_gpu_flash"])
        cp = [r["time_ms"] for r in ok if r["impl"].startswith("torch_context_parallel")]
        ds = [r["time_ms"] for r in ok if r["impl"] == "deepspeed_ulysses"]
        if cp:
            vs_cp.append(min(cp) / best["time_ms"])
        if ds:
            vs_ds.append(min(ds) / best["time_ms"])
    return {
        "best_pct_of_single_gpu_flash": _geomean(best_pct),
        "best_vs_context_parallel": _geomean(vs_cp),
        "best_vs_deepspeed_ulysses": _geomean(vs_ds),
        "tokenring_vs_ring": _geomean(tokenring_vs["ring"]),
        "tokenring_vs_ulysses": _geomean(tokenring_vs["ulysses"]),
        "best_by_case": best_mode,
    }


if __name__ == "__main__":
    main()
