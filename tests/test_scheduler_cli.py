import json

import pytest

from seqmesh.scheduler.cli import plan_main
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.plan import Plan
from seqmesh.scheduler.simulate import check_plan

EXTERNAL = {"alpha1_ms_per_tok2": 2e-6, "alpha2_ms_per_tok": 0.1, "beta_ms": 25.0,
            "a2a_GBps": {"2": 100.0, "4": 80.0, "8": 70.0}, "comm_bytes_per_token": 3e6,
            "mem_bytes_per_token": 4e5, "mem_static_bytes": 1.8e10, "mem_limit_bytes": 2.2e10}


@pytest.fixture
def files(tmp_path):
    lengths = [(37 * i * i) % 9000 + 20 for i in range(48)] + [60000]
    (tmp_path / "lengths.txt").write_text("\n".join(map(str, lengths)) + "\n")
    (tmp_path / "cost.json").write_text(json.dumps(EXTERNAL))
    return tmp_path, lengths


def test_plan_writes_one_plan_and_one_summary_per_batch(files, capsys):
    tmp, lengths = files
    out = tmp / "plans.jsonl"
    rc = plan_main(["--lengths", str(tmp / "lengths.txt"), "--gpus", "8", "--global-batch", "16",
                    "--cost-model", str(tmp / "cost.json"), "--out", str(out), "--baseline", "best-static"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    plans = [Plan.from_json(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(plans) == 3  # the 49th length is not a full batch
    cm = CostModel.from_dict(EXTERNAL)
    for k, (line, plan) in enumerate(zip(lines, plans)):
        batch = lengths[16 * k:16 * (k + 1)]
        check_plan(plan, batch, cm)
        assert line["batch"] == k and line["ratio"] >= 1.0
        assert line["predicted_ms"] == pytest.approx(plan.predicted_ms, abs=1e-3)
        assert sum(line["group_sizes"].values()) == len(plan.group_sizes())
        assert line["baseline"]["name"].startswith("static-sp=") and line["baseline"]["speedup"] >= 0.999


def test_static_baseline_and_batches_flag(files, capsys):
    tmp, _ = files
    rc = plan_main(["--lengths", str(tmp / "lengths.txt"), "--gpus", "8", "--global-batch", "16", "--batches", "1",
                    "--cost-model", str(tmp / "cost.json"), "--out", str(tmp / "p.jsonl"), "--baseline", "static-sp=2"])
    assert rc == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["baseline"]["name"] == "static-sp=2"


@pytest.mark.parametrize("argv_tail, message", [
    (["--batches", "9"], "3 full batch(es) of 16; cannot plan 9"),
    (["--baseline", "static-sp=x"], "K in static-sp=K must be an integer"),
    (["--baseline", "fastest"], "use static-sp=K"),
    (["--group-sizes", "1,two"], "--group-sizes '1,two'"),
])
def test_errors_are_messages_not_tracebacks(files, capsys, argv_tail, message):
    tmp, _ = files
    rc = plan_main(["--lengths", str(tmp / "lengths.txt"), "--gpus", "8", "--global-batch", "16",
                    "--cost-model", str(tmp / "cost.json"), "--out", str(tmp / "p.jsonl"), *argv_tail])
    assert rc == 2 and message in capsys.readouterr().err


def test_bad_lengths_file_names_the_line(tmp_path, capsys):
    (tmp_path / "l.txt").write_text("100\n\nabc\n")
    (tmp_path / "c.json").write_text(json.dumps(EXTERNAL))
    rc = plan_main(["--lengths", str(tmp_path / "l.txt"), "--gpus", "2", "--global-batch", "1",
                    "--cost-model", str(tmp_path / "c.json"), "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2 and "line 3: 'abc' is not an integer" in capsys.readouterr().err


def test_missing_cost_model_key_is_named(tmp_path, capsys):
    (tmp_path / "l.txt").write_text("100\n")
    (tmp_path / "c.json").write_text(json.dumps({k: v for k, v in EXTERNAL.items() if k != "mem_limit_bytes"}))
    rc = plan_main(["--lengths", str(tmp_path / "l.txt"), "--gpus", "2", "--global-batch", "1",
                    "--cost-model", str(tmp_path / "c.json"), "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2 and "missing key 'mem_limit_bytes'" in capsys.readouterr().err


def test_shipped_example_cost_model_plans_and_a_missing_one_points_at_it(tmp_path, capsys):
    from pathlib import Path

    from seqmesh.scheduler.cost_model import EXAMPLE

    example = Path(__file__).resolve().parents[1] / EXAMPLE
    cm = CostModel.load(example)
    assert "composition_h200x2.json" in cm.source
    committed = json.loads((example.parent.parent.parent / "bench/results/composition_h200x2.json").read_text())
    assert cm == CostModel.from_dict({**committed["config"]["cost_model"], "source": cm.source})
    (tmp_path / "l.txt").write_text("1000\n90000\n3000\n500\n")
    rc = plan_main(["--lengths", str(tmp_path / "l.txt"), "--gpus", "2", "--global-batch", "4",
                    "--cost-model", str(example), "--out", str(tmp_path / "p.jsonl")])
    assert rc == 0
    capsys.readouterr()
    rc = plan_main(["--lengths", str(tmp_path / "l.txt"), "--gpus", "2", "--global-batch", "4",
                    "--cost-model", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2 and EXAMPLE in capsys.readouterr().err


def test_certify_reports_the_gap_and_unpriced_sizes_need_the_extrapolation_flag(files, capsys):
    tmp, _ = files
    args = ["--lengths", str(tmp / "lengths.txt"), "--gpus", "16", "--global-batch", "16", "--batches", "1",
            "--cost-model", str(tmp / "cost.json"), "--out", str(tmp / "p.jsonl")]
    assert plan_main(args + ["--group-sizes", "1,2,16"]) == 2
    assert "prices all-to-all for group sizes [2, 4, 8] (a2a_GBps) but not 16" in capsys.readouterr().err
    assert plan_main(args + ["--group-sizes", "1,2,16", "--extrapolate-bandwidth", "--certify"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["lower_bound_ms"] <= line["certified_bound_ms"] * (1 + 1e-4) <= line["predicted_ms"] * (1 + 2e-4)
    assert line["gap_to_certified_bound"] == pytest.approx(line["predicted_ms"] / line["certified_bound_ms"], rel=1e-3)
