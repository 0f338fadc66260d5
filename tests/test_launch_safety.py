"""Safe defaults: a run directory is never overwritten by accident, and endpoints listen on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqmesh.launch.config import load_config
from seqmesh.launch.prometheus import PrometheusExporter
from seqmesh.launch.ray_driver import prepare_run_dir
from seqmesh.trainer.config import ConfigError


def _cfg(run_dir: Path, *extra: str):
    return load_config([f"run_dir={run_dir}", *extra])


def test_a_used_run_dir_needs_resume_or_overwrite(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(_cfg(run_dir))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run; pass resume=true.*overwrite=true"):
        prepare_run_dir(_cfg(run_dir))
    assert (run_dir / "metrics.jsonl").exists()

    prepare_run_dir(_cfg(run_dir, "resume=true"))
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "checkpoints").is_dir()

    prepare_run_dir(_cfg(run_dir, "overwrite=true"))
    assert sorted(p.name for p in run_dir.iterdir()) == [".seqmesh-run", "config.yaml"]


def test_resume_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="contradict"):
        _cfg(tmp_path, "resume=true", "overwrite=true")


def test_endpoints_default_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    launch = load_config([]).launch
    assert launch.prometheus_host == "127.0.0.1"
    import ray

    from seqmesh.launch import ray_driver

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    ray_driver._init_ray(load_config([]))
    assert seen["include_dashboard"] is True and seen["dashboard_host"] == "127.0.0.1"
    exporter = PrometheusExporter(launch.prometheus_host, 0, rank=0, hostname="test")
    try:
        assert exporter._server.server_address[0] == "127.0.0.1"
    finally:
        exporter.close()


@pytest.mark.parametrize("overrides, message", [
    (["launch.prometheus_port=70000"], "must be a TCP port"),
    (["launch.monitor_interval_s=0"], "needs the monitor"),
    (["launch.monitor_interval_s=-1"], "non-negative"),
])
def test_monitor_settings_are_checked(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_monitor_can_be_turned_off() -> None:
    launch = load_config(["launch.monitor_interval_s=0", "launch.prometheus_port=null"]).launch
    assert launch.monitor_interval_s == 0 and launch.prometheus_port is None
