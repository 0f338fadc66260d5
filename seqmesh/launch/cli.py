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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_summary(summary: dict, run_dir: str, wall_s: float) -> str:
    """The few lines printed when a training run ends: loss, speed, time, where the run is, what next."""
    from pathlib import Path

    path = Path(run_dir).expanduser().resolve()
    shown = run_dir if not Path(run_dir).is_absolute() else str(path)
    if not summary.get("steps"):
        return f"seqmesh: no training step ran (run directory {path})"
    start = summary.get("resumed_from") or 0
    steps = f"steps {start + 1}-{summary['last_step']} (resumed at step {start})" if start else \
        f"{summary['last_step']} steps"
    lines = [f"seqmesh: trained {steps} in {_duration(wall_s)} "
             f"({_duration(summary.get('total_time_s', 0.0))} in training steps)"]
    loss = f"  loss        {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    if summary.get("val_loss") is not None:
        loss += f"   (validation {summary['val_loss']:.4f})"
    lines.append(loss)
    if summary.get("mean_tokens_per_s"):
        speed = f"  throughput  {summary['mean_tokens_per_s']:,.0f} tokens/s"
        if summary.get("num_devices"):
            speed += f" on {summary['num_devices']} worker{'s' if summary['num_devices'] != 1 else ''}"
        if summary.get("mean_mfu"):
            speed += f", MFU {100 * summary['mean_mfu']:.1f}%"
        lines.append(speed)
    lines += [f"  run dir     {path}", f"  report      seqmesh report {shown}"]
    return "\n".join(lines)


def _train(argv: list[str]) -> int:
    import time

    from seqmesh.launch.config import load_config
    from seqmesh.launch.ray_driver import NothingToDo, run_training
    from seqmesh.launch.worker_warnings import new_warnings, warnings_offset

    t0 = time.perf_counter()
    cfg = load_config(argv)
    offset = warnings_offset(cfg.run_dir)
    with _NoteInterrupt() as interrupt:
        try:
            summary = run_training(cfg)
        except NothingToDo as e:
            print(f"seqmesh train: {e}")
            return 0
        except BaseException as e:
            if interrupt.seen:  # Ctrl-C: a clean stop and the way back, no traceback; 130 = 128 + SIGINT
                return _interrupted(argv, cfg.run_dir)
            # Ray Train's worker failures carry the workers' own tracebacks; the driver's frames add nothing.
            if type(e).__module__.startswith("ray.") and type(e).__name__ in ("WorkerGroupError",
                                                                              "TrainingFailedError", "ControllerError"):
                print(f"seqmesh train: training failed in the workers: {e}\n(run directory {cfg.run_dir}; "
                      f"launch.verbose=true shows the workers' output)", file=sys.stderr)
                _print_warnings(new_warnings(cfg.run_dir, offset), file=sys.stderr)
                return 1
            raise
    print(format_summary(summary, cfg.run_dir, time.perf_counter() - t0))
    _print_warnings(new_warnings(cfg.run_dir, offset))
    return 0


def _print_warnings(lines: list[str], file=None) -> None:
    if lines:
        print(f"  warnings    {len(lines)} from the workers (all in RUN_DIR/warnings.jsonl):", file=file)
        for line in lines:
            print(f"    {line}", file=file)


class _NoteInterrupt:
    """Notes a Ctrl-C (SIGINT) while training, whoever handles it: before Ray Train starts it raises
    KeyboardInterrupt; Ray Train's ``fit`` then installs its own handler (it aborts the workers gracefully,
    then ends the run by an exception or ``sys.exit``), which is wrapped here, not replaced."""

    def __enter__(self) -> "_NoteInterrupt":
        import signal

        self.seen, self._signal = False, signal.signal

        def register(sig, handler):  # stands in for signal.signal while training
            if sig == signal.SIGINT and callable(handler):
                return self._signal(sig, self._noting(handler))
            return self._signal(sig, handler)

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        self._previous = self._signal(signal.SIGINT, self._noting(interrupt))
        signal.signal = register
        return self

    def _noting(self, handler):
        def noting(signum, frame):
            self.seen = True
            return handler(signum, frame)
        return noting

    def __exit__(self, *exc) -> None:
        import signal

        signal.signal = self._signal
        signal.signal(signal.SIGINT, self._previous)


def _interrupted(argv: list[str], run_dir: str) -> int:
    from pathlib import Path

    kept = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in ("resume", "overwrite", "run_dir")]
    where = Path(run_dir).expanduser().resolve()
    again = " ".join([*kept, "resume=true", f"run_dir={where}"])
    print(f"\nseqmesh train: interrupted (Ctrl-C). Checkpoints under {where / 'checkpoints'} are intact (a save in "
          f"progress is never published half-written). Resume with:\n  seqmesh train {again}", file=sys.stderr,
          flush=True)
    return 130


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
