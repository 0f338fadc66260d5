"""``seqmesh report``: a PNG and a self-contained HTML page from a run directory whose records carry
every optional figure (the report of a real run is made in tests/test_launch_cluster.py)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib.image
import pytest

from seqmesh.launch.report import load_run, report_main, write_report
from seqmesh.scheduler import default_cost_model
from seqmesh.scheduler.cost_model import CostModel


def _check_outputs(png: Path, page: Path) -> str:
    image = matplotlib.image.imread(png)
    assert image.shape[0] >= 800 and image.shape[1] >= 1800
    assert image[..., :3].std() > 0.05  # not a blank canvas
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text) and "<script" not in text
    embedded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text).group(1)
    assert base64.b64decode(embedded) == png.read_bytes()
    return text


def _rich_run(run_dir: Path) -> None:
    """Records with every optional figure: per-rank timings and predictions (rank 1 slow), MFU, GPU samples."""
    run_dir.mkdir()
    lines = []
    for step in range(1, 9):
        compute = [0.10, 0.18, 0.10, 0.11]
        lines.append({"step": step, "loss": 5 - 0.3 * step, "step_time_s": 0.25, "tokens": 4096,
                      "tokens_per_s": 16384.0, "mfu": 0.3 + 0.01 * step, "warmup": step == 1,
                      "plan_predicted_ms": 210.0, "plan_group_sizes": [1, 1, 2],
                      "rank_predicted_ms": [100.0, 100.0, 100.0, 100.0],
                      "rank_timings": {"compute_s": compute, "reduce_s": [0.09, 0.01, 0.09, 0.08],
                                       "optimizer_s": [0.02] * 4, "plan_wait_s": [0.0] * 4}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "summary.json").write_text(json.dumps({"mean_tokens_per_s": 16384.0, "mean_mfu": 0.34,
                                                      "peak_mem_bytes": 2**33, "resumed_from": 0, "num_devices": 4}))
    (run_dir / "monitor").mkdir()
    for rank in range(2):
        samples = [{"elapsed_s": t, "rank": rank, "cpu": {"process_util_pct": 99.0}, "note": None,
                    "gpu": {"util_pct": 80 + rank + t % 7, "index": rank}} for t in range(20)]
        (run_dir / "monitor" / f"rank{rank}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_report_with_every_figure_and_speed_factors_for_the_scheduler(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    _rich_run(run_dir)
    cm_path, out_path = tmp_path / "cm.json", tmp_path / "cm_measured.json"
    default_cost_model(params=5e6, hidden_size=256, num_layers=6, device_flops=1e12,
                       mem_limit_bytes=8 * 2**30).save(cm_path)
    assert report_main([str(run_dir), "--out", str(tmp_path / "out"), "--cost-model", str(cm_path),
                        "--speed-out", str(out_path)]) == 0
    printed = capsys.readouterr().out
    assert "stragglers: ranks [1]" in printed
    text = _check_outputs(tmp_path / "out" / "report.png", tmp_path / "out" / "report.html")
    assert text.count("<tr class=slow>") == 1 and "speed factor" in text
    # rates predicted/measured = 1, 1/1.8, 1, 1/1.1; divided by their median (1 + 1/1.1) / 2
    median = (1 + 1 / 1.1) / 2
    assert CostModel.load(out_path).speed == pytest.approx([1 / median, 1 / 1.8 / median, 1 / median, 1 / 1.1 / median],
                                                           abs=1e-4)


def test_report_refuses_a_directory_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a seqmesh run directory"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')
    with pytest.raises(ValueError, match="no complete step record"):
        load_run(tmp_path)


def test_report_main_on_a_directory_without_a_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "seqmesh report: error:" in err and "not a seqmesh run directory" in err and "Traceback" not in err


def test_report_of_a_cpu_run_smooths_the_loss_shows_val_loss_and_no_mfu_panel(tmp_path: Path) -> None:
    from seqmesh.launch.report import _smoothed, render_png

    assert _smoothed([4.0, 4.0, 4.0], 5) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected: no pull towards 0
    smooth = _smoothed([0.0, 10.0] * 20, 9)
    assert 3 < min(smooth[10:]) and max(smooth[10:]) < 7
    run_dir = tmp_path / "cpu"
    run_dir.mkdir()
    lines = [{"step": s, "loss": 6 - 0.01 * s + (0.5 if s % 2 else -0.5), "step_time_s": 1.0, "tokens": 3000,
              "tokens_per_s": 3000.0, "mfu": None, "warmup": s == 1, "plan_group_sizes": [4] if s % 3 else [1, 1, 2],
              **({"val_loss": 6.2 - 0.01 * s} if s % 10 == 0 else {})} for s in range(1, 41)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": 5.8, "num_devices": 4}))
    run = load_run(run_dir)
    import matplotlib.pyplot as plt

    figures = []
    real_savefig = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k))[1]
    try:
        render_png(run)
    finally:
        plt.Figure.savefig = real_savefig
    titles = [ax.get_title() for ax in figures[0].axes]
    assert "MFU" not in titles and "loss" in titles and "plans: SP group sizes used per step" in titles
    loss_ax = figures[0].axes[titles.index("loss")]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels[0] == "train (raw)" and labels[1].startswith("train (EMA") and "validation" in labels
    assert loss_ax.get_lines()[2].get_xdata().tolist() == [10, 20, 30, 40]
    step_axes = [figures[0].axes[titles.index(t)] for t in ("loss", "throughput", "plans: SP group sizes used per step")]
    assert all(ax.get_shared_x_axes().joined(step_axes[0], ax) for ax in step_axes)
    png, page = write_report(run)
    assert "validation loss" in page.read_text() and "5.8" in page.read_text()
