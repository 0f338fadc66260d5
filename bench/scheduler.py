"""Planning quality and planning time of the adaptive scheduler, on CPU, against static SP.

For 8, 64, 256 and 1024 HDP ranks (global batch 512, scaled with the ranks from 256 on: 2048,
8192), batches of real long-tail lengths are planned by ``plan_step`` (adaptive, default 0.2 s
budget) and by every static SP degree (best-fit packing; ``best-static`` is the fastest of them),
and every plan is priced by the one simulator. Reported per batch: the step time over issue 4's
lower bound (``ratio``), the solve time (CPU seconds of this process, which is what "on 2 cores"
means on a machine shared with other jobs; wall seconds alongside), and the speedup over the best
static plan. ``ratio_moldable`` divides by a tighter bound that also charges the communication a
long sequence must pay to finish in time (see ``moldable_bound``): it separates what the planner
leaves on the table from what issue 4's bound cannot see.

Length distributions:

* ``wikipedia-fit``: a parametric fit of published Wikipedia statistics: log-normal body with
  median 350 tokens and p99 11K (sigma = ln(11000/350)/2.326), a Pareto tail above p99 with index
  2.46 (so ~6.5M articles hold about one over 1M tokens); documents are cut at the context limit.
* ``wikipedia-fit+1M``: such a batch whose longest sequence is replaced by one of the context limit
  (1,048,576 tokens), the case a 1M-token article forces.
* ``python-stdlib``: the Python standard library's .py files on this machine, tokens ~ bytes / 4.
* ``usr-share-doc``: every file under /usr/share/doc (gzip ones decompressed), tokens ~ bytes / 4.
* ``wikipedia-real``: FlexSP's released per-document lengths of English Wikipedia (the committed
  head, ``bench/data/README.md``), read as FlexSP's loader reads them, priced by FlexSP's GPT-7B cost
  model (``conf/cost_models/flexsp_gpt7b.json``): 64 GPUs x 512 (batches 0-7), 1024 x 8192 (0-2)
  and 4096 x 32768 (0). Each plan is judged against issue 4's bound and the certified bound
  (``seqmesh.scheduler.bound``, solved outside the timed planning); FlexSP's own MILP, under the
  same scorer, is published at 1.376x of the simple bound in 9.0 s for the 64-GPU case (issue 17).
  From 1024 GPUs on, groups wider than the model's 64-rank table are priced with its 64-rank
  bandwidth (``extrapolate_bandwidth``, an assumption the result's config states).

Sequences over the context limit (2**20 tokens) are split into chunks of at most that length, as
long-context data pipelines do; the cost model holds such a chunk on 8 ranks (155K tokens per
rank), so every GPU count can run every batch.

    python bench/scheduler.py            # full run, writes bench/results/scheduler_cpu.json
    python bench/scheduler.py --quick    # a few batches, for a smoke check
    python bench/scheduler.py --only wiki_real   # the real-length cases alone, printed
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from seqmesh.scheduler import plan_step  # noqa: E402
from seqmesh.scheduler.bound import certified_bound  # noqa: E402
from seqmesh.scheduler.cost_model import CostModel  # noqa: E402
from seqmesh.scheduler.simulate import plannable_sizes  # noqa: E402
from seqmesh.scheduler.static import best_static, static_plan  # noqa: E402

CONTEXT = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
WIKI_REAL = ROOT / "bench" / "data" / "wikipedia_lengths_head.txt.gz"
FLEXSP_MODEL = ROOT / "conf" / "cost_models" / "flexsp_gpt7b.json"
FLEXSP_PUBLISHED_64 = {"ratio_to_simple_bound": 1.376, "solve_s": 9.0,
                       "source": "issue 17: FlexSP's MILP, 64 GPUs x 512 real Wikipedia lengths, same scorer"}
# (GPUs, sequences per batch, batches) of the real-length cases
WIKI_REAL_CASES = ((64, 512, 8), (1024, 8192, 3), (4096, 32768, 1))

# GPT-7B (LLaMA-7B shape) on H100-class GPUs, 8 per node:
P, HIDDEN, LAYERS = 6.74e9, 4096, 32
MATMUL_FLOPS = 0.6 * 792e12   # NOTES.md: bf16 matmul 792 TFLOP/s measured on Hopper (H200 = H100 compute);
#                               x0.6, the share 7B training keeps after norms, optimizer and gaps (~48% MFU)
ATTN_FLOPS = 300e12           # NOTES.md: causal flash SDPA fwd+bwd 285-325 TFLOP/s at 8K-32K
RECOMPUTE = 4 / 3             # full activation checkpointing: what lets 1M-token sequences fit 8 ranks


def gpt7b_h100() -> CostModel:
    """The benchmark's cost model; every coefficient is a count over a rate, sources inline."""
    return CostModel(
        alpha1_ms_per_tok2=6 * HIDDEN * LAYERS * RECOMPUTE / ATTN_FLOPS * 1e3,    # causal 2 s^2 h per layer, x3
        alpha2_ms_per_tok=6 * P * RECOMPUTE / MATMUL_FLOPS * 1e3,                 # 6 FLOPs per parameter
        beta_ms=25.0,  # per micro-batch: ~100 kernels/layer (fwd, recompute, bwd) x 32 layers x ~8 us launch+dispatch
        # NOTES.md: all-to-all bus bandwidth 111 GB/s at 64 MB on NVLink (used for 2-8 ranks in a node);
        # across nodes 400 Gb/s NDR per GPU = 50 GB/s, ~80% reached by all-to-all
        a2a_GBps={2: 111.0, 4: 111.0, 8: 111.0, 16: 40.0},
        comm_bytes_per_token=4 * HIDDEN * 2 * 3 * LAYERS,  # Ulysses: q, k, v, out (bf16) fwd + recompute + bwd
        # checkpointed layer inputs (bf16) + one layer's working set (34 h bytes, Korthikanti et al. 2022,
        # fused attention); the loss is chunked so logits never materialise for the whole sequence
        mem_bytes_per_token=2 * HIDDEN * LAYERS + 34 * HIDDEN,
        mem_static_bytes=16 * P / 8 + 4 * 2**30,  # model states sharded over a node's 8 GPUs, + 4 GiB workspace
        mem_limit_bytes=80e9,                     # H100 80 GB less ~7% for context and fragmentation
        source="bench/scheduler.py gpt7b_h100",
    )


def flexsp_a100(gpus: int) -> CostModel:
    """FlexSP's own GPT-7B cost model (Hetu-Galvatron ``flexsp`` branch, ``flexSPCostModel`` defaults:
    A100 measurements, ZeRO-3, no checkpointing), in issue 4's form, with an 80 GiB memory limit."""
    mib = 2**20
    return CostModel(alpha1_ms_per_tok2=5.128e-6, alpha2_ms_per_tok=183.9576e-3, beta_ms=629.3563,
                     a2a_GBps={2: 154.0, 4: 137.0, 8: 121.0, 16: 8.7},
                     comm_bytes_per_token=4 * 2 * LAYERS * HIDDEN * 2 / mib * 1e6,  # their MB / (GB/s) = ms
                     mem_bytes_per_token=4.71 * mib, mem_static_bytes=7 * 16 * 1024 * mib / gpus,
                     mem_limit_bytes=80 * 1024 * mib, source="FlexSP flexSPCostModel defaults")


def split_at_context(lengths: np.ndarray) -> np.ndarray:
    full, rest = np.divmod(lengths.astype(np.int64), CONTEXT)
    return np.concatenate([np.full(int(full.sum()), CONTEXT, dtype=np.int64), rest[rest > 0]])


def wikipedia_fit(rng: np.random.Generator, n: int) -> np.ndarray:
    sigma = np.log(11000 / 350) / 2.3263
    x = np.exp(rng.normal(np.log(350), sigma, n))
    tail = x > 11000
    x[tail] = 11000 * rng.random(int(tail.sum())) ** (-1 / 2.46)
    return split_at_context(np.maximum(x, 1).astype(np.int64))[:n]


def _file_tokens(paths: list[str]) -> np.ndarray:
    sizes = []
    for p in paths:
        try:
            if p.endswith(".gz"):
                with gzip.open(p, "rb") as f:
                    n = len(f.read())
            else:
                n = os.path.getsize(p)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if n >= 4:
            sizes.append(n // 4)
    return split_at_context(np.array(sorted(sizes), dtype=np.int64))


def python_stdlib() -> np.ndarray:
    root = sysconfig.get_paths()["stdlib"]
    return _file_tokens([os.path.join(d, f) for d, dirs, files in os.walk(root)
                         if "site-packages" not in d for f in files if f.endswith(".py")])


def usr_share_doc() -> np.ndarray:
    return _file_tokens([os.path.join(d, f) for d, _, files in os.walk("/usr/share/doc") for f in files
                         if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))])


def wikipedia_real() -> np.ndarray:
    """The committed real lengths as FlexSP's loader reads them (bench/data/README.md): each padded
    up to a multiple of 128, those above 192,000 - 128 dropped, file order kept."""
    with gzip.open(WIKI_REAL, "rt") as f:
        raw = np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    padded = -(-raw // 128) * 128
    return padded[padded <= 192_000 - 128]


def run_real_batch(lengths: np.ndarray, gpus: int, cm: CostModel) -> dict[str, Any]:
    """One real-length batch: the timed plan, both bounds, the gap, the best static plan."""
    batch = lengths.tolist()
    plan, cpu_s, wall_s = _timed(lambda: plan_step(batch, gpus, cm))
    bound = certified_bound(batch, gpus, cm, upper_ms=plan.predicted_ms)
    base = best_static(batch, gpus, cm)
    lb = plan.lower_bound_ms
    sizes = sorted(set(plan.group_sizes()))
    return {
        "gpus": gpus, "sequences": len(batch), "tokens": int(lengths.sum()), "max_len": int(lengths.max()),
        "lower_bound_ms": round(lb, 2), "certified_bound_ms": round(bound.certified_ms, 2),
        "certified_over_simple": round(bound.certified_ms / lb, 4),
        "adaptive_ms": round(plan.predicted_ms, 2), "ratio": round(plan.predicted_ms / lb, 4),
        "gap_to_certified_bound": round(plan.predicted_ms / bound.certified_ms, 4),
        "solve_s": round(cpu_s, 4), "solve_wall_s": round(wall_s, 4), "certify_s": round(bound.seconds, 4),
        "solver": plan.meta.get("solver"), "microbatches": len(plan.microbatches),
        "group_sizes": {str(d): c for d, c in sorted(Counter(plan.group_sizes()).items())},
        "extrapolated_sizes": [d for d in sizes if d > 1 and d not in cm.a2a_GBps],
        "best_static": base.meta["baseline"], "best_static_ratio": round(base.predicted_ms / lb, 4),
        "speedup_vs_best_static": round(base.predicted_ms / plan.predicted_ms, 4),
    }


def real_rows(quick: bool) -> list[dict[str, Any]]:
    lengths = wikipedia_real()
    rows = []
    for gpus, size, batches in WIKI_REAL_CASES:
        cm = CostModel.load(FLEXSP_MODEL)
        if gpus > max(cm.a2a_GBps):
            cm = dataclasses.replace(cm, extrapolate_bandwidth=True)
        for k in range(1 if quick else batches):
            row = {"model": "flexsp-gpt7b", "distribution": "wikipedia-real", "batch": k,
                   **run_real_batch(lengths[k * size:(k + 1) * size], gpus, cm)}
            rows.append(row)
            print({k_: row[k_] for k_ in ("gpus", "batch", "ratio", "certified_over_simple", "gap_to_certified_bound",
                                          "solve_s", "certify_s")}, flush=True)
    return rows


def _real_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per GPU count of the real-length rows: mean and max ratio to the simple bound, mean gap to the
    certified bound, and the longest solve."""
    out: dict[str, float] = {}
    for gpus in sorted({r["gpus"] for r in rows}):
        mine = [r for r in rows if r["gpus"] == gpus]
        out[f"mean_ratio_to_lb_{gpus}_wiki_real"] = round(float(np.mean([r["ratio"] for r in mine])), 4)
        out[f"max_ratio_to_lb_{gpus}_wiki_real"] = round(float(np.max([r["ratio"] for r in mine])), 4)
        out[f"gap_to_certified_bound_{gpus}_wiki_real"] = round(float(np.mean([r["gap_to_certified_bound"]
                                                                             for r in mine])), 4)
        out[f"solve_s_{gpus}_wiki_real"] = round(float(np.max([r["solve_s"] for r in mine])), 4)
    return out


def _real_only(quick: bool, out: Path | None) -> None:
    """``--only wiki_real``: the real-length cases alone (a few minutes instead of the full run)."""
    rows = real_rows(quick)
    summary = _real_summary(rows)
    if out is None:
        print(summary)
        return
    config = {"only": "wiki_real", "cases": [{"gpus": g, "global_batch": b, "batches": list(range(1 if quick else n))}
                                             for g, b, n in WIKI_REAL_CASES]}
    write_result("scheduler_wiki_real", config, rows, summary, device="cpu", out_dir=out)


def moldable_bound(lengths: np.ndarray, gpus: int, cm: CostModel) -> float:
    """A tighter bound than issue 4's: in a plan of step time T, a sequence runs in a group whose
    time (with beta) is at most T, so its rank-milliseconds are at least its cheapest such group's;
    T is at least those, summed with issue 4's beta term, over the ranks. The smallest T for which
    that holds (the bound falls as T grows) is found by bisection."""
    s = lengths.astype(np.float64)
    sizes = plannable_sizes(gpus, cm)
    t = {d: cm.seq_ms(s, d) for d in sizes}
    fits = {d: cm.mem_static_bytes + cm.mem_bytes_per_token * s / d <= cm.mem_limit_bytes for d in sizes}
    beta_area = cm.beta_ms * s.sum() / cm.tokens_per_rank()

    def area(target: float) -> float:
        best = np.full(s.size, np.inf)
        for d in sizes:
            best = np.where(fits[d] & (t[d] + cm.beta_ms <= target), np.minimum(best, d * t[d]), best)
        return float(best.sum()) + beta_area

    lo, hi = 0.0, max(area(np.inf) / gpus, max(float(np.min([t[d] for d in sizes], axis=0).max()), 0.0) + cm.beta_ms)
    while not area(hi) / gpus <= hi:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if area(mid) / gpus <= mid:
            hi = mid
        else:
            lo = mid
    return hi + cm.grad_reduce_ms


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def run_batch(lengths: np.ndarray, gpus: int, cm: CostModel) -> dict[str, Any]:
    batch = lengths.tolist()
    plan, cpu_s, wall_s = _timed(lambda: plan_step(batch, gpus, cm))
    base = best_static(batch, gpus, cm)
    sp1 = static_plan(batch, gpus, 1, cm).predicted_ms if max(batch) <= cm.capacity(1) else None
    lb = plan.lower_bound_ms
    return {
        "gpus": gpus, "sequences": len(batch), "tokens": int(lengths.sum()), "max_len": int(lengths.max()),
        "lower_bound_ms": round(lb, 2), "moldable_bound_ms": round(moldable_bound(lengths, gpus, cm), 2),
        "adaptive_ms": round(plan.predicted_ms, 2), "ratio": round(plan.predicted_ms / lb, 4),
        "solve_s": round(cpu_s, 4), "solve_wall_s": round(wall_s, 4), "solver": plan.meta.get("solver"),
        "microbatches": len(plan.microbatches),
        "group_sizes": {str(d): c for d, c in sorted(Counter(plan.group_sizes()).items())},
        "best_static": base.meta["baseline"], "best_static_ratio": round(base.predicted_ms / lb, 4),
        "static_sp1_ratio": round(sp1 / lb, 4) if sp1 is not None else None,
        "speedup_vs_best_static": round(base.predicted_ms / plan.predicted_ms, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two batches per setting")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    ap.add_argument("--only", choices=("all", "wiki_real"), default="all",
                    help="wiki_real: only the real-length cases, printed (with their summary) and written "
                         "only under --out, so the full result file is never replaced by a partial one")
    args = ap.parse_args()
    if args.only == "wiki_real":
        _real_only(args.quick, args.out)
        return
    rng = np.random.default_rng(0)
    corpora = {"python-stdlib": python_stdlib(), "usr-share-doc": usr_share_doc()}
    batches_per = {8: 6, 64: 16, 256: 3, 1024: 2} if not args.quick else {8: 1, 64: 2, 256: 1, 1024: 1}
    cm = gpt7b_h100()
    plan_step(wikipedia_fit(rng, 512).tolist(), 64, cm)  # warm-up: the planner lives in a long-running process
    rows: list[dict[str, Any]] = []
    for gpus in (8, 64, 256, 1024):
        size = 512 if gpus <= 64 else 512 * gpus // 64
        for k in range(batches_per[gpus]):
            draws = {"wikipedia-fit": wikipedia_fit(rng, size)}
            for name, pool in corpora.items():
                draws[name] = rng.choice(pool, size)
            if k == 0:
                big = wikipedia_fit(rng, size)
                big[np.argmax(big)] = CONTEXT
                draws["wikipedia-fit+1M"] = big
            for name, lengths in draws.items():
                row = {"model": "gpt7b-h100", "distribution": name, "batch": k, **run_batch(lengths, gpus, cm)}
                rows.append(row)
                print({k_: row[k_] for k_ in ("gpus", "distribution", "batch", "ratio", "solve_s", "best_static",
                                             "speedup_vs_best_static")}, flush=True)
    rows += real_rows(args.quick)
    for k in range(batches_per[64]):  # FlexSP's own model, for a like-for-like look at its 1.38x
        row = {"model": "flexsp-a100", "distribution": "wikipedia-fit", "batch": k,
               **run_batch(wikipedia_fit(rng, 512), 64, flexsp_a100(64))}
        rows.append(row)

    def pick(gpus: int, model: str = "gpt7b-h100") -> list[dict[str, Any]]:
        return [r for r in rows if r["gpus"] == gpus and r["model"] == model]

    def real(gpus: int, key: str, how: Callable[[list[float]], Any] = np.mean) -> float:
        return round(float(how([r[key] for r in pick(gpus, "flexsp-gpt7b")])), 4)

    r64, r1024 = pick(64), pick(1024)
    summary = {
        "mean_ratio_to_lb_64": round(float(np.mean([r["ratio"] for r in r64])), 4),
        "max_ratio_to_lb_64": round(float(np.max([r["ratio"] for r in r64])), 4),
        "solve_s_64": round(float(np.max([r["solve_s"] for r in r64])), 4),
        "solve_s_1024": round(float(np.max([r["solve_s"] for r in r1024])), 4),
        "mean_solve_s_64": round(float(np.mean([r["solve_s"] for r in r64])), 4),
        "mean_ratio_to_moldable_lb_64": round(float(np.mean([r["adaptive_ms"] / r["moldable_bound_ms"] for r in r64])), 4),
        "mean_best_static_ratio_64": round(float(np.mean([r["best_static_ratio"] for r in r64])), 4),
        "mean_speedup_vs_best_static_64": round(float(np.mean([r["speedup_vs_best_static"] for r in r64])), 4),
        "mean_ratio_to_lb_64_flexsp_model": round(float(np.mean([r["ratio"] for r in pick(64, "flexsp-a100")])), 4),
        "mean_ratio_to_lb_64_wiki_real": real(64, "ratio"),
        "max_ratio_to_lb_64_wiki_real": real(64, "ratio", np.max),
        "gap_to_certified_bound_64_wiki_real": real(64, "gap_to_certified_bound"),
        "max_gap_to_certified_bound_64_wiki_real": real(64, "gap_to_certified_bound", np.max),
        "certified_over_simple_bound_64_wiki_real": real(64, "certified_over_simple"),
        "flexsp_published_ratio_to_lb_64_wiki_real": FLEXSP_PUBLISHED_64["ratio_to_simple_bound"],
        "beats_flexsp_every_batch_64_wiki_real": bool(real(64, "ratio", np.max) < FLEXSP_PUBLISHED_64["ratio_to_simple_bound"]),
        "solve_s_64_wiki_real": real(64, "solve_s", np.max),
        "solve_s_1024_wiki_real": real(1024, "solve_s", np.max),
        "mean_ratio_to_lb_1024_wiki_real": real(1024, "ratio"),
        "gap_to_certified_bound_1024_wiki_real": real(1024, "gap_to_certified_bound"),
        "max_gap_to_certified_bound_1024_wiki_real": real(1024, "gap_to_certified_bound", np.max),
        "certified_over_simple_bound_1024_wiki_real": real(1024, "certified_over_simple"),
        "solve_s_4096_wiki_real": real(4096, "solve_s", np.max),
        "mean_ratio_to_lb_4096_wiki_real": real(4096, "ratio"),
        "gap_to_certified_bound_4096_wiki_real": real(4096, "gap_to_certified_bound"),
    }
    config = {
        "cost_model": gpt7b_h100().to_dict(), "context_limit": CONTEXT, "gpus": [8, 64, 256, 1024],
        "global_batch": {"8": 512, "64": 512, "256": 2048, "1024": 8192}, "batches_per_setting": batches_per,
        "plan_step": {"policy": "adaptive", "time_limit_s": 0.2},
        "corpora": {name: {"documents": int(pool.size), "median": int(np.median(pool)),
                           "p99": int(np.percentile(pool, 99)), "max": int(pool.max())} for name, pool in corpora.items()},
        "cpu": os.cpu_count(), "solve_s": "CPU seconds of the planning process (single-threaded)",
        "wikipedia_real": {
            "lengths": "bench/data/wikipedia_lengths_head.txt.gz, padded to a multiple of 128, > 192000-128 dropped",
            "cost_model": CostModel.load(FLEXSP_MODEL).to_dict(),
            "cases": [{"gpus": g, "global_batch": b, "batches": list(range(1 if args.quick else n))}
                      for g, b, n in WIKI_REAL_CASES],
            "extrapolate_bandwidth": "from 1024 GPUs on: groups over 64 ranks priced with the 64-rank a2a bandwidth "
                                     "(an assumption; rows list the extrapolated sizes they used)",
            "certified_bound": "seqmesh.scheduler.bound (LP relaxation, HiGHS), solved after and outside the timed plan",
            "flexsp_published_64": FLEXSP_PUBLISHED_64,
        },
    }
    write_result("scheduler", config, rows, summary, device="cpu", out_dir=args.out)


if __name__ == "__main__":
    main()
