"""Which way to split an 8B-shaped Llama over two GPUs at 32K context: measured, and as the scheduler
predicts it.

The real step loop (``seqmesh.launch.torchrun``) trains a Llama-3-8B-shaped model (hidden 4096,
32 query / 8 KV heads of 128, MLP 14336; ``--layers`` of its 32 layers so that one GPU holds it;
byte vocabulary, untied head) in bf16 (FP8 optimizer states with ``--fp8``) on documents of exactly
``--seq-len`` tokens, in four layouts of the PP x HDP x TP mesh. Without ``--checkpointing`` no layer
is recomputed: at 8 layers and 32K tokens per micro-batch the activations fit, and recomputing the
forward would add a third to the work that MFU does not count; the scheduler's memory model (the
profile, taken the same way) splits the step into micro-batches that fit.

* ``1gpu``: one rank, no parallelism (the other GPU idles);
* ``tp2``: tensor parallel over both GPUs (Megatron with sequence parallelism);
* ``hdp2_zero1``: two HDP ranks, optimizer states sharded over them (ZeRO-1);
* ``pp2``: two pipeline stages, 1F1B over the plan's micro-batches.

Every layout plans its steps with the adaptive scheduler and one cost model, profiled first on
these GPUs (``seqmesh profile``: one layer's time and memory, all-to-all bandwidth), which the
trainer prices for its own TP x PP layout. Throughput and MFU are throughput means (tokens or
FLOPs over time) of the steps after the first ``--warmup`` (MFU: model FLOPs, causal attention
counted as half, recompute not counted, over the device's dense bf16 peak, per device used).
Alongside, the scheduler's own verdict: the same cost model priced for each layout plans the same
batch, and its predicted step time says which layout it would choose (``predicted_best_layout``);
the predictions leave out the gradient reduction and the optimizer step (plan-independent, and
for this model a few percent of a step).

    python bench/composition.py --out DIR          # on 2 GPUs (~6 min on 2x H200)
    python bench/composition.py --out DIR          # on 1 GPU: the 1gpu layout alone (summary mfu_1gpu)
    python bench/composition.py --smoke            # tiny model, CPU, gloo: checks the script only

A layout that fails (e.g. out of memory) gets its error in its row; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.harness import run_loop, write_corpus  # noqa: E402
from bench.scheduler_gpu import profile  # noqa: E402
from seqmesh.scheduler import CostModel, plan_step  # noqa: E402

# name, processes, overrides, (tp, pp, hdp)
LAYOUTS = [
    ("1gpu", 1, [], (1, 1, 1)),
    ("tp2", 2, ["parallel.tp=2"], (2, 1, 1)),
    ("hdp2_zero1", 2, ["parallel.zero_stage=1"], (1, 1, 2)),
    ("pp2", 2, ["parallel.pp=2"], (1, 2, 1)),  # last: a failed pipeline run cannot disturb the others
]
SHAPE = dict(hidden=4096, heads=32, kv_heads=8, ffn=14336)
SMOKE_SHAPE = dict(hidden=256, heads=8, kv_heads=4, ffn=704)


def model_overrides(shape: dict[str, int], layers: int, smoke: bool, checkpointing: bool) -> list[str]:
    base = ["model=tiny", "model.dtype=fp32"] if smoke else ["model=llama-8b", "model.dtype=bf16"]
    return [*base, f"model.hidden_size={shape['hidden']}", f"model.num_heads={shape['heads']}",
            f"model.num_kv_heads={shape['kv_heads']}", f"model.intermediate_size={shape['ffn']}",
            f"model.num_layers={layers}", "model.tie_embeddings=false",
            f"model.activation_checkpointing={str(checkpointing).lower()}"]


def profile_shape(shape: dict[str, int], layers: int, checkpointing: bool) -> list[str]:
    return ["--hidden", str(shape["hidden"]), "--layers", str(layers), "--heads", str(shape["heads"]),
            "--ffn", str(shape["ffn"]), "--vocab", "257", *(["--checkpointing"] if checkpointing else [])]


def layout_cost_model(cm: CostModel, tp: int, pp: int, hdp: int, zero_stage: int, moment_bytes: float) -> CostModel:
    """The profile (whole model, one device, 16 bytes of states per parameter) priced for a layout."""
    params = cm.mem_static_bytes / 16.0
    moments = moment_bytes / (hdp if zero_stage >= 1 else 1)
    return dataclasses.replace(cm, mem_static_bytes=(8.0 + moments) * params).with_layout(tp, pp)


def measured(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Throughput means over the steps after ``warmup`` (tokens and FLOPs over their time)."""
    recs = result["records"][warmup:] or result["records"]
    time_s = sum(r["step_time_s"] for r in recs)
    peak, devices = result.get("peak_flops_per_device"), result["num_devices"]
    flops_per_device_s = sum(r["flops"] for r in recs) / devices / time_s
    return {"tokens_per_s": sum(r["tokens"] for r in recs) / time_s,
            "tokens_per_s_per_device": sum(r["tokens"] for r in recs) / time_s / devices,
            "tflops_per_device": flops_per_device_s / 1e12,
            "mfu": flops_per_device_s / peak if peak else None,
            "step_s": time_s / len(recs), "steps_measured": len(recs),
            "plan_predicted_ms": recs[-1].get("plan_predicted_ms"),
            "microbatches_last": recs[-1].get("plan_microbatches"),
            "group_sizes_last": recs[-1].get("plan_group_sizes"),
            "peak_mem_gb": result["peak_mem_bytes"] / 2**30 if result.get("peak_mem_bytes") else None,
            "last_loss": result.get("last_loss")}


def fitting_layouts(wanted: list[str], gpus: int) -> list[str]:
    """The layouts of ``wanted`` that ``gpus`` devices can run (one GPU: ``1gpu`` alone); an error naming the
    fix when none can."""
    nproc = {name: n for name, n, *_ in LAYOUTS}
    fitting = [name for name in wanted if nproc[name] <= gpus]
    if not fitting:
        raise SystemExit(f"--layouts {','.join(wanted)} need {min(nproc[w] for w in wanted)} GPUs but this machine "
                         f"has {gpus}; add 1gpu to --layouts or run on more GPUs")
    skipped = sorted(set(wanted) - set(fitting))
    if skipped:
        print(f"skipping layouts {skipped}: they need more than the {gpus} GPU(s) here", flush=True)
    return fitting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for the result JSON (default bench/results)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seqmesh-bench-composition"))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B shape (32 in the real model)")
    ap.add_argument("--seq-len", type=int, default=32768, help="tokens per document (the context)")
    ap.add_argument("--docs", type=int, default=4, help="documents per step (global batch)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the means")
    ap.add_argument("--fp8", action="store_true", help="FP8 optimizer states (optim=fp8) instead of fp32 AdamW")
    ap.add_argument("--checkpointing", action="store_true", help="recompute every layer in backward")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per layout before it counts as failed")
    ap.add_argument("--layouts", default=",".join(name for name, *_ in LAYOUTS), help="comma-separated subset")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU over gloo (checks the script, not speed)")
    ap.add_argument("--seqmesh", nargs="*", default=[], help="extra overrides for every layout (e.g. "
                    "model.linear_dtype=fp8)")
    args = ap.parse_args()
    shape, device, layers = SHAPE, "cuda", args.layers
    extra = ["model.loss_tile_tokens=0", *args.seqmesh]
    if args.smoke:
        shape, device, layers = SMOKE_SHAPE, "cpu", 2
        args.seq_len, args.docs, args.steps, args.warmup = 512, 4, 3, 1
        extra.append("peak_tflops=0.1")  # a nominal CPU peak, so the MFU path runs; its value means nothing
    wanted = args.layouts.split(",")
    unknown = sorted(set(wanted) - {name for name, *_ in LAYOUTS})
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {[name for name, *_ in LAYOUTS]}")
    gpus = 2 if args.smoke else torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("bench/composition.py measures GPU layouts; run it on a GPU machine (or --smoke)")
    wanted = fitting_layouts(wanted, gpus)

    lengths = [args.seq_len] * args.docs
    corpus = write_corpus(args.work / "corpus.jsonl", lengths * (args.steps + 2))
    mem_limit_gb = 0.2 if args.smoke else 0.85 * torch.cuda.get_device_properties(0).total_memory / 2**30
    # Both devices are of one kind, and a one-process run cannot use a two-device list of speed
    # factors: every layout plans with the profile at nominal speed.
    profiled = profile(args.work, min(2, gpus), mem_limit_gb, profile_shape(shape, layers, args.checkpointing))
    cost = dataclasses.replace(CostModel.load(profiled),
                               speed=())
    common = [*model_overrides(shape, layers, args.smoke, args.checkpointing), f"data.source={corpus}",
              "data.tokenizer=byte",
              f"data.max_seq_len={args.seq_len}", f"data.global_batch={args.docs}", "data.val_fraction=0",
              f"data.cache_dir={args.work / 'cache'}", f"steps={args.steps}", "optim.warmup_steps=2",
              "scheduler=adaptive", "scheduler.refine_every=0",
              "scheduler.lookahead=1", *(["optim=fp8"] if args.fp8 else []), *extra]

    rows = []
    for name, nproc, overrides, (tp, pp, hdp) in LAYOUTS:
        if name not in wanted:
            continue
        zero = 1 if "parallel.zero_stage=1" in overrides else 0
        cm = layout_cost_model(cost, tp, pp, hdp, zero, 2.0 if args.fp8 else 8.0)
        # The run plans with the model this prediction used: its states' bytes follow the layout's ZeRO
        # stage and the optimizer (the profile alone counts fp32 Adam, which refused 32K with FP8 states).
        cost_path = args.work / f"cost_model_{name}.json"
        cm.save(cost_path)
        plan = plan_step(lengths, hdp, cm, policy="adaptive")
        row: dict[str, Any] = {"layout": name, "devices": nproc, "tp": tp, "pp": pp, "hdp": hdp, "zero_stage": zero,
                               "predicted_step_ms": plan.predicted_ms,
                               "predicted_tokens_per_s_per_device": sum(lengths) / (plan.predicted_ms / 1e3) / nproc,
                               "predicted_microbatches": len(plan.microbatches),
                               "predicted_group_sizes": sorted(plan.group_sizes())}
        try:
            result = run_loop([*common, f"scheduler.cost_model={cost_path}", *overrides], nproc,
                              args.work / f"run_{name}", timeout_s=args.timeout,
                              device=device)
        except Exception as e:  # a hung layout (timeout) or a launcher failure: record it, run the others
            result = {"error": f"{type(e).__name__}: {e}"}
        if "error" in result:
            row["error"] = result["error"][-1500:]
        else:
            row.update(measured(result, args.warmup))
            row["prediction_error"] = abs(plan.predicted_ms / 1e3 - row["step_s"]) / row["step_s"]
        rows.append(row)
        print(row, flush=True)

    ok = [r for r in rows if r.get("mfu") is not None]
    best = max(ok, key=lambda r: r["mfu"]) if ok else {}
    predicted = max(rows, key=lambda r: r["predicted_tokens_per_s_per_device"]) if rows else {}
    summary = {
        "best_layout": best.get("layout"),
        "best_mfu": best.get("mfu"),
        "mfu_1gpu": next((r["mfu"] for r in ok if r["layout"] == "1gpu"), None),
        "tokens_per_s": {r["layout"]: r.get("tokens_per_s") for r in rows},
        "predicted_best_layout": predicted.get("layout"),
        "predicted_step_ms": {r["layout"]: round(r["predicted_step_ms"], 1) for r in rows},
    }
    config = {"model": f"llama-3-8b shape, {layers} layers, byte vocab, untied", "shape": shape, "layers": layers,
              "seq_len": args.seq_len, "docs_per_step": args.docs, "steps": args.steps, "warmup": args.warmup,
              "dtype": "fp32 (smoke)" if args.smoke else "bf16 autocast, fp32 master",
              "activation_checkpointing": args.checkpointing,
              "attention_backend": "auto", "overrides": args.seqmesh, "optimizer": "FP8AdamW" if args.fp8 else "AdamW fp32 states",
              "scheduler": "adaptive, cost model from seqmesh profile on these devices",
              "cost_model": {k: v for k, v in cost.to_dict().items() if k != "source"}}
    write_result("composition", config, rows, summary, out_dir=args.out, device="cpu-smoke" if args.smoke else None)


if __name__ == "__main__":
    main()
