"""Loss of FP8 linear layers against bf16 over a long run, paired seeds: whether ``model.linear_dtype=fp8``
trains as well, measured as the FP8 optimizer's loss is (``bench/optim.py``'s convergence section).

For each seed: seqmesh's step loop on the Llama-3.2-1B shape (``bench/train.py``'s configuration, compiled
layers and Liger's loss unless ``--seqmesh`` says otherwise) once with bf16 linears and once with float8
ones, the same seed, so the same initial weights and the same batches. The text is real: the Python
standard library's sources (``bench/optim.py: corpus_bytes``, non-ASCII bytes replaced), cut into documents
of exactly ``--tokens`` byte tokens, one per step. A pair's gap is the relative difference of the two runs'
mean loss over the last ``--tail`` steps; what differs between seeds (initialisation, the batches'
difficulty) cancels within a pair. Summary (``fp8_linear_loss_{device}.json``):

* ``fp8_linear_loss_gap_pct``: the mean paired gap, with ``_stderr`` and ``_ci95`` (Student t over the
  seeds, ``bench/optim.py: gap_statistics``) and ``_abs_mean`` (one run's gap whatever its sign);
* ``seed_loss_gap_pct``: the mean |gap| between the bf16 runs of consecutive seeds: how far two runs
  that differ only by their seed end apart over the same tail, the yardstick for the gap above.

Budget on an H100 (6284ad7): a seed's bf16 run of 1000 steps finished inside a 320 s command, its fp8
run did not. A run of this small model at 2048 tokens is bound by start-up, compilation and launch
overhead, not by the GPU, so ``--jobs 2`` runs a seed's two arms side by side (each process holds about
a quarter of an 80 GB card): one seed per 10-minute command. The seeds of one commit go into one result
with ``--merge``, which reads the earlier result from ``--out`` (copy it there first on a machine whose
``--out`` starts empty). Concurrency changes no loss: each run is its own process with its own seed.

    python bench/fp8_linear_loss.py --out DIR --seeds 0 --jobs 2            # GPU (float8: Hopper or Ada)
    python bench/fp8_linear_loss.py --out DIR --seeds 1 --jobs 2 --merge    # more pairs into one result
    python bench/fp8_linear_loss.py --smoke --out DIR              # CPU: tiny model, both arms bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, device_tag, head_commit, write_result  # noqa: E402
from bench.harness import run_loop  # noqa: E402
from bench.optim import corpus_bytes, gap_statistics  # noqa: E402
from bench.train import seqmesh_overrides  # noqa: E402

ARMS = {"bf16": [], "fp8": ["model.linear_dtype=fp8"]}


def write_text_corpus(path: Path, doc_tokens: int, docs: int) -> Path:
    """``docs`` documents of exactly ``doc_tokens`` byte tokens (``doc_tokens - 1`` ASCII characters and
    the end-of-text token) of the standard library's sources, in order."""
    text = bytes(b if b < 128 else ord("?") for b in corpus_bytes().tolist()).decode("ascii")
    n = doc_tokens - 1
    if len(text) < n * docs:
        raise SystemExit(f"the text corpus holds {len(text) // n} documents of {doc_tokens} tokens, {docs} needed: "
                         "lower --steps or --tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": text[i * n:(i + 1) * n]}) + "\n")
    return path


def tail_mean(losses: Sequence[float], tail: int) -> float:
    return statistics.fmean(losses[-tail:])


def summarize(rows: list[dict[str, Any]], tail: int) -> dict[str, Any]:
    """Paired gaps of the seeds whose two arms both finished, and the bf16 seed-to-seed yardstick."""
    final = {(r["arm"], r["seed"]): tail_mean(r["losses"], tail) for r in rows if r.get("losses")}
    seeds = sorted({seed for arm, seed in final if arm == "bf16" and ("fp8", seed) in final})
    summary: dict[str, Any] = {"seeds": seeds, "tail_steps": tail}
    gaps = [100.0 * (final["fp8", s] - final["bf16", s]) / final["bf16", s] for s in seeds]
    stats = gap_statistics(gaps) if gaps else {}
    summary.update({f"fp8_linear_{key}": value for key, value in stats.items()})
    summary["fp8_linear_loss_gap_pct_per_seed"] = dict(zip(map(str, seeds), gaps))
    bf16 = sorted(seed for arm, seed in final if arm == "bf16")
    seed_gaps = [100.0 * abs(final["bf16", b] - final["bf16", a]) / final["bf16", a] for a, b in zip(bf16, bf16[1:])]
    summary["seed_loss_gap_pct"] = statistics.fmean(seed_gaps) if seed_gaps else None
    return summary


def earlier_rows(out_dir: Path | None, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier result of the same commit and configuration (``--merge``); refused otherwise."""
    path = (out_dir or RESULTS) / f"fp8_linear_loss_{device_tag()}.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = {k: v for k, v in old["config"].items() if k != "seeds"} == {k: v for k, v in config.items() if k != "seeds"}
    if old["commit"] != head_commit() or not same:
        raise SystemExit(f"--merge: {path} is of commit {old['commit']} with {old['config']}; this run is "
                         f"{head_commit()} with {config}. Move that file away or run without --merge.")
    return old["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for the result JSON (default bench/results)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seqmesh-bench-fp8-loss"))
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds, each run with bf16 and fp8 linears")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (one document)")
    ap.add_argument("--tail", type=int, default=100, help="steps at the end whose mean loss is compared")
    ap.add_argument("--seqmesh", nargs="*", default=["model.compile_layers=true", "model.loss_kernel=liger"],
                    help="overrides of both arms")
    ap.add_argument("--timeout", type=float, default=280, help="seconds per run before it counts as failed")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once on the one GPU (2: a seed's arms together)")
    ap.add_argument("--merge", action="store_true", help="add these seeds to the result of the same commit")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny model, 20 steps, both arms bf16 (float8 needs a GPU): checks the script only")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    steps, tail = (20, 5) if args.smoke else (args.steps, args.tail)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs} must be 1 or more")
    if not 0 < tail <= steps:
        raise SystemExit(f"--tail {tail} must be between 1 and --steps {steps}")
    arms = {"bf16": [], "fp8": []} if args.smoke else ARMS
    extra = ["model=tiny", "model.dtype=fp32", "model.vocab_size=257"] if args.smoke else args.seqmesh
    config = {"model": "tiny (smoke)" if args.smoke else "llama-3.2-1b shape", "dtype": "bf16 autocast, fp32 master",
              "steps": steps, "tokens_per_step": args.tokens, "tail_steps": tail, "seeds": seeds,
              "corpus": "Python standard library sources, byte tokens, non-ASCII bytes as '?'",
              "arms": arms, "seqmesh_overrides": extra, "optimizer": "AdamW fused"}
    rows = earlier_rows(args.out, config) if args.merge else []
    corpus = write_text_corpus(args.work / f"text_{args.tokens}.jsonl", args.tokens, steps + 2)

    def one(seed: int, arm: str) -> dict[str, Any]:
        run = seqmesh_overrides(args.tokens, 1, False, corpus, steps, args.work,
                                [*extra, *arms[arm], f"seed={seed}", "optim.warmup_steps=20"])
        result = run_loop(run, 1, args.work / f"run_{arm}_{seed}", timeout_s=args.timeout,
                          device="cpu" if args.smoke else "cuda")
        row: dict[str, Any] = {"arm": arm, "seed": seed, "overrides": arms[arm]}
        if "error" in result:
            row["error"] = result["error"][-1500:]
        else:
            row["losses"] = [r["loss"] for r in result["records"]]
            row["tail_mean_loss"] = tail_mean(row["losses"], tail)
        return row

    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the run's subprocess
        runs = [pool.submit(one, seed, arm) for seed in seeds for arm in arms]
        for done in runs:  # in submission order, so the rows' order does not depend on timing
            row = done.result()
            print(row["arm"], row["seed"], {k: v for k, v in row.items() if k != "losses"}, flush=True)
            rows.append(row)
            write_result("fp8_linear_loss", config, rows, summarize(rows, tail), out_dir=args.out)

if __name__ == "__main__":
    main()
