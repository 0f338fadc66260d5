"""Timers for the step loop that do not stall the GPU.

On CUDA a host clock around asynchronous kernels measures launch time, not work; CUDA events are
recorded in stream order and read once, after the step has synchronised anyway (the loss is
read back). On CPU the same interface uses the host clock.
"""

from __future__ import annotations

import time

import torch


class SpanTimer:
    """Named spans (``start(name)`` ... ``stop(name)``) of one step, read with ``elapsed_ms()``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: dict[str, object] = {}
        self._spans: list[tuple[str, object, object]] = []

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self._mark()

    def stop(self, name: str) -> None:
        self._spans.append((name, self._open.pop(name), self._mark()))

    def elapsed_ms(self) -> list[tuple[str, float]]:
        """Every closed span in order, in ms; clears the timer for the next step."""
        if self.cuda and self._spans:
            self._spans[-1][2].synchronize()
        out = [(name, a.elapsed_time(b) if self.cuda else (b - a) * 1e3) for name, a, b in self._spans]
        self._spans.clear()
        return out
