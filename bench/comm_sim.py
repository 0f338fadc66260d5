"""The communication side of issue 18, projected: a SIMULATION (no GPU ran).

Three gains, each the ratio of summed simulated step times of the same batches, both plans made by
``seqmesh.scheduler.plan_step`` (adaptive, 0.2 s budget) and priced by ``seqmesh.scheduler.simulate``:

* **TokenRing vs zigzag ring** (8-64 GPUs): the same cost model with ``attention.mode`` ring or
  tokenring (``seqmesh.scheduler.sp_comm``: each mode's volumes, transfers overlapped with the
  attention of the step before, one port per link class); Ulysses beside them from the same inputs,
  and ``auto`` (the planner picks the mode per group) against the best single mode.
  Llama-3-8B heads (32 query, 8 KV, 128 wide: GQA 4) as in the projection; a multi-head variant
  (32 KV heads, the same compute) shows where TokenRing pays. Plus one document of ``gpus x T``
  tokens on one static group of all GPUs (long-context rows).
* **Overlapped gradient reduction** (64-1024 GPUs): ``simulate.overlapped_step_ms`` -- ZeRO-1's
  reduce of fp32 gradients (half of the reduction) in 25 MiB buckets during each rank's last
  backward, launched in one order once every rank has the bucket (seqmesh.parallel.grad_reduce's
  rule), 3/4 of the last group's time being backward (checkpointing); the parameter all-gather
  stays after the step. A pessimistic row uses instead the share the CPU benchmark measured hidden
  (``bench/results/grad_overlap_cpu.json``, gloo on 2 shared cores: its sums compete with backward).
* **Link-aware placement on a two-NIC cluster** (64 GPUs, ``conf/clusters/two_nic.yaml``: 3
  InfiniBand nodes, 5 RoCE nodes, Ethernet between the fabrics): the planner pricing each group
  by its own links against today's link-oblivious planner (one NVLink and one inter-node figure,
  bench/scheduler_sim.py's table), both plans priced on the real links.

Inputs (all in the result's ``config``): bench/scheduler_sim.py's projection model (the H200
profile of Llama-3-8B x 32/8 layers, activation checkpointing, ZeRO-1; Wikipedia lengths, 16,384
tokens per GPU per step); NVLink 111 GB/s per GPU and direction (../shared/NOTES.md: NCCL
all-to-all bus bandwidth on 2 H200s at 64 MB; NOTES' p2p 256 GB/s at 64 MB is not used, so the
ring modes are not favoured over Ulysses); InfiniBand 400 Gb/s per GPU at 80% = 40 GB/s; RoCE
200 Gb/s per GPU at 80% = 20 GB/s; Ethernet 100 Gb/s per node shared by its 8 GPUs, ~1.5 GB/s.

    python bench/comm_sim.py            # writes bench/results/comm_sim_cpu.json (a few minutes on 2 cores)
    python bench/comm_sim.py --quick    # small configuration (the CPU test runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result  # noqa: E402
from bench.scheduler_sim import (GPUS_PER_NODE, HIDDEN, LAYERS, NIC_EFFICIENCY, NIC_GBPS, NVLINK_GBPS,  # noqa: E402
                                 TOKENS_PER_GPU, batches, llama8b_32layers, memory_plan, load_profile,
                                 split_at_cap, wikipedia_docs)
from seqmesh.scheduler import CostModel, Plan, check_plan, plan_step, simulate, static_plan  # noqa: E402
from seqmesh.scheduler.links import ClusterLinks, load_cluster, parse_cluster  # noqa: E402
from seqmesh.scheduler.simulate import overlapped_step_ms  # noqa: E402
from seqmesh.scheduler.sp_comm import AttentionComm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TWO_NIC = ROOT / "conf" / "clusters" / "two_nic.yaml"
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, HIDDEN // 32
IB_GBPS = NIC_EFFICIENCY * NIC_GBPS      # 40
BUCKET_BYTES = 25 * 1024 * 1024          # seqmesh.parallel.grad_reduce.BUCKET_BYTES
BACKWARD_SHARE = 3 / 4                   # recomputed forward + backward of the last group, with checkpointing
GRAD_OVERLAP_CPU = RESULTS / "grad_overlap_cpu.json"


def uniform_cluster(gpus: int) -> ClusterLinks:
    """``gpus / 8`` nodes on one InfiniBand fabric, NVLink inside each."""
    nodes = max(1, gpus // GPUS_PER_NODE)
    return parse_cluster(f"format: seqmesh-cluster/1\ngpus_per_node: {GPUS_PER_NODE}\n"
                         f"bandwidth_GBps: {{nvlink: {NVLINK_GBPS}, infiniband: {IB_GBPS}}}\n"
                         f"nodes:\n  - {{name: node, nic: infiniband, count: {nodes}}}\n",
                         where=f"uniform cluster of {nodes} nodes")


MODES = ("ulysses", "ring", "tokenring", "auto")


def with_mode(cm: CostModel, mode: str, kv_heads: int = KV_HEADS) -> CostModel:
    """``cm`` with the SP mode's term (Llama-3-8B's heads unless ``kv_heads``; three passes: checkpointing);
    ``auto``: the planner picks the fastest of the three per group (``parallel.sp_mode=auto``)."""
    auto = mode == "auto"
    attn = AttentionComm(mode="ulysses" if auto else mode, q_heads=Q_HEADS, kv_heads=kv_heads, head_dim=HEAD_DIM,
                         layers=LAYERS, act_bytes=2, forward_passes=2, choose=MODES[:3] if auto else ())
    return dataclasses.replace(cm, attention=attn)


def priced(plan: Plan, lengths: list[int], planner_cm: CostModel, real_cm: CostModel) -> float:
    check_plan(plan, lengths, planner_cm)
    return simulate(plan, lengths, real_cm)


def tokenring_rows(gpu_counts: tuple[int, ...], n_batches: int, long_tokens: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    chunks = split_at_cap(wikipedia_docs(), 131072)
    for gpus in gpu_counts:
        base = llama8b_32layers(gpus).with_links(uniform_cluster(gpus))
        for shape, kv in (("gqa4", KV_HEADS), ("mha", Q_HEADS)):
            models = {mode: with_mode(base, mode, kv) for mode in MODES}
            for k, lengths in enumerate(batches(chunks, gpus, n_batches, TOKENS_PER_GPU)):
                batch = lengths.tolist()
                row = {"part": "tokenring", "workload": "wikipedia-128K", "gpus": gpus, "heads": shape, "batch": k}
                for mode, cm in models.items():
                    row[f"{mode}_ms"] = round(priced(plan_step(batch, gpus, cm), batch, cm, cm), 2)
                rows.append(row)
            for per_gpu in long_tokens:
                batch = [gpus * per_gpu]
                row = {"part": "tokenring", "workload": f"one document, {per_gpu} tokens per GPU", "gpus": gpus,
                       "heads": shape, "batch": 0}
                for mode, cm in models.items():
                    row[f"{mode}_ms"] = round(priced(static_plan(batch, gpus, gpus, cm), batch, cm, cm), 2)
                rows.append(row)
            print({k: v for k, v in rows[-1].items() if k != "part"}, flush=True)
    return rows


def measured_hidden_share() -> float:
    """The share of the reduction the CPU benchmark hid (a committed measurement)."""
    return json.loads(GRAD_OVERLAP_CPU.read_text())["summary"]["reduce_hidden_pct"] / 100


def overlap_rows(gpu_counts: tuple[int, ...], n_batches: int) -> list[dict[str, Any]]:
    rows = []
    hidden = measured_hidden_share()
    for gpus in gpu_counts:
        cm = llama8b_32layers(gpus)
        params = memory_plan(load_profile(), gpus, zero_stage=1, checkpointing=True).params
        buckets = math.ceil(4 * params / BUCKET_BYTES)
        reduce_ms = cm.grad_reduce_ms / 2  # ZeRO-1: reduce of the gradients; the all-gather follows the step
        for cap in (32768, 131072):
            chunks = split_at_cap(wikipedia_docs(), cap)
            for k, lengths in enumerate(batches(chunks, gpus, n_batches, TOKENS_PER_GPU)):
                batch = lengths.tolist()
                plan = plan_step(batch, gpus, cm)
                off = priced(plan, batch, cm, cm)
                on = overlapped_step_ms(plan, batch, cm, reduce_ms=reduce_ms, buckets=buckets,
                                        backward_share=BACKWARD_SHARE)
                rows.append({"part": "overlap", "workload": f"wikipedia-{cap // 1024}K", "gpus": gpus, "batch": k,
                             "buckets": buckets, "reduce_ms": round(reduce_ms, 2),
                             "gather_ms": round(cm.grad_reduce_ms - reduce_ms, 2), "no_overlap_ms": round(off, 2),
                             "overlap_ms": round(on, 2), "overlap_measured_share_ms": round(off - hidden * reduce_ms, 2),
                             "fully_hidden_ms": round(off - reduce_ms, 2),
                             "hidden_pct": round(100 * (off - on) / reduce_ms, 1)})
                print({k: v for k, v in rows[-1].items() if k != "part"}, flush=True)
    return rows


def link_workloads(gpus: int, n_batches: int, caps: tuple[int, ...],
                   long_docs: tuple[int, ...]) -> list[tuple[str, int, list[int]]]:
    """(workload, batch index, lengths): Wikipedia batches at each cap, and long-context steps of
    ``gpus x 16,384`` tokens cut into documents of each ``long_docs`` length."""
    out = []
    for cap in caps:
        chunks = split_at_cap(wikipedia_docs(), cap)
        out += [(f"wikipedia-{cap // 1024}K", k, lengths.tolist())
                for k, lengths in enumerate(batches(chunks, gpus, n_batches, TOKENS_PER_GPU))]
    for doc in long_docs:
        out.append((f"long-context {doc // 1024}K documents", 0, [doc] * (gpus * TOKENS_PER_GPU // doc)))
    return out


def link_rows(n_batches: int, caps: tuple[int, ...], long_docs: tuple[int, ...]) -> list[dict[str, Any]]:
    links = load_cluster(TWO_NIC)
    gpus = links.world
    oblivious = llama8b_32layers(gpus)   # today's planner: NVLink inside a node, one inter-node figure beyond
    aware = oblivious.with_links(links)
    rows = []
    for workload, k, batch in link_workloads(gpus, n_batches, caps, long_docs):
        t0 = time.process_time()
        plan_aware = plan_step(batch, gpus, aware)
        solve_s = time.process_time() - t0
        plan_oblivious = plan_step(batch, gpus, oblivious)
        row = {"part": "links", "workload": workload, "gpus": gpus, "batch": k,
               "aware_ms": round(priced(plan_aware, batch, aware, aware), 2),
               "oblivious_ms": round(priced(plan_oblivious, batch, oblivious, aware), 2),
               "oblivious_believed_ms": round(simulate(plan_oblivious, batch, oblivious), 2),
               "grad_reduce_ms": round(aware.grad_reduce_ms, 2), "aware_solve_s": round(solve_s, 3)}
        for name, plan in (("aware", plan_aware), ("oblivious", plan_oblivious)):
            groups = [g for mb in plan.microbatches for g in mb.groups if g.count > 1]
            row[f"{name}_groups_over_ethernet"] = sum("ethernet" in aware.block(g.first, g.count).spans
                                                      for g in groups)
            row[f"{name}_sp_groups"] = len(groups)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "part"}, flush=True)
    return rows


def gain(rows: list[dict[str, Any]], slow: str, fast: str, cut: str | None = None) -> float:
    """Summed ``slow`` over summed ``fast`` step times (``cut``: a term left out of both)."""
    minus = (lambda r: r[cut]) if cut else (lambda r: 0.0)
    return round(sum(r[slow] - minus(r) for r in rows) / sum(r[fast] - minus(r) for r in rows), 4)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    tr = [r for r in rows if r["part"] == "tokenring"]
    for gpus in sorted({r["gpus"] for r in tr}):
        for shape in ("gqa4", "mha"):
            sel = [r for r in tr if r["gpus"] == gpus and r["heads"] == shape]
            wiki = [r for r in sel if r["workload"].startswith("wikipedia")]
            long = [r for r in sel if not r["workload"].startswith("wikipedia")]
            suffix = "" if shape == "gqa4" else "_mha"
            summary[f"tokenring_gain_vs_ring_{gpus}{suffix}"] = gain(wiki, "ring_ms", "tokenring_ms")
            summary[f"tokenring_gain_vs_ring_{gpus}{suffix}_long"] = gain(long, "ring_ms", "tokenring_ms")
            summary[f"ring_gain_vs_ulysses_{gpus}{suffix}"] = gain(wiki, "ulysses_ms", "ring_ms")
            best = min(("ulysses_ms", "ring_ms", "tokenring_ms"), key=lambda k: sum(r[k] for r in wiki))
            summary[f"auto_gain_vs_best_mode_{gpus}{suffix}"] = gain(wiki, best, "auto_ms")
    ov = [r for r in rows if r["part"] == "overlap"]
    for gpus in sorted({r["gpus"] for r in ov}):
        sel = [r for r in ov if r["gpus"] == gpus]
        summary[f"overlap_gain_{gpus}"] = gain(sel, "no_overlap_ms", "overlap_ms")
        summary[f"overlap_gain_{gpus}_measured_share"] = gain(sel, "no_overlap_ms", "overlap_measured_share_ms")
        summary[f"overlap_gain_{gpus}_if_fully_hidden"] = gain(sel, "no_overlap_ms", "fully_hidden_ms")
    li = [r for r in rows if r["part"] == "links"]
    if li:
        long = [r for r in li if r["workload"].startswith("long")] or li
        wiki = [r for r in li if r["workload"].startswith("wikipedia")]
        summary["link_aware_gain_two_nic"] = gain(long, "oblivious_ms", "aware_ms")
        summary["link_aware_plan_gain_two_nic"] = gain(long, "oblivious_ms", "aware_ms", cut="grad_reduce_ms")
        if wiki:
            summary["link_aware_gain_two_nic_wikipedia"] = gain(wiki, "oblivious_ms", "aware_ms")
        summary["link_aware_groups_over_ethernet"] = sum(r["aware_groups_over_ethernet"] for r in li)
        summary["link_oblivious_groups_over_ethernet"] = sum(r["oblivious_groups_over_ethernet"] for r in li)
    return summary


@dataclasses.dataclass(frozen=True)
class Config:
    tokenring_gpus: tuple[int, ...] = (8, 16, 32, 64)
    tokenring_batches: int = 4
    long_tokens_per_gpu: tuple[int, ...] = (2048, 8192, 32768)
    overlap_gpus: tuple[int, ...] = (64, 256, 1024)
    overlap_batches: int = 2
    link_batches: int = 8
    link_caps: tuple[int, ...] = (32768, 131072)
    link_long_docs: tuple[int, ...] = (262144, 524288, 1048576)


QUICK = Config(tokenring_gpus=(8, 16), tokenring_batches=1, long_tokens_per_gpu=(2048,), overlap_gpus=(64,),
               overlap_batches=1, link_batches=1, link_caps=(131072,), link_long_docs=(524288,))


def run(config: Config) -> list[dict[str, Any]]:
    return (tokenring_rows(config.tokenring_gpus, config.tokenring_batches, config.long_tokens_per_gpu)
            + overlap_rows(config.overlap_gpus, config.overlap_batches)
            + link_rows(config.link_batches, config.link_caps, config.link_long_docs))


def describe(config: Config) -> dict[str, Any]:
    return {
        "simulation": "plans priced by seqmesh.scheduler.simulate; no GPU ran",
        "runs": dataclasses.asdict(config),
        "model": "bench/scheduler_sim.py's projection: conf/cost_models/h200_llama8b_8layers.json x 32/8 layers, "
                 "activation checkpointing (x4/3), ZeRO-1, Wikipedia lengths, "
                 f"{TOKENS_PER_GPU} tokens per GPU per step",
        "heads": {"gqa4": f"{Q_HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM} (Llama-3-8B)",
                  "mha": f"{Q_HEADS} query / {Q_HEADS} KV heads of {HEAD_DIM}, same compute (comm only)"},
        "links_GBps_per_gpu_and_direction": {
            "nvlink": f"{NVLINK_GBPS}: NOTES.md, NCCL all-to-all bus bandwidth, 2x H200, 64 MB",
            "infiniband": f"{IB_GBPS}: 400 Gb/s NDR per GPU at {NIC_EFFICIENCY:.0%}",
            "roce": "20: 200 Gb/s per GPU at 80% (conf/clusters/two_nic.yaml)",
            "ethernet": "1.5: 100 Gb/s per node shared by 8 GPUs (conf/clusters/two_nic.yaml)"},
        "link_model": "one port per link class and GPU, per direction, shared by the peers behind it "
                      "(seqmesh/scheduler/links.py)",
        "sp_modes": "seqmesh/scheduler/sp_comm.py: ring and TokenRing volumes per step, overlapped with the "
                    "previous step's attention (alpha1 share: forward 1/4, backward 2/4 with checkpointing)",
        "tokenring_cluster": f"{GPUS_PER_NODE} GPUs per node, NVLink inside, InfiniBand between nodes",
        "overlap": {"reduce": "half of grad_reduce_ms (ZeRO-1's reduce of fp32 gradients); the parameter "
                              "all-gather stays after the step",
                    "bucket_bytes": BUCKET_BYTES, "backward_share_of_last_group": BACKWARD_SHARE,
                    "measured_share": f"{measured_hidden_share():.3f} hidden: "
                                      f"{GRAD_OVERLAP_CPU.relative_to(ROOT)} summary.reduce_hidden_pct"},
        "two_nic_cluster": str(TWO_NIC.relative_to(ROOT)),
        "link_oblivious": "the same cost model without the cluster file: a2a_GBps of bench/scheduler_sim.py "
                          "(NVLink inside a node, the InfiniBand figure beyond)",
        "link_aware_gain_two_nic": "over the long-context rows (documents of 256K-1M tokens, which need SP groups "
                                   "across nodes); link_aware_gain_two_nic_wikipedia: over the Wikipedia rows",
        "gain": "summed step ms of the slower policy over the faster one's on the same batches",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small configuration (smoke check, the CPU test)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = ap.parse_args()
    config = QUICK if args.quick else Config()
    rows = run(config)
    write_result("comm_sim", describe(config), rows, summarise(rows), device="cpu", out_dir=args.out)


if __name__ == "__main__":
    main()
