"""What sequence-parallel attention costs on the links of a group: Ulysses, zigzag ring, TokenRing.

Why a term per mode: the three move different tensors. Ulysses all-to-alls q, k, v and the output
and waits for them (``CostModel.comm_bytes_per_token``); the ring and TokenRing move blocks while
the previous block computes, so only what a transfer takes beyond that block's attention is paid.
The planner and the simulator price a group by its mode from the same inputs (head shapes, link
bandwidths, the profiled attention coefficient), so the modes can be compared plan for plan.

**Volumes** per token of a rank's chunk, per layer and ring step (``seqmesh/parallel/sequence``'s
``ring.py`` and ``tokenring.py`` docstrings; ``b`` = activation bytes, ``Hq``/``Hkv`` heads of
``D``):

=========  ======================================  ==============================================
pass       zigzag ring (one way, ``r -> r+1``)     TokenRing (queries to ``r-1``, results to owner)
=========  ======================================  ==============================================
forward    K, V: ``2 Hkv D b``                     q: ``Hq D b``; out + fp32 LSE: ``Hq D b + 4 Hq``
backward   K, V + fp32 dK, dV: ``2 Hkv D (b+4)``;  q, dout, out + LSE: ``3 Hq D b + 4 Hq``;
           then dK, dV's last hop home (``b``)     dQ: ``Hq D b``
=========  ======================================  ==============================================

TokenRing's part-B trimming (packs past the wrap drop part A) is not counted: ring position 0
sends and receives full packs at every step, and the step waits for the slowest rank.

**Timing.** A sequence of ``s`` tokens on ``d`` ranks: each holds ``x = s/d`` tokens; a pass runs
``d`` block steps of attention ``a = w * alpha1 * s^2 / d^2`` each (``w``: the pass's share of the
profiled ``alpha1``: forward 1, backward 2, out of ``forward_passes + 2``), and the transfer for
step ``t`` overlaps step ``t - 1``'s block, so the pass pays ``sum_t max(0, c_t - a)`` beyond its
compute. The ring has ``d - 1`` transfers of ``c = x * bytes / hop bandwidth`` (the slowest hop of
the ring waits everyone); TokenRing at step ``t`` (1..d) sends the queries for step ``t`` (t < d)
and the result of step ``t - 1`` (t > 1) to its owner ``t - 1`` positions on, both through the
sending GPU's ports (``seqmesh.scheduler.links``: one port per link class, shared by the peers
behind it, each direction on its own), so ``c_t`` is the busiest port's bytes over its bandwidth,
of any rank, sending or receiving. Without a cluster file every peer sits behind one port of
``p2p_GBps[d]``.

So where the queries and results share a port (one NVSwitch), TokenRing beats the ring only when
its bytes are fewer: with multi-head attention in the backward (``4 Hq D b`` against ``6 Hkv D b``
elements' worth), not with GQA of 4 query heads per KV head, whose K/V are 4x smaller than q.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seqmesh.scheduler.links import Block

SP_MODES = ("ulysses", "ring", "tokenring")
LSE_BYTES = 4   # fp32 log-sum-exp per head and row


@dataclass(frozen=True)
class Pass:
    """One pass of attention over the layers: its share of alpha1 and the bytes per token it moves."""

    share: float
    send: float          # ring: K/V (and dK/dV) per step; TokenRing: the query pack
    result: float = 0.0  # TokenRing: the block result sent to the queries' owner
    final: float = 0.0   # ring backward: dK/dV's last hop home, not overlapped


@dataclass(frozen=True)
class AttentionComm:
    """The SP mode a run uses and the head shapes its ring modes move (JSON key ``attention``)."""

    mode: str = "ulysses"
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    layers: int = 0
    act_bytes: int = 2
    forward_passes: int = 1
    p2p_GBps: dict[int, float] = field(default_factory=dict)
    choose: tuple[str, ...] = ()  # modes the planner picks from per group (``parallel.sp_mode=auto``); (): ``mode``

    def __post_init__(self) -> None:
        for m in (self.mode, *self.choose):
            if m not in SP_MODES:
                raise ValueError(f"cost model: attention mode {m!r}; choose one of {', '.join(SP_MODES)}")
        if any(m != "ulysses" for m in (self.mode, *self.choose)):
            for key in ("q_heads", "kv_heads", "head_dim", "layers", "act_bytes"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"cost model: attention.{key}={v!r} must be an integer >= 1 for the ring "
                                     "modes (their volumes come from the head shapes)")
            if self.q_heads % self.kv_heads:
                raise ValueError(f"cost model: attention.q_heads={self.q_heads} is not a multiple of "
                                 f"kv_heads={self.kv_heads}")
        if self.forward_passes not in (1, 2):
            raise ValueError(f"cost model: attention.forward_passes={self.forward_passes!r} must be 1, or 2 with "
                             "activation checkpointing (the forward runs again in the backward)")
        for d, bw in self.p2p_GBps.items():
            if not isinstance(d, int) or d < 2 or not (isinstance(bw, (int, float)) and bw > 0):
                raise ValueError(f"cost model: attention.p2p_GBps[{d!r}]={bw!r}: keys are group sizes >= 2, "
                                 "values GB/s > 0")

    def modes(self, d: int) -> tuple[str, ...]:
        """The modes a group of ``d`` ranks may run: ``choose`` (or ``mode``), less Ulysses where the
        group outnumbers the query heads (each rank needs one)."""
        allowed = tuple(m for m in (self.choose or (self.mode,)) if m != "ulysses" or not self.q_heads
                        or d <= self.q_heads)
        return allowed or (self.mode,)

    def passes(self) -> list[Pass]:
        """The passes of one training step, with the bytes per token (all layers) each moves per step."""
        hq, hkv, dim, b, layers = self.q_heads, self.kv_heads, self.head_dim, self.act_bytes, self.layers
        total = self.forward_passes + 2
        if self.mode == "ring":
            fwd = Pass(1 / total, 2 * hkv * dim * b * layers)
            bwd = Pass(2 / total, 2 * hkv * dim * (b + 4) * layers, final=2 * hkv * dim * b * layers)
        else:
            fwd = Pass(1 / total, hq * dim * b * layers, (hq * dim * b + LSE_BYTES * hq) * layers)
            bwd = Pass(2 / total, (3 * hq * dim * b + LSE_BYTES * hq) * layers, hq * dim * b * layers)
        return [fwd] * self.forward_passes + [bwd]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.q_heads:
            out.update(q_heads=self.q_heads, kv_heads=self.kv_heads, head_dim=self.head_dim, layers=self.layers,
                       act_bytes=self.act_bytes, forward_passes=self.forward_passes)
        if self.p2p_GBps:
            out["p2p_GBps"] = {str(k): v for k, v in sorted(self.p2p_GBps.items())}
        if self.choose:
            out["choose"] = list(self.choose)
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "AttentionComm":
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: key 'attention' must be an object, e.g. {{\"mode\": \"tokenring\", "
                             "\"q_heads\": 32, \"kv_heads\": 8, \"head_dim\": 128, \"layers\": 32, \"p2p_GBps\": {\"8\": 111}}")
        known = {"mode", "q_heads", "kv_heads", "head_dim", "layers", "act_bytes", "forward_passes", "p2p_GBps",
                 "choose"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in 'attention'; "
                             f"it takes {', '.join(sorted(known))}")
        p2p_raw = raw.get("p2p_GBps", {})
        if not isinstance(p2p_raw, dict):
            raise ValueError(f"{where}: attention.p2p_GBps must map group size to GB/s, got {p2p_raw!r}")
        try:
            p2p = {int(k): v for k, v in p2p_raw.items()}
        except ValueError:
            raise ValueError(f"{where}: attention.p2p_GBps has a non-integer group size in {list(p2p_raw)}") from None
        try:
            return cls(**{k: v for k, v in raw.items() if k not in ("p2p_GBps", "choose")}, p2p_GBps=p2p,
                       choose=tuple(raw.get("choose", ())))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def _port_ms(q: np.ndarray, res: np.ndarray, cq: np.ndarray, cr: np.ndarray, bw: np.ndarray) -> np.ndarray:
    """ms per token of chunk of the busiest port when bytes ``q`` leave through class ``cq`` and
    ``res`` through ``cr`` (-1: nothing sent); the same class shares one port."""
    tq = np.where(cq >= 0, q / bw[np.maximum(cq, 0)], 0.0)
    tr = np.where(cr >= 0, res / bw[np.maximum(cr, 0)], 0.0)
    return np.where(cq == cr, tq + tr, np.maximum(tq, tr)) / 1e6


def step_rates(attn: AttentionComm, p: Pass, d: int, block: Block | None) -> tuple[np.ndarray, float]:
    """Per ring step, the transfer's ms per token of a rank's chunk (the slowest rank's), and the
    final non-overlapped hop's; ``block`` None: every peer behind one port of ``p2p_GBps[d]``."""
    if block is None:
        if d not in attn.p2p_GBps:
            raise ValueError(f"cost model: attention mode {attn.mode!r} needs the point-to-point bandwidth of a group "
                             f"of {d} ranks: add attention.p2p_GBps[\"{d}\"] (GB/s per GPU and direction; NOTES.md "
                             "has measured figures) or give a cluster file (scheduler.cluster)")
        classes, bw = np.zeros((d, d), dtype=np.int64), np.array([float(attn.p2p_GBps[d])])
    else:
        classes, bw = block.classes.astype(np.int64), block.bandwidth
    ranks = np.arange(d)
    none = np.full(d, -1)
    hop_out, hop_in = classes[ranks, (ranks - 1) % d], classes[ranks, (ranks + 1) % d]
    if attn.mode == "ring":
        hop = float(np.max(_port_ms(np.float64(p.send), np.float64(0), hop_in, none, bw)))
        final = float(np.max(_port_ms(np.float64(p.final), np.float64(0), hop_in, none, bw))) if p.final else 0.0
        return np.full(d - 1, hop), final
    rates = np.empty(d)
    for t in range(1, d + 1):
        q = hop_out if t < d else none
        if t > 1:
            out, inn = classes[ranks, (ranks + t - 1) % d], classes[ranks, (ranks - t + 1) % d]
        else:
            out = inn = none
        q_in = hop_in if t < d else none
        rates[t - 1] = max(np.max(_port_ms(np.float64(p.send), np.float64(p.result), q, out, bw)),
                           np.max(_port_ms(np.float64(p.send), np.float64(p.result), q_in, inn, bw)))
    return rates, 0.0


def ring_exposed_ms(attn: AttentionComm, s: np.ndarray, d: int, alpha1: float, block: Block | None,
                    cache: dict) -> np.ndarray:
    """Communication of the ring modes not hidden behind attention, per sequence (ms, one rank, TP 1).

    ``cache`` (one per cost model) keeps each link pattern's step rates (TokenRing's take ``O(d^2)``)."""
    s = np.asarray(s, dtype=np.float64)
    x = s / d
    out = np.zeros_like(s)
    for k, p in enumerate(attn.passes()):
        key = (attn.mode, d, k, None if block is None else block.key)
        if key not in cache:
            rates, final = step_rates(attn, p, d, block)
            values, counts = np.unique(rates, return_counts=True)
            cache[key] = (values, counts.astype(np.float64), final)
        values, counts, final = cache[key]
        a = p.share * alpha1 * s * s / (d * d)
        out += np.maximum(0.0, x[..., None] * values - a[..., None]) @ counts + x * final
    return out
