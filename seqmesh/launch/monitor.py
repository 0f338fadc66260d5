"""A sampler thread in every training worker: its GPU through NVML, or CPU figures without one.

Each worker samples the device it trains on (found by UUID, since NVML ignores
``CUDA_VISIBLE_DEVICES``), so every GPU of every node is covered exactly once, whatever the number
of workers per node, and a GPU of another job on the same node is never reported as ours. Outputs,
all under the run directory:

* ``monitor/rankN.jsonl``: one record per sample (format below), appended across restarts;
* ``monitor/rankN.json``: who the worker is (pid, host, node, device, Prometheus address); the
  fault-tolerance test finds the pid to kill here, an operator the endpoint to scrape;
* ``tb/monitor/rankN/``: TensorBoard scalars, x axis = milliseconds since the run started;
* a Prometheus endpoint (``seqmesh.launch.prometheus``); rank 0 also follows ``metrics.jsonl`` and
  exports the training figures, so one scrape target shows loss, tokens/s and MFU.

Record: ``{"time", "elapsed_s", "rank", "local_rank", "host", "pid", "cpu": {...}, "gpu": {...} | null,
"note"}``; ``gpu`` holds utilisation, memory, power, temperature, SM clock, the active clock-limiting
("throttle") reasons, volatile ECC counts and XID events since the last sample, each ``null`` where
the GPU or driver does not report it. A machine without a GPU or NVML is normal (CPU runs, CI): the
record says so in ``note`` and carries the CPU figures; nothing fails.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# NVML's clock event (throttle) reason bits, as nvml.h defines them.
CLOCK_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}


def decode_clock_reasons(mask: int) -> list[str]:
    """Names of the reasons set in an NVML clock-event bit mask (unknown bits as ``bit_0x...``)."""
    names = [name for bit, name in CLOCK_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_REASONS)
    names += [f"bit_{1 << i:#x}" for i in range(rest.bit_length()) if rest >> i & 1]
    return names


class CpuSampler:
    """Node and process CPU/memory figures: psutil when installed, else what the stdlib knows."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self._psutil = self._process = None
        else:
            self._psutil, self._process = psutil, psutil.Process()
            psutil.cpu_percent(None)  # the first call only starts the measuring interval
            self._process.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {"load1": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        if self._psutil is None:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {**out, "node_util_pct": None, "process_util_pct": None, "node_mem_used_bytes": None,
                    "node_mem_total_bytes": None,
                    "process_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
        mem = self._psutil.virtual_memory()
        return {**out, "node_util_pct": self._psutil.cpu_percent(None),
                "process_util_pct": self._process.cpu_percent(None),
                "process_rss_bytes": self._process.memory_info().rss,
                "node_mem_used_bytes": mem.total - mem.available, "node_mem_total_bytes": mem.total}


class NvmlSampler:
    """NVML figures of one GPU; every query that the GPU or driver does not support reads ``None``."""

    def __init__(self, nvml: Any, handle: Any, index: int) -> None:
        self.nvml, self.handle, self.index = nvml, handle, index
        self.name = self._query(nvml.nvmlDeviceGetName, handle)
        self.uuid = self._query(nvml.nvmlDeviceGetUUID, handle)
        self._events = None
        try:  # XID events need a driver that reports them to this (possibly unprivileged) process
            events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
            self._events = events
        except nvml.NVMLError:
            pass

    @classmethod
    def open(cls, device: torch.device, nvml: Any = None) -> tuple["NvmlSampler | None", str | None]:
        """The sampler of ``device``'s GPU, or ``(None, note)`` saying why there is none."""
        if device.type != "cuda":
            return None, "no GPU: this worker trains on CPU, so the monitor samples CPU figures only"
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
        except Exception as exc:  # ImportError, or any NVMLError (no driver, no library)
            return None, (f"no GPU metrics: NVML is unavailable ({type(exc).__name__}: {exc}); install "
                          f"nvidia-ml-py and check the driver; sampling CPU figures only")
        try:
            handle = _nvml_handle(nvml, device)
        except nvml.NVMLError as exc:
            return None, f"no GPU metrics: NVML does not know this worker's GPU ({exc}); sampling CPU figures only"
        return cls(nvml, handle, nvml.nvmlDeviceGetIndex(handle)), None

    def _query(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.nvml.NVMLError:
            return None

    def _xids(self) -> list[int]:
        xids: list[int] = []
        while self._events is not None and len(xids) < 64:
            try:
                event = self.nvml.nvmlEventSetWait_v2(self._events, 0)
            except self.nvml.NVMLError:  # NVMLError_Timeout: nothing pending
                break
            xids.append(int(event.eventData))
        return xids

    def sample(self) -> dict[str, Any]:
        n, h, q = self.nvml, self.handle, self._query
        util, mem = q(n.nvmlDeviceGetUtilizationRates, h), q(n.nvmlDeviceGetMemoryInfo, h)
        power, limit = q(n.nvmlDeviceGetPowerUsage, h), q(n.nvmlDeviceGetEnforcedPowerLimit, h)
        reasons_fn = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            n.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = q(reasons_fn, h)
        return {
            "index": self.index, "name": self.name, "uuid": self.uuid,
            "util_pct": None if util is None else util.gpu,
            "mem_util_pct": None if util is None else util.memory,
            "mem_used_bytes": None if mem is None else mem.used,
            "mem_total_bytes": None if mem is None else mem.total,
            "power_w": None if power is None else power / 1000,
            "power_limit_w": None if limit is None else limit / 1000,
            "temperature_c": q(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": q(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM),
            "sm_clock_max_mhz": q(n.nvmlDeviceGetMaxClockInfo, h, n.NVML_CLOCK_SM),
            "throttle_mask": mask,
            "throttle_reasons": None if mask is None else decode_clock_reasons(mask),
            "ecc_corrected": q(n.nvmlDeviceGetTotalEccErrors, h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC),
            "ecc_uncorrected": q(n.nvmlDeviceGetTotalEccErrors, h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                 n.NVML_VOLATILE_ECC),
            "xid_events": self._xids(),
        }

    def close(self) -> None:
        if self._events is not None:
            self._query(self.nvml.nvmlEventSetFree, self._events)
        self._query(self.nvml.nvmlShutdown)


def _nvml_handle(nvml: Any, device: torch.device) -> Any:
    """NVML's handle of a torch CUDA device: by UUID, else by PCI bus id (NVML numbers all GPUs)."""
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return nvml.nvmlDeviceGetHandleByPciBusId(bus)


class JsonlFollower:
    """Reads the complete lines appended to a JSONL file since the last call.

    A file that shrank was rewritten (a resumed run cuts its log back to the checkpoint), so it is
    read again from the start.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self._pos = Path(path), 0

    def new_records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        if self.path.stat().st_size < self._pos:
            self._pos = 0
        records = []
        with self.path.open("rb") as f:
            f.seek(self._pos)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                self._pos += len(line)
                records.append(json.loads(line))
        return records


class Monitor:
    """Samples every ``interval_s`` on a daemon thread until ``stop()``; see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int, local_rank: int, device: torch.device,
                 interval_s: float, prometheus_host: str = "127.0.0.1", prometheus_port: int | None = None,
                 follow_metrics: bool = False, tensorboard: bool = True, extra_info: dict[str, Any] | None = None,
                 nvml: Any = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s} must be > 0 (launch.monitor_interval_s=0 means no monitor)")
        self.run_dir, self.rank, self.interval_s = Path(run_dir), rank, interval_s
        self.host = socket.gethostname()
        config = self.run_dir / "config.yaml"
        self._t0 = config.stat().st_mtime if config.exists() else time.time()
        self.cpu = CpuSampler()
        self.gpu, self.note = NvmlSampler.open(device, nvml)
        self.exporter = None
        if prometheus_port is not None:
            from seqmesh.launch.prometheus import PrometheusExporter

            port = prometheus_port + local_rank if prometheus_port else 0
            self.exporter = PrometheusExporter(prometheus_host, port, rank=rank, hostname=self.host)
        self._metrics = JsonlFollower(self.run_dir / "metrics.jsonl") if follow_metrics and self.exporter else None
        out = self.run_dir / "monitor"
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"rank{rank}.jsonl"
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb" / "monitor" / f"rank{rank}"))
        self.info = {"rank": rank, "local_rank": local_rank, "pid": os.getpid(), "host": self.host,
                     "device": str(device), "gpu": None if self.gpu is None else {"index": self.gpu.index,
                                                                                  "name": self.gpu.name,
                                                                                  "uuid": self.gpu.uuid},
                     "note": self.note, "interval_s": interval_s, "started": time.time(),
                     "prometheus": None if self.exporter is None else f"http://{self.exporter.address}/metrics",
                     **(extra_info or {})}
        tmp = out / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=1) + "\n")
        os.replace(tmp, out / f"rank{rank}.json")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"seqmesh-monitor-rank{rank}", daemon=True)
        self._failed = False

    def start(self) -> "Monitor":
        where = f", Prometheus {self.info['prometheus']}" if self.exporter else ""
        print(f"seqmesh monitor rank {self.rank} on {self.host}: "
              f"{self.note or 'GPU ' + str(self.info['gpu'])}; samples to {self.path}{where}", file=sys.stderr)
        self._thread.start()
        return self

    def sample_once(self) -> dict[str, Any]:
        """Take one sample, write it everywhere, and return the record."""
        now = time.time()
        record = {"time": now, "elapsed_s": now - self._t0, "rank": self.rank, "local_rank": self.info["local_rank"],
                  "host": self.host, "pid": self.info["pid"], "cpu": self.cpu.sample(),
                  "gpu": None if self.gpu is None else self.gpu.sample(), "note": self.note}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = int(record["elapsed_s"] * 1000)
            for group in ("cpu", "gpu"):
                for key, value in (record[group] or {}).items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "index":
                        self._writer.add_scalar(f"{group}/{key}", value, global_step=step, walltime=now)
        if self.exporter is not None:
            self.exporter.update_sample(record)
            if self._metrics is not None:
                for train_record in self._metrics.new_records()[-1:]:
                    self.exporter.update_train(train_record)
        return record

    def _run(self) -> None:
        while True:
            try:
                self.sample_once()
            except Exception as exc:  # monitoring must never stop training
                if not self._failed:
                    log.warning("seqmesh monitor rank %d: sampling failed (%s: %s); will keep trying",
                                self.rank, type(exc).__name__, exc)
                self._failed = True
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Take a last sample, stop the thread and close every output."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 10)
        self.sample_once()
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self.exporter is not None:
            self.exporter.close()
        if self.gpu is not None:
            self.gpu.close()
