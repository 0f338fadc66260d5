"""``seqmesh`` command line: one entry point, one sub-command per job.

``train`` takes Hydra overrides (``seqmesh train model=tiny steps=50``); the planning tools take
flags. Sub-commands import their module lazily so ``seqmesh plan`` starts without torch or Ray.
"""

from __future__ import annotations

import sys
from typing import Callable

USAGE = """usage: seqmesh <command> [args]

commands:
  train [OVERRIDES...]   train on a local or existing Ray cluster (Hydra overrides, e.g. model=tiny steps=50)
  plan  [FLAGS]          plan SP groups for batches of lengths (seqmesh plan --help)
  profile [FLAGS]        measure this device's cost model (seqmesh profile --help)
  config [OVERRIDES...]  print the resolved, validated configuration
  submit --address ADDR [--working-dir DIR] -- [OVERRIDES...]
                         train on a Ray cluster as a job (Ray Jobs API; seqmesh submit --help)
  jobs list|status|logs|stop [ID]
                         watch and control submitted jobs (seqmesh jobs --help)
  report RUN_DIR         write report.png and report.html of a run (seqmesh report --help)
"""


def _train(argv: list[str]) -> int:
    from seqmesh.launch.config import load_config
    from seqmesh.launch.ray_driver import run_training

    summary = run_training(load_config(argv))
    print({k: summary[k] for k in ("first_loss", "last_loss", "steps") if k in summary})
    return 0


def _config(argv: list[str]) -> int:
    import yaml

    from seqmesh.launch.config import load_config
    from seqmesh.trainer.config import config_to_dict

    print(yaml.safe_dump(config_to_dict(load_config(argv)), sort_keys=False))
    return 0


def _plan(argv: list[str]) -> int:
    from seqmesh.scheduler.cli import plan_main

    return plan_main(argv)


def _profile(argv: list[str]) -> int:
    from seqmesh.trainer.profile import profile_main

    return profile_main(argv)


def _submit(argv: list[str]) -> int:
    from seqmesh.launch.submit import submit_main

    return submit_main(argv)


def _jobs(argv: list[str]) -> int:
    from seqmesh.launch.jobs import jobs_main

    return jobs_main(argv)


def _report(argv: list[str]) -> int:
    from seqmesh.launch.report import report_main

    return report_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": _train, "plan": _plan, "profile": _profile,
                                                   "config": _config, "submit": _submit, "jobs": _jobs,
                                                   "report": _report}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"seqmesh: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from seqmesh.trainer.config import ConfigError

    try:
        return COMMANDS[command](rest)
    except ConfigError as e:
        print(f"seqmesh {command}: configuration error: {e}", file=sys.stderr)
        return 2
