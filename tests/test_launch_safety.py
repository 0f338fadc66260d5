"""Safe defaults: a run directory is never overwritten by accident, and endpoints listen on loopback."""

from __future__ import annotations

import json
import re
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


# ------------------------------------------------------------------ run directories are never lost


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _trained_run(run_dir: Path, steps: int = 6, last_step: int | None = None, *extra: str) -> None:
    """A run directory as a finished (or stopped) run leaves it, without training."""
    prepare_run_dir(_cfg(run_dir, f"steps={steps}", "model.num_layers=6", *extra))
    last = steps if last_step is None else last_step
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 5.0}}\n' for s in range(1, last + 1)))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / f"step-{last}").write_text("weights")
    (run_dir / "summary.json").write_text(json.dumps({"steps": last, "first_step": 1, "last_step": last,
                                                      "first_loss": 8.3, "last_loss": 4.1}))


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    notes = tmp_path / "thesis"
    notes.mkdir()
    (notes / "chapter1.tex").write_text("precious")
    with pytest.raises(ConfigError, match=r"is not empty and is not a seqmesh run \(it has no .seqmesh-run file\).*"
                                          r"Nothing was deleted"):
        prepare_run_dir(_cfg(notes, "overwrite=true"))
    with pytest.raises(ConfigError, match="is not a seqmesh run"):
        prepare_run_dir(_cfg(notes, "resume=true"))
    assert _tree(notes) == {"chapter1.tex": b"precious"}


def test_overwrite_never_deletes_the_cwd_or_a_git_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    _trained_run(run_dir)
    (run_dir / "src" / ".git").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"but it contains a git checkout .*Nothing was deleted"):
        prepare_run_dir(_cfg(run_dir, "overwrite=true"))
    (run_dir / "src" / ".git").rmdir()
    monkeypatch.chdir(run_dir / "src")
    with pytest.raises(ConfigError, match=r"but it contains the current directory"):
        prepare_run_dir(_cfg(run_dir, "overwrite=true"))
    assert (run_dir / "summary.json").exists()
    # run_dir=. overwrite=true on a checkout: not a run (no marker), so refused before anything else.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    with pytest.raises(ConfigError, match="not a seqmesh run"):
        prepare_run_dir(load_config(["run_dir=.", "overwrite=true"]))
    assert (tmp_path / "repo" / ".git").is_dir()


def test_a_run_that_never_trained_is_reused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(_cfg(run_dir))
    (run_dir / "ray").mkdir()  # what a start that failed in Ray leaves
    prepare_run_dir(_cfg(run_dir, "steps=7"))
    assert load_config([f"run_dir={run_dir}"]).steps != 7
    assert "steps: 7" in (run_dir / "config.yaml").read_text()


def test_bad_data_leaves_no_run_directory(tmp_path: Path) -> None:
    from seqmesh.launch.cli import main

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    run_dir = tmp_path / "run"
    assert main(["train", f"run_dir={run_dir}", f"data.source={bad}", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert not run_dir.exists()


# -------------------------------------------------------------------- resume uses the saved config


def test_resume_starts_from_the_saved_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _trained_run(run_dir, 6, 3, "optim.lr=0.01", "data.global_batch=2", "stop_at=3")
    cfg = _cfg(run_dir, "resume=true", "steps=9")
    assert (cfg.steps, cfg.optim.lr, cfg.data.global_batch, cfg.stop_at) == (9, 0.01, 2, None)
    # Keys not typed stay as saved, whatever the YAML defaults say.
    cfg = _cfg(run_dir, "resume=true", "optim.lr=0.002", "launch.num_workers=2")
    assert (cfg.steps, cfg.optim.lr, cfg.launch.num_workers, cfg.data.global_batch) == (6, 0.002, 2, 2)


@pytest.mark.parametrize("override, key", [
    ("model.num_layers=4", "model.num_layers=4 (the run has 6)"),
    ("data.vocab_size=1024", "data.vocab_size=1024 (the run has 4096)"),
    ("data.tokenizer=byte", "data.tokenizer='byte' (the run has 'bpe')"),
    ("model=llama-1b", "model.name='llama-1b' (the run has 'tiny')"),
])
def test_resume_refuses_incompatible_overrides_and_touches_nothing(tmp_path: Path, override: str, key: str) -> None:
    from seqmesh.launch.cli import main

    run_dir = tmp_path / "run"
    _trained_run(run_dir, 6, 3)
    before = _tree(run_dir)
    with pytest.raises(ConfigError, match=r"cannot resume .* with " + re.escape(key) + r".*Drop the override"):
        _cfg(run_dir, "resume=true", override)
    assert main(["train", f"run_dir={run_dir}", "resume=true", override]) == 2
    assert _tree(run_dir) == before


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path: Path, capsys) -> None:
    from seqmesh.launch.cli import main

    run_dir = tmp_path / "run"
    _trained_run(run_dir, 6)
    before = _tree(run_dir)
    assert main(["train", f"run_dir={run_dir}", "resume=true"]) == 0
    out = capsys.readouterr().out
    assert "is finished: all 6 of its steps are done (loss 8.3 -> 4.1). Nothing was changed." in out
    assert f"seqmesh train run_dir={run_dir} resume=true steps=12" in out
    assert main(["train", f"run_dir={run_dir}", "resume=true", "steps=4"]) == 0  # fewer steps: also finished
    assert _tree(run_dir) == before


def test_resume_past_stop_at_says_so(tmp_path: Path) -> None:
    from seqmesh.launch.ray_driver import finished_message

    run_dir = tmp_path / "run"
    _trained_run(run_dir, 6, 3)
    assert "past stop_at=2" in finished_message(_cfg(run_dir, "resume=true", "stop_at=2"))
    assert finished_message(_cfg(run_dir, "resume=true")) is None


# ------------------------------------------------------------------------------ typos and output


@pytest.mark.parametrize("override, hint", [
    ("stepz=3", "unknown key 'stepz' in 'stepz=3'; did you mean steps?"),
    ("model.num_layer=2", "did you mean model.num_layers?"),
    ("num_layers=2", "did you mean model.num_layers?"),
    ("data.sourse=x", "did you mean data.source?"),
])
def test_unknown_keys_suggest_the_nearest(override: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(hint)):
        load_config([override])


def test_end_of_run_summary() -> None:
    from seqmesh.launch.cli import format_summary

    text = format_summary({"steps": 50, "first_step": 1, "last_step": 50, "first_loss": 8.31, "last_loss": 3.2,
                           "mean_tokens_per_s": 12345.6, "num_devices": 4, "total_time_s": 48.0},
                          "runs/default", 75.0)
    assert text.splitlines()[0] == "seqmesh: trained 50 steps in 1 min 15 s (48 s in training steps)"
    assert "loss        8.3100 -> 3.2000" in text and "12,346 tokens/s on 4 workers" in text
    assert "seqmesh report runs/default" in text and "{" not in text


def test_ray_chatter_is_off_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from seqmesh.launch import ray_driver

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    ray_driver._init_ray(load_config([]))
    assert seen["log_to_driver"] is False
    ray_driver._init_ray(load_config(["launch.verbose=true"]))
    assert seen["log_to_driver"] is True


def test_worker_errors_reach_the_user_without_driver_frames(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from seqmesh.launch import cli, ray_driver

    error = type("WorkerGroupError", (RuntimeError,), {"__module__": "ray.train"})

    def fail(cfg):
        raise error("Training failed due to worker errors:\n[Rank 0]: ValueError: the training split has 3 documents")

    monkeypatch.setattr(ray_driver, "run_training", fail)
    assert cli.main(["train", "run_dir=/nonexistent/run"]) == 1
    err = capsys.readouterr().err
    assert "training failed in the workers: Training failed due to worker errors" in err
    assert "the training split has 3 documents" in err and "launch.verbose=true" in err


def test_end_of_run_summary_after_resume() -> None:
    from seqmesh.launch.cli import format_summary

    text = format_summary({"steps": 5, "first_step": 1, "last_step": 5, "first_loss": 5.2, "last_loss": 5.1,
                           "resumed_from": 3, "val_loss": 5.0, "total_time_s": 3.0}, "/tmp/run", 37.0)
    assert text.splitlines()[0] == "seqmesh: trained steps 4-5 (resumed at step 3) in 37 s (3 s in training steps)"
    assert "(validation 5.0000)" in text


# ------------------------------------------------------------------------------------- moved keys


@pytest.mark.parametrize("override, new", [
    ("scheduler.mem_limit_gb=8", "memory.limit_gb"),
    ("scheduler.mem_headroom=0.2", "memory.headroom"),
    ("offload.loss_tile_tokens=4096", "model.loss_tile_tokens"),
    ("+offload.mlp_tile_tokens=16384", "model.mlp_tile_tokens"),
])
def test_a_moved_key_names_its_new_place(override: str, new: str) -> None:
    old = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{old} moved to {new}")):
        load_config([override])
    from seqmesh.trainer.config import config_from_dict

    section, leaf = old.split(".")
    with pytest.raises(ConfigError, match=re.escape(f"{old} moved to {new}")):
        config_from_dict({section: {leaf: 1}})


def test_a_run_saved_with_moved_keys_resumes_under_the_new_names(tmp_path: Path, capsys) -> None:
    import yaml

    run_dir = tmp_path / "run"
    _trained_run(run_dir, 6, 3, "memory.limit_gb=7", "model.loss_tile_tokens=64")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["scheduler"]["mem_limit_gb"], saved["scheduler"]["mem_headroom"] = saved["memory"].pop("limit_gb"), 0.3
    saved["offload"]["loss_tile_tokens"] = saved["model"].pop("loss_tile_tokens")
    saved["offload"]["mlp_tile_tokens"] = saved["model"].pop("mlp_tile_tokens") + 32  # as saved before the move
    del saved["memory"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = _cfg(run_dir, "resume=true")
    assert (cfg.memory.limit_gb, cfg.memory.headroom) == (7.0, 0.3)
    assert (cfg.model.loss_tile_tokens, cfg.model.mlp_tile_tokens) == (64, 32)
    note = capsys.readouterr().err
    assert "scheduler.mem_limit_gb -> memory.limit_gb" in note and "offload.mlp_tile_tokens -> model.mlp_tile_tokens" in note
    assert "no longer knows" not in note
