"""Which host memory an update running behind the step has finished writing.

Why: parameter offload's update of the streamed layers runs on a thread after ``step`` returns
(``FP8AdamW.overlap_updates``), a chunk at a time in layer order, and the next forward needs each layer's
weights in turn. Waiting for the whole update before the first streamed layer leaves the device idle for
the rest of it; waiting for the chunks that hold that layer lets the later layers' update run behind the
earlier layers' forward.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable

import torch


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class WrittenRanges:
    """Byte ranges written since ``begin``, merged; ``wait`` blocks until given tensors lie inside them, or until
    ``finish`` says nothing more will come (the update ended, or failed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._starts: list[int] = []  # sorted, disjoint, non-adjacent ranges [start, end)
        self._ends: list[int] = []
        self._open = False

    def begin(self) -> None:
        with self._cond:
            self._starts, self._ends, self._open = [], [], True

    def mark(self, tensors: Iterable[torch.Tensor]) -> None:
        """``tensors`` now hold their final values (called by the writer, in any order)."""
        with self._cond:
            for t in tensors:
                if t.numel():
                    self._add(*_span(t))
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._open = False
            self._cond.notify_all()

    def wait(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether ``tensors`` were written (False: the writer finished without them)."""
        spans = [_span(t) for t in tensors if t.numel()]
        with self._cond:
            while not (covered := all(self._covers(a, b) for a, b in spans)) and self._open:
                self._cond.wait()
            return covered

    def _add(self, a: int, b: int) -> None:
        i = bisect.bisect_left(self._ends, a)  # first range ending at or after a: it may touch [a, b)
        j = bisect.bisect_right(self._starts, b)  # ranges starting after b stay apart
        if i < j:
            a, b = min(a, self._starts[i]), max(b, self._ends[j - 1])
        self._starts[i:j], self._ends[i:j] = [a], [b]

    def _covers(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self._starts, a) - 1
        return i >= 0 and self._ends[i] >= b
