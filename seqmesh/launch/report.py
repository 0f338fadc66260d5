"""``seqmesh report RUN_DIR``: one PNG and one self-contained HTML page of a run.

Everything comes from the run directory (``metrics.jsonl``, ``summary.json``, ``config.yaml``,
``monitor/rank*.jsonl``), so a report can be made for a run still in progress, on any machine,
without torch.distributed or Ray. The HTML embeds the picture as base64 and has no external
links or scripts: it can be mailed or attached to an issue as one file.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import statistics
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from seqmesh.launch.stragglers import mean_breakdown, speed_factors, stragglers, with_measured_speed
from seqmesh.trainer.metrics import read_jsonl

STRAGGLER_THRESHOLD = 0.9
_COLORS = {"plan_wait": "#b0b0b0", "compute": "#4c72b0", "sp_comm": "#64b5cd", "offload_wait": "#8172b2",
           "grad_reduce": "#dd8452", "optimizer": "#55a868", "idle": "#c44e52"}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The run's records: metrics, summary, config text and monitor samples per rank."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: {run_dir} is not a seqmesh run directory, or its "
                                f"run has not logged a step yet")
    records = read_jsonl(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no complete step record yet; make the report after the first step")
    summary_path = run_dir / "summary.json"
    monitor = {}
    for path in sorted((run_dir / "monitor").glob("rank*.jsonl")):
        samples = read_jsonl(path)
        if samples:
            monitor[int(path.stem.removeprefix("rank"))] = samples
    return {"run_dir": run_dir, "records": records,
            "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
            "config": (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else "",
            "monitor": dict(sorted(monitor.items()))}


def _speed(records: list[dict[str, Any]]) -> list[float] | None:
    try:
        return speed_factors(records)
    except ValueError:
        return None


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, textwrap.fill(text, 44), ha="center", va="center", fontsize=9, color="#555",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _series(ax: Any, records: list[dict[str, Any]], key: str, scale: float, title: str, ylabel: str) -> None:
    points = [(r["step"], r[key] * scale) for r in records if isinstance(r.get(key), (int, float))]
    ax.set_title(title)
    if not points:
        _note(ax, f"no {key} in metrics")
        return
    ax.plot(*zip(*points), color="#4c72b0", lw=1.5, marker="." if len(points) < 60 else None)
    warm = [(s, v) for (s, v), r in zip(points, records) if r.get("warmup")]
    if warm:
        ax.plot(*zip(*warm), ls="", marker="o", mfc="none", color="#999", label="warmup")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average with the weight of a ``span``-step window (alpha = 2 / (span + 1)),
    bias-corrected so the first steps are not pulled towards zero."""
    alpha, avg, norm, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg, norm = (1 - alpha) * avg + alpha * v, (1 - alpha) * norm + alpha
        out.append(avg / norm)
    return out


def _loss(ax: Any, records: list[dict[str, Any]]) -> None:
    """Training loss, raw (faint) and smoothed; validation loss as points where it was evaluated."""
    points = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    ax.set_title("loss")
    if not points:
        _note(ax, "no loss in metrics")
        return
    steps, values = zip(*points)
    span = max(1, min(50, len(values) // 10))
    ax.plot(steps, values, color="#4c72b0", lw=0.8, alpha=0.3, label="train (raw)")
    ax.plot(steps, _smoothed(list(values), span), color="#4c72b0", lw=1.8, label=f"train (EMA, {span} steps)")
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if val:
        ax.plot(*zip(*val), ls="--", marker="o", color="#dd8452", label="validation")
    ax.legend(fontsize=8)
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)


def _breakdown(ax: Any, parts: dict[str, list[float]]) -> None:
    ax.set_title("per-rank step time (mean per step)")
    if not parts:
        _note(ax, "no per-rank timings (rank_timings) in metrics.jsonl")
        return
    ranks = list(range(len(next(iter(parts.values())))))
    bottom = [0.0] * len(ranks)
    for key, values in parts.items():
        ms = [1e3 * v for v in values]
        ax.bar(ranks, ms, bottom=bottom, label=key, color=_COLORS.get(key))
        bottom = [b + v for b, v in zip(bottom, ms)]
    ax.set_xlabel("rank")
    ax.set_ylabel("ms")
    ax.set_xticks(_rank_ticks(len(ranks)))
    ax.set_ylim(0, 1.3 * max(bottom))  # headroom for the legend
    ax.legend(fontsize=7, ncol=3, loc="upper center")


def _rank_ticks(world: int) -> list[int]:
    return list(range(0, world, max(1, world // 16)))


def _group_sizes(ax: Any, records: list[dict[str, Any]]) -> None:
    """The plan of every step: a dot per (step, SP group size) used, its area the number of such groups."""
    counts = Counter(size for r in records for size in r.get("plan_group_sizes") or ())
    ax.set_title("plans: SP group sizes used per step")
    if not counts:
        _note(ax, "no plan_group_sizes in metrics")
        return
    dots = [(r["step"], d, n) for r in records for d, n in Counter(r.get("plan_group_sizes") or ()).items()]
    steps, sizes, n = zip(*dots)
    ax.scatter(steps, sizes, s=[12 * k for k in n], color="#8172b2", alpha=0.6)
    ax.set_yscale("log", base=2)
    ax.set_yticks(sorted(counts), [str(d) for d in sorted(counts)])
    ax.set_ylim(min(counts) / 1.5, max(counts) * 1.5)
    ax.set_ylabel("group size (ranks)")
    ax.legend(handles=[], title="groups in all steps: " + ", ".join(f"{counts[d]} of {d}" for d in sorted(counts)),
              title_fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)


def _predicted(ax: Any, records: list[dict[str, Any]]) -> None:
    """Warmup steps (compilation, allocator growth) are left out: no cost model predicts them."""
    pairs = [(r["plan_predicted_ms"], 1e3 * r["step_time_s"]) for r in records
             if isinstance(r.get("plan_predicted_ms"), (int, float)) and r["plan_predicted_ms"] > 0
             and not r.get("warmup")]
    ax.set_title("plan's predicted vs measured step time")
    if not pairs:
        _note(ax, "no plan_predicted_ms in metrics after warmup")
        return
    xs, ys = zip(*pairs)
    ax.scatter(xs, ys, color="#4c72b0", s=14)
    hi = max(max(xs), max(ys)) * 1.05
    ax.plot([0, hi], [0, hi], ls="--", color="#555", lw=1, label="measured = predicted")
    err = statistics.fmean(abs(p - m) / m for p, m in pairs)
    ax.legend(fontsize=8, title=f"{len(pairs)} steps after warmup, mean |error| {100 * err:.0f}%", title_fontsize=8)
    ax.set_xlabel("predicted ms")
    ax.set_ylabel("measured ms")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.grid(alpha=0.3)


def _speed_panel(ax: Any, factors: list[float] | None) -> None:
    ax.set_title("per-rank speed factors (1 = median rank)")
    if factors is None:
        _note(ax, "needs rank_timings and rank_predicted_ms in metrics")
        return
    slow = set(stragglers(factors, STRAGGLER_THRESHOLD))
    ax.bar(range(len(factors)), factors, color=["#c44e52" if r in slow else "#55a868" for r in range(len(factors))])
    ax.axhline(STRAGGLER_THRESHOLD, ls="--", color="#c44e52", lw=1, label=f"straggler < {STRAGGLER_THRESHOLD}")
    ax.set_xlabel("rank")
    ax.set_xticks(_rank_ticks(len(factors)))
    ax.legend(fontsize=8)


def _utilization(ax: Any, monitor: dict[int, list[dict[str, Any]]]) -> None:
    if not monitor:
        ax.set_title("device utilisation")
        _note(ax, "no monitor samples (launch.monitor_interval_s=0?)")
        return
    gpu = any(s.get("gpu") for samples in monitor.values() for s in samples)
    ax.set_title("GPU utilisation" if gpu else "CPU utilisation per worker (no GPU)")
    for rank, samples in monitor.items():
        points = [(s["elapsed_s"], (s["gpu"] or {}).get("util_pct") if gpu else s["cpu"].get("process_util_pct"))
                  for s in samples]
        points = [(t, v) for t, v in points if isinstance(v, (int, float))]
        if points:
            ax.plot(*zip(*points), lw=1, label=f"rank {rank}")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("%")
    if len(monitor) <= 8:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def render_png(run: dict[str, Any]) -> bytes:
    """The report's figure as PNG bytes (eight panels, see README "Run report")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run["records"]
    has_mfu = any(isinstance(r.get("mfu"), (int, float)) for r in records)
    # Left column: every per-step panel, stacked on one shared step axis; right: the run-wide panels.
    fig = plt.figure(figsize=(20, 12))
    grid = fig.add_gridspec(4 if has_mfu else 3, 3, width_ratios=(2, 1, 1))
    loss = fig.add_subplot(grid[0, 0])
    tok, groups = (fig.add_subplot(grid[k, 0], sharex=loss) for k in (1, 2))
    _loss(loss, records)
    _series(tok, records, "tokens_per_s", 1.0, "throughput", "tokens/s (all devices)")
    _group_sizes(groups, records)
    step_axes = [loss, tok, groups]
    if has_mfu:  # no panel at all when the device's peak is unknown (MFU null), rather than an empty one
        step_axes.append(fig.add_subplot(grid[3, 0], sharex=loss))
        _series(step_axes[-1], records, "mfu", 100.0, "MFU", "% of dense bf16 peak")
    for ax in step_axes:
        ax.set_xlabel("")
        ax.tick_params(labelbottom=False)
    step_axes[-1].set_xlabel("step")
    step_axes[-1].tick_params(labelbottom=True)
    rows = grid.nrows
    parts, pred = fig.add_subplot(grid[:rows // 2, 1]), fig.add_subplot(grid[rows // 2:, 1])
    speed, util = fig.add_subplot(grid[:rows // 2, 2]), fig.add_subplot(grid[rows // 2:, 2])
    _breakdown(parts, mean_breakdown(records))
    _predicted(pred, records)
    _speed_panel(speed, _speed(records))
    _utilization(util, run["monitor"])
    fig.suptitle(f"seqmesh run {run['run_dir'].name}: {len(records)} steps", fontsize=14)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return html.escape(str(value))


def render_html(run: dict[str, Any], png: bytes) -> str:
    """A self-contained page: headline figures, the picture, per-rank table, monitor notes, config."""
    records, summary = run["records"], run["summary"] or {}
    last = records[-1]
    headline = {"steps logged": len(records), "last step": last["step"], "last loss": last["loss"],
                "validation loss": summary.get("val_loss", next((r["val_loss"] for r in reversed(records)
                                                                 if r.get("val_loss") is not None), None)),
                "mean tokens/s": summary.get("mean_tokens_per_s"), "mean MFU": summary.get("mean_mfu"),
                "peak memory (GiB)": None if summary.get("peak_mem_bytes") is None else summary["peak_mem_bytes"] / 2**30,
                "resumed from step": summary.get("resumed_from"), "devices": summary.get("num_devices")}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{'&ndash;' if v is None else _fmt(v)}</td></tr>"
                   for k, v in headline.items())
    if not summary:
        rows += "<tr><th>status</th><td>no summary.json: the run is in progress or did not finish</td></tr>"
    parts, factors = mean_breakdown(records), _speed(records)
    rank_table = ""
    if parts:
        keys = list(parts)
        world = len(parts[keys[0]])
        head = "".join(f"<th>{html.escape(k)} ms</th>" for k in keys) + ("<th>speed factor</th>" if factors else "")
        body = ""
        for r in range(world):
            slow = factors is not None and factors[r] < STRAGGLER_THRESHOLD
            cells = "".join(f"<td>{1e3 * parts[k][r]:.1f}</td>" for k in keys)
            cells += f"<td>{factors[r]:.3f}</td>" if factors else ""
            body += f"<tr{' class=slow' if slow else ''}><th>{r}</th>{cells}</tr>"
        rank_table = (f"<h2>Per-rank breakdown (mean per step, after warmup)</h2><table><tr><th>rank</th>{head}</tr>"
                      f"{body}</table><p>Speed factors below {STRAGGLER_THRESHOLD} mark stragglers; "
                      f"<code>seqmesh report RUN_DIR --cost-model IN.json --speed-out OUT.json</code> writes them into a "
                      f"cost model for the scheduler.</p>")
    notes = sorted({s["note"] for samples in run["monitor"].values() for s in samples if s.get("note")})
    if not run["monitor"]:
        notes = ["no monitor samples (launch.monitor_interval_s=0?)"]
    elif not notes:
        notes = [f"NVML samples of {len(run['monitor'])} workers' GPUs in monitor/rank*.jsonl"]
    monitor = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    image = base64.b64encode(png).decode()
    title = html.escape(f"seqmesh report: {run['run_dir']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}tr.slow{{background:#fbe3e4}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>{title}</h1>
<table>{rows}</table>
<img alt="loss, throughput, MFU, per-rank breakdown, group sizes, predicted vs measured, speed factors, utilisation"
 src="data:image/png;base64,{image}">
{rank_table}
<h2>Monitor</h2><ul>{monitor}</ul>
<h2>Configuration</h2><pre>{html.escape(run["config"] or "(no config.yaml in the run directory)")}</pre>
</body></html>
"""


def write_report(run_dir: str | Path | dict[str, Any], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` (into the run directory unless ``out_dir``) of a run
    directory or of what ``load_run`` read from one."""
    run = run_dir if isinstance(run_dir, dict) else load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run["run_dir"]
    out.mkdir(parents=True, exist_ok=True)
    png = render_png(run)
    png_path, html_path = out / "report.png", out / "report.html"
    png_path.write_bytes(png)
    html_path.write_text(render_html(run, png))
    return png_path, html_path


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seqmesh report", description="Write report.png and report.html of a run.")
    parser.add_argument("run_dir", help="the run directory (run_dir= of the training job)")
    parser.add_argument("--out", help="folder for the report files (default: the run directory)")
    parser.add_argument("--cost-model", help="a cost model JSON to combine with this run's measured speed factors")
    parser.add_argument("--speed-out", help="where to write that cost model with the measured speed factors")
    args = parser.parse_args(argv)
    if bool(args.cost_model) != bool(args.speed_out):
        parser.error("--cost-model and --speed-out go together: the cost model to update and where to write it")
    try:
        run = load_run(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"seqmesh report: error: {e}", file=sys.stderr)
        return 2
    png, page = write_report(run, args.out)
    print(f"wrote {png} and {page}")
    records = run["records"]
    factors = _speed(records)
    if factors is not None:
        slow = stragglers(factors, STRAGGLER_THRESHOLD)
        print("speed factors: " + " ".join(f"{f:.3f}" for f in factors)
              + (f"; stragglers: ranks {slow}" if slow else "; no straggler"))
    if args.cost_model:
        from seqmesh.scheduler.cost_model import CostModel

        updated = with_measured_speed(CostModel.load(args.cost_model), records)
        updated.save(args.speed_out)
        print(f"wrote {args.speed_out}: use it with scheduler.cost_model={args.speed_out}")
    return 0
