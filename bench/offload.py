"""Offload benchmark (issue 6): the longest context one GPU trains, the step-time cost, the link rates.

(a) Longest context: a Llama-8B-shaped model (hidden 4096, 32/8 heads, MLP 14336, vocab 128256;
    ``--layers`` of them), bf16 parameters and gradients, FP8 AdamW moments (``seqmesh.trainer.optim``;
    torch AdamW if it is missing), activation checkpointing, tiled MLP and tiled loss, one full
    training step (forward, backward, optimizer) per trial, with offload target none / cpu / nvme
    (ratio 1.0: every layer, memory first). Lengths are searched by doubling, then bisection to
    ``--resolution``; every trial runs in a fresh subprocess (an OOM leaves the allocator
    fragmented) under a time cap. Trials pack the context as documents of ``--doc-tokens``: device
    memory is the same as one sequence of that length (flash attention keeps O(T) state), while
    attention compute, quadratic in the document length, would not fit a benchmark's minutes;
    ``--doc-tokens 0`` runs one sequence. The nvme search starts from the cpu result, whose device
    footprint it shares.
(b) Overhead: step time at ``--overhead-tokens`` (one sequence, fits without offload) with offload
    none, cpu at ratio auto and 1.0, and nvme at ratio auto, in one process, median of timed steps.
(c) Link rates: pinned host-to-device copy and offload-file write/read (the thread engine).

``--layer-tile-tokens N`` tiles each decoder layer's per-token parts (``model.layer_tile_tokens``). Every
trial reports its working set per token (``trainer/working_set.py``: peak memory above the footprint
before the step, over the step's tokens); the summary names the longest one-sequence trial that trained
(``single_sequence_tokens``, ``--doc-tokens 0``) and the working sets per token of it and at 524,288 tokens.

``--smoke`` runs the whole pipeline on CPU with a tiny model (no memory limit there, so the
search stops at ``--max-tokens``). Writes ``bench/results/offload_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256,
                rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=512, rope_theta=10000.0)


# --------------------------------------------------------------------------- child: one process per trial


def _cost_model(cfg, model, device):
    """The run's cost model of ``cfg`` (what ``build_parallel_model`` builds) for ``model`` on ``device``."""
    from seqmesh.trainer.build import build_cost_model

    return build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=cfg.hdp,
                            profile=cfg.scheduler.cost_model, state_dtype=cfg.optim.state_dtype)


def build_trial(spec: dict[str, Any], target: str, ratio: str):
    """Model (meta-initialised straight onto the device in bf16), optimizer and run config of a trial
    (``spec['dims']``, where given, replaces the shape that ``spec['smoke']`` picks)."""
    import torch

    from seqmesh.parallel.checkpointing import apply_activation_checkpointing
    from seqmesh.trainer.build import apply_offload, hf_config
    from seqmesh.trainer.config import config_from_dict
    from seqmesh.trainer.model import Transformer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = spec.get("dims") or (TINY if spec["smoke"] else LLAMA_8B)
    cfg = config_from_dict({
        "model": {**dims, "num_layers": spec["layers"], "tie_embeddings": False, "activation_checkpointing": True,
                  "max_position_embeddings": max(spec["tokens"], 4096),
                  "mlp_tile_tokens": spec["mlp_tile_tokens"], "loss_tile_tokens": spec["loss_tile_tokens"],
                  "layer_tile_tokens": spec.get("layer_tile_tokens", 0)},
        "parallel": {"attn_backend": "auto"},
        "launch": {"num_workers": 1},
        "offload": {"target": target, "ratio": ratio, "path": spec["nvme_path"], "engine": spec["engine"],
                    "h2d_GBps": spec.get("h2d_GBps"), "disk_GBps": spec.get("disk_GBps")},
    })
    with torch.device("meta"):
        model = Transformer(hf_config(cfg.model, dims["vocab_size"]))
    model = model.to(torch.bfloat16).to_empty(device=device)
    model.init_weights()
    apply_activation_checkpointing(model.model.layers)
    apply_offload(model, cfg.model, cfg.offload, _cost_model(cfg, model, device), device)
    try:
        from seqmesh.trainer.optim import FP8AdamW

        optimizer, optim_name = FP8AdamW(model.parameters(), lr=1e-5, state_dtype="fp8"), "FP8AdamW(fp8)"
    except ImportError:
        optimizer, optim_name = torch.optim.AdamW(model.parameters(), lr=1e-5), "torch.AdamW(bf16 states)"
    return model, optimizer, cfg, device, optim_name


def trial_docs(spec: dict[str, Any], vocab: int) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    tokens, doc = spec["tokens"], spec["doc_tokens"] or spec["tokens"]
    sizes = [doc] * (tokens // doc) + ([tokens % doc] if tokens % doc else [])
    return [torch.randint(0, vocab, (n,), generator=g) for n in sizes]


def _step(model, optimizer, docs, cfg, device) -> float:
    import torch

    from seqmesh.trainer.loop import run_group

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_group(model, docs, None, cfg.model, cfg.parallel, device, denominator=sum(d.numel() for d in docs))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _offload_stats(model) -> dict[str, Any]:
    from seqmesh.parallel.offload import get_offloader

    off = get_offloader(model)
    if off is None:
        return {}
    s = off.stats
    return {"offloaded_layers": list(s.groups_last),
            "offloaded_GB_per_step": round(s.offloaded_bytes / max(s.sessions, 1) / 1e9, 3),
            "sync_loads": s.sync_loads, "engine": off.files.engine.name if off.files else None,
            "o_direct": off.files.direct if off.files else None}


def child_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One training step at ``spec['tokens']``: does it fit, how long, how much memory (the working set per token:
    peak above the footprint before the step, over the step's tokens)."""
    import torch

    from seqmesh.parallel.offload import OffloadError
    from seqmesh.trainer.working_set import track_working_set

    row: dict[str, Any] = {"phase": "max_context", "target": spec["target"], "tokens": spec["tokens"]}
    free_GB = round(torch.cuda.mem_get_info()[0] / 1e9, 3) if torch.cuda.is_available() else None
    try:
        model, optimizer, cfg, device, optim_name = build_trial(spec, spec["target"], spec["ratio"])
        row["optimizer"] = optim_name
        static = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        with track_working_set(device) as working_set:
            row["step_s"] = round(_step(model, optimizer, trial_docs(spec, model.dims.vocab_size), cfg, device), 3)
        row.update(ok=True, working_set_kb_per_token=round(working_set.kb_per_token(spec["tokens"]), 2),
                   **_offload_stats(model))
        if device.type == "cuda":
            row.update(static_GB=round(static / 1e9, 3), peak_GB=round(torch.cuda.max_memory_allocated() / 1e9, 3),
                       reserved_GB=round(torch.cuda.max_memory_reserved() / 1e9, 3), free_GB=free_GB)
    except torch.OutOfMemoryError:
        row.update(ok=False, error="device out of memory")
    except (OffloadError, MemoryError) as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}")
    return row


def child_overhead(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Median step time per offload setting, all in one process on the same model."""
    import torch

    from seqmesh.parallel.offload import detach_offload
    from seqmesh.trainer.build import apply_offload

    model, optimizer, cfg, device, optim_name = build_trial(spec, "none", "auto")
    docs = trial_docs(spec, model.dims.vocab_size)
    rows = []
    for target, ratio in spec["settings"]:
        detach_offload(model)
        setting = dataclasses.replace(cfg, offload=dataclasses.replace(cfg.offload, target=target, ratio=ratio))
        apply_offload(model, setting.model, setting.offload, _cost_model(setting, model, device), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = [_step(model, optimizer, docs, setting, device) for _ in range(spec["warmup"] + spec["steps"])]
        row = {"phase": "overhead", "target": target, "ratio": ratio, "tokens": spec["tokens"],
               "optimizer": optim_name, "step_s": round(statistics.median(times[spec["warmup"]:]), 4),
               "step_times_s": [round(t, 4) for t in times], **_offload_stats(model)}
        if device.type == "cuda":
            row["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        rows.append(row)
    return rows


def child_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from seqmesh.parallel.offload import measure_disk_GBps, measure_h2d_GBps

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = spec["bandwidth_bytes"]
    write, read = measure_disk_GBps(spec["nvme_path"], size, engine="threads")
    return {"phase": "bandwidth", "h2d_GBps": round(measure_h2d_GBps(device, size), 2),
            "disk_write_GBps": round(write, 3), "disk_read_GBps": round(read, 3), "bytes": size}


CHILDREN = {"trial": child_trial, "overhead": child_overhead, "bandwidth": child_bandwidth}


# --------------------------------------------------------------------------- parent: search and report


def run_child(kind: str, spec: dict[str, Any], timeout: float) -> Any:
    """Run ``kind`` in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                              text=True, timeout=max(timeout, 1), env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"over the {timeout:.0f} s time cap"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    return json.loads(lines[-1])


def search_max(run: Callable[[int], bool], start: int, first_step: int, resolution: int, limit: int,
               deadline: float, known_fail: int | None = None) -> tuple[int, int | None, bool]:
    """Largest length that ``run`` accepts, by doubling then bisection.

    From ``start``, steps of ``first_step`` doubling each time go up while trials pass (down while
    they fail) until one passing and one failing length bracket the answer; bisection then
    narrows the bracket to ``resolution``. ``first_step == start`` is plain doubling of the length;
    a small first step searches around a predicted length. Returns (best, first failing length or
    None, whether it finished before ``deadline``); ``run`` raises TimeoutError when the budget
    ends mid-trial, and that trial decides nothing.
    """
    best, fail = 0, known_fail

    def attempt(t: int) -> bool:
        if time.monotonic() > deadline:
            raise TimeoutError
        return run(t)

    try:
        step, t = first_step, start
        if attempt(t):
            best = t
            while best + step <= limit and (fail is None or best + step < fail):
                if attempt(best + step):
                    best, step = best + step, step * 2
                else:
                    fail = best + step
        else:
            fail = t
            while fail > resolution:
                t = max(resolution, fail - step)
                if attempt(t):
                    best = t
                    break
                fail, step = t, step * 2
        while best and fail is not None and fail - best > resolution:
            mid = (best + fail) // 2 // resolution * resolution
            if mid <= best:
                break
            if attempt(mid):
                best = mid
            else:
                fail = mid
    except TimeoutError:
        return best, fail, False
    return best, fail, True


def predict_max_tokens(probes: list[dict[str, Any]]) -> int | None:
    """Tokens at which the peak memory of two probe steps, extended linearly, reaches the free memory."""
    ok = [r for r in probes if r.get("ok") and r.get("peak_GB") is not None]
    if len(ok) < 2 or ok[1]["tokens"] == ok[0]["tokens"]:
        return None
    slope = (ok[1]["peak_GB"] - ok[0]["peak_GB"]) / (ok[1]["tokens"] - ok[0]["tokens"])
    if slope <= 0:
        return None
    return int((ok[1]["free_GB"] - ok[1]["peak_GB"]) / slope + ok[1]["tokens"])


def single_sequence_summary(rows: list[dict[str, Any]], doc_tokens: int) -> dict[str, Any]:
    """``single_sequence_tokens``: the longest trial of one sequence (``--doc-tokens 0``) that trained (None when
    trials packed documents); ``working_set_kb_per_token``: that trial's working set per token, and
    ``working_set_kb_per_token_512k`` the one at 524,288 tokens, where such a trial trained."""
    trained = [r for r in rows if r.get("phase") in ("probe", "max_context") and r.get("ok")]
    longest = max(trained, key=lambda r: r["tokens"], default=None)
    at_512k = next((r for r in trained if r["tokens"] == 524288), None)
    return {"single_sequence_tokens": longest["tokens"] if longest and doc_tokens == 0 else None,
            "working_set_kb_per_token": longest.get("working_set_kb_per_token") if longest else None,
            "working_set_kb_per_token_512k": at_512k.get("working_set_kb_per_token") if at_512k else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the pipeline, measures nothing")
    p.add_argument("--out", type=Path, default=None, help="result directory (default bench/results)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama-8B-shaped model")
    p.add_argument("--start", type=int, default=131072, help="first length of the doubling search without probes")
    p.add_argument("--probe-tokens", default="65536,131072",
                   help="two lengths whose peak memory predicts where the search starts (empty: plain doubling)")
    p.add_argument("--resolution", type=int, default=65536, help="bisection stops at this gap (tokens)")
    p.add_argument("--max-tokens", type=int, default=4 << 20, help="the search never tries beyond this")
    p.add_argument("--doc-tokens", type=int, default=16384, help="document length in search trials (0: one sequence)")
    p.add_argument("--overhead-tokens", type=int, default=65536, help="one sequence for the overhead runs")
    p.add_argument("--steps", type=int, default=3, help="timed steps per overhead setting (after one warm-up)")
    p.add_argument("--mlp-tile-tokens", type=int, default=8192)
    p.add_argument("--loss-tile-tokens", type=int, default=2048)
    p.add_argument("--layer-tile-tokens", type=int, default=0,
                   help="model.layer_tile_tokens: each layer's per-token parts a tile at a time (0: off)")
    p.add_argument("--nvme-path", default=os.path.join(tempfile.gettempdir(), "seqmesh-offload-bench"))
    p.add_argument("--engine", default="threads", choices=["auto", "aio", "threads"],
                   help="file I/O engine (auto builds DeepSpeed's aio op if libaio is present: minutes, once)")
    p.add_argument("--targets", default="none,cpu,nvme", help="offload targets of the longest-context search")
    p.add_argument("--skip-overhead", action="store_true",
                   help="no overhead runs (b): for deep models whose steps take minutes at --overhead-tokens")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole benchmark")
    p.add_argument("--trial-timeout-s", type=float, default=150.0)
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        result = CHILDREN[args.child[0]](json.loads(args.child[1]))
        print(json.dumps(result))
        return

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    if args.smoke:
        args.layers, args.start, args.resolution, args.doc_tokens, args.probe_tokens = 2, 256, 256, 128, "128,256"
        args.max_tokens, args.overhead_tokens, args.steps = min(args.max_tokens, 1024), 512, 1
        args.mlp_tile_tokens, args.loss_tile_tokens = 64, 64
    os.makedirs(args.nvme_path, exist_ok=True)
    base = {"smoke": args.smoke, "layers": args.layers, "doc_tokens": args.doc_tokens, "nvme_path": args.nvme_path,
            "engine": args.engine, "mlp_tile_tokens": args.mlp_tile_tokens, "loss_tile_tokens": args.loss_tile_tokens,
            "layer_tile_tokens": args.layer_tile_tokens}
    rows: list[dict[str, Any]] = []

    def log(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    # (c) link rates, in a child so that this process never holds a CUDA context during trials
    bw = run_child("bandwidth", {**base, "bandwidth_bytes": (1 << 30) if not args.smoke else (16 << 20)}, 120)
    log(bw)
    h2d, disk = bw.get("h2d_GBps"), min(bw.get("disk_write_GBps", 0), bw.get("disk_read_GBps", 0)) or None
    base.update(h2d_GBps=h2d, disk_GBps=disk)

    # (b) step-time overhead at a length that fits without offload
    settings = [["none", "auto"], ["cpu", "auto"], ["cpu", "1.0"], ["nvme", "auto"]]
    overhead = [] if args.skip_overhead else run_child("overhead", {**base, "tokens": args.overhead_tokens, "doc_tokens": 0, "settings": settings,
                                      "warmup": 1, "steps": args.steps}, max(60.0, 0.3 * args.budget_s))
    if isinstance(overhead, list):
        for row in overhead:
            log(row)
        times = {(r["target"], r["ratio"]): r["step_s"] for r in overhead}
        pct = {k: round(100 * (v / times[("none", "auto")] - 1), 2) for k, v in times.items() if k[0] != "none"}
    else:
        log({"phase": "overhead", **overhead})
        pct = {}

    # (a) longest context per target
    probe_tokens = [int(t) for t in args.probe_tokens.split(",") if t]
    best: dict[str, tuple[int, int | None, bool]] = {}
    for target in args.targets.split(","):
        def run(tokens: int, target: str = target, phase: str = "max_context") -> dict[str, Any]:
            remaining = deadline - time.monotonic()
            row = run_child("trial", {**base, "target": target, "ratio": "1.0", "tokens": tokens},
                            min(args.trial_timeout_s, remaining))
            if not row.get("ok") and "time cap" in row.get("error", "") and remaining < args.trial_timeout_s:
                raise TimeoutError  # cut by the benchmark's budget, not by the trial's own cap
            row = {**row, "phase": phase, "target": target, "tokens": tokens}
            log(row)
            return row

        def fits(tokens: int, target: str = target) -> bool:
            return bool(run(tokens, target)["ok"])

        if target == "nvme" and best.get("cpu", (0,))[0]:  # same device footprint as cpu: confirm, then bisect
            cpu_best, cpu_fail, _ = best["cpu"]
            best[target] = search_max(fits, cpu_best, args.resolution, args.resolution, args.max_tokens, deadline,
                                      known_fail=cpu_fail)
            continue
        guess = None
        if probe_tokens:
            try:
                guess = predict_max_tokens([run(t, target, "probe") for t in probe_tokens])
            except TimeoutError:
                best[target] = (0, None, False)
                continue
        if guess is None or guess < args.resolution:
            best[target] = search_max(fits, args.start, args.start, args.resolution, args.max_tokens, deadline)
        else:
            start = min(args.max_tokens, max(args.resolution, int(0.97 * guess) // args.resolution * args.resolution))
            best[target] = search_max(fits, start, args.resolution, args.resolution, args.max_tokens, deadline)

    from bench.common import write_result

    summary = {
        **single_sequence_summary(rows, args.doc_tokens),
        "max_context_tokens": max(best.get("cpu", (0,))[0], best.get("nvme", (0,))[0]),
        "overhead_auto_pct": pct.get(("cpu", "auto")),
        "h2d_GBps": h2d,
        "disk_GBps": disk,
        "max_context_tokens_by_target": {t: b[0] for t, b in best.items()},
        "first_failing_tokens_by_target": {t: b[1] for t, b in best.items()},
        "search_complete": {t: b[2] for t, b in best.items()},
        "overhead_pct": {f"{t}@{r}": v for (t, r), v in pct.items()},
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    config = {k: v for k, v in vars(args).items() if k != "child"}
    config["out"] = str(args.out) if args.out else None
    config["model"] = {**(TINY if args.smoke else LLAMA_8B), "num_layers": args.layers}
    write_result("offload", config, rows, summary, device="cpu-smoke" if args.smoke else None, out_dir=args.out)


if __name__ == "__main__":
    main()
