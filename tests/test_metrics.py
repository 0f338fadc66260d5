import json

import pytest
import torch

from seqmesh.trainer.metrics import MetricsLogger, aggregate_rank_timings, peak_memory, progress_postfix

KEYS = {"step", "loss", "grad_norm", "lr", "step_time_s", "tokens", "tokens_per_s", "tokens_per_s_per_device",
        "flops", "tflops_per_device", "mfu", "peak_mem_bytes", "peak_mem_source", "warmup"}


def log_three(logger: MetricsLogger) -> None:
    # Step 1 is warmup (slow); steps 2 and 3: 4000 tokens in 0.5 s + 6000 tokens in 1.5 s.
    logger.log_step(1, loss=5.0, grad_norm=2.0, lr=1e-4, step_time_s=4.0, tokens=1000, flops=8e12,
                    extra={"plan_groups": 4, "predicted_ms": torch.tensor(480.0)})
    logger.log_step(2, loss=torch.tensor(4.0), grad_norm=torch.tensor(1.5), lr=2e-4, step_time_s=0.5,
                    tokens=4000, flops=2e12, extra={"plan_groups": 2, "predicted_ms": 450.0})
    logger.log_step(3, loss=3.0, grad_norm=None, lr=3e-4, step_time_s=1.5, tokens=6000, flops=6e12,
                    peak_mem_bytes=123456)


def test_jsonl_tensorboard_progress_and_summary(tmp_path):
    logger = MetricsLogger(tmp_path, num_devices=4, peak_flops_per_device=1e12, total_steps=3, warmup_steps=1)
    log_three(logger)
    assert logger.progress_bar.n == 3
    assert logger.progress_bar.postfix == "loss=3.0000, tok_s=4000, mfu=100.0%"
    summary = logger.close(extra={"device": "cpu"})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(KEYS <= r.keys() for r in records)
    second = records[1]
    assert second["loss"] == 4.0 and second["grad_norm"] == 1.5 and second["lr"] == 2e-4
    assert second["tokens_per_s"] == pytest.approx(8000)
    assert second["tokens_per_s_per_device"] == pytest.approx(2000)
    assert second["tflops_per_device"] == pytest.approx(2e12 / 4 / 0.5 / 1e12)
    assert second["mfu"] == pytest.approx(1.0)
    assert second["peak_mem_source"] == "cpu_rss" and second["peak_mem_bytes"] > 10 * 2**20
    assert records[0]["predicted_ms"] == 480.0 and records[0]["plan_groups"] == 4
    assert [r["warmup"] for r in records] == [True, False, False]
    assert records[2]["grad_norm"] is None and records[2]["peak_mem_bytes"] == 123456

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["steps"] == 3 and summary["steps_in_means"] == 2
    assert summary["first_loss"] == 5.0 and summary["last_loss"] == 3.0 and summary["min_loss"] == 3.0
    assert summary["total_time_s"] == pytest.approx(6.0)
    assert summary["tokens"] == 11000
    assert summary["mean_tokens_per_s"] == pytest.approx(10000 / 2.0)  # warmup step left out
    assert summary["mean_tokens_per_s_per_device"] == pytest.approx(10000 / 2.0 / 4)
    assert summary["mean_tflops_per_device"] == pytest.approx(8e12 / 4 / 2.0 / 1e12)
    assert summary["mean_mfu"] == pytest.approx(1.0)
    assert summary["device"] == "cpu"

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_unknown_peak_gives_no_mfu(tmp_path):
    logger = MetricsLogger(tmp_path, num_devices=1, peak_flops_per_device=None, progress=True, tensorboard=False)
    record = logger.log_step(1, loss=2.0, grad_norm=1.0, lr=1e-3, step_time_s=1.0, tokens=10, flops=1e9)
    assert record["mfu"] is None and record["tflops_per_device"] == pytest.approx(1e-3)
    assert progress_postfix(record)["mfu"] == "n/a"
    assert logger.close()["mean_mfu"] is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] is None
    assert not (tmp_path / "tb").exists()


def test_disabled_rank_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "r1", num_devices=2, peak_flops_per_device=None, enabled=False)
    record = logger.log_step(1, loss=2.0, grad_norm=1.0, lr=1e-3, step_time_s=1.0, tokens=10, flops=1e9)
    assert record["tokens_per_s_per_device"] == 5.0
    assert logger.close()["steps"] == 1
    assert not (tmp_path / "r1").exists()


def test_resume_replaces_steps_after_the_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, num_devices=4, peak_flops_per_device=1e12, progress=False)
    log_three(first)
    first.close()
    # The run crashed after logging step 3; its checkpoint was at step 2.
    resumed = MetricsLogger(tmp_path, num_devices=4, peak_flops_per_device=1e12, resume_step=2, progress=False,
                            warmup_steps=0)
    resumed.log_step(3, loss=2.5, grad_norm=1.0, lr=3e-4, step_time_s=1.0, tokens=6000, flops=6e12)
    summary = resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 4.0), (3, 2.5)]
    assert summary["steps"] == 3 and summary["first_loss"] == 5.0 and summary["last_loss"] == 2.5


def test_bad_metrics_are_named(tmp_path):
    logger = MetricsLogger(tmp_path, num_devices=1, peak_flops_per_device=None, progress=False, tensorboard=False)
    with pytest.raises(TypeError, match="'plan'"):
        logger.log_step(1, loss=1.0, grad_norm=1.0, lr=1.0, step_time_s=1.0, tokens=1, flops=1.0,
                        extra={"plan": object()})
    with pytest.raises(ValueError, match="'loss'"):
        logger.log_step(1, loss=1.0, grad_norm=1.0, lr=1.0, step_time_s=1.0, tokens=1, flops=1.0,
                        extra={"loss": 2.0})
    with pytest.raises(ValueError, match="step_time_s"):
        logger.log_step(1, loss=1.0, grad_norm=1.0, lr=1.0, step_time_s=0.0, tokens=1, flops=1.0)
    logger.close()


def test_aggregate_rank_timings():
    out = aggregate_rank_timings([{"fwd_ms": 10.0, "comm_ms": 1.0},
                                  {"fwd_ms": 30.0, "comm_ms": 3.0, "mb2_ms": 4.0},
                                  {"fwd_ms": 20.0, "comm_ms": 2.0}])
    assert out["fwd_ms_min"] == 10.0 and out["fwd_ms_max"] == 30.0 and out["fwd_ms_mean"] == 20.0
    assert out["fwd_ms_max_rank"] == 1 and out["fwd_ms_imbalance"] == pytest.approx(1.5)
    assert out["mb2_ms_mean"] == 4.0 and out["mb2_ms_imbalance"] == 1.0
    with pytest.raises(TypeError, match="rank 1"):
        aggregate_rank_timings([{"a": 1.0}, {"a": "slow"}])
    with pytest.raises(ValueError):
        aggregate_rank_timings([])


def test_peak_memory_cpu():
    value, source = peak_memory("cpu")
    assert source == "cpu_rss" and value > 10 * 2**20


@pytest.mark.gpu
def test_peak_memory_cuda():
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    value, source = peak_memory("cuda")
    assert source == "cuda" and value >= x.numel()


def test_peak_mem_source_names_the_measurement_even_when_the_loop_passes_the_max(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, num_devices=4, peak_flops_per_device=None, progress=False, tensorboard=False)
    rec = logger.log_step(1, loss=3.0, grad_norm=1.0, lr=1e-3, step_time_s=1.0, tokens=10, flops=1.0,
                          peak_mem_bytes=123)
    assert rec["peak_mem_source"] == "cpu_rss" and rec["peak_mem_bytes"] == 123
    logger.note(val_loss=2.5)
    rec = logger.log_step(2, loss=3.0, grad_norm=1.0, lr=1e-3, step_time_s=1.0, tokens=10, flops=1.0,
                          extra={"plan_group_sizes": [1, 1, 2]})
    assert rec["val_loss"] == 2.5
    assert progress_postfix(rec)["groups"] == "2+1+1" and progress_postfix(rec)["val"] == "2.5000"
    assert "val_loss" not in logger.log_step(3, loss=3.0, grad_norm=1.0, lr=1e-3, step_time_s=1.0, tokens=10, flops=1.0)
    assert logger.close()["val_loss"] == 2.5
