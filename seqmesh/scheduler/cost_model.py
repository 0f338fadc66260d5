"""How long a sequence-parallel group takes, and whether it fits in memory.

The planner is only as good as this model, and plans are only comparable between planners when
they are priced by the same model; so the formula is the one of issue 4, verbatim, and the JSON
accepts that issue's external form unchanged. A group of ``d`` ranks running sequences
``s_1..s_m`` in one micro-batch takes::

    sum_k (alpha1 * s_k**2 + alpha2 * s_k) / d  +  beta
      + (sum_k s_k) * comm_bytes_per_token / d / (a2a_GBps[d] * 1e6)          [ms]

(no communication term for ``d == 1``) and fits when
``mem_static_bytes + mem_bytes_per_token * sum_k s_k / d <= mem_limit_bytes``.

Two extensions, both optional in the JSON, neither changing the formula above:

* ``speed``: one factor per HDP rank (1.0 = nominal). A group runs at the pace of its slowest rank,
  so its time is divided by the smallest factor among its ranks; a straggling node gets less work.
* ``grad_reduce_ms``: the gradient reduction at the end of the step (plan-independent).

seqmesh's own JSON is the external form plus ``"format": "seqmesh-cost-model/1"``, those two
extensions and a free-form ``"source"`` (where the coefficients came from).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = "seqmesh-cost-model/1"
_REQUIRED = ("alpha1_ms_per_tok2", "alpha2_ms_per_tok", "beta_ms", "a2a_GBps", "comm_bytes_per_token",
             "mem_bytes_per_token", "mem_static_bytes", "mem_limit_bytes")


@dataclass(frozen=True)
class CostModel:
    alpha1_ms_per_tok2: float
    alpha2_ms_per_tok: float
    beta_ms: float
    a2a_GBps: dict[int, float]
    comm_bytes_per_token: float
    mem_bytes_per_token: float
    mem_static_bytes: float
    mem_limit_bytes: float
    speed: tuple[float, ...] = ()
    grad_reduce_ms: float = 0.0
    source: str = ""
    _bw_sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("alpha1_ms_per_tok2", "alpha2_ms_per_tok", "beta_ms", "comm_bytes_per_token",
                    "mem_bytes_per_token", "mem_static_bytes", "mem_limit_bytes", "grad_reduce_ms"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cost model: {key}={v!r} must be a finite non-negative number")
        if self.mem_bytes_per_token <= 0:
            raise ValueError("cost model: mem_bytes_per_token must be > 0 (every token holds activations)")
        if self.mem_static_bytes >= self.mem_limit_bytes:
            raise ValueError(f"cost model: mem_static_bytes={self.mem_static_bytes:.4g} leaves no room under "
                             f"mem_limit_bytes={self.mem_limit_bytes:.4g}; shard model states further or raise the limit")
        for d, bw in self.a2a_GBps.items():
            if not isinstance(d, int) or d < 2 or not (isinstance(bw, (int, float)) and bw > 0):
                raise ValueError(f"cost model: a2a_GBps[{d!r}]={bw!r}: keys are group sizes >= 2, values GB/s > 0")
        if any(not (isinstance(s, (int, float)) and s > 0) for s in self.speed):
            raise ValueError(f"cost model: speed factors must all be > 0, got {list(self.speed)}")
        object.__setattr__(self, "_bw_sizes", tuple(sorted(self.a2a_GBps)))

    # ---- time -------------------------------------------------------------------------------------
    def bandwidth_GBps(self, d: int) -> float:
        """All-to-all bandwidth of a group of ``d`` ranks.

        A size missing from the table takes the nearest listed size below it (the largest listed
        size stands for every larger group: across nodes the NIC, not the group size, bounds it),
        or the smallest listed size when it lies below all of them.
        """
        if d in self.a2a_GBps:
            return self.a2a_GBps[d]
        if not self._bw_sizes:
            raise ValueError(f"cost model has no a2a_GBps entries, so groups of {d} ranks cannot be priced; "
                             "add a2a_GBps (e.g. from `seqmesh profile`) or plan with sp=1")
        below = [k for k in self._bw_sizes if k < d]
        return self.a2a_GBps[below[-1] if below else self._bw_sizes[0]]

    def comm_ms_per_token(self, d: int) -> float:
        """Communication per token of a group of ``d``, already divided by ``d`` (per rank)."""
        if d == 1:
            return 0.0
        return self.comm_bytes_per_token / d / (self.bandwidth_GBps(d) * 1e6)

    def seq_ms(self, s: Any, d: int) -> Any:
        """A sequence's (or an array of sequences') share of a group's time, without beta."""
        s = np.asarray(s, dtype=np.float64) if not isinstance(s, (int, float)) else float(s)
        return (self.alpha1_ms_per_tok2 * s * s + self.alpha2_ms_per_tok * s) / d + s * self.comm_ms_per_token(d)

    def group_ms(self, lengths: Sequence[int], d: int, speed: float = 1.0) -> float:
        """Time of one group running ``lengths`` in one micro-batch at the pace ``speed``."""
        if not len(lengths):
            return 0.0
        return (float(np.sum(self.seq_ms(np.asarray(lengths), d))) + self.beta_ms) / speed

    def rank_speed(self, gpus: int) -> np.ndarray:
        """Per-rank speed factors for an HDP group of ``gpus`` ranks (all 1.0 unless given)."""
        if not self.speed:
            return np.ones(gpus)
        if len(self.speed) != gpus:
            raise ValueError(f"cost model lists {len(self.speed)} speed factors but the plan has {gpus} ranks; "
                             "give one factor per HDP rank or none")
        return np.asarray(self.speed, dtype=np.float64)

    # ---- memory -----------------------------------------------------------------------------------
    def tokens_per_rank(self) -> float:
        """Activation tokens one rank holds in one micro-batch."""
        return (self.mem_limit_bytes - self.mem_static_bytes) / self.mem_bytes_per_token

    def fits(self, total_tokens: float, d: int) -> bool:
        return self.mem_static_bytes + self.mem_bytes_per_token * total_tokens / d <= self.mem_limit_bytes

    def capacity(self, d: int) -> int:
        """Most tokens a group of ``d`` ranks holds in one micro-batch (largest ``t`` with ``fits(t, d)``)."""
        t = int(self.tokens_per_rank() * d)
        while t > 0 and not self.fits(t, d):
            t -= 1
        while self.fits(t + 1, d):
            t += 1
        return t

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT}
        for key in _REQUIRED:
            d[key] = getattr(self, key)
        d["a2a_GBps"] = {str(k): v for k, v in sorted(self.a2a_GBps.items())}
        if self.speed:
            d["speed"] = list(self.speed)
        d["grad_reduce_ms"] = self.grad_reduce_ms
        if self.source:
            d["source"] = self.source
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "cost model JSON") -> "CostModel":
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object with keys {', '.join(_REQUIRED)}")
        fmt = raw.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"{where}: key 'format' is {fmt!r}; this seqmesh reads {FORMAT!r} or no 'format' key "
                             "(the external form)")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                             f"(a cost model needs {', '.join(_REQUIRED)}; `seqmesh profile` writes one)")
        unknown = sorted(set(raw) - set(_REQUIRED) - {"format", "speed", "grad_reduce_ms", "source"})
        if unknown:
            raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")

        def number(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: key {key!r} must be a number, got {value!r}")
            return float(value)

        bw_raw = raw["a2a_GBps"]
        if not isinstance(bw_raw, dict):
            raise ValueError(f"{where}: key 'a2a_GBps' must be an object mapping group size to GB/s, "
                             f"e.g. {{\"2\": 150, \"4\": 130}}, got {bw_raw!r}")
        bw: dict[int, float] = {}
        for k, v in bw_raw.items():
            try:
                size = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: key 'a2a_GBps' has non-integer group size {k!r}") from None
            bw[size] = number(f"a2a_GBps[{k}]", v)
        speed = raw.get("speed", [])
        if not isinstance(speed, list):
            raise ValueError(f"{where}: key 'speed' must be a list with one factor per HDP rank, got {speed!r}")
        try:
            return cls(**{k: number(k, raw[k]) for k in _REQUIRED if k != "a2a_GBps"}, a2a_GBps=bw,
                       speed=tuple(number("speed", s) for s in speed),
                       grad_reduce_ms=number("grad_reduce_ms", raw.get("grad_reduce_ms", 0.0)),
                       source=str(raw.get("source", "")))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "cost model JSON") -> "CostModel":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(raw, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"cost model file {str(p)!r} not found; write one with `seqmesh profile --out {p}`")
        return cls.from_json(p.read_text(), where=f"cost model {str(p)!r}")

    def with_speed(self, speed: Sequence[float]) -> "CostModel":
        d = self.to_dict()
        d["speed"] = [float(s) for s in speed]
        return CostModel.from_dict(d)


def default_cost_model(*, params: float, hidden_size: int, num_layers: int, device_flops: float,
                       mem_limit_bytes: float, link_GBps: float = 10.0, max_group: int = 1024,
                       dp_shards: int = 1, act_bytes: int = 2, checkpointing: bool = True) -> CostModel:
    """A cost model from first principles, for workers that have no profile yet.

    Every coefficient is a count divided by a rate the caller states, none is tuned:

    * ``alpha2 = 6 * params / device_flops`` and ``alpha1 = 6 * hidden * layers / device_flops``:
      the training FLOPs of a token (linear layers) and of a token pair under causal attention
      (``2 L^2 h`` forward per layer, x3 for forward+backward; seqmesh.trainer.flops' convention),
      times 4/3 when activations are recomputed. ``device_flops`` is what the device sustains
      (e.g. NOTES.md's measured bf16 matmul rate), not its datasheet peak.
    * ``beta = 0``: a per-micro-batch fixed cost exists (kernel launches, parameter gathers) but no
      count predicts it; `seqmesh profile` measures it, and until then the planner simply does not
      prefer fewer micro-batches.
    * ``comm_bytes_per_token``: Ulysses moves q, k, v and the output (``4 * hidden`` values of
      ``act_bytes``) per layer, forward and backward (and the recomputed forward).
    * Memory: with checkpointing a token keeps each layer's input (``2 * hidden * layers`` bytes
      at bf16) plus one layer's working set (~34 hidden-sized values, Korthikanti et al. 2022, with
      a fused attention kernel); without it, the working set of every layer. Model states are
      16 bytes per parameter (bf16 weights and grads, fp32 master weights and two Adam moments)
      divided over ``dp_shards`` ZeRO shards.
    """
    for key, v in (("params", params), ("hidden_size", hidden_size), ("num_layers", num_layers),
                   ("device_flops", device_flops), ("mem_limit_bytes", mem_limit_bytes), ("link_GBps", link_GBps),
                   ("dp_shards", dp_shards), ("max_group", max_group)):
        if not v > 0:
            raise ValueError(f"default_cost_model: {key}={v!r} must be > 0")
    recompute = 4 / 3 if checkpointing else 1.0
    passes = 3 if checkpointing else 2
    per_layer_work = 34 * hidden_size * act_bytes // 2
    mem_per_token = (act_bytes * hidden_size * num_layers + per_layer_work) if checkpointing \
        else per_layer_work * num_layers
    sizes = [2 ** k for k in range(1, int(math.log2(max_group)) + 1)]
    return CostModel(
        alpha1_ms_per_tok2=6.0 * hidden_size * num_layers * recompute / device_flops * 1e3,
        alpha2_ms_per_tok=6.0 * params * recompute / device_flops * 1e3,
        beta_ms=0.0,
        a2a_GBps={d: float(link_GBps) for d in sizes},
        comm_bytes_per_token=float(4 * hidden_size * act_bytes * passes * num_layers),
        mem_bytes_per_token=float(mem_per_token),
        mem_static_bytes=16.0 * params / dp_shards,
        mem_limit_bytes=float(mem_limit_bytes),
        source=f"default_cost_model(params={params:.4g}, hidden={hidden_size}, layers={num_layers}, "
               f"device_flops={device_flops:.4g}, link_GBps={link_GBps}, dp_shards={dp_shards})",
    )
