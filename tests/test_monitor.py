"""The per-worker monitor: CPU-only machines get a "no GPU" note and CPU figures; NVML figures are
decoded and exported (checked against a fake NVML here, against the real one on a GPU); outputs go to
JSONL, TensorBoard and a loopback Prometheus endpoint."""

from __future__ import annotations

import json
import types
import urllib.request
from pathlib import Path

import pytest
import torch

from seqmesh.launch.monitor import JsonlFollower, Monitor, NvmlSampler, decode_clock_reasons


def _scrape(monitor: Monitor) -> str:
    return urllib.request.urlopen(monitor.info["prometheus"], timeout=10).read().decode()


def test_cpu_only_worker_records_cpu_figures_and_a_no_gpu_note(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path, rank=1, local_rank=0, device=torch.device("cpu"), interval_s=0.05, prometheus_port=0)
    monitor.start()
    monitor.stop()
    samples = [json.loads(line) for line in (tmp_path / "monitor" / "rank1.jsonl").read_text().splitlines()]
    assert len(samples) >= 2
    for s in samples:
        assert s["gpu"] is None and s["note"].startswith("no GPU") and s["rank"] == 1
        assert s["cpu"]["process_rss_bytes"] > 0 and s["cpu"]["node_mem_total_bytes"] > 0
    info = json.loads((tmp_path / "monitor" / "rank1.json").read_text())
    assert info["pid"] > 0 and info["note"] == samples[0]["note"]
    assert info["prometheus"].startswith("http://127.0.0.1:")
    assert list((tmp_path / "tb" / "monitor" / "rank1").glob("events.out.tfevents.*"))


def test_prometheus_endpoint_on_loopback_with_training_figures_on_rank0(tmp_path: Path) -> None:
    record = {"step": 7, "loss": 2.5, "tokens_per_s": 1234.0, "mfu": 0.31, "step_time_s": 0.5,
              "plan_predicted_ms": 400.0, "rank_timings": {"compute_s": [0.3, 0.45]}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n" + '{"step": 8, "lo')  # 2nd line mid-write
    monitor = Monitor(tmp_path, rank=0, local_rank=0, device=torch.device("cpu"), interval_s=60, prometheus_port=0,
                      follow_metrics=True, tensorboard=False)
    try:
        assert monitor.exporter._server.server_address[0] == "127.0.0.1"
        monitor.sample_once()
        text = _scrape(monitor)
    finally:
        monitor.stop()
    assert 'seqmesh_worker_has_gpu{host="' in text and 'rank="0"} 0.0' in text
    assert "seqmesh_process_resident_memory_bytes{" in text
    assert 'seqmesh_train_step{host=' in text and "} 7.0" in text
    assert "seqmesh_train_mfu_ratio{" in text and "} 0.31" in text
    assert "seqmesh_train_plan_predicted_seconds{" in text and "} 0.4" in text
    assert 'of_rank="1"' in text and "} 0.45" in text


def test_zero_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="monitor_interval_s=0 means no monitor"):
        Monitor(tmp_path, rank=0, local_rank=0, device=torch.device("cpu"), interval_s=0)


def test_decode_clock_reasons() -> None:
    assert decode_clock_reasons(0) == []
    assert decode_clock_reasons(0x1 | 0x4 | 0x40) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert decode_clock_reasons(0x200) == ["bit_0x200"]


class _NVMLError(Exception):
    pass


class _Timeout(_NVMLError):
    pass


def _fake_nvml(xids: list[int], ecc_supported: bool = True) -> types.SimpleNamespace:
    """Just enough of pynvml for one GPU; ECC can be 'not supported', as on consumer GPUs."""
    pending = list(xids)

    def wait(events, timeout_ms):
        if not pending:
            raise _Timeout("timeout")
        return types.SimpleNamespace(eventData=pending.pop(0))

    def ecc(handle, kind, counter):
        if not ecc_supported:
            raise _NVMLError("not supported")
        return 3 if kind == 0 else 0

    return types.SimpleNamespace(
        NVMLError=_NVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_MEMORY_ERROR_TYPE_CORRECTED=0,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1, NVML_VOLATILE_ECC=0, nvmlEventTypeXidCriticalError=8,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetIndex=lambda h: 3,
        nvmlDeviceGetHandleByUUID=lambda uuid: "h", nvmlDeviceGetName=lambda h: "NVIDIA H100",
        nvmlDeviceGetUUID=lambda h: "GPU-1234", nvmlEventSetCreate=lambda: "events",
        nvmlDeviceRegisterEvents=lambda h, kind, events: None, nvmlEventSetWait_v2=wait,
        nvmlEventSetFree=lambda events: None,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=70 * 2**30, total=80 * 2**30),
        nvmlDeviceGetPowerUsage=lambda h: 612_500, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetTemperature=lambda h, sensor: 71, nvmlDeviceGetClockInfo=lambda h, clock: 1755,
        nvmlDeviceGetMaxClockInfo=lambda h, clock: 1980,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4 | 0x20, nvmlDeviceGetTotalEccErrors=ecc,
    )


def test_nvml_sample_is_decoded_into_units(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="1234"))
    sampler, note = NvmlSampler.open(torch.device("cuda", 0), _fake_nvml([79, 48]))
    assert note is None and sampler.index == 3 and sampler.name == "NVIDIA H100"
    s = sampler.sample()
    assert (s["util_pct"], s["mem_util_pct"], s["temperature_c"], s["sm_clock_mhz"]) == (87, 40, 71, 1755)
    assert s["power_w"] == 612.5 and s["power_limit_w"] == 700.0 and s["mem_used_bytes"] == 70 * 2**30
    assert s["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert (s["ecc_corrected"], s["ecc_uncorrected"]) == (3, 0)
    assert s["xid_events"] == [79, 48] and sampler.sample()["xid_events"] == []  # each event reported once


def test_unsupported_nvml_queries_read_none_and_nvml_failure_is_a_note(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="1234"))
    sampler, _ = NvmlSampler.open(torch.device("cuda", 0), _fake_nvml([], ecc_supported=False))
    s = sampler.sample()
    assert s["ecc_corrected"] is None and s["util_pct"] == 87

    broken = _fake_nvml([])

    def no_driver():
        raise _NVMLError("Driver Not Loaded")

    broken.nvmlInit = no_driver
    sampler, note = NvmlSampler.open(torch.device("cuda", 0), broken)
    assert sampler is None and "NVML is unavailable" in note and "Driver Not Loaded" in note


def test_gpu_samples_reach_prometheus(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="1234"))
    monitor = Monitor(tmp_path, rank=2, local_rank=0, device=torch.device("cuda", 0), interval_s=60,
                      prometheus_port=0, tensorboard=False, nvml=_fake_nvml([79]))
    try:
        record = monitor.sample_once()
        text = _scrape(monitor)
    finally:
        monitor.stop()
    assert record["note"] is None and record["gpu"]["util_pct"] == 87
    assert 'seqmesh_gpu_utilization_ratio{gpu="3",host=' in text and "} 0.87" in text
    assert "seqmesh_gpu_sm_clock_hertz{" in text and "1.755e+09" in text
    assert 'reason="sw_power_cap"' in text
    assert 'seqmesh_gpu_xid_events_total{gpu="3",host=' in text and 'xid="79"} 1.0' in text


def test_follower_reads_complete_lines_and_restarts_after_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    follower = JsonlFollower(path)
    assert follower.new_records() == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert [r["step"] for r in follower.new_records()] == [1, 2]
    with path.open("a") as f:
        f.write('ep": 3}\n')
    assert [r["step"] for r in follower.new_records()] == [3]
    path.write_text('{"step": 1}\n')  # a resumed run cut the log back
    assert [r["step"] for r in follower.new_records()] == [1]


@pytest.mark.gpu
def test_real_nvml_samples_this_gpu(tmp_path: Path) -> None:
    device = torch.device("cuda", 0)
    monitor = Monitor(tmp_path, rank=0, local_rank=0, device=device, interval_s=60, prometheus_port=0,
                      tensorboard=False)
    try:
        record = monitor.sample_once()
        text = _scrape(monitor)
    finally:
        monitor.stop()
    gpu = record["gpu"]
    assert record["note"] is None, record["note"]
    assert gpu["name"] == torch.cuda.get_device_name(device)
    assert gpu["mem_total_bytes"] == pytest.approx(torch.cuda.get_device_properties(device).total_memory, rel=0.05)
    assert 0 <= gpu["util_pct"] <= 100 and gpu["sm_clock_mhz"] > 0 and gpu["temperature_c"] > 0
    assert gpu["power_w"] > 0 and isinstance(gpu["throttle_reasons"], list)
    assert "seqmesh_gpu_memory_total_bytes{" in text
