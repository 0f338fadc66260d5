"""End-to-end training throughput and MFU of seqmesh's step loop on one GPU, against plain
transformers and transformers + Liger-Kernel on the same model, tokens per step and optimizer, in the same run
(the baselines train on random token ids, seqmesh on its byte-level corpus: throughput compares, losses do not).

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads of 64, vocab 128256, tied; 1.24B
parameters), bf16 autocast with fp32 master weights, fused AdamW. Two context lengths: 8K tokens
per document (8 per step) without activation checkpointing, 32K (2 per step) with it unless
``--no-ckpt-32k``. MFU counts causal attention FLOPs and no recomputation, for every system
(seqmesh/trainer/flops.py), against the dense bf16 peak (989 TFLOP/s on an H100/H200).

Baselines, each in its own process (Liger patches transformers' classes for the whole process):

* ``hf``: ``LlamaForCausalLM`` with SDPA attention, one document per forward;
* ``hf_liger``: the same after ``apply_liger_kernel_to_llama`` (fused linear cross-entropy,
  RMSNorm, SwiGLU, RoPE): the stack many fine-tuning users run.

seqmesh runs with the overrides of ``--seqmesh`` (its configuration under test), and at 8K once
more with ``model.linear_dtype=fp8`` (torchao float8 linears): same seed, same documents, so the
per-step losses are paired; ``fp8_linear_loss_gap_pct`` is the relative gap of their mean loss
after warm-up, and ``--noise-seed`` adds a bf16 run with another seed whose gap to the first is the
seed-to-seed noise at the same step count. ``--variant NAME[@LENGTH]=OVR,OVR`` adds seqmesh rows to compare; the summary's
``mfu_*`` and ``speedup_*`` keys are those of the fastest bf16 seqmesh row at each length, named in
``seqmesh_row_*`` (e.g. 32K without recompute where seqmesh fits it and the baselines need checkpointing).

    python bench/train.py --out DIR --seqmesh model.loss_kernel=liger        # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.composition import measured  # noqa: E402
from bench.harness import ROOT, run_loop, write_corpus  # noqa: E402
from seqmesh.trainer.flops import peak_flops, train_flops  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072)
BASELINES = ("hf", "hf_liger")
WARMUP = 2  # steps left out of every mean: compiles, cuDNN graphs, Triton autotuning, allocator growth


def merge_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``base`` with the ``key=value`` items of ``extra`` replacing those of the same key (Hydra wants each once)."""
    merged: dict[str, str] = {}
    for item in [*base, *extra]:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        merged[item.split("=", 1)[0]] = item
    return list(merged.values())


def parse_variant(spec: str) -> tuple[str, int | None, list[str]]:
    """``--variant NAME[@LENGTH]=key=value,key=value`` as (name, the one length it runs at or None, overrides):
    the name ends at the first ``=``, and each override keeps its own ``=`` (``compiled=model.compile_layers=true``)."""
    head, _, overrides = spec.partition("=")
    name, _, only = head.partition("@")
    items = overrides.split(",")
    if not name or not overrides or (only and not only.isdigit()) or not all("=" in item for item in items):
        raise ValueError(f"--variant {spec!r}: write NAME=key=value,key=value or NAME@LENGTH=key=value,...")
    return name, int(only) if only else None, items


def seqmesh_overrides(seq_len: int, docs: int, ckpt: bool, corpus: Path, steps: int, work: Path,
                      extra: Sequence[str] = ()) -> list[str]:
    """The step loop's configuration for this benchmark (the model and data of the module docstring)."""
    return merge_overrides(
        ["model=llama-1b", "model.vocab_size=128256", f"model.activation_checkpointing={str(ckpt).lower()}",
         f"data.source={corpus}", "data.tokenizer=byte", f"data.max_seq_len={seq_len}",
         f"data.global_batch={docs}", "data.val_fraction=0", "model.loss_tile_tokens=8192",
         f"steps={steps}", "optim.warmup_steps=2", f"data.cache_dir={work / 'cache'}", "eval_every=0"], extra)


def hf_baseline(seq_len: int, docs_per_step: int, steps: int, checkpointing: bool, liger: bool) -> dict[str, Any]:
    """transformers' LlamaForCausalLM (SDPA attention, Liger-patched with ``liger``), one document per forward,
    fused AdamW; throughput over the steps after ``WARMUP``."""
    import transformers

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA_1B, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).cuda()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 100, (1, seq_len), device="cuda")
    times, losses = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(docs_per_step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / docs_per_step
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total)
    step_s = sum(times[WARMUP:]) / len(times[WARMUP:])
    peak = peak_flops(torch.cuda.get_device_name(0))
    flops = train_flops(config, [seq_len] * docs_per_step)
    return {"tokens_per_s": seq_len * docs_per_step / step_s, "mfu": flops / step_s / peak if peak else None,
            "step_s": step_s, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "losses": losses}


def run_baseline(kind: str, seq_len: int, docs: int, steps: int, ckpt: bool, timeout_s: float) -> dict[str, Any]:
    """``hf_baseline`` in a fresh process (Liger's patches are process-wide); its result, or its error."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline", kind, "--seq-len", str(seq_len),
           "--docs", str(docs), "--hf-steps", str(steps), *(["--ckpt"] if ckpt else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: " + (proc.stdout + proc.stderr)[-1500:]}
    return json.loads(lines[-1])


def loss_gap_pct(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Relative gap (%) of ``a``'s mean loss over the steps after ``WARMUP`` to ``b``'s (paired: same steps)."""
    if "records" not in a or "records" not in b:
        return None
    la = [r["loss"] for r in a["records"][WARMUP:]]
    lb = [r["loss"] for r in b["records"][WARMUP:]]
    n = min(len(la), len(lb))
    if n == 0:
        return None
    return 100.0 * (sum(la[:n]) - sum(lb[:n])) / sum(lb[:n])


def seqmesh_row(result: dict[str, Any]) -> dict[str, Any]:
    """A seqmesh run's figures (means after ``WARMUP``) or its error."""
    if "error" in result:
        return {"error": result["error"][-1500:]}
    out = measured(result, WARMUP)
    out["losses"] = [r["loss"] for r in result["records"]]
    return out


def summarize(rows: list[dict[str, Any]], variant_names: Sequence[str], steps: int) -> dict[str, Any]:
    """The summary keys of the issue from the rows measured so far (None where a figure is missing)."""

    def at(seq_len: int, key: str, field: str) -> Any:
        row = next((r for r in rows if r["seq_len"] == seq_len), {})
        return row.get(key, {}).get(field)

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a and b else None

    def fastest_bf16(seq_len: int) -> str:
        """The fastest seqmesh bf16 configuration measured at ``seq_len`` (main or a variant; not fp8 or seed1)."""
        row = next((r for r in rows if r["seq_len"] == seq_len), {})
        names = ["seqmesh", *(f"seqmesh_{n}" for n in variant_names)]
        timed = [n for n in names if (row.get(n) or {}).get("tokens_per_s_per_device")]
        return max(timed, key=lambda n: row[n]["tokens_per_s_per_device"]) if timed else "seqmesh"

    summary: dict[str, Any] = {}
    for seq_len in (8192, 32768):
        k, name = f"{seq_len // 1024}k", fastest_bf16(seq_len)
        ours = at(seq_len, name, "tokens_per_s_per_device")
        summary[f"seqmesh_row_{k}"] = name
        summary[f"mfu_{k}"] = at(seq_len, name, "mfu")
        summary[f"tokens_per_s_{k}"] = ours
        summary[f"speedup_vs_hf_transformers_{k}"] = ratio(ours, at(seq_len, "hf", "tokens_per_s"))
        summary[f"speedup_vs_hf_liger_{k}"] = ratio(ours, at(seq_len, "hf_liger", "tokens_per_s"))
    summary["fp8_linear_speedup_8k"] = ratio(at(8192, "seqmesh_fp8", "tokens_per_s_per_device"),
                                             at(8192, "seqmesh", "tokens_per_s_per_device"))
    summary["fp8_linear_loss_gap_pct"] = at(8192, "seqmesh_fp8", "loss_gap_pct")
    summary["seed_loss_gap_pct"] = at(8192, "seqmesh_seed1", "loss_gap_pct")
    # the loss gaps are of the 8K row, whose step count may differ from this command's (--merge)
    summary["loss_gap_steps"] = max(0, next((r.get("steps", steps) for r in rows if r["seq_len"] == 8192), steps)
                                    - WARMUP)
    best = max((m for m in (summary["mfu_8k"], summary["mfu_32k"]) if m), default=None)
    summary["mfu"] = best  # the design's `train` keys: the better of the two lengths
    summary["tokens_per_s_per_device"] = summary["tokens_per_s_8k"] if best == summary["mfu_8k"] else \
        summary["tokens_per_s_32k"]
    return summary


def earlier_rows(out_dir: Path | None, lengths: Sequence[int], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """Rows of an earlier result in ``out_dir`` at lengths this run does not measure, and the variant names of
    both runs; ``config`` gains the earlier run's. One GPU command (10 minutes) holds one length's runs, so
    ``--merge`` puts 8K and 32K, measured by two commands of the same commit, in one result. Refused when
    the earlier result is of another commit or another seqmesh configuration (their ratios would mix)."""
    from bench.common import RESULTS, device_tag, head_commit

    path = (out_dir or RESULTS) / f"train_{device_tag()}.json"
    if not path.exists():
        return [], list(config["variants"])
    old = json.loads(path.read_text())
    if old["commit"] != head_commit() or old["config"].get("seqmesh_overrides") != config["seqmesh_overrides"]:
        raise SystemExit(f"--merge: {path} is of commit {old['commit']} with --seqmesh "
                         f"{old['config'].get('seqmesh_overrides')}; this run is {head_commit()} with "
                         f"{config['seqmesh_overrides']}. Move that file away or run without --merge.")
    config["earlier_run"] = old["config"]
    names = sorted({*old["config"].get("variants", {}), *config["variants"]})
    return [r for r in old["rows"] if r["seq_len"] not in lengths], names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for the result JSON (default bench/results)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seqmesh-bench-train"))
    ap.add_argument("--steps", type=int, default=10, help="seqmesh steps per run (the first 2 are warm-up)")
    ap.add_argument("--hf-steps", type=int, default=6, help="baseline steps per run (the first 2 are warm-up)")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--no-ckpt-32k", action="store_true", help="no activation checkpointing above 8K either")
    ap.add_argument("--seqmesh", nargs="*", default=[], help="overrides of seqmesh's configuration under test")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[@LENGTH]=OVR,OVR",
                    help="another seqmesh configuration to measure alongside, at every length or one (repeatable)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the float8-linear run at 8K")
    ap.add_argument("--noise-seed", action="store_true", help="at 8K, also run bf16 with seed=1 (loss noise)")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other lengths' rows of an earlier result in --out (one length per GPU command)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per run before it counts as failed")
    ap.add_argument("--baseline", choices=BASELINES, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--docs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train.py measures GPU training; run it on a GPU machine")
    if args.baseline:
        print(json.dumps(hf_baseline(args.seq_len, args.docs, args.hf_steps, args.ckpt, args.baseline == "hf_liger")))
        return
    variants: dict[str, tuple[int | None, list[str]]] = {}
    for spec in args.variant:
        try:
            name, only, overrides = parse_variant(spec)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        variants[name] = (only, overrides)
    baselines = [b for b in args.baselines.split(",") if b]
    if set(baselines) - set(BASELINES):
        raise SystemExit(f"--baselines: choose from {BASELINES}, got {baselines}")

    rows: list[dict[str, Any]] = []
    config = {"model": "llama-3.2-1b shape", "dtype": "bf16 autocast, fp32 master", "steps": args.steps,
              "hf_steps": args.hf_steps, "warmup_steps_excluded": WARMUP, "optimizer": "AdamW fused",
              "seqmesh_overrides": args.seqmesh, "variants": variants}

    lengths = [int(n) for n in args.lengths.split(",")]
    kept, names = earlier_rows(args.out, lengths, config) if args.merge else ([], list(variants))

    def save() -> None:
        """Rewrite the result with what is measured so far: a run cut short keeps its finished rows."""
        write_result("train", config, kept + rows, summarize(kept + rows, names, args.steps), out_dir=args.out)

    for seq_len in lengths:
        docs = max(1, 65536 // seq_len)
        ckpt = seq_len > 8192 and not args.no_ckpt_32k
        corpus = write_corpus(args.work / f"corpus_{seq_len}.jsonl", [seq_len] * (docs * (args.steps + 2)))

        def run(name: str, extra: Sequence[str]) -> dict[str, Any]:
            overrides = seqmesh_overrides(seq_len, docs, ckpt, corpus, args.steps, args.work, [*args.seqmesh, *extra])
            result = run_loop(overrides, 1, args.work / f"run_{seq_len}_{name}", timeout_s=args.timeout)
            print(seq_len, name, {k: v for k, v in seqmesh_row(result).items() if k != "losses"}, flush=True)
            return result

        row: dict[str, Any] = {"seq_len": seq_len, "steps": args.steps, "docs_per_step": docs,
                               "activation_checkpointing": ckpt,
                               "seqmesh_overrides": args.seqmesh}
        rows.append(row)
        main_run = run("main", [])
        row["seqmesh"] = seqmesh_row(main_run)
        save()
        for name, (only, extra) in variants.items():
            if only in (None, seq_len):
                row[f"seqmesh_{name}"] = {**seqmesh_row(run(name, extra)), "overrides": extra}
                save()
        if seq_len == 8192 and not args.no_fp8:
            fp8 = run("fp8", ["model.linear_dtype=fp8"])
            row["seqmesh_fp8"] = {**seqmesh_row(fp8), "loss_gap_pct": loss_gap_pct(fp8, main_run)}
            save()
            if args.noise_seed:
                row["seqmesh_seed1"] = {**seqmesh_row(noise := run("seed1", ["seed=1"])),
                                        "loss_gap_pct": loss_gap_pct(noise, main_run)}
                save()
        for kind in baselines:
            row[kind] = run_baseline(kind, seq_len, docs, args.hf_steps, ckpt, args.timeout)
            print(seq_len, kind, {k: v for k, v in row[kind].items() if k != "losses"}, flush=True)
            save()



if __name__ == "__main__":
    main()
