"""Per-step training metrics: one JSONL line, TensorBoard scalars and a progress bar per step.

Definitions (README "Metrics" quotes them):

* ``tokens``: real (non-padding) tokens of the whole global step, all ranks and micro-batches.
* ``tokens_per_s`` = tokens / step_time_s; ``tokens_per_s_per_device`` divides by ``num_devices``.
* ``flops``: model FLOPs of the global step (``seqmesh.trainer.flops.train_flops``: causal
  attention counted as half, recompute not counted); ``tflops_per_device`` = flops /
  num_devices / step_time_s / 1e12; ``mfu`` = that over the device's dense peak, or None when
  the peak is unknown (never a guessed figure).
* ``peak_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only, not the
  allocator's cache); on CPU the process's peak resident set size (``getrusage``, whole process,
  never reset). ``peak_mem_source`` says which: ``"cuda"`` or ``"cpu_rss"`` (also when the loop
  passes the max over ranks, measured the same way on every rank).
* ``val_loss`` (eval steps only, and the summary's last one): mean token loss over the validation
  split (``seqmesh.trainer.evaluate``).
* ``warmup``: true for the first ``warmup_steps`` steps of each process (compilation, allocator
  growth); ``summary.json`` leaves them out of its means.

The summary's means are throughput means -- total tokens (FLOPs) over total time of the steps
after warmup -- not means of per-step rates, so one slow step weighs by its duration.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

_NUMERIC = (int, float)


def memory_source(device: torch.device | str | None = None) -> str:
    """How ``peak_memory`` measures on ``device``: ``"cuda"`` (max_memory_allocated) or ``"cpu_rss"`` (peak RSS)."""
    return "cuda" if torch.device(device if device is not None else "cpu").type == "cuda" else "cpu_rss"


def peak_memory(device: torch.device | str | None = None) -> tuple[int | None, str]:
    """Peak memory of this process so far, and where it comes from (see module docstring)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), memory_source(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024), memory_source(device)


def _plain(key: str, value: Any) -> Any:
    """A JSON-able value: tensors and numpy scalars become Python numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log a scalar")
        return value.item()
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, *_NUMERIC)):
        return value.item() if hasattr(value, "item") else float(value)
    try:
        json.dumps(value)
    except TypeError as exc:
        raise TypeError(f"metric {key!r} = {value!r} is not JSON-serialisable; log numbers, strings, "
                        "lists or dicts") from exc
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log, up to the first line a crash cut short."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def progress_postfix(record: Mapping[str, Any]) -> dict[str, str]:
    """The progress bar's postfix for one step record: loss, tokens/s, MFU ("n/a" when unknown), the plan's
    SP group sizes (e.g. ``4+1+1+2``: one group per (micro-batch, group), largest first) and the
    validation loss on the steps that have one."""
    mfu = record.get("mfu")
    out = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:.0f}",
           "mfu": "n/a" if mfu is None else f"{100 * mfu:.1f}%"}
    if record.get("plan_group_sizes"):
        out["groups"] = "+".join(str(d) for d in sorted(record["plan_group_sizes"], reverse=True))
    if record.get("val_loss") is not None:
        out["val"] = f"{record['val_loss']:.4f}"
    return out


class MetricsLogger:
    """Writes ``metrics.jsonl``, TensorBoard events (``tb/``) and ``summary.json`` under ``run_dir``.

    Every rank may build one; only the one with ``enabled=True`` (rank 0) touches the disk or the
    terminal, so the step loop needs no rank checks. On ``resume_step=s`` the existing JSONL keeps
    its records up to step ``s`` and TensorBoard purges later events: the steps a crashed run
    logged after its last checkpoint are replaced, not duplicated.
    """

    def __init__(self, run_dir: str | os.PathLike, *, num_devices: int, peak_flops_per_device: float | None,
                 total_steps: int | None = None, warmup_steps: int = 1, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, resume_step: int | None = None,
                 device: torch.device | str | None = None) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.run_dir = Path(run_dir)
        self.num_devices = num_devices
        self.peak = peak_flops_per_device
        self.warmup_steps = warmup_steps
        self.enabled = enabled
        self.device = device
        self.records: list[dict[str, Any]] = []
        self._pending: dict[str, Any] = {}
        self._logged_here = 0
        self._start = time.perf_counter()
        self._file = self._writer = self.progress_bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            self.records = [r for r in read_jsonl(path) if r.get("step", math.inf) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, path)
        self._file = path.open("a" if resume_step is not None else "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        if progress:
            from tqdm import tqdm

            self.progress_bar = tqdm(total=total_steps, initial=resume_step or 0, desc="train", unit="step",
                                     dynamic_ncols=True)

    def log_step(self, step: int, *, loss: float, grad_norm: float | None, lr: float, step_time_s: float,
                 tokens: int, flops: float, peak_mem_bytes: int | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record one optimizer step (global figures: all ranks); returns the record written.

        ``peak_mem_bytes`` is measured on this process when not given; pass the max over ranks
        (from ``aggregate_rank_timings``) to report the worst device. ``extra`` adds any keys
        (plan statistics, predicted vs measured times); numeric ones also go to TensorBoard.
        """
        if step_time_s <= 0:
            raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
        source = memory_source(self.device)
        if peak_mem_bytes is None:
            peak_mem_bytes, source = peak_memory(self.device)
        flops_per_device_s = flops / self.num_devices / step_time_s
        record: dict[str, Any] = {
            "step": int(step),
            "loss": _plain("loss", loss),
            "grad_norm": None if grad_norm is None else _plain("grad_norm", grad_norm),
            "lr": _plain("lr", lr),
            "step_time_s": float(step_time_s),
            "tokens": int(tokens),
            "tokens_per_s": tokens / step_time_s,
            "tokens_per_s_per_device": tokens / step_time_s / self.num_devices,
            "flops": float(flops),
            "tflops_per_device": flops_per_device_s / 1e12,
            "mfu": None if self.peak is None else flops_per_device_s / self.peak,
            "peak_mem_bytes": peak_mem_bytes,
            "peak_mem_source": source,
            "warmup": self._logged_here < self.warmup_steps,
        }
        extra = {**self._pending, **(extra or {})}
        self._pending = {}
        for key, value in extra.items():
            if key in record:
                raise ValueError(f"extra metric {key!r} would overwrite a built-in one; rename it")
            record[key] = _plain(key, value)
        self._logged_here += 1
        self.records.append(record)
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, _NUMERIC) and not isinstance(value, bool) and key != "step":
                    self._writer.add_scalar(key, value, global_step=step)
        if self.progress_bar is not None:
            self.progress_bar.set_postfix(progress_postfix(record), refresh=False)
            self.progress_bar.update(max(0, step - self.progress_bar.n))
        return record

    def note(self, **values: Any) -> None:
        """Values for the next ``log_step``'s record (as its ``extra``), e.g. ``val_loss`` on eval steps."""
        self._pending.update(values)

    def summary(self) -> dict[str, Any]:
        """Run totals and post-warmup throughput means over every step recorded (resumed ones too)."""
        if not self.records:
            return {"steps": 0}
        measured = [r for r in self.records if not r.get("warmup")] or self.records
        time_s = sum(r["step_time_s"] for r in measured)
        flops_per_device_s = sum(r["flops"] for r in measured) / self.num_devices / time_s
        tokens_per_s = sum(r["tokens"] for r in measured) / time_s
        peaks = [r["peak_mem_bytes"] for r in self.records if r.get("peak_mem_bytes") is not None]
        evals = [r for r in self.records if r.get("val_loss") is not None]
        return {
            "steps": len(self.records),
            "first_step": self.records[0]["step"],
            "last_step": self.records[-1]["step"],
            "first_loss": self.records[0]["loss"],
            "last_loss": self.records[-1]["loss"],
            "min_loss": min(r["loss"] for r in self.records),
            "tokens": sum(r["tokens"] for r in self.records),
            "skipped_steps": sum(1 for r in self.records if r.get("skipped_step")),
            "total_time_s": sum(r["step_time_s"] for r in self.records),
            "wall_time_s": time.perf_counter() - self._start,
            "steps_in_means": len(measured),
            "mean_tokens_per_s": tokens_per_s,
            "mean_tokens_per_s_per_device": tokens_per_s / self.num_devices,
            "mean_tflops_per_device": flops_per_device_s / 1e12,
            "mean_mfu": None if self.peak is None else flops_per_device_s / self.peak,
            "peak_mem_bytes": max(peaks) if peaks else None,
            "num_devices": self.num_devices,
            "peak_flops_per_device": self.peak,
            "val_loss": evals[-1]["val_loss"] if evals else None,
            "val_loss_step": evals[-1]["step"] if evals else None,
            "min_val_loss": min(r["val_loss"] for r in evals) if evals else None,
        }

    def close(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (plus ``extra`` keys) and close the outputs; returns the summary."""
        summary = self.summary()
        summary.update({k: _plain(k, v) for k, v in (extra or {}).items()})
        if not self.enabled:
            return summary
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, self.run_dir / "summary.json")
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self.progress_bar is not None:
            self.progress_bar.close()
        self.enabled = False
        return summary


def aggregate_rank_timings(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float | int]:
    """Min, mean, max, the slowest rank and the imbalance (max / mean) of each key across ranks.

    Input is what the step loop all-gathers: one dict of timings (or any numbers) per rank, in rank
    order. A key only some ranks report (a rank that ran fewer micro-batches) is aggregated over
    the ranks that have it. Output keys: ``{key}_min``, ``{key}_mean``, ``{key}_max``,
    ``{key}_max_rank``, ``{key}_imbalance`` (1.0 = perfectly balanced; the straggler cost).
    """
    if not per_rank:
        raise ValueError("aggregate_rank_timings needs one dict per rank, got none")
    keys = list(dict.fromkeys(k for timings in per_rank for k in timings))
    out: dict[str, float | int] = {}
    for key in keys:
        values = [(r, timings[key]) for r, timings in enumerate(per_rank) if key in timings]
        bad = [(r, v) for r, v in values if not isinstance(v, _NUMERIC) or isinstance(v, bool)]
        if bad:
            raise TypeError(f"timing {key!r} of rank {bad[0][0]} is {bad[0][1]!r}; timings must be numbers")
        numbers_only = [float(v) for _, v in values]
        mean = sum(numbers_only) / len(numbers_only)
        slowest, top = max(values, key=lambda rv: rv[1])
        out[f"{key}_min"] = min(numbers_only)
        out[f"{key}_mean"] = mean
        out[f"{key}_max"] = float(top)
        out[f"{key}_max_rank"] = slowest
        out[f"{key}_imbalance"] = float(top) / mean if mean else 1.0
    return out
