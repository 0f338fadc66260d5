"""Write a cluster file (``seqmesh.scheduler.links``) from the ranks themselves: ``seqmesh profile --cluster-out``.

Why: a cluster file written by hand goes stale (a NIC swapped, a node moved to another fabric) and
its bandwidths are guesses until measured. Under ``torchrun`` every rank reports its host and its
NIC class, the ranks of one host form a node, and one pair of ranks per link class times a
point-to-point transfer, so the file states what the links deliver.

* **NIC class** (``nic_class``): from ``/sys/class/infiniband/*/ports/*/link_layer``, the RDMA
  devices the kernel sees: ``InfiniBand`` -> ``infiniband``, ``Ethernet`` -> ``roce`` (RDMA over
  Converged Ethernet); no RDMA device -> ``ethernet``. Nodes of one NIC class form one fabric.
* **Intra-node class**: ``nvlink`` when NVML reports an active NVLink on the rank's GPU, else
  ``pcie`` (on a CPU-only machine the figure is the loopback's: the file is then for tests).
* **Bandwidth**: ranks ``a -> b`` send ``nbytes`` (median of ``repeats``), one pair per class: two
  GPUs of node 0; the first GPUs of two nodes of each fabric; the first GPUs of two fabrics'
  first nodes (``between_fabrics``, written as ``ethernet``). That is one port's rate per class,
  what ``links.py``'s port model takes.
"""

from __future__ import annotations

import datetime as dt
import glob
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from seqmesh.scheduler.links import FORMAT, parse_cluster


def nic_class(sys_root: str = "/sys/class/infiniband") -> str:
    """This host's inter-node link class, from the RDMA devices' link layers (module docstring)."""
    layers = {Path(p).read_text().strip() for p in glob.glob(f"{sys_root}/*/ports/*/link_layer")}
    if "InfiniBand" in layers:
        return "infiniband"
    return "roce" if "Ethernet" in layers else "ethernet"


def intra_class(device: torch.device) -> str:
    """``nvlink`` when this GPU has an active NVLink (NVML), else ``pcie``."""
    if device.type != "cuda":
        return "pcie"
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return "nvlink" if pynvml.nvmlDeviceGetNvLinkState(handle, 0) == pynvml.NVML_FEATURE_ENABLED else "pcie"
    except Exception:  # noqa: BLE001 - no NVML or no NVLink on this GPU: the PCIe bus
        return "pcie"


def nodes_of(ranks: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """(node name, NIC class) per node in rank order, and ranks per node, from each rank's (host, NIC)."""
    nodes: list[tuple[str, str]] = []
    counts: list[int] = []
    for host, nic in ranks:
        if nodes and nodes[-1][0] == host:
            counts[-1] += 1
            continue
        if any(h == host for h, _ in nodes):
            raise ValueError(f"host {host!r} holds ranks that are not consecutive; launch one block of ranks per "
                             "node (torchrun --nnodes does), so that world rank k * gpus_per_node starts node k")
        nodes.append((host, nic))
        counts.append(1)
    if len(set(counts)) > 1:
        raise ValueError(f"nodes hold different numbers of ranks ({dict(zip((h for h, _ in nodes), counts))}); "
                         "a cluster file needs the same gpus_per_node everywhere")
    return nodes, counts[0]


def _pairs(nodes: list[tuple[str, str]], per_node: int) -> dict[str, tuple[int, int]]:
    """One (sender, receiver) rank pair per link class the file will use."""
    pairs: dict[str, tuple[int, int]] = {}
    if per_node > 1:
        pairs["intra"] = (0, 1)
    first_of: dict[str, list[int]] = {}
    for k, (_, nic) in enumerate(nodes):
        first_of.setdefault(nic, []).append(k * per_node)
    for nic, firsts in first_of.items():
        if len(firsts) > 1:
            pairs[nic] = (firsts[0], firsts[1])
    fabrics = list(first_of.values())
    if len(fabrics) > 1:
        pairs["ethernet-between"] = (fabrics[0][0], fabrics[1][0])
    return pairs


def _send_GBps(a: int, b: int, nbytes: int, repeats: int, device: torch.device) -> float:
    """GB/s of ``nbytes`` from rank ``a`` to ``b`` (median), the same on every rank."""
    rank = dist.get_rank()
    buf = torch.ones(max(1, nbytes // 4), device=device)
    result = torch.zeros(1, dtype=torch.float64, device=device)
    if rank in (a, b):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up (connection set-up)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if rank == a:
                dist.send(buf, b)
                dist.recv(result, b)  # the receiver's acknowledgement: the data has arrived
            else:
                dist.recv(buf, a)
                dist.send(result, a)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        if rank == a:
            result.fill_(buf.numel() * 4 / float(np.median(times[1:])) / 1e9)
    dist.broadcast(result, src=a)
    return float(result.cpu()[0])


def probe_cluster(device: torch.device, nbytes: int = 64 << 20, repeats: int = 5,
                  host: Callable[[], str] = socket.gethostname, nic: Callable[[], str] = nic_class) -> str:
    """The cluster file's text for the ranks of the default process group (every rank calls this and
    gets the same text). ``host`` and ``nic`` say where this rank runs (tests give their own)."""
    mine = (host(), nic(), intra_class(device))
    everyone: list[tuple[str, str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    nodes, per_node = nodes_of([(h, n) for h, n, _ in everyone])
    intra = everyone[0][2]
    measured = {cls: _send_GBps(a, b, nbytes, repeats, device) for cls, (a, b) in _pairs(nodes, per_node).items()}
    bandwidth: dict[str, float] = {}
    for cls, bw in measured.items():  # Ethernet inside a fabric and between fabrics: one class, the slower
        name = intra if cls == "intra" else cls.removesuffix("-between")
        bandwidth[name] = round(min(bw, bandwidth.get(name, bw)), 3)
    lines = [f"# Written by `seqmesh profile --cluster-out` on {dt.date.today()}: {len(nodes)} nodes x {per_node} "
             f"ranks; bandwidth = one rank pair's {nbytes >> 20} MiB send, median of {repeats}.",
             f"format: {FORMAT}", f"gpus_per_node: {per_node}", f"intra_node: {intra}", "between_fabrics: ethernet",
             "bandwidth_GBps:"]
    lines += [f"  {cls}: {bw}" for cls, bw in bandwidth.items()] or ["  {}"]
    lines += ["nodes:"] + [f"  - {{name: {name!r}, nic: {card}}}" for name, card in nodes]
    text = "\n".join(lines) + "\n"
    parse_cluster(text, where="the probed cluster")  # what it wrote, it reads
    return text
