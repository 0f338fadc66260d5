"""bench/offload.py's search: doubling then bisection finds the largest fitting length with few trials."""

from __future__ import annotations

import math
import time

import pytest

from bench.offload import predict_max_tokens, search_max


@pytest.mark.parametrize("capacity", [64, 700, 1000, 5000])
@pytest.mark.parametrize("start,first_step", [(128, 128), (640, 64), (1024, 64)])
def test_search_brackets_the_capacity(capacity: int, start: int, first_step: int) -> None:
    tried: list[int] = []

    def fits(t: int) -> bool:
        tried.append(t)
        return t <= capacity

    best, fail, complete = search_max(fits, start, first_step, 64, 1 << 20, time.monotonic() + 60)
    assert complete and best == capacity // 64 * 64 and fail is not None and fail - best <= 64
    assert all(t % 64 == 0 for t in tried) and len(tried) == len(set(tried))
    assert len(tried) <= 2 * math.ceil(math.log2(max(capacity, start) / 64)) + 2  # logarithmic in the range


def test_search_respects_limit_known_failure_and_deadline() -> None:
    assert search_max(lambda t: True, 128, 128, 64, 1024, time.monotonic() + 60) == (1024, None, True)
    calls: list[int] = []
    assert search_max(lambda t: calls.append(t) or True, 640, 64, 64, 1 << 20, time.monotonic() + 60,
                      known_fail=704) == (640, 704, True)
    assert calls == [640]  # a length already known to fail is never tried again
    assert search_max(lambda t: True, 128, 128, 64, 1 << 20, time.monotonic() - 1) == (0, None, False)

    def budget_ends(t: int) -> bool:
        if t > 256:
            raise TimeoutError
        return True

    assert search_max(budget_ends, 128, 128, 64, 1 << 20, time.monotonic() + 60) == (256, None, False)


def test_prediction_from_two_probes() -> None:
    probes = [{"ok": True, "tokens": 1000, "peak_GB": 12.0, "free_GB": 80.0},
              {"ok": True, "tokens": 2000, "peak_GB": 14.0, "free_GB": 80.0}]
    assert predict_max_tokens(probes) == 35000  # 2 GB per 1000 tokens on top of 10 GB, 80 GB free
    assert predict_max_tokens(probes[:1]) is None
    assert predict_max_tokens([probes[0], {**probes[1], "ok": False}]) is None
