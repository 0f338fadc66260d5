"""Projected end-to-end win of the adaptive planner over the best static SP: a SIMULATION.

Nothing here runs on a GPU. Plans are made by ``seqmesh.scheduler.plan_step`` (adaptive, default
0.2 s budget) and by ``best_static`` (the fastest static SP degree, best-fit packed), and both are
priced by the one simulator (``seqmesh.scheduler.simulate``) under the cost model built below.
Tokens/s = tokens of the batch / simulated step time (makespan + gradient reduction). Every input
is a measured figure or a stated assumption; where they come from:

* **Compute** (alpha1, alpha2, beta, activation bytes per token): ``seqmesh profile`` on one H200
  for the Llama-3-8B shape cut to 8 layers (``conf/cost_models/h200_llama8b_8layers.json``; byte
  vocabulary, bf16 autocast, fp32 AdamW states, no checkpointing). The full model has 32 layers:
  every per-layer term is multiplied by 32/8, exactly as ``seqmesh profile --layers 32`` scales its
  one measured layer. The LM head of the byte vocabulary (256 x 4096, ~0.05% of a layer's FLOPs) is
  inside the profiled alpha2 and is scaled with it; a 128K vocabulary's head is not modelled.
* **Memory decides the training configuration** (``memory_plan``): 16 B of model state per
  parameter (fp32 weights, gradients, two Adam moments; the profile's own count) for 32 layers is
  124.6 GB of the profile's 127.6 GB limit, so unsharded nothing fits. ZeRO-1 (optimizer moments
  sharded over the HDP ranks; seqmesh's ``zero_stage: 1``) leaves ~64 GB, which holds only ~11.8K
  tokens per GPU without checkpointing (a 32K document would need 4 GPUs, a 128K one 16, across
  nodes); with activation checkpointing (conf/model/llama-8b.yaml's default) a token keeps its 32
  fp32 layer inputs plus one layer's measured working set, 0.70 MB, so a GPU holds ~92K tokens.
  Assumed therefore: activation checkpointing (x 4/3 compute and beta, Ulysses traffic of three
  passes instead of two, as ``seqmesh profile --checkpointing`` prices it) and ZeRO-1.
* **Gradient reduction**: seqmesh's ZeRO-1 reduce-scatters fp32 gradients and all-gathers fp32
  parameters once per step after the last backward (not overlapped): ``2 * 4 B * params * (n-1)/n``
  per GPU at the inter-node ring rate (below). It is the same for both policies, so it dilutes the
  speedup; the plan-only ratio (makespans) is reported beside it.
* **Intra-node all-to-all** (groups of 2, 4, 8 GPUs; 8 GPUs per node on NVSwitch, so every GPU keeps
  its full NVLink rate whatever the group): 111 GB/s, the NCCL all-to-all bus bandwidth measured on
  2 H200s at 64 MB per rank (../shared/NOTES.md; 64 MB is ``seqmesh profile``'s message size, and
  a Ulysses q shard of 8K tokens x 4096 x bf16). NOTES' 293 GB/s at 512 MB is not used (optimistic
  for short sequences); its p2p figures are not used either: the cost model prices Ulysses
  (all-to-all) only.
* **Inter-node** (groups of 16 and more): one 400 Gb/s NIC per GPU (50 GB/s), of which all-to-all
  reaches ``NIC_EFFICIENCY`` = 80%. A rank of a ``d``-rank group (``d/8`` whole nodes, contiguous)
  sends ``(d-8)/d`` of its buffer off-node through its NIC, in parallel with the NVLink share, so
  its time is ``(d-8)/d * M / (0.8 * 50 GB/s)`` and the bus bandwidth, ``M (d-1)/d`` over that time,
  is ``0.8 * 50 * (d-1)/(d-8)`` GB/s, capped by NVLink's: 75 at 16, 51.7 at 32, ... -> 40 GB/s.
  ``a2a_GBps`` is the bus bandwidth, as ``seqmesh profile`` measures it; the cost model divides a
  rank's whole buffer by it, so communication is charged ``d/(d-1)`` high (2x at d=2, 1.07x at 16),
  the same for both policies. Every power of two up to the GPU count is priced (``a2a_table``).
* **Data**: real Wikipedia document lengths (``bench/data``: padded to 128, > 192,000-128 dropped,
  file order) and the Python standard library's .py files on this machine (tokens ~ bytes / 4,
  sampled with replacement, seed 0). A document longer than the context cap (32K or 128K) is split
  into cap-long chunks plus the remainder, as long-context pipelines do (nothing is dropped).
* **Global batch**: a fixed budget of ``TOKENS_PER_GPU`` = 16,384 tokens per GPU per step:
  consecutive documents until the batch holds ``gpus * 16384`` tokens (1M tokens at 64 GPUs, 4M at
  256, 16M at 1024, Llama 3's largest global batch). How much one long document unbalances a
  static plan depends on this budget, so 4K and 64K tokens per GPU are also run at 64 GPUs
  (sensitivity rows, outside the summary keys).
* **Straggler**: one node (the last 8 ranks) at 0.7x speed through ``CostModel.speed`` (one factor
  per HDP rank; a group runs at its slowest rank's pace; both policies and the simulator see it).

    python bench/scheduler_sim.py            # writes bench/results/scheduler_sim_cpu.json (~2 min, 2 cores)
    python bench/scheduler_sim.py --quick    # one batch per case, 64 GPUs only
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from seqmesh.scheduler import CostModel, Plan, check_plan, plan_step, simulate  # noqa: E402
from seqmesh.scheduler.static import best_static  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "conf" / "cost_models" / "h200_llama8b_8layers.json"
WIKIPEDIA = ROOT / "bench" / "data" / "wikipedia_lengths_head.txt.gz"

# The profiled shape (conf/cost_models/README.md) and the model the projection is for.
HIDDEN, FFN, VOCAB = 4096, 14336, 256
PROFILED_LAYERS, LAYERS = 8, 32
RECOMPUTE = 4 / 3           # activation checkpointing runs every layer's forward twice
ACT_BYTES = 2               # bf16 activations moved by Ulysses
RESIDUAL_BYTES = 4          # checkpointed layer inputs: fp32 residual stream under autocast (seqmesh profile)

GPUS_PER_NODE = 8
NVLINK_GBPS = 111.0         # NOTES.md: NCCL all-to-all bus bandwidth, 2x H200, 64 MB per rank
NIC_GBPS = 50.0             # 400 Gb/s per GPU (one ConnectX-7 NDR port per GPU)
NIC_EFFICIENCY = 0.8        # share of the NIC's line rate an inter-node all-to-all or ring reaches

TOKENS_PER_GPU = 16384
CAPS = (32768, 131072)
GPU_COUNTS = (64, 256, 1024)
STRAGGLER_SPEED = 0.7
SENSITIVITY_TOKENS_PER_GPU = (4096, 65536)
STDLIB_DRAWS = 200_000      # documents drawn from the stdlib's files (enough for 4 batches at 1024 GPUs)
PAD, WIKI_MAX = 128, 192000 - 128   # FlexSP's loader (bench/data/README.md)


def a2a_table(gpus: int) -> dict[int, float]:
    """All-to-all bus bandwidth (GB/s) for every power-of-two group size up to ``gpus``.

    Within a node every GPU keeps its NVLink rate; beyond it a rank's off-node share ``(d-8)/d``
    goes through its NIC, so the bus bandwidth is ``eff * NIC * (d-1)/(d-8)``, never above NVLink's.
    """
    table: dict[int, float] = {}
    d = 2
    while d <= gpus:
        if d <= GPUS_PER_NODE:
            table[d] = NVLINK_GBPS
        else:
            table[d] = min(NVLINK_GBPS, NIC_EFFICIENCY * NIC_GBPS * (d - 1) / (d - GPUS_PER_NODE))
        d *= 2
    return table


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of the 32-layer model under a ZeRO stage, with or without checkpointing."""

    params: float
    zero_stage: int
    checkpointing: bool
    static_bytes: float
    bytes_per_token: float
    limit_bytes: float

    @property
    def tokens_per_gpu(self) -> int:
        return max(0, int((self.limit_bytes - self.static_bytes) / self.bytes_per_token))


def load_profile() -> dict[str, Any]:
    """The profiled 8-layer cost model's JSON, as committed."""
    return json.loads(PROFILE.read_text())


def memory_plan(profile: dict[str, Any], gpus: int, zero_stage: int, checkpointing: bool) -> MemoryPlan:
    """What one GPU holds, from the profile's figures scaled to 32 layers.

    The profile counts 16 B of state per parameter (``mem_static_bytes = 16 * params``) with its
    own parameter count (``4 h^2 + 3 h ffn`` per layer plus embedding and head); its activation
    bytes per token are one layer's measured working set times 8 layers.
    """
    embed = 2 * VOCAB * HIDDEN
    per_layer = (profile["mem_static_bytes"] / 16 - embed) / PROFILED_LAYERS
    params = per_layer * LAYERS + embed
    weights, grads, moments = 4.0, 4.0, 8.0
    if zero_stage >= 1:
        moments /= gpus
    if zero_stage >= 2:
        grads /= gpus
    layer_bytes = profile["mem_bytes_per_token"] / PROFILED_LAYERS
    per_token = RESIDUAL_BYTES * HIDDEN * LAYERS + layer_bytes if checkpointing else layer_bytes * LAYERS
    return MemoryPlan(params, zero_stage, checkpointing, (weights + grads + moments) * params, per_token,
                      profile["mem_limit_bytes"])


def grad_reduce_ms(params: float, gpus: int) -> float:
    """ZeRO-1's reduce-scatter of fp32 gradients and all-gather of fp32 parameters, ring over nodes."""
    return 2 * 4 * params * (gpus - 1) / gpus / (NIC_EFFICIENCY * NIC_GBPS * 1e9) * 1e3


def llama8b_32layers(gpus: int) -> CostModel:
    """The projection's cost model for ``gpus`` HDP ranks (checkpointing, ZeRO-1; module docstring)."""
    profile = load_profile()
    scale = LAYERS / PROFILED_LAYERS
    mem = memory_plan(profile, gpus, zero_stage=1, checkpointing=True)
    return CostModel(
        alpha1_ms_per_tok2=profile["alpha1_ms_per_tok2"] * scale * RECOMPUTE,
        alpha2_ms_per_tok=profile["alpha2_ms_per_tok"] * scale * RECOMPUTE,
        beta_ms=profile["beta_ms"] * scale * RECOMPUTE,
        a2a_GBps=a2a_table(gpus),
        comm_bytes_per_token=float(4 * HIDDEN * ACT_BYTES * 3 * LAYERS),  # q, k, v, out; fwd, recompute, bwd
        mem_bytes_per_token=mem.bytes_per_token,
        mem_static_bytes=mem.static_bytes,
        mem_limit_bytes=mem.limit_bytes,
        grad_reduce_ms=grad_reduce_ms(mem.params, gpus),
        source=f"bench/scheduler_sim.py: {PROFILE.name} x {LAYERS}/{PROFILED_LAYERS} layers, checkpointing, "
               f"ZeRO-1 over {gpus} ranks, NVLink {NVLINK_GBPS} GB/s, NIC {NIC_EFFICIENCY} x {NIC_GBPS} GB/s",
    )


def with_slow_node(cm: CostModel, gpus: int) -> CostModel:
    """The same model with the last node's ranks at ``STRAGGLER_SPEED``."""
    speed = [1.0] * gpus
    speed[-GPUS_PER_NODE:] = [STRAGGLER_SPEED] * GPUS_PER_NODE
    return cm.with_speed(speed)


def split_at_cap(docs: np.ndarray, cap: int) -> np.ndarray:
    """Each document as cap-long chunks followed by its remainder, in document order."""
    out: list[int] = []
    for n in docs.tolist():
        full, rest = divmod(n, cap)
        out.extend([cap] * full)
        if rest:
            out.append(rest)
    return np.asarray(out, dtype=np.int64)


def wikipedia_docs() -> np.ndarray:
    raw = np.array(gzip.decompress(WIKIPEDIA.read_bytes()).split(), dtype=np.int64)
    padded = -(-raw // PAD) * PAD
    return padded[padded <= WIKI_MAX]


def stdlib_docs(count: int, seed: int = 0) -> np.ndarray:
    """``count`` documents drawn with replacement from the stdlib's .py files (tokens ~ bytes / 4)."""
    root = sysconfig.get_paths()["stdlib"]
    sizes = sorted(os.path.getsize(os.path.join(d, f)) // 4 for d, _, files in os.walk(root)
                   if "site-packages" not in d for f in files if f.endswith(".py"))
    pool = np.asarray([s for s in sizes if s > 0], dtype=np.int64)
    return np.random.default_rng(seed).choice(pool, count)


def batches(chunks: np.ndarray, gpus: int, count: int, tokens_per_gpu: int) -> Iterator[np.ndarray]:
    """``count`` batches of consecutive chunks, each the first to reach ``gpus * tokens_per_gpu`` tokens."""
    ends = np.searchsorted(np.cumsum(chunks), gpus * tokens_per_gpu * np.arange(1, count + 1))
    start = 0
    for end in ends.tolist():
        if end >= chunks.size:
            raise ValueError(f"the corpus holds {chunks.size} chunks, too few for {count} batches at {gpus} GPUs")
        yield chunks[start:end + 1]
        start = end + 1


def plans(lengths: np.ndarray, gpus: int, cm: CostModel) -> tuple[Plan, Plan, float]:
    """(adaptive plan, best static plan, planning CPU seconds) of one batch; both checked."""
    batch = lengths.tolist()
    t0 = time.process_time()
    adaptive = plan_step(batch, gpus, cm)
    solve_s = time.process_time() - t0
    static = best_static(batch, gpus, cm)
    for plan in (adaptive, static):
        check_plan(plan, batch, cm)
    return adaptive, static, solve_s


def compare(lengths: np.ndarray, gpus: int, cm: CostModel) -> dict[str, Any]:
    """Adaptive vs best static on one batch, both priced by the one simulator.

    ``speedup`` is the tokens/s ratio (same tokens, so the step-time ratio); ``plan_speedup``
    leaves out the plan-independent gradient reduction (what it would be were the reduction
    hidden behind compute); ``speedup_bound`` is the best any plan could do, best static over
    the lower bound.
    """
    adaptive, static, solve_s = plans(lengths, gpus, cm)
    batch = lengths.tolist()
    a_ms, s_ms = simulate(adaptive, batch, cm), simulate(static, batch, cm)
    tokens = int(lengths.sum())
    return {
        "gpus": gpus, "sequences": len(batch), "tokens": tokens, "max_len": int(lengths.max()),
        "adaptive_ms": round(a_ms, 2), "best_static_ms": round(s_ms, 2), "best_static": static.meta["baseline"],
        "grad_reduce_ms": round(cm.grad_reduce_ms, 2), "lower_bound_ms": round(adaptive.lower_bound_ms, 2),
        "adaptive_tokens_per_s": round(tokens / a_ms * 1e3), "static_tokens_per_s": round(tokens / s_ms * 1e3),
        "speedup": round(s_ms / a_ms, 4),
        "plan_speedup": round((s_ms - cm.grad_reduce_ms) / (a_ms - cm.grad_reduce_ms), 4),
        "speedup_bound": round(s_ms / adaptive.lower_bound_ms, 4),
        "adaptive_group_sizes": {str(d): c for d, c in sorted(Counter(adaptive.group_sizes()).items())},
        "adaptive_microbatches": len(adaptive.microbatches), "static_microbatches": len(static.microbatches),
        "solver": adaptive.meta.get("solver"), "solve_s": round(solve_s, 3),
    }


@dataclasses.dataclass(frozen=True)
class Case:
    corpus: str
    cap: int
    gpus: int
    batches: int
    straggler: bool = False
    tokens_per_gpu: int = TOKENS_PER_GPU

    @property
    def headline(self) -> bool:
        """Whether the case counts towards the summary keys (the stated setting, no straggler)."""
        return not self.straggler and self.tokens_per_gpu == TOKENS_PER_GPU


def cases(quick: bool) -> list[Case]:
    """Every simulated case: corpora x caps at each GPU count, the slow node, and a batch-size check."""
    counts = (64,) if quick else GPU_COUNTS
    per = {64: 1} if quick else {64: 8, 256: 8, 1024: 4}
    out = [Case(corpus, cap, gpus, per[gpus]) for gpus in counts for corpus in ("wikipedia", "python-stdlib")
           for cap in CAPS]
    out += [Case("wikipedia", CAPS[0], gpus, per[gpus], straggler=True) for gpus in counts]
    # The budget per GPU sets how much one long document unbalances a static plan: 4x less and 4x more.
    out += [Case(corpus, cap, 64, 1 if quick else 4, tokens_per_gpu=t) for t in SENSITIVITY_TOKENS_PER_GPU
            for corpus in ("wikipedia", "python-stdlib") for cap in CAPS]
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    wiki = wikipedia_docs()
    stdlib = stdlib_docs(STDLIB_DRAWS)
    rows: list[dict[str, Any]] = []
    for case in cases(quick):
        cm = llama8b_32layers(case.gpus)
        if case.straggler:
            cm = with_slow_node(cm, case.gpus)
        chunks = split_at_cap(wiki if case.corpus == "wikipedia" else stdlib, case.cap)
        for k, lengths in enumerate(batches(chunks, case.gpus, case.batches, case.tokens_per_gpu)):
            row = {**dataclasses.asdict(case), "headline": case.headline, "batch": k,
                   **compare(lengths, case.gpus, cm)}
            del row["batches"]
            rows.append(row)
            print({key: row[key] for key in ("gpus", "corpus", "cap", "straggler", "tokens_per_gpu", "batch",
                                            "best_static", "speedup", "plan_speedup", "solve_s")}, flush=True)
    return rows


def ratio(rows: list[dict[str, Any]], plan_only: bool = False) -> float:
    """Best static over adaptive, summed over the rows' batches (= their tokens/s ratio when the
    batches are weighted by time); ``plan_only`` leaves out the gradient reduction."""
    cut = (lambda r: r["grad_reduce_ms"]) if plan_only else (lambda r: 0.0)
    return round(sum(r["best_static_ms"] - cut(r) for r in rows) / sum(r["adaptive_ms"] - cut(r) for r in rows), 4)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The DESIGN.md keys (``sim_speedup_vs_best_static_<gpus>``: every headline batch of that GPU
    count, both corpora and caps) and, beside them, the plan-only ratio, the bound and the slow node."""
    summary: dict[str, Any] = {}
    for gpus in sorted({r["gpus"] for r in rows if r["headline"]}):
        main = [r for r in rows if r["gpus"] == gpus and r["headline"]]
        summary[f"sim_speedup_vs_best_static_{gpus}"] = ratio(main)
        summary[f"sim_plan_speedup_vs_best_static_{gpus}"] = ratio(main, plan_only=True)
        summary[f"sim_speedup_bound_{gpus}"] = round(sum(r["best_static_ms"] for r in main)
                                                     / sum(r["lower_bound_ms"] for r in main), 4)
        summary[f"sim_plan_speedup_bound_{gpus}"] = round(
            sum(r["best_static_ms"] - r["grad_reduce_ms"] for r in main)
            / sum(r["lower_bound_ms"] - r["grad_reduce_ms"] for r in main), 4)
        slow = [r for r in rows if r["gpus"] == gpus and r["straggler"]]
        if slow:
            summary[f"sim_speedup_vs_best_static_{gpus}_slow_node"] = ratio(slow)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 GPUs, one batch per case (smoke check)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = ap.parse_args()
    rows = run(args.quick)
    profile = load_profile()
    config = {
        "simulation": "plans priced by seqmesh.scheduler.simulate under the cost models below; no GPU ran",
        "profile": str(PROFILE.relative_to(ROOT)),
        "layers": f"{LAYERS}: the profile's {PROFILED_LAYERS}-layer alpha1, alpha2, beta and activation bytes x "
                  f"{LAYERS // PROFILED_LAYERS}",
        "assumed": "activation checkpointing (x4/3 compute and beta, 3 Ulysses passes) and ZeRO-1 over all ranks",
        "tokens_per_gpu_by_memory_plan_64": {f"zero{z}_{'checkpointing' if c else 'no_checkpointing'}":
                                             memory_plan(profile, 64, z, c).tokens_per_gpu
                                             for z in (0, 1, 2) for c in (False, True)},
        "cost_models": {str(g): llama8b_32layers(g).to_dict() for g in sorted({r["gpus"] for r in rows})},
        "gpus_per_node": GPUS_PER_NODE, "nvlink_a2a_GBps": NVLINK_GBPS, "nic_GBps": NIC_GBPS,
        "nic_efficiency": NIC_EFFICIENCY, "tokens_per_gpu_per_step": TOKENS_PER_GPU,
        "sensitivity_tokens_per_gpu": list(SENSITIVITY_TOKENS_PER_GPU), "caps": list(CAPS),
        "corpora": {"wikipedia": f"{WIKIPEDIA.relative_to(ROOT)}, padded to {PAD}, > {WIKI_MAX} dropped, file order",
                    "python-stdlib": f"{sysconfig.get_paths()['stdlib']} *.py, bytes // 4, {STDLIB_DRAWS} draws "
                                     "with replacement, seed 0"},
        "long_documents": "split into cap-long chunks plus the remainder",
        "straggler": f"last node ({GPUS_PER_NODE} ranks) at {STRAGGLER_SPEED}x via CostModel.speed; wikipedia, "
                     f"cap {CAPS[0]}",
        "plan_step": {"policy": "adaptive", "time_limit_s": 0.2},
        "baseline": "seqmesh.scheduler.static.best_static: the fastest static SP over every power of two",
        "speedup": "best-static step ms / adaptive step ms = adaptive tokens/s / static tokens/s; step = makespan "
                   "+ grad_reduce_ms",
        "plan_speedup": "the same without the plan-independent gradient reduction",
        "speedup_bound": "best-static step ms / lower bound: the most any plan could gain",
        "summary": "ratios of summed step times over the headline batches (both corpora, both caps) of a GPU count",
    }
    write_result("scheduler_sim", config, rows, summarise(rows), device="cpu", out_dir=args.out)


if __name__ == "__main__":
    main()
