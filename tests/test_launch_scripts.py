"""The multi-node launch files: the SLURM batch script's orchestration (against stand-ins for srun,
scontrol, ray and python that record what they are asked to run) and the Ray cluster YAML (against
Ray's own schema, as ``ray up`` checks it). The ``ray start`` recipe itself runs for real in
tests/test_launch_cluster.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "seqmesh.sbatch"

_SHIMS = {
    "scontrol": 'printf "gpu-a\\ngpu-b\\ngpu-c\\n"',
    # srun: `hostname --ip-address` answers for the node; anything else is recorded with its node.
    "srun": '''node=""; while [ "$#" -gt 0 ]; do case "$1" in -w) node=$2; shift 2;; --*) shift;; *) break;; esac; done
if [ "$1" = hostname ]; then echo "10.0.0.7 fe80::1"; exit 0; fi
echo "srun $node: $*" >> "$LOG"''',
    "ray": 'echo "ray $*" >> "$LOG"',
    # python: the token one-liner runs for real; the wait-for-nodes script is read and skipped.
    "python": '''if [ "$1" = -c ]; then exec "$REAL_PYTHON" "$@"; fi
if [ "$1" = - ]; then cat > /dev/null; echo "wait $2 $3" >> "$LOG"; exit 0; fi
echo "python $* RAY_AUTH_MODE=$RAY_AUTH_MODE token_len=${#RAY_AUTH_TOKEN}" >> "$LOG"''',
}


def test_sbatch_starts_head_then_workers_then_the_driver(tmp_path: Path) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    for name, body in _SHIMS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    env = {**os.environ, "LOG": str(log), "REAL_PYTHON": sys.executable, "SEQMESH_VENV": str(tmp_path / "venv"),
           "SEQMESH_ROOT": str(REPO), "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32"}
    done = subprocess.run(["bash", str(SBATCH), "run_dir=/shared/r", "steps=10"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    srun = [line for line in lines if line.startswith("srun")]
    assert srun[0].startswith("srun gpu-a: ray start --head --block --node-ip-address=10.0.0.7 --port=6379 "
                              "--dashboard-host=127.0.0.1")
    assert "--num-cpus=32 --num-gpus=4" in srun[0]
    assert sorted(srun[1:]) == [f"srun gpu-{n}: ray start --block --address=10.0.0.7:6379 --num-cpus=32 --num-gpus=4"
                                for n in "bc"]
    assert "wait 10.0.0.7:6379 3" in lines
    driver = lines[-1]
    assert driver.startswith("python -m seqmesh train launch=cluster launch.address=10.0.0.7:6379 "
                             "launch.num_workers=12 launch.device=cuda run_dir=/shared/r steps=10")
    assert driver.endswith("RAY_AUTH_MODE=token token_len=64")


def test_ray_cluster_yaml_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "scripts" / "ray-cluster.yaml").read_text()))
    validate_config(config)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
