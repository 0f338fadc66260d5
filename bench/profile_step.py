"""Where a seqmesh training step's GPU time goes: one steady step under torch.profiler, per category.

The real step loop (``seqmesh.trainer.loop.train``, one process, NCCL world of 1) trains the same
Llama-1B-shaped model and synthetic documents as ``bench/train.py``; the profiler records one step
after ``--warmup`` steps (compiles, cuDNN graphs and allocator growth stay out). Each CUDA kernel is
put in one category by its name and by the CPU operators that launched it (the profiler lists under
each CPU event the kernels it launched; the event's ancestors and input shapes say where in the
model it was):

* ``optimizer``: under ``Optimizer.step`` / ``zero_grad`` or gradient clipping;
* ``lm_head_loss``: a loss kernel or one under a loss operator (cross-entropy, log-softmax, NLL, the
  tiled or Liger fused loss), or under an operator with a vocabulary-sized input (the LM head's
  products; with tied embeddings also the embedding lookup and the gradient accumulation into the
  shared weight, both small);
* ``attention``: attention kernels (cuDNN SDPA, flash, fmha);
* ``matmul``: the remaining GEMMs (cuBLAS/cuBLASLt, CUTLASS, nvjet; float8 ``_scaled_mm`` too);
* ``memcpy``: device copies and memsets;
* ``norms_elementwise``: everything else (RMSNorm, RoPE, SwiGLU, residual adds, casts, embedding);
* ``idle``: the step's wall time (host clock, synchronized at both ends) not covered by any kernel.

The profiler's own host overhead (``record_shapes``) lengthens the idle gaps a little; each row
therefore also gives the unprofiled step time of the same run (``steady_step_s``).

    python bench/profile_step.py --out DIR                     # on a GPU: 8K and 32K
    python bench/profile_step.py --out DIR --extra model.loss_kernel=liger
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.harness import ROOT, write_corpus  # noqa: E402

CATEGORIES = ("matmul", "attention", "lm_head_loss", "norms_elementwise", "optimizer", "memcpy", "idle")
# Gradient clipping and the optimizer are the only users of foreach ops in this step.
_OPTIMIZER = ("optimizer.step", "optimizer.zero_grad", "adam", "clip_grad", "_foreach_", "zero_grad")
_LOSS = ("cross_entropy", "log_softmax", "nll_loss", "liger", "tiledlinearcrossentropy", "logsumexp")
_ATTENTION = ("cudnn", "flash", "fmha", "attention", "sdpa", "attn")
# Inductor's pointwise, reduction and persistent-reduction kernels, named after every operator fused into them
# (a float8 cast fused next to ``_scaled_mm`` carries its name): never a product.
_TRITON_ELEMENTWISE = ("triton_poi", "triton_red", "triton_per")
_GEMM = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "sm90_", "_scaled_mm", "splitk")


def classify(kernel: str, ancestry: Iterable[tuple[str, list]], vocab: int) -> str:
    """The category of one kernel (module docstring), from its name and its launching operators
    (``ancestry``: (name, input shapes) from the launching operator up to the root)."""
    name = kernel.lower()
    if name.startswith(("memcpy", "memset")) or "memcpy" in name:
        return "memcpy"
    chain = [(op.lower(), shapes) for op, shapes in ancestry]
    if any(any(key in op for key in _OPTIMIZER) for op, _ in chain):
        return "optimizer"
    if any(key in name for key in _LOSS) or any(any(key in op for key in _LOSS) for op, _ in chain):
        return "lm_head_loss"
    if any(vocab in (shape or []) for _, shapes in chain for shape in (shapes or []) if isinstance(shape, list)):
        return "lm_head_loss"
    if any(key in name for key in _ATTENTION):
        return "attention"
    if any(key in name for key in _GEMM) and not name.startswith(_TRITON_ELEMENTWISE):
        return "matmul"
    return "norms_elementwise"


def covered_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels of several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def breakdown(events: Any, wall_us: float, vocab: int) -> dict[str, Any]:
    """Per-category kernel time (ms, share of the wall time) and the top kernels of a profiled step.

    Each CPU event lists the kernels it launched (``FunctionEvent.kernels``, the link every torch
    release keeps; ``linked_correlation_id`` is not on torch 2.11's events); the launching event's
    ancestors say where in the model a kernel ran. A device event that no CPU event claims (none
    launched it under the profiler) is classified by its name alone. User annotations on the device's
    timeline (a compiled graph's "## Call CompiledFxGraph ... ##" span, recorded around its kernels) are
    not kernels: counted, they would add each compiled layer's time a second time and hide its idle gaps.
    """
    from torch.autograd import DeviceType

    per_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    claimed: Counter[tuple[str, float]] = Counter()

    def add(name: str, dur: float, ancestry: list[tuple[str, list]]) -> None:
        cat = classify(name, ancestry, vocab)
        per_cat[cat] += dur
        per_kernel[(cat, name[:120])][0] += dur
        per_kernel[(cat, name[:120])][1] += 1

    annotations = {e.name for e in events if e.device_type == DeviceType.CUDA and getattr(e, "is_user_annotation", False)}
    for e in events:
        if e.device_type != DeviceType.CPU or not e.kernels:
            continue
        ancestry, op = [], e
        while op is not None:
            ancestry.append((op.name, op.input_shapes))
            op = op.cpu_parent
        for k in e.kernels:
            if k.name in annotations:
                continue
            add(k.name, k.duration, ancestry)
            claimed[(k.name, round(k.duration, 3))] += 1
    intervals = []
    for e in events:
        if e.device_type != DeviceType.CUDA or e.name in annotations:
            continue
        dur = e.time_range.end - e.time_range.start
        intervals.append((e.time_range.start, e.time_range.end))
        key = (e.name, round(dur, 3))
        if claimed[key] > 0:
            claimed[key] -= 1
        else:
            add(e.name, dur, [])
    busy = covered_us(intervals)
    per_cat["idle"] = max(0.0, wall_us - busy)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {"wall_ms": wall_us / 1e3, "kernel_busy_ms": busy / 1e3,
            "ms": {c: per_cat.get(c, 0.0) / 1e3 for c in CATEGORIES},
            "share": {c: per_cat.get(c, 0.0) / wall_us for c in CATEGORIES},
            "top_kernels": [{"category": c, "kernel": k, "ms": v[0] / 1e3, "calls": v[1]} for (c, k), v in top]}


def worker(args: argparse.Namespace) -> None:
    """One length: train ``--warmup`` + 2 steps with the real loop, profiling step ``--warmup``."""
    import torch.distributed as dist

    from seqmesh.launch.allocator import prefer_expandable_segments
    from seqmesh.launch.config import load_config
    from seqmesh.launch.ray_driver import prepare_run_dir
    from seqmesh.trainer import step_telemetry
    from seqmesh.trainer.loop import train

    prefer_expandable_segments()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cfg = load_config(json.loads(args.worker))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    prepare_run_dir(cfg)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA], record_shapes=True)
    state = {"step": 0, "t0": 0.0, "wall_us": 0.0}
    begin = step_telemetry.StepTelemetry.begin_step

    def profiled_begin(self: Any) -> None:  # the loop's per-step hook: start and stop around one step
        if state["step"] in (args.warmup, args.warmup + 1):
            torch.cuda.synchronize()
            if state["step"] == args.warmup:
                prof.start()
                state["t0"] = time.perf_counter()
            else:
                state["wall_us"] = (time.perf_counter() - state["t0"]) * 1e6
                prof.stop()
        state["step"] += 1
        begin(self)

    step_telemetry.StepTelemetry.begin_step = profiled_begin
    try:
        summary = train(cfg, cfg.run_dir, device)
    finally:
        dist.destroy_process_group()
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = [r["step_time_s"] for i, r in enumerate(records) if i >= args.warmup and i != args.warmup]
    row = breakdown(prof.events(), state["wall_us"], cfg.model.vocab_size)
    row.update(steady_step_s=sum(steady) / len(steady) if steady else None,
               profiled_step_s=records[args.warmup]["step_time_s"], peak_mem_gb=summary["peak_mem_bytes"] / 2**30,
               mfu_steady=summary.get("mean_mfu"))
    Path(args.row_out).write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for the result JSON (default bench/results)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seqmesh-bench-profile"))
    ap.add_argument("--lengths", default="8192,32768", help="tokens per document, comma-separated")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the profiled one")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for seqmesh (e.g. model.loss_kernel=liger)")
    ap.add_argument("--tag", default="", help="suffix of the result name (profile_step<tag>_<device>.json)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29533, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/profile_step.py profiles GPU kernels; run it on a GPU machine")
    from bench.train import seqmesh_overrides

    rows = []
    for seq_len in (int(n) for n in args.lengths.split(",")):
        docs, ckpt = (8, False) if seq_len <= 8192 else (2, True)
        steps = args.warmup + 2
        corpus = write_corpus(args.work / f"corpus_{seq_len}.jsonl", [seq_len] * (docs * (steps + 2)))
        overrides = [*seqmesh_overrides(seq_len, docs, ckpt, corpus, steps, args.work, args.extra),
                     f"run_dir={args.work / f'run_{seq_len}'}", "overwrite=true", "ckpt_every=0",
                     "launch.num_workers=1", "launch.device=cuda"]
        ckpt = "model.activation_checkpointing=true" in overrides
        row_path = args.work / f"row_{seq_len}.json"
        row_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(overrides),
               "--row-out", str(row_path), "--warmup", str(args.warmup)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            failure = None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            failure = f"timed out after {args.timeout:.0f} s"
        row: dict[str, Any] = {"seq_len": seq_len, "docs_per_step": docs, "activation_checkpointing": ckpt,
                               "extra": args.extra}
        if failure is None and row_path.exists():
            row.update(json.loads(row_path.read_text()))
        else:
            row["error"] = failure or "no result written"
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("seq_len", "share", "steady_step_s", "error")}), flush=True)
    summary = {f"share_{c}_{r['seq_len'] // 1024}k": r["share"][c] for r in rows if "share" in r for c in CATEGORIES}
    write_result(f"profile_step{args.tag}", {"model": "llama-3.2-1b shape", "dtype": "bf16 autocast, fp32 master",
                                            "warmup_steps": args.warmup, "extra": args.extra}, rows, summary,
                 out_dir=args.out)


if __name__ == "__main__":
    main()
