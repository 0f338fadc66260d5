"""Best-fit-decreasing bin packing: memory is the bin, tokens are the weight.

Best fit (each item into the fullest bin that still holds it) uses the fewest micro-batches of
the simple rules in practice (within 11/9 OPT + 1, Johnson 1974), and every extra micro-batch
costs a fixed beta, so both the static baselines and the adaptive planner pack with it.
"""

from __future__ import annotations

import bisect
from typing import Sequence


def best_fit_decreasing(ids: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack sequences ``ids`` (lengths ``lengths[i]``) into bins of ``capacity`` tokens.

    Deterministic: ties between equal lengths keep ascending id order. Raises ValueError when a
    single sequence exceeds the capacity.
    """
    order = sorted(ids, key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining tokens, bin index), kept sorted
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, over the micro-batch capacity of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            rem, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (rem - n, b))
    return bins
