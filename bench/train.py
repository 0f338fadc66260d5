"""End-to-end training throughput and MFU of seqmesh's step loop on one GPU, against plain
transformers + torch on the same model, tokens and optimizer, in the same run.

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied; 1.24B
parameters), bf16 autocast with fp32 master weights, fused AdamW. Two context lengths:
8K tokens per document without activation checkpointing, 32K with it (shared/NOTES.md measured
the baseline at 38.5K tokens/s / 35% MFU and 21.8K / 30% on one H200). MFU counts causal
attention FLOPs and no recomputation, for both systems (seqmesh/trainer/flops.py).

    python bench/train.py --out DIR          # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.harness import run_loop, write_corpus  # noqa: E402
from seqmesh.trainer.flops import peak_flops, train_flops  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072)


def hf_baseline(seq_len: int, docs_per_step: int, steps: int, checkpointing: bool) -> dict:
    """transformers' LlamaForCausalLM (SDPA attention), one document per forward, fused AdamW."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA_1B, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).cuda()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 100, (1, seq_len), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(docs_per_step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / docs_per_step
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[2:]) / len(times[2:])
    flops = train_flops(config, [seq_len] * docs_per_step)
    del model, opt
    torch.cuda.empty_cache()
    peak = peak_flops(torch.cuda.get_device_name(0))
    return {"tokens_per_s": seq_len * docs_per_step / step_s, "mfu": flops / step_s / peak if peak else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="directory for the result JSON (default bench/results)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seqmesh-bench-train"))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train.py measures GPU training; run it on a GPU machine")

    cases = [(8192, 8, False), (32768, 2, True)]
    rows = []
    for seq_len, docs, ckpt in cases:
        corpus = write_corpus(args.work / f"corpus_{seq_len}.jsonl", [seq_len] * (docs * (args.steps + 2)))
        overrides = ["model=llama-1b", "model.vocab_size=128256", f"model.activation_checkpointing={str(ckpt).lower()}",
                     f"data.source={corpus}", "data.tokenizer=byte", f"data.max_seq_len={seq_len}",
                     f"data.global_batch={docs}", "data.val_fraction=0", "model.loss_tile_tokens=8192",
                     f"steps={args.steps}", "optim.warmup_steps=2",
                     f"data.cache_dir={args.work / 'cache'}"]
        ours = run_loop(overrides, 1, args.work / f"run_{seq_len}")
        base = hf_baseline(seq_len, docs, min(args.steps, 6), ckpt)
        row = {"seq_len": seq_len, "docs_per_step": docs, "activation_checkpointing": ckpt,
               "hf_tokens_per_s": base["tokens_per_s"], "hf_mfu": base["mfu"]}
        if "error" in ours:
            row["seqmesh_error"] = ours["error"]
        else:
            row.update(seqmesh_tokens_per_s=ours["mean_tokens_per_s_per_device"], seqmesh_mfu=ours["mean_mfu"],
                       seqmesh_peak_mem_gb=ours["peak_mem_bytes"] / 2**30,
                       speedup_vs_hf=ours["mean_tokens_per_s_per_device"] / base["tokens_per_s"])
        rows.append(row)
        print(row, flush=True)
    ok = [r for r in rows if "seqmesh_mfu" in r]
    best = max(ok, key=lambda r: r["seqmesh_mfu"] or 0) if ok else {}
    summary = {"mfu": best.get("seqmesh_mfu"), "tokens_per_s_per_device": best.get("seqmesh_tokens_per_s"),
               "speedup_vs_hf_transformers": best.get("speedup_vs_hf"), "at_seq_len": best.get("seq_len")}
    write_result("train", {"model": "llama-3.2-1b shape", "dtype": "bf16 autocast, fp32 master", "steps": args.steps,
                           "optimizer": "AdamW fused"}, rows, summary, out_dir=args.out)


if __name__ == "__main__":
    main()
