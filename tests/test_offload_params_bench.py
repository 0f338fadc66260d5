"""bench/offload_params.py's parts on the CPU: the shapes it sizes, a trial with and without offload, the SR gap."""

from __future__ import annotations

import math

import pytest
import torch

from bench.offload_params import TINY, llama_shape, sr_gap, trial


@pytest.mark.parametrize("billions", [8, 13, 30, 70])
def test_llama_shapes_have_the_size_asked_for(billions: float) -> None:
    from seqmesh.trainer.model import Transformer, tiny_config

    s = llama_shape(billions)
    with torch.device("meta"):
        model = Transformer(tiny_config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                                        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                                        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                                        tie_word_embeddings=False))
    n = sum(p.numel() for p in model.parameters())
    # whole layers: within half a layer of the target, plus the table's 3% step
    per_layer = (n - 2 * s["vocab_size"] * s["hidden_size"]) / s["num_layers"]
    assert abs(n - billions * 1e9) <= per_layer / 2 + 0.03 * billions * 1e9


def test_trial_with_offload_trains_the_resident_model_bit_for_bit() -> None:
    resident = trial(dict(TINY), 128, 2, offload=False, resident=None, device_name="cpu")
    offloaded = trial(dict(TINY), 128, 2, offload=True, resident=0, device_name="cpu")
    assert offloaded["losses"] == resident["losses"] and len(resident["losses"]) == 3
    assert offloaded["plan"]["streamed_layers"] == TINY["num_layers"] and resident["plan"] is None
    assert offloaded["mfu"] is None  # no peak FLOP/s for a CPU


def test_sr_gap_pairs_the_two_runs_of_each_seed() -> None:
    out = sr_gap(dict(TINY, num_layers=1), steps=25, seeds=2, tokens=64, device_name="cpu")
    assert len(out["gaps_pct"]) == 2 and all(math.isfinite(g) for g in out["gaps_pct"])
    assert out["mean_gap_pct"] == pytest.approx(sum(out["gaps_pct"]) / 2)


ISSUE_KEYS = {"max_params_billion", "mfu_at_max", "fits_without_offload_at_max", "param_offload_overhead_pct_8b_8k",
              "param_offload_overhead_pct_8b_32k", "single_sequence_tokens", "working_set_kb_per_token_512k",
              "bf16_sr_loss_gap_pct"}


def test_smoke_run_writes_every_summary_key_of_the_issue(tmp_path) -> None:
    """``--smoke`` end to end (trials in subprocesses, as on a GPU), then one part again with ``--merge``."""
    import json

    from bench.offload_params import main

    summary = main(["--smoke", "--steps", "1", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "offload_params_cpu.json").read_text())
    assert set(record["summary"]) == ISSUE_KEYS and record["summary"] == summary
    assert summary["max_params_billion"] > 0 and summary["fits_without_offload_at_max"] is True  # no limit on a CPU
    assert {r["part"] for r in record["rows"]} == {"max", "overhead", "sr"}
    assert not any("error" in r for r in record["rows"])
    main(["--smoke", "--steps", "1", "--parts", "sr", "--merge", "--out", str(tmp_path)])
    merged = json.loads((tmp_path / "offload_params_cpu.json").read_text())
    assert set(merged["summary"]) == ISSUE_KEYS and len(merged["config"]["runs"]) == 2
    assert [r for r in merged["rows"] if r["part"] != "sr"] == [r for r in record["rows"] if r["part"] != "sr"]


def test_max_summary_takes_the_largest_size_that_trained_over_several_commands() -> None:
    from bench.offload_params import max_summary

    rows = [{"part": "max", "size": 13.1, "params_billion": 13.1, "mfu": 0.2},
            {"part": "max", "without_offload": True, "size": 13.1, "params_billion": 13.1, "mfu": 0.3},
            {"part": "max", "size": 20.2, "params_billion": 20.2, "mfu": 0.1},
            {"part": "max", "without_offload": True, "size": 20.2, "error": "CUDA out of memory"},
            {"part": "max", "size": 30.1, "error": "offload.params=cpu: host memory must hold ..."}]
    assert max_summary(rows) == {"max_params_billion": 20.2, "mfu_at_max": 0.1, "fits_without_offload_at_max": False}
    assert max_summary(rows[:2])["fits_without_offload_at_max"] is True
    assert max_summary(rows[4:]) == dict.fromkeys(("max_params_billion", "mfu_at_max", "fits_without_offload_at_max"))


def test_sequence_keys_come_from_the_devices_single_sequence_runs(tmp_path) -> None:
    """The longest sequence of any ``bench/offload.py --doc-tokens 0`` run of the device, the 512K working set of
    the newest that measured it; packed-document runs, other devices and other benchmarks are not read."""
    import json

    from bench.offload_params import sequence_summary

    def record(name: str, device: str, doc_tokens: int, date: str, tokens: int | None, kb: float | None,
               benchmark: str = "offload") -> None:
        (tmp_path / name).write_text(json.dumps({
            "benchmark": benchmark, "device": device, "date": date, "commit": name[:7],
            "config": {"doc_tokens": doc_tokens},
            "summary": {"single_sequence_tokens": tokens, "working_set_kb_per_token_512k": kb}}))

    assert sequence_summary(tmp_path, "h100") == (
        {"single_sequence_tokens": None, "working_set_kb_per_token_512k": None}, [])
    record("offload_h100_a.json", "h100", 0, "2026-12-05T18:00:00+00:00", 524288, 127.3)
    record("offload_h100_b.json", "h100", 0, "2026-12-06T20:00:00+00:00", 1048576, None)
    record("offload_h100_c.json", "h100", 0, "2026-12-06T21:00:00+00:00", 524288, 80.1)
    record("offload_h100_docs.json", "h100", 16384, "2026-12-07T00:00:00+00:00", 2097152, 10.0)
    record("offload_h100x2.json", "h100x2", 0, "2026-12-07T00:00:00+00:00", 4194304, 5.0)
    summary, sources = sequence_summary(tmp_path, "h100")
    assert summary == {"single_sequence_tokens": 1048576, "working_set_kb_per_token_512k": 80.1}
    assert [(s["key"], s["file"]) for s in sources] == [("single_sequence_tokens", "offload_h100_b.json"),
                                                       ("working_set_kb_per_token_512k", "offload_h100_c.json")]


def test_max_summary_pairs_the_run_without_host_state_layers() -> None:
    """``--compare-host-states``: the baseline row never counts as the largest model, and the summary gives the
    ratio of its step to the step of the same size with host-state layers."""
    from bench.offload_params import max_summary

    rows = [{"part": "max", "size": 13.1, "params_billion": 13.1, "mfu": 0.4, "step_s": 1.6},
            {"part": "max", "baseline": "no_host_states", "size": 13.1, "params_billion": 13.1, "mfu": 0.32,
             "step_s": 2.0}]
    summary = max_summary(rows)
    assert summary["mfu_at_max"] == 0.4 and summary["host_states_speedup_at_max"] == pytest.approx(1.25)
    assert "host_states_speedup_at_max" not in max_summary(rows[:1])


def test_staged_update_summary_compares_each_kind_with_its_default_and_the_link() -> None:
    from bench.staged_update import summarize
    from seqmesh.trainer.optim.fp8_adamw import STAGED_CHUNK_ELEMS, STAGED_IN_FLIGHT

    big = 2 * STAGED_CHUNK_ELEMS
    rows = [{"case": "copy_one_way", "GBps": 54.0}, {"case": "copy_both_ways", "GBps": 40.0},
            {"case": "states", "in_flight": STAGED_IN_FLIGHT, "chunk_elems": STAGED_CHUNK_ELEMS, "GBps": 30.0},
            {"case": "states", "in_flight": STAGED_IN_FLIGHT + 1, "chunk_elems": big, "GBps": 36.0},
            {"case": "streamed", "in_flight": STAGED_IN_FLIGHT, "chunk_elems": STAGED_CHUNK_ELEMS, "GBps": 44.0}]
    out = summarize(rows)
    assert out["copy_one_way_GBps"] == 54.0 and out["copy_both_ways_GBps"] == 40.0
    assert out["states_best_GBps"] == 36.0 and out["states_best_in_flight"] == STAGED_IN_FLIGHT + 1
    assert out["states_best_chunk_elems"] == big
    assert out["states_best_over_default"] == pytest.approx(1.2)
    assert out["states_default_over_both_ways"] == pytest.approx(0.75)
    assert out["streamed_best_over_default"] == pytest.approx(1.0)


def test_offload_predict_runs_the_plan_on_measured_rates(tmp_path) -> None:
    """``bench/offload_predict.py`` (a prediction, labelled so) on a committed measured row: one row per layer-time
    estimate and headroom, each the plan's own line, and an MFU from the named GPU's peak."""
    import json

    from bench.offload_predict import main

    summary = main(["--smoke", "--headroom", "0.1", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "offload_predict_h200.json").read_text())
    assert record["config"]["kind"].startswith("PREDICTION") and summary["prediction"] is True
    assert [r["layer_ms_from"] for r in record["rows"]] == ["measured", "plan"]
    for row in record["rows"]:
        assert row["line"].startswith("offload plan: ") and 0 < row["mfu"] < 1
        assert row["step_s"] == row["plan"]["step_ms"] / 1e3
    assert summary["mfu_range"][0] <= summary["mfu_range"][1]
