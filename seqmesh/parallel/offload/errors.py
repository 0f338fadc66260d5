"""Offload failures, each naming the limit that was hit and the setting that moves it.

They are raised from inside forward or backward; the offloader releases every buffer and file of
the failed micro-batch before the exception leaves ``offload_session``, so parameters and optimizer
state are untouched and the step can be retried (after ``zero_grad``) or the run resumed.
"""

from __future__ import annotations


class OffloadError(RuntimeError):
    """Base class: offload could not store or restore a saved activation."""


class HostMemoryError(OffloadError, MemoryError):
    """The pinned host-memory budget (``offload.host_mem_gb``) or the machine's RAM ran out."""


class OffloadSpaceError(OffloadError):
    """The offload directory's file system is full (``offload.path``)."""


class OffloadPathError(OffloadError):
    """The offload directory cannot be created or written (``offload.path``)."""
