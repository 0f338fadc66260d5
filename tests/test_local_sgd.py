"""CO2 local updates (seqmesh.parallel.local_sgd): the outer step against a single-process reference,
and the outer synchronisation overlapping local steps over a slow fake link (timing trace)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from seqmesh.parallel.local_sgd import AllReduceLink, OuterConfig, OuterSync, Pending
from tests.distributed import run_distributed

GROUPS, INNER = 2, 2          # 4 ranks: node groups {0, 1} and {2, 3}
SIZE = 11                     # not a multiple of INNER: the last slice is padded
CONFIG = OuterConfig(every=3, lr=0.8, momentum=0.5, staleness_penalty=2.0, clip=1.5)


class DelayedLink:
    """A slow fake link (an ``OuterLink``): the all-reduce runs on a background thread after
    ``delay_s`` (a link that takes that long), with a trace of when it started and ended."""

    def __init__(self, group: dist.ProcessGroup | None, delay_s: float) -> None:
        self.group, self.delay_s = group, delay_s
        self.trace: list[tuple[str, float]] = []

    def start(self, tensor: torch.Tensor) -> Pending:
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.trace.append(("link-start", time.perf_counter()))
                time.sleep(self.delay_s)
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
                self.trace.append(("link-end", time.perf_counter()))
            except BaseException as e:  # surfaced by wait()
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()

        class _Handle:
            def wait(self) -> None:
                done.wait()
                if failure:
                    raise failure[0]

        return _Handle()


def local_update(group: int, step: int) -> torch.Tensor:
    """What one inner step does to a group's parameters (the same on both ranks of the group)."""
    g = torch.Generator().manual_seed(1000 * group + step)
    return 0.1 * torch.randn(SIZE, generator=g)


def _groups(rank: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    inner = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    outer = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return inner[rank // INNER], outer[rank % INNER]


def _train(rank: int, world: int, steps: int, delay_s: float, step_s: float):
    inner, outer = _groups(rank)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(SIZE))
    link = DelayedLink(outer, delay_s) if delay_s else AllReduceLink(outer)
    sync = OuterSync([w], CONFIG, link, groups=GROUPS, inner_group=inner, inner_size=INNER, inner_rank=rank % INNER)
    steps_trace = []
    t0 = time.perf_counter()
    for step in range(steps):
        start = time.perf_counter()
        time.sleep(step_s)  # the step's compute
        with torch.no_grad():
            w.sub_(local_update(rank // INNER, step))
        steps_trace.append((start, time.perf_counter()))
        sync.after_step(step + 1)
    sync.finish()
    return {"w": w.detach().clone(), "anchor": sync.anchor.clone(), "rounds": sync.rounds, "elapsed":
            time.perf_counter() - t0, "sync": list(sync.trace), "link": getattr(link, "trace", []), "steps": steps_trace}


def reference(steps: int) -> list[torch.Tensor]:
    """The algorithm of the module docstring, written out for all groups in one process."""
    torch.manual_seed(0)
    w0 = torch.randn(SIZE)
    local = [w0.clone() for _ in range(GROUPS)]
    snap = [w0.clone() for _ in range(GROUPS)]
    anchor, m, prev, pending = w0.clone(), torch.zeros(SIZE), None, None

    def apply(avg: torch.Tensor, newest: list[torch.Tensor]) -> None:
        nonlocal m, prev
        p = 1.0
        if prev is not None and float(prev.norm()) > 0:
            p = 1 / (1 + CONFIG.staleness_penalty * float((avg - prev).norm()) / float(prev.norm()))
        prev = avg
        m = CONFIG.momentum * m + p * avg
        if float(m.norm()) > CONFIG.clip:
            m = m * (CONFIG.clip / float(m.norm()))
        anchor.sub_(CONFIG.lr * m)
        for g in range(GROUPS):
            local[g] = anchor - newest[g]

    for step in range(steps):
        for g in range(GROUPS):
            local[g] = local[g] - local_update(g, step)
        if (step + 1) % CONFIG.every == 0:
            moved = [snap[g] - local[g] for g in range(GROUPS)]
            if pending is not None:
                apply(pending, moved)
            pending = sum(moved) / GROUPS
            snap = [x.clone() for x in local]
    apply(pending, [snap[g] - local[g] for g in range(GROUPS)])
    return local


@pytest.mark.parametrize("steps", [9, 11])   # ending on a boundary, and two steps past one
def test_outer_steps_match_the_reference(steps):
    out = run_distributed(_train, GROUPS * INNER, steps, 0.0, 0.0)
    want = reference(steps)
    for rank, r in enumerate(out):
        torch.testing.assert_close(r["w"], want[rank // INNER], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["anchor"], out[0]["anchor"], rtol=0, atol=0)  # one anchor everywhere
        assert r["rounds"] == steps // CONFIG.every
    # ending on a boundary, finish() leaves every group at the anchor; else each keeps its own newest steps
    assert torch.equal(out[0]["w"], out[INNER]["w"]) == (steps % CONFIG.every == 0)


def test_outer_sync_overlaps_local_steps_over_a_slow_link():
    """A link that takes 0.6 s, rounds of 3 steps x 0.3 s: each average travels while the next round
    computes, so the wait at the next boundary is short and the run takes about the compute alone."""
    delay, step_s, steps = 0.6, 0.3, 9
    out = run_distributed(_train, GROUPS * INNER, steps, delay, step_s)
    for r in out:
        links = r["link"]
        starts = [t for e, t in links if e == "link-start"]
        ends = [t for e, t in links if e == "link-end"]
        assert len(starts) == len(ends) == steps // CONFIG.every
        # trace: during every exchange but the last (waited for by finish), a whole local step ran
        for s, e in list(zip(starts, ends))[:-1]:
            assert any(s <= a and b <= e for a, b in r["steps"]), "no local step ran while the link was busy"
        waits = [t for ev, t in r["sync"] if ev == "wait"]
        applied = [t for ev, t in r["sync"] if ev == "applied"]
        blocked = [b - a for a, b in zip(waits, applied)]
        assert max(blocked[:-1]) < delay / 2, f"boundaries waited {blocked} for a link of {delay} s"
        # a synchronous exchange would add every delay to the compute
        assert r["elapsed"] < steps * step_s + delay + 0.5 * (steps // CONFIG.every - 1) * delay
