"""The Plan: what every HDP rank does in one training step.

A plan is the scheduler's only output and the trainer's only instruction about grouping, so it is
plain data (JSON-serialisable, hashable) and knows nothing about torch. Every rank receives the
same plan and checks its hash: two ranks acting on different plans would deadlock in a collective,
so a mismatch is raised as an error before the step instead.

JSON form (README documents it):
``{"gpus": N, "microbatches": [{"groups": [{"ranks": [first, count], "sequences": [ids...]}]}],
   "predicted_ms": float, "lower_bound_ms": float}``
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence


@dataclass(frozen=True)
class Group:
    """A contiguous rank range ``[first, first + count)`` running ``sequences`` together (SP degree = count),
    in SP ``mode`` (``""``: the run's ``parallel.sp_mode``; set when the planner chooses per group)."""

    first: int
    count: int
    sequences: tuple[int, ...]
    mode: str = ""

    @property
    def ranks(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class MicroBatch:
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class Plan:
    gpus: int
    microbatches: tuple[MicroBatch, ...]
    predicted_ms: float = 0.0
    lower_bound_ms: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus,
            "microbatches": [
                {"groups": [{"ranks": [g.first, g.count], "sequences": list(g.sequences),
                             **({"mode": g.mode} if g.mode else {})} for g in mb.groups]}
                for mb in self.microbatches
            ],
            "predicted_ms": self.predicted_ms,
            "lower_bound_ms": self.lower_bound_ms,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        try:
            mbs = tuple(
                MicroBatch(tuple(Group(int(g["ranks"][0]), int(g["ranks"][1]), tuple(int(s) for s in g["sequences"]),
                                       str(g.get("mode", ""))) for g in mb["groups"]))
                for mb in d["microbatches"]
            )
            return cls(int(d["gpus"]), mbs, float(d.get("predicted_ms", 0.0)), float(d.get("lower_bound_ms", 0.0)))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"malformed plan JSON ({e!r}); expected keys gpus, "
                             f"microbatches[].groups[].ranks/sequences") from e

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def digest(self) -> str:
        """Hash of the grouping (not of the predictions), compared across ranks before a step."""
        body = json.dumps(self.to_dict()["microbatches"], separators=(",", ":")).encode()
        return hashlib.sha256(f"{self.gpus}|".encode() + body).hexdigest()[:16]

    def work_of(self, rank: int) -> Iterator[tuple[int, Group]]:
        """The (micro-batch index, group) pairs that ``rank`` takes part in, in execution order."""
        for i, mb in enumerate(self.microbatches):
            for g in mb.groups:
                if g.first <= rank < g.first + g.count:
                    yield i, g
                    break

    def group_sizes(self) -> list[int]:
        return [g.count for mb in self.microbatches for g in mb.groups]

    def validate(self, num_sequences: int) -> None:
        """Raise ValueError unless every sequence appears exactly once and groups are disjoint and in range."""
        seen: dict[int, int] = {}
        for i, mb in enumerate(self.microbatches):
            used = [False] * self.gpus
            for g in mb.groups:
                if g.count < 1 or g.first < 0 or g.first + g.count > self.gpus:
                    raise ValueError(f"micro-batch {i}: group ranks [{g.first}, {g.first + g.count}) "
                                     f"outside 0..{self.gpus - 1}")
                for r in g.ranks:
                    if used[r]:
                        raise ValueError(f"micro-batch {i}: rank {r} is in two groups")
                    used[r] = True
                for s in g.sequences:
                    if s in seen:
                        raise ValueError(f"sequence {s} planned twice (micro-batches {seen[s]} and {i})")
                    seen[s] = i
        missing = sorted(set(range(num_sequences)) - set(seen))
        if missing:
            raise ValueError(f"sequences not planned: {missing[:10]}{'...' if len(missing) > 10 else ''}")
        extra = sorted(s for s in seen if not 0 <= s < num_sequences)
        if extra:
            raise ValueError(f"plan names sequences outside 0..{num_sequences - 1}: {extra[:10]}")


def plan_from_assignment(gpus: int, microbatches: Sequence[Sequence[tuple]],
                         predicted_ms: float = 0.0, lower_bound_ms: float = 0.0) -> Plan:
    """Build a Plan from nested ``(first, count, sequence_ids[, mode])`` tuples (planners' common exit)."""
    return Plan(gpus, tuple(MicroBatch(tuple(Group(t[0], t[1], tuple(t[2]), *t[3:]) for t in mb))
                            for mb in microbatches), predicted_ms, lower_bound_ms)
