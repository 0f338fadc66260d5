"""``seqmesh plan``: plan batches of a length file offline, and compare with static SP.

    seqmesh plan --lengths FILE --gpus N --global-batch B [--batches K] --cost-model FILE.json
                 --out plans.jsonl [--baseline static-sp=K|best-static] [--group-sizes 1,2,4]
                 [--time-limit S] [--tp T] [--pp P] [--certify] [--extrapolate-bandwidth] [--cluster FILE]

FILE holds one length per line; batch k is lines k*B .. (k+1)*B-1 and sequence ids are indices
within the batch. Each batch's plan goes to ``--out`` (one Plan JSON per line) and one summary line
goes to stdout: predicted and lower-bound ms, their ratio, solve ms, micro-batches and the group
sizes used, and, with ``--baseline``, the static plan's time and the speedup over it.
``--tp``/``--pp`` price the plans for that layout (``--gpus`` stays the HDP ranks); the cost model
must describe one device's whole model (a profile) or already that layout. ``--certify`` adds the
certified lower bound (seqmesh.scheduler.bound) and the plan's gap to it to each summary line.
``--extrapolate-bandwidth`` lets group sizes missing from the cost model's ``a2a_GBps`` take the
nearest listed size's bandwidth (an assumption; without it such sizes are refused or left out).
``--cluster`` prices every group by the links of its own ranks (seqmesh.scheduler.links).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from seqmesh.scheduler import plan_step
from seqmesh.scheduler.bound import certified_bound
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.links import load_cluster
from seqmesh.scheduler.plan import Plan
from seqmesh.scheduler.static import baseline_plan


def read_lengths(path: str) -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--lengths {path!r}: no such file (expected one token length per line)")
    out = []
    for no, line in enumerate(p.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"--lengths {path!r} line {no}: {text!r} is not an integer token length") from None
        if n < 1:
            raise ValueError(f"--lengths {path!r} line {no}: length {n} must be >= 1")
        out.append(n)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqmesh plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", required=True, help="file with one sequence length (tokens) per line")
    p.add_argument("--gpus", type=int, required=True, help="HDP ranks to plan for")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per batch")
    p.add_argument("--batches", type=int, default=None, help="batches to plan (default: every full batch)")
    p.add_argument("--cost-model", required=True, help="cost-model JSON (seqmesh profile, or the external form); example: "
                   "conf/cost_models/h200_llama8b_8layers.json")
    p.add_argument("--out", required=True, help="JSONL file receiving one Plan per batch")
    p.add_argument("--baseline", default=None, help="static-sp=K or best-static: also plan this and compare")
    p.add_argument("--group-sizes", default=None, help="comma-separated allowed SP group sizes (default: powers of two)")
    p.add_argument("--time-limit", type=float, default=0.2, help="seconds for the MILP per batch (default 0.2)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each HDP rank (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages of each HDP rank (default 1)")
    p.add_argument("--certify", action="store_true", help="also solve the certified lower bound and report the gap")
    p.add_argument("--cluster", default=None, help="cluster file with link classes (conf/clusters/two_nic.yaml): "
                   "every group is priced by its own ranks' links")
    p.add_argument("--extrapolate-bandwidth", action="store_true",
                   help="price group sizes missing from a2a_GBps with the nearest listed size below (an assumption)")
    return p


def _summary(k: int, plan: Plan, solve_ms: float) -> dict[str, Any]:
    sizes = Counter(plan.group_sizes())
    return {"batch": k, "predicted_ms": round(plan.predicted_ms, 3), "lower_bound_ms": round(plan.lower_bound_ms, 3),
            "ratio": round(plan.predicted_ms / plan.lower_bound_ms, 4) if plan.lower_bound_ms else None,
            "solve_ms": round(solve_ms, 2), "microbatches": len(plan.microbatches),
            "group_sizes": {str(d): sizes[d] for d in sorted(sizes)}, "solver": plan.meta.get("solver")}


def plan_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.gpus < 1 or args.global_batch < 1:
            raise ValueError("--gpus and --global-batch must be >= 1")
        if args.tp < 1 or args.pp < 1:
            raise ValueError(f"--tp {args.tp} and --pp {args.pp} must be >= 1")
        cost_model = CostModel.load(args.cost_model).for_layout(args.tp, args.pp)
        if args.extrapolate_bandwidth:
            cost_model = dataclasses.replace(cost_model, extrapolate_bandwidth=True)
        if args.cluster:
            cost_model = cost_model.with_links(load_cluster(args.cluster))
        lengths = read_lengths(args.lengths)
        available = len(lengths) // args.global_batch
        batches = available if args.batches is None else args.batches
        if batches < 1 or batches > available:
            raise ValueError(f"--lengths has {len(lengths)} lengths = {available} full batch(es) of {args.global_batch}; "
                             f"cannot plan {batches} (lower --batches or --global-batch)")
        try:
            group_sizes = [int(x) for x in args.group_sizes.split(",")] if args.group_sizes else None
        except ValueError:
            raise ValueError(f"--group-sizes {args.group_sizes!r}: expected comma-separated integers, e.g. 1,2,4") from None
        with open(args.out, "w") as out:
            for k in range(batches):
                batch = lengths[k * args.global_batch:(k + 1) * args.global_batch]
                t0 = time.perf_counter()
                plan = plan_step(batch, args.gpus, cost_model, group_sizes=group_sizes, time_limit_s=args.time_limit)
                line = _summary(k, plan, (time.perf_counter() - t0) * 1e3)
                if args.certify:
                    bound = certified_bound(batch, args.gpus, cost_model, group_sizes=group_sizes,
                                            upper_ms=plan.predicted_ms)
                    line.update(certified_bound_ms=round(bound.certified_ms, 3),
                                gap_to_certified_bound=round(plan.predicted_ms / bound.certified_ms, 4),
                                certify_ms=round(bound.seconds * 1e3, 1))
                if args.baseline:
                    base = baseline_plan(args.baseline, batch, args.gpus, cost_model)
                    line["baseline"] = {"name": base.meta["baseline"], "predicted_ms": round(base.predicted_ms, 3),
                                        "ratio": round(base.predicted_ms / base.lower_bound_ms, 4),
                                        "speedup": round(base.predicted_ms / plan.predicted_ms, 4)}
                out.write(plan.to_json() + "\n")
                print(json.dumps(line), flush=True)
    except (ValueError, OSError) as e:
        print(f"seqmesh plan: error: {e}", file=sys.stderr)
        return 2
    return 0
