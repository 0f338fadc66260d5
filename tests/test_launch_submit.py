"""``seqmesh submit`` and ``seqmesh jobs`` without a cluster: what the job will run, and the errors a
user meets before anything is sent (the real submission is tested in tests/test_launch_cluster.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from seqmesh.launch.cli import main
from seqmesh.launch.submit import EXCLUDES, job_spec
from seqmesh.trainer.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_job_runs_seqmesh_train_joining_the_cluster() -> None:
    spec = job_spec(["steps=5", "run_dir=/shared/runs/a"], working_dir=str(REPO), env={"NCCL_DEBUG": "WARN"})
    assert shlex.split(spec["entrypoint"]) == ["python", "-m", "seqmesh", "train", "steps=5", "run_dir=/shared/runs/a",
                                               "launch.address=auto"]
    assert spec["runtime_env"] == {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": {"NCCL_DEBUG": "WARN"}}
    assert spec["metadata"]["run_dir"] == "/shared/runs/a"


def test_an_explicit_address_is_kept_and_no_working_dir_means_the_installed_seqmesh() -> None:
    spec = job_spec(["launch=cluster", "run_dir=/shared/r"], python="/opt/venv/bin/python")
    assert shlex.split(spec["entrypoint"]) == ["/opt/venv/bin/python", "-m", "seqmesh", "train", "launch=cluster",
                                               "run_dir=/shared/r"]
    assert spec["runtime_env"] is None


@pytest.mark.parametrize("overrides, working_dir, message", [
    (["steps=5"], None, "run_dir='runs/default' is relative"),
    (["run_dir=/x", "stepz=5"], None, "unknown key .stepz. in .stepz=5.; did you mean steps?"),
    (["run_dir=/x", "launch.num_workers=0"], None, "launch.num_workers=0"),
    (["run_dir=/x"], "/", "is not a seqmesh source tree"),
])
def test_bad_jobs_are_refused_before_contacting_a_cluster(overrides, working_dir, message) -> None:
    with pytest.raises(ConfigError, match=message):
        job_spec(overrides, working_dir=working_dir)


def test_cli_errors_name_the_fix(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "--", "run_dir=/x", "steps=3"]) == 1
    assert "pass --address http://HEAD:8265" in capsys.readouterr().err
    assert main(["submit", "--env", "NOEQUALS", "--address", "http://127.0.0.1:9", "--", "run_dir=/x"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "steps=3"]) == 2
    assert "run_dir=/ABSOLUTE/PATH" in capsys.readouterr().err
    assert main(["jobs", "status", "some-id", "--address", "http://127.0.0.1:9"]) == 1
    assert "cannot use the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err
