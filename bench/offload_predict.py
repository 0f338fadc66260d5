"""What the parameter-offload plan predicts for a model on a GPU that is not here: a PREDICTION, not a measurement.

Why: the goal of issue 20 (a 30B model at >= 35% MFU on one H200) needs an H200, which has not been lent since the
placement was built; this runs the plan the trainer makes at start-up (``scheduler/offload_plan.py: plan_offload``)
on inputs taken from measured files and the model's own arithmetic, so the prediction can be rerun and checked
against the measurement when it comes.

Where each input comes from (all in the result's ``config``):

* sizes, activation bytes per token, working sets and FLOPs: the Llama shape of ``bench/offload_params.py``
  (``llama_shape``), its run config, ``trainer/memory_model.py`` and ``trainer/flops.py``, as the trainer counts them;
* link rates (copy, staged update, states-only update): a measured row of ``offload_params_*.json`` (``--rates-from``);
* a decoder layer's forward + backward at ``--tokens``: that row's 8K time per layer scaled by FLOPs per layer, two
  ways (its measured forward + backward, and its plan's compute), which bound the estimate; on an H200 the bf16
  peak is an H100's, so the time per FLOP is carried over as it is;
* device memory: ``--device-gb`` less ``memory.headroom`` (the run's default, 10%, and ``--headroom`` values);
  host memory ``--host-gb`` (the plan's budget: 80% of free RAM plus the model built there).

``python bench/offload_predict.py --size 30 --rates-from bench/results/offload_params_h100_max_b1d2f39.json``
writes ``bench/results/offload_predict_h200.json``; ``--smoke`` checks the script on a small shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result  # noqa: E402
from bench.offload_params import LOSS_TILE_TOKENS, llama_shape, run_config  # noqa: E402


def _meta_model(shape: dict[str, int], tokens: int) -> Any:
    """The trainer's model of ``shape`` on the meta device: its own modules' sizes and shapes, no memory."""
    import torch

    from seqmesh.trainer.build import hf_config
    from seqmesh.trainer.model import Transformer

    with torch.device("meta"):
        return Transformer(hf_config(run_config(shape, tokens, offload=True, resident=None).model, shape["vocab_size"]))


def _layer_flops(shape: dict[str, int], tokens: int) -> float:
    """Training FLOPs of one decoder layer of ``shape`` at one ``tokens``-long document."""
    from seqmesh.trainer.flops import train_flops

    two, one = (train_flops(_meta_model({**shape, "num_layers": n}, tokens).config, [tokens]) for n in (2, 1))
    return two - one


def measured_row(path: Path, tokens: int) -> dict[str, Any]:
    """The largest model of part (a) in ``path`` that trained at ``tokens`` with host-state layers planned."""
    rows = [r for r in json.loads(path.read_text())["rows"] if r.get("part") == "max" and "error" not in r
            and r.get("offload") and r.get("tokens") == tokens and r.get("plan", {}).get("rates_GBps")]
    if not rows:
        raise SystemExit(f"{path}: no part (a) row at {tokens} tokens with the plan's rates; name a result file of "
                         "bench/offload_params.py --parts max (e.g. bench/results/offload_params_h100_max_b1d2f39.json)")
    return max(rows, key=lambda r: r["params_billion"])


def predict(size: float, row: dict[str, Any], tokens: int, device_gb: float, headroom: float, host_gb: float,
            disk_gb: float, disk_GBps: float, peak_flops: float,
            loss_tile_tokens: int = LOSS_TILE_TOKENS) -> list[dict[str, Any]]:
    """One prediction per estimate of the layer time (from the row's measured step, and from its plan)."""
    import torch

    from seqmesh.scheduler.offload_plan import OffloadInputs, OffloadPlanError, plan_offload
    from seqmesh.trainer.build import counted_model_config
    from seqmesh.trainer.flops import train_flops
    from seqmesh.trainer.memory_model import (activation_bytes_per_token, kept_layer_bytes_per_token,
                                              layer_tile_working_bytes, loss_working_bytes, mlp_tile_working_bytes)
    from seqmesh.trainer.param_offload import STATE_BYTES

    shape = llama_shape(size)
    cfg = run_config(shape, tokens, offload=True, resident=None, update="device")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss_tile_tokens=loss_tile_tokens))
    counted = counted_model_config(cfg.model, False, torch.bfloat16 if not cfg.optim.master_weights else torch.float32)
    model = _meta_model(shape, tokens)
    dims, total_flops = model.dims, train_flops(model.config, [tokens])
    layer_flops = _layer_flops(shape, tokens)
    measured_shape = llama_shape(row["size"])
    measured_layer_flops = _layer_flops(measured_shape, tokens)
    per_layer = {  # the row's forward + backward of one layer without its recomputation (4/3 with it)
        "measured": row["phase_s"]["forward_backward"] * 1e3 / measured_shape["num_layers"] / (4 / 3),
        "plan": row["plan"]["compute_ms"] / measured_shape["num_layers"] / (4 / 3)}
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    root_params = sum(p.numel() for p in model.parameters()) - dims.num_layers * layer_params
    rates = row["plan"]["rates_GBps"]
    out = []
    for source, ms in per_layer.items():
        x = OffloadInputs(
            num_layers=dims.num_layers, layer_params=layer_params, root_params=root_params, param_bytes=2,
            state_bytes=STATE_BYTES[cfg.optim.state_dtype], state_share=1.0,
            act_bytes=activation_bytes_per_token(dims, counted) * tokens,
            device_bytes=device_gb * 1e9 * (1 - headroom), host_bytes=host_gb * 1e9, disk_bytes=disk_gb * 1e9,
            h2d_GBps=rates["copy"], disk_GBps=disk_GBps, adam_Mparams_s=None,
            layer_ms=ms * layer_flops / measured_layer_flops, checkpointing=True,
            layer_act_bytes=kept_layer_bytes_per_token(dims, cfg.model) * tokens,
            working_bytes=loss_working_bytes(dims, counted) + mlp_tile_working_bytes(dims, counted)
            + layer_tile_working_bytes(dims, counted),
            update="device", host_states=True, staged_GBps=rates.get("staged update"),
            states_GBps=rates.get("states update"))
        row_out = {"size": size, "params_billion": dims.num_layers * layer_params / 1e9 + root_params / 1e9,
                   "layer_ms_from": source, "layer_ms": x.layer_ms, "headroom": headroom,
                   "loss_tile_tokens": loss_tile_tokens,
                   "inputs": dataclasses.asdict(x)}
        try:
            plan = plan_offload(x)
        except OffloadPlanError as e:
            out.append({**row_out, "error": str(e)})
            continue
        step_s = plan.step_ms / 1e3
        out.append({**row_out, "plan": plan.as_dict(), "line": plan.report(), "step_s": step_s,
                    "mfu": total_flops / step_s / peak_flops})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=30.0, help="model size in billions (llama_shape)")
    ap.add_argument("--rates-from", type=Path, default=RESULTS / "offload_params_h100_max_b1d2f39.json")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--device", default="NVIDIA H200", help="the GPU predicted for (its bf16 peak names the MFU)")
    ap.add_argument("--device-gb", type=float, default=139.8, help="its memory (NOTES.md: an H200's 139.8 GB)")
    ap.add_argument("--headroom", type=float, nargs="+", default=[0.1, 0.05],
                    help="memory.headroom values (0.1: the run's default)")
    ap.add_argument("--host-gb", type=float, default=96.0, help="the plan's host budget (80%% of 120 GB free)")
    ap.add_argument("--disk-gb", type=float, default=60.0)
    ap.add_argument("--disk-GBps", type=float, default=1.5, help="NOTES/offload_h200: 1.5-1.9 GB/s")
    ap.add_argument("--loss-tile-tokens", type=int, nargs="+", default=[LOSS_TILE_TOKENS],
                    help="model.loss_tile_tokens values (default: the tile bench/offload_params.py runs; 0: untiled)")
    ap.add_argument("--smoke", action="store_true", help="a 1B shape, written under /tmp: checks the script")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from seqmesh.trainer.flops import peak_flops

    peak = peak_flops(args.device, "bf16")
    if not peak:
        raise SystemExit(f"no bf16 peak known for {args.device!r}; name a GPU trainer/flops.py lists")
    size = 1.0 if args.smoke else args.size
    row = measured_row(args.rates_from, args.tokens)
    rows = [r for tile in args.loss_tile_tokens for h in args.headroom
            for r in predict(size, row, args.tokens, args.device_gb, h, args.host_gb, args.disk_gb, args.disk_GBps,
                             peak, tile)]
    fitted = [r for r in rows if "error" not in r]
    summary = {"prediction": True, "size": size,
               "step_s_range": [min(r["step_s"] for r in fitted), max(r["step_s"] for r in fitted)] if fitted else None,
               "mfu_range": [min(r["mfu"] for r in fitted), max(r["mfu"] for r in fitted)] if fitted else None,
               "host_state_layers": sorted({r["plan"]["host_state_layers"] for r in fitted}),
               "streamed_layers": sorted({r["plan"]["streamed_layers"] for r in fitted})}
    config = {"kind": "PREDICTION of plan_offload, not a measurement", "device": args.device,
              "device_gb": args.device_gb, "host_gb": args.host_gb, "tokens": args.tokens,
              "rates_from": str(args.rates_from.name), "rates_row_commit": json.loads(args.rates_from.read_text())
              .get("commit"), "rates_row_size": row["size"], "peak_flops": peak}
    tag = args.device.split()[-1].lower()
    write_result("offload_predict", config, rows, summary, device=tag,
                 out_dir=Path("/tmp") if args.smoke and args.out is None else args.out)
    return summary


if __name__ == "__main__":
    main()
