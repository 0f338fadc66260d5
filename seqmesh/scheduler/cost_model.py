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
* ``extrapolate_bandwidth`` (default false): a group size missing from ``a2a_GBps`` is refused
  (``bandwidth_GBps`` raises, the planner's default sizes leave it out), because a time made up for
  it can make a plan look faster than any valid one (issue 17: a 128-rank group priced with the
  64-rank bandwidth claimed a step under the bound). Set true, such a size takes the nearest listed
  size below (the largest listed size for every larger group: across nodes the NIC, not the group
  size, bounds it), an explicit assumption that the result's config then carries.

**Layout** (``tp``, ``pp``, ``tp_GBps``; optional, 1, 1, 0). The planner plans the HDP plane of
the ``PP x HDP x TP`` mesh; every coefficient above describes the *whole* model on one HDP rank (what
``seqmesh profile`` measures on one device), and the layout turns it into what one device of that
rank does, so one profile prices every layout:

* TP splits every head and the MLP width (and, with Megatron sequence parallelism, the residual
  stream) over ``tp`` devices: compute and Ulysses traffic (local heads only) per token are
  divided by ``tp``. Activation memory is priced at ``(1 + 1/tp) / 2`` of a token's bytes per
  device, not ``1/tp``: a plan priced at ``1/tp`` ran out of memory on 2 H200s (131K tokens of the
  8-layer 8B shape in one TP=2 micro-batch) while the column-parallel GEMMs still saved their
  all-gathered input whole. They now save only the token shard (``seqmesh/parallel/tensor.py``),
  which should bring TP's activations close to ``1/tp``; the conservative price stays until a GPU
  run measures it. TP's own all-gathers and reduce-scatters move the same tensors
  per layer and pass as Ulysses' all-to-all of q, k, v and the output (four hidden-sized ones), so
  they cost ``comm_bytes_per_token * (tp - 1) / tp`` bytes per token of the rank's share at
  ``tp_GBps``; ``tp_GBps = 0`` leaves them unpriced, i.e. part of alpha (``refine`` folds them
  in, exactly: at a fixed ``tp`` they are the same linear term).
* PP splits the layers over ``pp`` stages: every time above (beta included) is a stage's time,
  ``1/pp`` of the whole. A stage holds ``1/pp`` of each micro-batch's activations, but 1F1B keeps
  up to ``pp`` micro-batches in flight on the first stage, so a micro-batch's memory capacity is
  unchanged. The step of a rank is the 1F1B makespan of its items (see ``simulate``).
* Model states (weights, gradients, optimizer) are divided by ``tp * pp``.

With ``tp = pp = 1`` every figure is the formula above, bit for bit. ``group_ms`` and ``seq_ms``
therefore always return one device's (one stage's) time.

**SP mode** (``attention``; optional, Ulysses): ``{"mode": "ring" | "tokenring", "q_heads",
"kv_heads", "head_dim", "layers", "act_bytes", "forward_passes", "p2p_GBps"}`` prices a group by
the ring modes' overlapped transfers instead of Ulysses' all-to-all (``seqmesh.scheduler.sp_comm``
derives the term from each mode's volumes); ``"mode": "ulysses"`` (or no key) is the formula above.

**Links** (``links``, from a cluster file, ``scheduler.cluster``; never in the JSON): with a
``seqmesh.scheduler.links.ClusterLinks`` every group is priced by the links its own ranks use
(``block``): Ulysses by the all-to-all rate of its busiest port, the ring modes per hop and step;
``a2a_GBps`` and ``p2p_GBps`` are then not read and every group size is priced. Times without a
block (``first=None``) are those of the fastest aligned block of that size, so bounds stay bounds.

seqmesh's own JSON is the external form plus ``"format": "seqmesh-cost-model/1"``, those
extensions and a free-form ``"source"`` (where the coefficients came from).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from seqmesh.scheduler.links import Block, ClusterLinks
from seqmesh.scheduler.sp_comm import AttentionComm, ring_exposed_ms

FORMAT = "seqmesh-cost-model/1"
# A profiled cost model that ships with seqmesh (conf/cost_models/README.md says where its figures come from).
EXAMPLE = "conf/cost_models/h200_llama8b_8layers.json"
_REQUIRED = ("alpha1_ms_per_tok2", "alpha2_ms_per_tok", "beta_ms", "a2a_GBps", "comm_bytes_per_token",
             "mem_bytes_per_token", "mem_static_bytes", "mem_limit_bytes")


class CapacityError(ValueError):
    """A sequence longer than the largest allowed group holds in memory: no plan can run the step."""


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
    tp: int = 1
    pp: int = 1
    tp_GBps: float = 0.0
    source: str = ""
    extrapolate_bandwidth: bool = False
    attention: AttentionComm = AttentionComm()
    links: ClusterLinks | None = field(default=None, compare=False)
    _bw_sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _blocks: dict = field(init=False, repr=False, compare=False)
    _rates: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("alpha1_ms_per_tok2", "alpha2_ms_per_tok", "beta_ms", "comm_bytes_per_token",
                    "mem_bytes_per_token", "mem_static_bytes", "mem_limit_bytes", "grad_reduce_ms", "tp_GBps"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cost model: {key}={v!r} must be a finite non-negative number")
        if self.mem_bytes_per_token <= 0:
            raise ValueError("cost model: mem_bytes_per_token must be > 0 (every token holds activations)")
        for key in ("tp", "pp"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"cost model: {key}={v!r} must be an integer >= 1")
        if self.static_bytes >= self.mem_limit_bytes:
            shared = f" ({self.static_bytes:.4g} per device over tp x pp = {self.tp} x {self.pp})" \
                if self.tp * self.pp > 1 else ""
            raise ValueError(f"cost model: mem_static_bytes={self.mem_static_bytes:.4g}{shared} leaves no room under "
                             f"mem_limit_bytes={self.mem_limit_bytes:.4g}; shard model states further or raise the limit")
        for d, bw in self.a2a_GBps.items():
            if not isinstance(d, int) or d < 2 or not (isinstance(bw, (int, float)) and bw > 0):
                raise ValueError(f"cost model: a2a_GBps[{d!r}]={bw!r}: keys are group sizes >= 2, values GB/s > 0")
        if any(not (isinstance(s, (int, float)) and s > 0) for s in self.speed):
            raise ValueError(f"cost model: speed factors must all be > 0, got {list(self.speed)}")
        object.__setattr__(self, "_bw_sizes", tuple(sorted(self.a2a_GBps)))
        object.__setattr__(self, "_blocks", {})
        object.__setattr__(self, "_rates", {})

    # ---- layout -----------------------------------------------------------------------------------
    @property
    def static_bytes(self) -> float:
        """Model states one device holds: ``mem_static_bytes`` shared by its TP and PP peers."""
        return self.mem_static_bytes / (self.tp * self.pp)

    @property
    def act_bytes_per_token(self) -> float:
        """Activation bytes per token of a micro-batch on one device (see the module docstring for TP and PP)."""
        return self.mem_bytes_per_token * (1 + 1 / self.tp) / 2

    @property
    def microbatch_ms(self) -> float:
        """Fixed cost of one micro-batch on one stage (beta, split over the stages like the layers)."""
        return self.beta_ms / self.pp

    def with_layout(self, tp: int = 1, pp: int = 1, tp_GBps: float | None = None) -> "CostModel":
        """This model (coefficients of the whole model on one HDP rank) priced for a TP x PP layout.

        ``tp_GBps`` None keeps the model's own, or else estimates it from the all-to-all table at
        ``tp`` ranks (when it prices that size): profiles time it on the first ``tp`` ranks, which are a TP group (TP is
        innermost), so it is the same links' measured bandwidth; without a table TP's collectives
        stay unpriced (part of alpha). Speed factors of a one-device model are per device, in world
        rank order (as ``seqmesh profile`` and the straggler report give them); when there is one
        per device of the layout's world they become one per HDP rank, the slowest of its
        ``tp x pp`` devices (world rank = stage x HDP x TP + HDP rank x TP + TP rank).
        """
        if tp_GBps is None:
            tp_GBps = self.tp_GBps or (self.bandwidth_GBps(tp) if tp > 1 and self.a2a_GBps and self.priced(tp) else 0.0)
        speed = self.speed
        if speed and tp * pp > 1 and len(speed) % (tp * pp) == 0 and (self.tp, self.pp) == (1, 1):
            per_device = np.asarray(speed, dtype=np.float64).reshape(pp, len(speed) // (tp * pp), tp)
            speed = tuple(float(x) for x in per_device.min(axis=(0, 2)))
        return dataclasses.replace(self, tp=tp, pp=pp, tp_GBps=float(tp_GBps), speed=speed)

    def for_layout(self, tp: int, pp: int) -> "CostModel":
        """The model a run of layout ``tp x pp`` plans with: this one when it was made for that layout,
        the layout applied when it was made for one device (a profile), an error otherwise."""
        if (self.tp, self.pp) == (tp, pp):
            return self
        if (self.tp, self.pp) == (1, 1):
            return self.with_layout(tp, pp)
        raise ValueError(f"the cost model was made for tp={self.tp}, pp={self.pp} (its coefficients may be refit for "
                         f"that layout) but this run uses tp={tp}, pp={pp}; profile again (`seqmesh profile`) or use "
                         "the layout it was made for")

    # ---- time -------------------------------------------------------------------------------------
    def priced(self, d: int) -> bool:
        """Whether a group of ``d`` ranks has a time: one rank always; wider ones under a cluster file,
        or when the mode's table (``a2a_GBps`` for Ulysses, ``attention.p2p_GBps`` for the ring modes)
        lists ``d`` (Ulysses: or lists anything, under ``extrapolate_bandwidth``)."""
        if d == 1 or self.links is not None:
            return True
        return any(self._table_prices(d, m) for m in self.attention.modes(d))

    def _table_prices(self, d: int, mode: str) -> bool:
        if mode != "ulysses":
            return d in self.attention.p2p_GBps
        return d in self.a2a_GBps or (self.extrapolate_bandwidth and bool(self._bw_sizes))

    def has_comm_prices(self) -> bool:
        """Whether any group wider than one rank can be priced (a table or a cluster file)."""
        modes = self.attention.choose or (self.attention.mode,)
        return self.links is not None or any(bool(self.a2a_GBps if m == "ulysses" else self.attention.p2p_GBps)
                                             for m in modes)

    def modes(self, d: int) -> tuple[str, ...]:
        """The SP modes a group of ``d`` ranks may run that this model prices (``attention.choose``,
        or its one ``mode``)."""
        if d == 1:
            return (self.attention.mode,)  # nothing to communicate: every mode is the same
        allowed = self.attention.modes(d)
        if self.links is not None:
            return allowed
        return tuple(m for m in allowed if self._table_prices(d, m)) or allowed

    def best_mode(self, lengths: Sequence[int], d: int, first: int | None = None) -> str:
        """The mode that runs ``lengths`` on a group of ``d`` soonest (ties: the order of ``modes``)."""
        modes = self.modes(d)
        if len(modes) == 1:
            return modes[0]
        s = np.asarray(lengths, dtype=np.float64)
        return min(modes, key=lambda m: float(np.sum(self._mode_seq_ms(s, d, first, m))))

    # ---- links ------------------------------------------------------------------------------------
    def with_links(self, links: ClusterLinks | None) -> "CostModel":
        """This model pricing every group by the links of its ranks (None: the tables again)."""
        return dataclasses.replace(self, links=links)

    def block(self, first: int, d: int) -> Block | None:
        """The links of the group ``[first, first + d)`` of HDP ranks (None without a cluster file)."""
        if self.links is None:
            return None
        key = (first, d)
        if key not in self._blocks:
            self._blocks[key] = self.links.block(self.links.hdp_nodes(first + d, self.tp), first, d)
        return self._blocks[key]

    def aligned_blocks(self, d: int, gpus: int | None = None) -> list[Block]:
        """The aligned blocks of ``d`` ranks over ``gpus`` HDP ranks (the cluster's, None)."""
        if self.links is None:
            return []
        gpus = self.links.world // self.tp if gpus is None else gpus
        return [self.block(k * d, d) for k in range(gpus // d)]

    def _link_patterns(self, d: int) -> list[Block]:
        """One aligned block of ``d`` ranks per link pattern in the cluster: what ``first=None`` takes
        the fastest of."""
        key = ("patterns", d)
        if key not in self._blocks:
            self._blocks[key] = list({b.key: b for b in self.aligned_blocks(d)}.values())
        return self._blocks[key]

    def unpriced_error(self, d: int) -> ValueError:
        """The error for a group size the model does not price: the size, the priced ones, the fixes."""
        return ValueError(
            f"cost model prices all-to-all for group sizes {list(self._bw_sizes)} (a2a_GBps) but not {d}; a group of "
            f"{d} ranks would get a made-up time. Measure it (`seqmesh profile` on {d} ranks) and add a2a_GBps[\"{d}\"], "
            "restrict the group sizes to priced ones (--group-sizes, scheduler.group_sizes), or set "
            "\"extrapolate_bandwidth\": true in the cost model (`seqmesh plan --extrapolate-bandwidth`) to price it with "
            "the nearest listed size below")

    def bandwidth_GBps(self, d: int) -> float:
        """All-to-all bandwidth of a group of ``d`` ranks: the table's, or under
        ``extrapolate_bandwidth`` the nearest listed size's below (the smallest listed when ``d``
        lies below all of them); an unpriced size raises (see the module docstring)."""
        if d in self.a2a_GBps:
            return self.a2a_GBps[d]
        if not self._bw_sizes:
            raise ValueError(f"cost model has no a2a_GBps entries, so groups of {d} ranks cannot be priced; "
                             "add a2a_GBps (e.g. from `seqmesh profile`) or plan with sp=1")
        if not self.extrapolate_bandwidth:
            raise self.unpriced_error(d)
        below = [k for k in self._bw_sizes if k < d]
        return self.a2a_GBps[below[-1] if below else self._bw_sizes[0]]

    def comm_ms_per_token(self, d: int, first: int | None = None) -> float:
        """Ulysses' communication per token of a group of ``d``, already divided by ``d`` (per rank;
        whole model, TP 1): at the group's links when a cluster file is given (the fastest aligned
        block of ``d`` when ``first`` is None), else at ``a2a_GBps[d]``."""
        if d == 1:
            return 0.0
        if self.links is not None:
            blocks = [self.block(first, d)] if first is not None else self._link_patterns(d)
            return self.comm_bytes_per_token / d / (max(b.a2a_GBps for b in blocks) * 1e6)
        return self.comm_bytes_per_token / d / (self.bandwidth_GBps(d) * 1e6)

    def ring_comm_ms(self, s: Any, d: int, first: int | None = None, mode: str | None = None) -> np.ndarray:
        """A ring mode's (``mode``, default ``attention.mode``) exposed communication per sequence (one
        device): at the group's links, or the least of the aligned blocks' when ``first`` is None
        under a cluster file."""
        s = np.asarray(s, dtype=np.float64)
        if d == 1:
            return np.zeros_like(s)
        if self.links is None:
            blocks: list[Block | None] = [None]
        else:
            blocks = [self.block(first, d)] if first is not None else self._link_patterns(d)
        attn = self.attention if mode in (None, self.attention.mode) else dataclasses.replace(self.attention, mode=mode)
        per_block = [ring_exposed_ms(attn, s, d, self.alpha1_ms_per_tok2, b, self._rates) for b in blocks]
        return np.min(per_block, axis=0) / self.tp

    def tp_comm_ms_per_token(self, d: int) -> float:
        """TP's all-gathers and reduce-scatters per token of a group of ``d`` (per rank; whole model)."""
        if self.tp == 1 or not self.tp_GBps:
            return 0.0
        return self.comm_bytes_per_token * (self.tp - 1) / self.tp / d / (self.tp_GBps * 1e6)

    def seq_ms(self, s: Any, d: int, first: int | None = None, mode: str | None = None) -> Any:
        """A sequence's (or an array of sequences') share of a group's time on one device, without
        beta; ``first``: the group's first rank, which decides its links under a cluster file;
        ``mode``: its SP mode (None: the fastest of ``modes(d)`` for each sequence)."""
        s = np.asarray(s, dtype=np.float64) if not isinstance(s, (int, float)) else float(s)
        modes = (mode,) if mode else self.modes(d)
        if len(modes) == 1:
            return self._mode_seq_ms(s, d, first, modes[0])
        return np.minimum.reduce([self._mode_seq_ms(s, d, first, m) for m in modes])

    def _mode_seq_ms(self, s: Any, d: int, first: int | None, mode: str) -> Any:
        compute = (self.alpha1_ms_per_tok2 * s * s + self.alpha2_ms_per_tok * s) / (d * self.tp)
        if mode != "ulysses":
            ring = self.ring_comm_ms(s, d, first, mode)
            return (compute + s * self.tp_comm_ms_per_token(d) + (float(ring) if np.ndim(s) == 0 else ring)) / self.pp
        comm = self.comm_ms_per_token(d, first) / self.tp + self.tp_comm_ms_per_token(d)
        return (compute + s * comm) / self.pp

    def comm_ms(self, s: Any, d: int) -> Any:
        """The communication share of ``seq_ms`` (SP and TP) at the fastest group of ``d`` ranks, in
        the mode that communicates least."""
        out = []
        for mode in self.modes(d):
            if mode != "ulysses":
                out.append((s * self.tp_comm_ms_per_token(d) + self.ring_comm_ms(s, d, mode=mode)) / self.pp)
            else:
                out.append(s * (self.comm_ms_per_token(d) / self.tp + self.tp_comm_ms_per_token(d)) / self.pp)
        return out[0] if len(out) == 1 else np.minimum.reduce(out)

    def group_ms(self, lengths: Sequence[int], d: int, speed: float = 1.0, first: int | None = None,
                 mode: str | None = None) -> float:
        """Time of one group running ``lengths`` in one micro-batch at the pace ``speed`` (one stage's),
        in ``mode`` (None: the group's best mode, ``best_mode``)."""
        if not len(lengths):
            return 0.0
        mode = mode or self.best_mode(lengths, d, first)
        return (float(np.sum(self.seq_ms(np.asarray(lengths), d, first, mode))) + self.microbatch_ms) / speed

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
        return (self.mem_limit_bytes - self.static_bytes) / self.act_bytes_per_token

    def fits(self, total_tokens: Any, d: int) -> Any:
        """Whether a group of ``d`` holds ``total_tokens`` in one micro-batch (elementwise on arrays)."""
        return self.static_bytes + self.act_bytes_per_token * total_tokens / d <= self.mem_limit_bytes

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
        for key, default in (("tp", 1), ("pp", 1), ("tp_GBps", 0.0)):
            if getattr(self, key) != default:
                d[key] = getattr(self, key)
        if self.source:
            d["source"] = self.source
        if self.extrapolate_bandwidth:
            d["extrapolate_bandwidth"] = True
        if self.attention != AttentionComm():
            d["attention"] = self.attention.to_dict()
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
        unknown = sorted(set(raw) - set(_REQUIRED) - {"format", "speed", "grad_reduce_ms", "source", "tp", "pp",
                                                      "tp_GBps", "extrapolate_bandwidth", "attention"})
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

        def degree(key: str) -> int:
            value = raw.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: key {key!r} must be an integer >= 1, got {value!r}")
            return value

        extrapolate = raw.get("extrapolate_bandwidth", False)
        if not isinstance(extrapolate, bool):
            raise ValueError(f"{where}: key 'extrapolate_bandwidth' must be true or false, got {extrapolate!r}")
        try:
            return cls(**{k: number(k, raw[k]) for k in _REQUIRED if k != "a2a_GBps"}, a2a_GBps=bw,
                       extrapolate_bandwidth=extrapolate,
                       speed=tuple(number("speed", s) for s in speed),
                       grad_reduce_ms=number("grad_reduce_ms", raw.get("grad_reduce_ms", 0.0)),
                       tp=degree("tp"), pp=degree("pp"), tp_GBps=number("tp_GBps", raw.get("tp_GBps", 0.0)),
                       source=str(raw.get("source", "")),
                       attention=AttentionComm.from_dict(raw.get("attention", {}), where))
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
            raise ValueError(f"cost model file {str(p)!r} not found; try the shipped example "
                             f"{EXAMPLE!r} (measured on an H200, see its 'source'), or measure your "
                             f"devices with `seqmesh profile --out {p}` (needs GPUs)")
        return cls.from_json(p.read_text(), where=f"cost model {str(p)!r}")

    def with_speed(self, speed: Sequence[float]) -> "CostModel":
        d = self.to_dict()
        d["speed"] = [float(s) for s in speed]
        return CostModel.from_dict(d).with_links(self.links)


def default_cost_model(*, params: float, hidden_size: int, num_layers: int, device_flops: float,
                       mem_limit_bytes: float, link_GBps: float = 10.0, max_group: int = 1024,
                       dp_shards: int = 1, act_bytes: int = 2, checkpointing: bool = True,
                       zero_stage: int | None = None, optim_state_bytes: float = 8.0,
                       whole_grads: bool = False, mem_bytes_per_token: float | None = None,
                       mem_reserved_bytes: float = 0.0, model_states: bool = True) -> CostModel:
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
      fp32 weights and gradients (4 + 4 bytes per parameter) and the optimizer's moments
      (``optim_state_bytes``: 8 for two fp32 Adam moments, ~2 for FP8 ones). ``zero_stage`` None
      divides all of it over ``dp_shards`` (fully sharded states) -- but the gradients with
      ``whole_grads`` (ZeRO-3 keeping the step's full layer gradients for one reduce-scatter per
      step); ZeRO stage 1 shards only the optimizer moments over ``dp_shards`` HDP ranks, stage 2
      the gradients too, stage 0 nothing. ``model_states=False``: they live off the device (parameter
      offload, whose plan then adds what the device holds of them), so none is counted here.
      A caller that knows its model's modules passes its own count instead (``mem_bytes_per_token``,
      the whole model's activations per token) and the working set of a micro-batch that does not
      grow with its tokens, such as a loss tile's logits (``mem_reserved_bytes``, held beside the
      model states).

    The result describes the whole model on one device; ``CostModel.with_layout`` applies TP and PP.
    """
    for key, v in (("params", params), ("hidden_size", hidden_size), ("num_layers", num_layers),
                   ("device_flops", device_flops), ("mem_limit_bytes", mem_limit_bytes), ("link_GBps", link_GBps),
                   ("dp_shards", dp_shards), ("max_group", max_group)):
        if not v > 0:
            raise ValueError(f"default_cost_model: {key}={v!r} must be > 0")
    if zero_stage not in (None, 0, 1, 2):
        raise ValueError(f"default_cost_model: zero_stage={zero_stage!r} must be None, 0, 1 or 2")
    if whole_grads and zero_stage is not None:
        raise ValueError(f"default_cost_model: whole_grads describes fully sharded states (zero_stage=None), "
                         f"got zero_stage={zero_stage}")
    if zero_stage is None:
        mem_static = (8.0 + optim_state_bytes) * params / dp_shards
        if whole_grads:
            mem_static += 4.0 * params * (1 - 1 / dp_shards)
    else:
        grads = 4.0 / (dp_shards if zero_stage >= 2 else 1)
        moments = optim_state_bytes / (dp_shards if zero_stage >= 1 else 1)
        mem_static = (4.0 + grads + moments) * params
    if not model_states:
        mem_static = 0.0
    recompute = 4 / 3 if checkpointing else 1.0
    passes = 3 if checkpointing else 2
    per_layer_work = 34 * hidden_size * act_bytes // 2
    mem_per_token = (act_bytes * hidden_size * num_layers + per_layer_work) if checkpointing \
        else per_layer_work * num_layers
    if mem_bytes_per_token is not None:
        if not mem_bytes_per_token > 0 or mem_reserved_bytes < 0:
            raise ValueError(f"default_cost_model: mem_bytes_per_token={mem_bytes_per_token!r} must be > 0 and "
                             f"mem_reserved_bytes={mem_reserved_bytes!r} >= 0")
        mem_per_token = mem_bytes_per_token
    mem_static += mem_reserved_bytes
    sizes = [2 ** k for k in range(1, int(math.log2(max_group)) + 1)]
    return CostModel(
        alpha1_ms_per_tok2=6.0 * hidden_size * num_layers * recompute / device_flops * 1e3,
        alpha2_ms_per_tok=6.0 * params * recompute / device_flops * 1e3,
        beta_ms=0.0,
        a2a_GBps={d: float(link_GBps) for d in sizes},
        comm_bytes_per_token=float(4 * hidden_size * act_bytes * passes * num_layers),
        mem_bytes_per_token=float(mem_per_token),
        mem_static_bytes=mem_static,
        mem_limit_bytes=float(mem_limit_bytes),
        source=f"default_cost_model(params={params:.4g}, hidden={hidden_size}, layers={num_layers}, "
               f"device_flops={device_flops:.4g}, link_GBps={link_GBps}, dp_shards={dp_shards}"
               + (f", zero_stage={zero_stage}" if zero_stage is not None else "")
               + (f", optim_state_bytes={optim_state_bytes}" if optim_state_bytes != 8.0 else "")
               + (", whole_grads=True" if whole_grads else "") + ")",
    )
