"""A per-process record of one-off work: things a process pays for the first time it uses something.

A cuDNN graph built for a new padded document length, a ``torch.compile`` of a fused kernel (or a
recompile), a process group created and its communicator set up: each costs tens to thousands of
ms once, and no later step that reuses it pays again. Such costs do not only fall in the first
step -- a long-tail length mix keeps meeting new cuDNN length buckets for many steps -- so the
step loop cannot tell them apart by step number. Instead the places that do one-off work note it
here (one line each), the loop diffs the counts around each step, and ``CostFeedback`` reports a
step with one-off events without fitting the cost model to it.

    before = first_use.counts()
    ...                                   # the step; hooks call note() / first()
    events = first_use.since(before)      # {"cudnn_graph": 2}, {} for a steady step

The record is per process and never reset: a cache that is warm stays warm for the process's life.

It sits below every layer (it imports nothing of seqmesh): kernels, parallel and the trainer all note
work here, and the lowest of them must not import the ones above it to do so.
"""

from __future__ import annotations

import collections
from typing import Hashable, Mapping

_counts: collections.Counter[str] = collections.Counter()
_seen: set[tuple[str, Hashable]] = set()
_compiles_tracked = False


def note(kind: str) -> None:
    """Record one piece of one-off work of ``kind`` (e.g. ``"process_group"``) done just now."""
    _counts[kind] += 1


def first(kind: str, key: Hashable) -> bool:
    """Record ``kind`` the first time this process meets ``key`` (the key a cache below builds its entry
    for, e.g. a cuDNN graph's shape); True then, False for a key met before."""
    if (kind, key) in _seen:
        return False
    _seen.add((kind, key))
    note(kind)
    return True


def track_compiles() -> None:
    """Count every graph ``torch.compile`` builds in this process from here on (first compiles and
    recompiles alike) as ``"compile"`` events. Called where compiled code runs, so a process that never
    compiles (CPU tests) never imports dynamo."""
    global _compiles_tracked
    _compiles_tracked = True


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def counts() -> dict[str, int]:
    """Events so far in this process, by kind (cheap: a dict copy, and a counter read once compiles are tracked)."""
    out = dict(_counts)
    if _compiles_tracked:
        out["compile"] = _compiled_graphs()
    return out


def since(before: Mapping[str, int]) -> dict[str, int]:
    """The events recorded after ``before`` (an earlier ``counts()``), by kind; empty when there were none."""
    return {kind: n - before.get(kind, 0) for kind, n in counts().items() if n > before.get(kind, 0)}
