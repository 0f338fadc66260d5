"""The working set of a step: the most memory its tensors hold at once above what existed before it.

Divided by the step's tokens this is the figure long-context memory work is judged by (bytes of
working set per token: what decides the longest sequence that fits once the static footprint of
weights and optimizer states is paid). On CUDA it is the allocator's own peak
(``max_memory_allocated`` less ``memory_allocated`` at entry). CPU has no allocator statistics, so
there every storage an op creates inside the window is counted from its creation to its release:
a ``TorchDispatchMode`` sees each op's outputs (also inside autograd's backward and activation
checkpointing's recompute), and a finalizer on the storage (PyTorch keeps one Python object per
live storage) sees its release. Outputs that alias a storage the op was given (views, in-place
ops) allocate nothing; buffers a kernel allocates and frees inside itself are not seen.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class WorkingSet:
    """Peak bytes held above the footprint at the start of a ``track_working_set`` window."""

    peak_bytes: int = 0

    def kb_per_token(self, tokens: int) -> float:
        """Kilobytes (1000 bytes, as GB are 1e9 in the benchmarks) of working set per token."""
        return self.peak_bytes / tokens / 1e3


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages created while active and still alive: now and at most."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # StorageImpl address -> bytes
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), given)
        return out

    def _track(self, storage: torch.UntypedStorage, given: set[int]) -> None:
        key = storage._cdata
        if key in self._live or key in given or storage.nbytes() == 0:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


@contextmanager
def track_working_set(device: torch.device) -> Iterator[WorkingSet]:
    """Measure the working set of what runs inside the ``with`` block on ``device`` (see the module docstring);
    the yielded ``WorkingSet`` is filled when the block ends."""
    result = WorkingSet()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        static = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - static
        return
    with _LiveStorages() as live:
        yield result
    result.peak_bytes = live.peak
