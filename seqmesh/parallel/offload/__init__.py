"""Offload of activations saved for backward to pinned host memory or NVMe files.

Long context runs out of device memory in activations first: under activation checkpointing, in
the inputs every layer keeps for its recompute; without it, in attention's q/k/v/output/LSE. This
package moves those tensors off the device while they wait for backward and brings them back one
layer ahead of need, overlapped with compute, for as many layers as the compute can hide.

* ``offloader.py``: the ``saved_tensors_hooks`` (what is offloaded, side streams, prefetch);
* ``pool.py``: reusable pinned host buffers inside a byte budget;
* ``files.py``: the NVMe file store (DeepSpeed async I/O or aligned direct I/O on threads);
* ``policy.py``: which layers, per micro-batch, from the cost model and the link bandwidths;
* ``bandwidth.py``: the measured PCIe and disk rates;
* ``errors.py``: the failures, each naming the setting to change.

Usage: ``attach_offload(model, model.model.layers, ...)`` once after activation checkpointing,
then ``with offload_session(model, meta):`` around each micro-batch's forward *and* backward.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager, Sequence

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from seqmesh.parallel.offload.bandwidth import available_host_bytes, measure_disk_GBps, measure_h2d_GBps
from seqmesh.parallel.offload.errors import HostMemoryError, OffloadError, OffloadPathError, OffloadSpaceError
from seqmesh.parallel.offload.files import aio_available
from seqmesh.parallel.offload.offloader import TARGETS, Offloader, OffloadStats
from seqmesh.parallel.offload.policy import OffloadPolicy, Selection, estimate_bytes_per_token

if TYPE_CHECKING:
    from seqmesh.parallel.sequence import SPBatch
    from seqmesh.scheduler.cost_model import CostModel

_ATTR = "_seqmesh_offloader"
# Share of available host memory the budget takes by default: all offloaded bytes live there for
# ``cpu``; for ``nvme`` it only stages transfers, so it leaves the page cache and data loaders room.
HOST_SHARE = {"cpu": 0.8, "nvme": 0.25}

__all__ = ["HostMemoryError", "OffloadError", "OffloadPathError", "OffloadPolicy", "OffloadSpaceError",
           "OffloadStats", "Offloader", "Selection", "TARGETS", "aio_available", "attach_offload",
           "available_host_bytes", "detach_offload", "estimate_bytes_per_token", "get_offloader",
           "measure_disk_GBps", "measure_h2d_GBps", "offload_session"]


def offload_scopes(layers: Sequence[nn.Module]) -> tuple[list[nn.Module], bool]:
    """The module of each layer whose saved tensors are offloaded, and whether layers are checkpointed.

    A checkpointed layer saves only its inputs, through the checkpoint wrapper; a plain layer's
    attention saves q, k, v, the output and the LSE (the MLP's saved tensors stay: tile it instead).
    """
    checkpointed = [isinstance(layer, CheckpointWrapper) for layer in layers]
    if any(checkpointed) and not all(checkpointed):
        raise ValueError("offload: either every layer or none must be activation-checkpointed")
    if all(checkpointed):
        return list(layers), True
    return [getattr(layer, "self_attn", layer) for layer in layers], False


def attach_offload(model: nn.Module, layers: Sequence[nn.Module], *, device: torch.device | str, target: str,
                   ratio: float | None = None, cost_model: "CostModel | None" = None, path: str | None = None,
                   host_limit_bytes: int | None = None, h2d_GBps: float | None = None,
                   disk_GBps: float | None = None, engine: str = "auto", min_bytes: int = 1 << 20,
                   compute_dtype: torch.dtype | None = None, **kwargs) -> Offloader:
    """Offload the saved activations of ``layers`` (apply after activation checkpointing).

    ``ratio`` None chooses per micro-batch from ``cost_model`` and the bandwidths (measured here
    when not given); ``compute_dtype`` is the autocast dtype, if any, for the first estimate of the
    bytes a layer saves (later micro-batches measure it). ``kwargs`` go to ``Offloader``.
    """
    if target not in TARGETS:
        raise ValueError(f"offload target {target!r} is not known; choose one of {TARGETS}")
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("offload is already attached to this model")
    device = torch.device(device)
    scopes, checkpointed = offload_scopes(layers)
    if ratio is None:
        h2d_GBps = h2d_GBps or measure_h2d_GBps(device, 64 << 20)
        if target == "nvme" and disk_GBps is None:
            disk_GBps = min(measure_disk_GBps(path, 64 << 20))
    policy = OffloadPolicy(num_groups=len(scopes), ratio=ratio, cost_model=cost_model, h2d_GBps=h2d_GBps or 1.0,
                           disk_GBps=disk_GBps if target == "nvme" else None, checkpointed=checkpointed)
    estimate = None
    dims = getattr(model, "dims", None)
    if dims is not None:
        stream = next(model.parameters()).element_size()
        estimate = estimate_bytes_per_token(dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim,
                                            checkpointed=checkpointed, stream_bytes=stream,
                                            compute_bytes=torch.empty((), dtype=compute_dtype).element_size()
                                            if compute_dtype is not None else stream)
    limit = host_limit_bytes or int(HOST_SHARE[target] * available_host_bytes())
    off = Offloader(device, target, policy, limit, path=path, engine=engine, min_bytes=min_bytes,
                    bytes_per_token=estimate, **kwargs)
    off.attach(scopes)
    setattr(model, _ATTR, off)
    return off


def get_offloader(model: nn.Module) -> Offloader | None:
    return getattr(model, _ATTR, None)


def offload_session(model: nn.Module, meta: "SPBatch") -> ContextManager:
    """The offload scope of one micro-batch (a no-op when the model has no offloader)."""
    off = get_offloader(model)
    if off is None:
        return nullcontext()
    return off.session(meta.seqlens, meta.layout.ulysses * meta.layout.ring, int(meta.local_index.numel()))


def detach_offload(model: nn.Module) -> None:
    """Remove the model's offloader (hooks, host buffers, files), e.g. to compare settings in one process."""
    off = getattr(model, _ATTR, None)
    if off is not None:
        off.close()
        delattr(model, _ATTR)
