"""Working set per token of a one-sequence training step, with and without tiled decoder layers (issue 20).

What limits the longest sequence on one GPU, once weights and optimizer states are paid, is the memory
a step holds per token at its peak: under activation checkpointing, the layer being recomputed and
its backward. This benchmark counts it on any machine (``trainer/working_set.py``: on CPU every
storage an op creates is counted while it lives; on CUDA the allocator's peak) for the model of
``bench/offload.py`` (Llama-8B-shaped, bf16 weights, activation checkpointing, tiled MLP and loss,
no activation offload), narrowed by ``--width-divisor`` (hidden size, MLP width, head counts and
vocabulary divided; head_dim 128 kept) so that a CPU runs it in seconds. It counts forward and
backward (the optimizer step adds a constant) at two lengths of one sequence and reports the slope,
the *marginal* working set per token: constants (gradients, tile buffers) drop out, and what is left
is what grows with the context. Both lengths must be long enough that the peak falls in a layer's
backward (at short lengths the loss's tile of logits, a constant, sets it and the slope means
nothing). Most per-token terms scale with the width, but not all (RoPE's cos/sin tables, the
attention's log-sum-exp), so the ratio tiled / untiled carries over to the full model better than
the kilobytes do; the measurement on a GPU is ``bench/offload.py``'s ``working_set_kb_per_token``.
Buffers a kernel allocates and frees inside itself (flash attention's backward accumulators) are
not counted on CPU.

    python bench/working_set.py --out /tmp/ws      # CPU, width / 8, 8192 and 16384 tokens: ~4 minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.offload import LLAMA_8B, build_trial, trial_docs  # noqa: E402


def narrowed(divisor: int) -> dict[str, Any]:
    """``LLAMA_8B`` with every width divided by ``divisor`` (head_dim 128 and the 4:1 grouping kept)."""
    if divisor < 1 or LLAMA_8B["num_kv_heads"] % divisor:
        raise ValueError(f"--width-divisor must divide the 8 key/value heads, got {divisor}")
    return {**LLAMA_8B, **{k: LLAMA_8B[k] // divisor for k in ("hidden_size", "intermediate_size", "num_heads",
                                                                  "num_kv_heads", "vocab_size")}}


def working_set_bytes(dims: dict[str, Any], layers: int, tokens: int, layer_tile_tokens: int,
                      mlp_tile_tokens: int, loss_tile_tokens: int) -> int:
    """Peak bytes above the model's footprint of one forward and backward of a ``tokens``-token sequence, on
    ``bench/offload.py``'s trial model (no activation offload)."""
    from seqmesh.trainer.loop import run_group
    from seqmesh.trainer.working_set import track_working_set

    spec = {"smoke": False, "dims": dims, "layers": layers, "tokens": tokens, "doc_tokens": 0,
            "mlp_tile_tokens": mlp_tile_tokens, "loss_tile_tokens": loss_tile_tokens,
            "layer_tile_tokens": layer_tile_tokens, "nvme_path": tempfile.gettempdir(), "engine": "threads"}
    model, _, cfg, device, _ = build_trial(spec, "none", "auto")
    with track_working_set(device) as working_set:
        run_group(model, trial_docs(spec, dims["vocab_size"]), None, cfg.model, cfg.parallel, device,
                  denominator=tokens)
    return working_set.peak_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width-divisor", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", default="8192,16384", help="two sequence lengths; the slope between them is reported")
    p.add_argument("--layer-tile-tokens", type=int, default=512, help="the tiled run's model.layer_tile_tokens")
    p.add_argument("--mlp-tile-tokens", type=int, default=256)
    p.add_argument("--loss-tile-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="result directory (default bench/results)")
    args = p.parse_args()

    dims = narrowed(args.width_divisor)
    short, long = (int(t) for t in args.tokens.split(","))
    rows: list[dict[str, Any]] = []
    slope: dict[str, float] = {}
    for name, tile in (("untiled", 0), ("tiled", args.layer_tile_tokens)):
        peaks = {}
        for tokens in (short, long):
            t0 = time.perf_counter()
            peaks[tokens] = working_set_bytes(dims, args.layers, tokens, tile, args.mlp_tile_tokens,
                                              args.loss_tile_tokens)
            row = {"setting": name, "layer_tile_tokens": tile, "tokens": tokens,
                   "peak_MB": round(peaks[tokens] / 1e6, 2), "kb_per_token": round(peaks[tokens] / tokens / 1e3, 3),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        slope[name] = (peaks[long] - peaks[short]) / (long - short) / 1e3

    from bench.common import write_result

    summary = {"marginal_kb_per_token_untiled": round(slope["untiled"], 3),
               "marginal_kb_per_token_tiled": round(slope["tiled"], 3),
               "tiled_over_untiled": round(slope["tiled"] / slope["untiled"], 3)}
    config = {**{k: v for k, v in vars(args).items() if k != "out"}, "model": {**dims, "num_layers": args.layers}}
    write_result("working_set", config, rows, summary, out_dir=args.out)


if __name__ == "__main__":
    main()
