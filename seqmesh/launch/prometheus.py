"""Prometheus endpoint of one training worker: its device samples, and on rank 0 the training figures.

Each worker serves its own registry (not prometheus_client's global one), so several workers in one
process (tests) or one node never mix their series, and every series carries the worker's ``rank``
and ``host`` labels. Names follow Prometheus conventions: base units (bytes, watts, hertz, seconds)
and ratios in 0..1 rather than percent. The server binds ``127.0.0.1`` unless the configuration says
otherwise: metrics reveal the cluster's layout and must not be open to a network by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

# (metric name, help, record key, scale to base units)
_GPU_GAUGES = (
    ("seqmesh_gpu_utilization_ratio", "GPU busy time share over the last sample period", "util_pct", 0.01),
    ("seqmesh_gpu_memory_utilization_ratio", "GPU memory controller busy share", "mem_util_pct", 0.01),
    ("seqmesh_gpu_memory_used_bytes", "GPU memory in use (all processes)", "mem_used_bytes", 1.0),
    ("seqmesh_gpu_memory_total_bytes", "GPU memory size", "mem_total_bytes", 1.0),
    ("seqmesh_gpu_power_watts", "GPU board power draw", "power_w", 1.0),
    ("seqmesh_gpu_power_limit_watts", "GPU enforced power limit", "power_limit_w", 1.0),
    ("seqmesh_gpu_temperature_celsius", "GPU core temperature", "temperature_c", 1.0),
    ("seqmesh_gpu_sm_clock_hertz", "GPU SM clock", "sm_clock_mhz", 1e6),
    ("seqmesh_gpu_sm_clock_max_hertz", "GPU maximum SM clock", "sm_clock_max_mhz", 1e6),
    ("seqmesh_gpu_ecc_corrected_errors", "GPU corrected ECC errors since the driver loaded", "ecc_corrected", 1.0),
    ("seqmesh_gpu_ecc_uncorrected_errors", "GPU uncorrected ECC errors since the driver loaded", "ecc_uncorrected", 1.0),
)
_CPU_GAUGES = (
    ("seqmesh_node_cpu_utilization_ratio", "Node CPU busy share, all cores", "node_util_pct", 0.01),
    ("seqmesh_process_cpu_utilization_ratio", "Worker process CPU time per wall second (may exceed 1)",
     "process_util_pct", 0.01),
    ("seqmesh_process_resident_memory_bytes", "Worker process resident memory", "process_rss_bytes", 1.0),
    ("seqmesh_node_memory_used_bytes", "Node memory in use", "node_mem_used_bytes", 1.0),
    ("seqmesh_node_memory_total_bytes", "Node memory size", "node_mem_total_bytes", 1.0),
    ("seqmesh_node_load1", "Node one-minute load average", "load1", 1.0),
)
_TRAIN_GAUGES = (
    ("seqmesh_train_step", "Last optimizer step logged", "step", 1.0),
    ("seqmesh_train_loss", "Training loss of the last step", "loss", 1.0),
    ("seqmesh_train_tokens_per_second", "Real tokens per second of the last step, all devices", "tokens_per_s", 1.0),
    ("seqmesh_train_mfu_ratio", "Model FLOPs utilisation of the last step", "mfu", 1.0),
    ("seqmesh_train_step_seconds", "Wall time of the last step", "step_time_s", 1.0),
    ("seqmesh_train_plan_predicted_seconds", "The plan's predicted step time", "plan_predicted_ms", 1e-3),
    ("seqmesh_train_compute_imbalance_ratio", "Slowest rank's compute time over the mean (1 = balanced)",
     "ranks_compute_s_imbalance", 1.0),
)


class PrometheusExporter:
    """An HTTP ``/metrics`` endpoint on ``host:port`` (port 0: a free one; see ``.port``)."""

    def __init__(self, host: str, port: int, *, rank: int, hostname: str) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"rank": str(rank), "host": hostname}
        names = ("rank", "host")
        self._gpu = {key: (Gauge(name, doc, (*names, "gpu"), registry=self.registry), scale)
                     for name, doc, key, scale in _GPU_GAUGES}
        self._throttle = Gauge("seqmesh_gpu_clocks_event_active", "1 while NVML reports this clock-limiting reason",
                               (*names, "gpu", "reason"), registry=self.registry)
        self._xid = Counter("seqmesh_gpu_xid_events", "Critical XID errors seen by this worker",
                            (*names, "gpu", "xid"), registry=self.registry)
        self._cpu = {key: (Gauge(name, doc, names, registry=self.registry), scale)
                     for name, doc, key, scale in _CPU_GAUGES}
        self._train = {key: (Gauge(name, doc, names, registry=self.registry), scale)
                       for name, doc, key, scale in _TRAIN_GAUGES}
        self._rank_compute = Gauge("seqmesh_train_rank_compute_seconds", "Each rank's compute time in the last step",
                                   (*names, "of_rank"), registry=self.registry)
        self._has_gpu = Gauge("seqmesh_worker_has_gpu", "1 when NVML samples this worker's GPU, 0 on CPU only",
                              names, registry=self.registry)
        self._reasons_seen: set[tuple[str, str]] = set()
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve Prometheus metrics on {host}:{port} ({exc}); choose another "
                          f"launch.prometheus_port, 0 for a free one, or null to turn the endpoint off") from exc
        self.host, self.port = host, self._server.server_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def update_sample(self, record: Mapping[str, Any]) -> None:
        """Set the gauges from one monitor record (``seqmesh.launch.monitor``'s format)."""
        _set_all(self._cpu, record.get("cpu") or {}, self._labels)
        gpu = record.get("gpu")
        self._has_gpu.labels(**self._labels).set(0 if gpu is None else 1)
        if gpu is None:
            return
        labels = {**self._labels, "gpu": str(gpu["index"])}
        _set_all(self._gpu, gpu, labels)
        active = set(gpu.get("throttle_reasons") or ())
        for reason in active | {r for g, r in self._reasons_seen if g == labels["gpu"]}:
            self._throttle.labels(**labels, reason=reason).set(1 if reason in active else 0)
            self._reasons_seen.add((labels["gpu"], reason))
        for xid in gpu.get("xid_events") or ():
            self._xid.labels(**labels, xid=str(xid)).inc()

    def update_train(self, record: Mapping[str, Any]) -> None:
        """Set the training gauges from one ``metrics.jsonl`` record."""
        _set_all(self._train, record, self._labels)
        for rank, seconds in enumerate((record.get("rank_timings") or {}).get("compute_s") or ()):
            self._rank_compute.labels(**self._labels, of_rank=str(rank)).set(seconds)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _set_all(gauges: Mapping[str, tuple[Gauge, float]], values: Mapping[str, Any], labels: dict[str, str]) -> None:
    for key, (gauge, scale) in gauges.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gauge.labels(**labels).set(value * scale)
