"""How fast FP8AdamW's staged update crosses the link, against what the link itself carries both ways.

Why: with parameter offload the update behind the step (host-state layers' moments, streamed layers' weights,
gradients and moments) is what the next forward waits for; at 30B it is the part of the step no forward can hide
(docs/offload_params.md, part (a)). At bad0d77 on an H100 the states-only update ran at 37.5 GB/s into the device
while one direction of a pinned copy ran at 54: this measures where the rest goes, in one run:

* ``copy_one_way``: a pinned host-to-device copy alone (``measure_h2d_GBps``), the plan's ``copy`` rate;
* ``copy_both_ways``: a host-to-device and a device-to-host copy at once, each way's rate
  (``measure_both_ways_GBps``): the ceiling of an update that copies in and out together;
* the staged update (``measure_staged_update_GBps``, the rate the plan prices it with) of a host-state layer
  (``states``) and of a streamed layer (``streamed``), for each ``staged_in_flight`` (pieces copied in ahead of
  the one whose copy back the host waits for) and piece size in ``--in-flight`` and ``--chunks``.

The baseline is the default configuration (``STAGED_IN_FLIGHT`` pieces ahead, ``STAGED_CHUNK_ELEMS`` per chunk),
measured in the same run; the summary gives each kind's best rate over it and over ``copy_both_ways``.

    python bench/staged_update.py --out DIR     # on a GPU machine (about a minute)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from seqmesh.parallel.offload.bandwidth import measure_both_ways_GBps, measure_h2d_GBps  # noqa: E402
from seqmesh.trainer.optim.fp8_adamw import STAGED_CHUNK_ELEMS, STAGED_IN_FLIGHT  # noqa: E402
from seqmesh.trainer.param_offload import measure_staged_update_GBps  # noqa: E402

KINDS = {"states": True, "streamed": False}  # name -> states_only


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind: the default configuration's rate, the best one's, their ratio, and both against the link's rate
    each way with both directions busy."""
    both = next(r["GBps"] for r in rows if r["case"] == "copy_both_ways")
    out: dict[str, Any] = {"copy_one_way_GBps": next(r["GBps"] for r in rows if r["case"] == "copy_one_way"),
                           "copy_both_ways_GBps": both}
    for kind in KINDS:
        mine = [r for r in rows if r["case"] == kind]
        if not mine:
            continue
        base = next(r for r in mine if r["in_flight"] == STAGED_IN_FLIGHT and r["chunk_elems"] == STAGED_CHUNK_ELEMS)
        best = max(mine, key=lambda r: r["GBps"])
        out.update({f"{kind}_default_GBps": base["GBps"], f"{kind}_best_GBps": best["GBps"],
                    f"{kind}_best_in_flight": best["in_flight"], f"{kind}_best_chunk_elems": best["chunk_elems"],
                    f"{kind}_best_over_default": best["GBps"] / base["GBps"],
                    f"{kind}_default_over_both_ways": base["GBps"] / both})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for the result JSON (default bench/results)")
    ap.add_argument("--in-flight", default="1,2,3,4", help="staged_in_flight values, comma-separated")
    ap.add_argument("--chunks", default=f"{STAGED_CHUNK_ELEMS},{2 * STAGED_CHUNK_ELEMS}",
                    help="staged_chunk_elems values, comma-separated")
    ap.add_argument("--pieces", type=int, default=8, help="pieces per timed update")
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/staged_update.py times copies over a GPU's link; run it on a GPU machine")
    in_flight = sorted({int(v) for v in args.in_flight.split(",")} | {STAGED_IN_FLIGHT})
    chunks = sorted({int(v) for v in args.chunks.split(",")} | {STAGED_CHUNK_ELEMS})
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: choose from {sorted(KINDS)}, got {kinds}")
    device = torch.device("cuda", 0)
    rows: list[dict[str, Any]] = [
        {"case": "copy_one_way", "GBps": measure_h2d_GBps(device)},
        {"case": "copy_both_ways", "GBps": measure_both_ways_GBps(device)},
    ]
    print(rows, flush=True)
    for kind in kinds:
        for chunk in chunks:
            for ahead in in_flight:
                rate = measure_staged_update_GBps(device, "fp8", torch.bfloat16, KINDS[kind], pieces=args.pieces,
                                                  chunk_elems=chunk, in_flight=ahead)
                rows.append({"case": kind, "in_flight": ahead, "chunk_elems": chunk, "GBps": rate})
                print(rows[-1], flush=True)
    write_result("staged_update", {"state_dtype": "fp8", "param_dtype": "bf16", "pieces": args.pieces,
                                   "default_in_flight": STAGED_IN_FLIGHT, "default_chunk_elems": STAGED_CHUNK_ELEMS},
                 rows, summarize(rows), out_dir=args.out)


if __name__ == "__main__":
    main()
