"""Sequence-parallel attention over a packed micro-batch of variable-length documents.

The trainer sees only this interface: ``make_sp_batch`` describes how the group's packed documents
are laid out on this rank, ``shard_tokens`` moves any per-token tensor into that layout, and
``sp_attention`` is the attention over the group, which ``apply_sequence_parallel`` (``transform.py``)
makes every layer's attention core. Everything else in the model is token-wise, so any layout
works; the layout is chosen for the attention's load balance.

Modes (``ulysses x ring`` degrees on the group): ``local`` (1 x 1, no communication), ``ulysses``
(W x 1: all-to-all from sequence shards to head shards and back), ``ring`` (1 x W: zigzag ring
attention, K/V round the ring), ``tokenring`` (1 x W, the same layout: queries round the ring one
way, block results straight back the other) and ``hybrid`` (U x W/U: Ulysses among neighbouring
ranks, ring across). All work on
any process group, using group-local ranks for the layout and global ranks for point-to-point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqmesh.kernels.attention import BACKENDS, cu_seqlens_table, varlen_attention
from seqmesh.parallel.sequence.comm import global_rank
from seqmesh.parallel.sequence.layout import Layout
from seqmesh.parallel.sequence.ring import Part, ring_attention, ring_parts
from seqmesh.parallel.sequence.tokenring import tokenring_attention
from seqmesh.parallel.sequence.ulysses import UlyssesPlan, heads_to_seq, seq_to_heads, ulysses_attention, ulysses_plan

SP_MODES = ("local", "ulysses", "ring", "tokenring", "hybrid")

__all__ = ["SP_MODES", "SPBatch", "SequenceParallelAttention", "apply_sequence_parallel", "make_sp_batch",
           "shard_tokens", "sp_attention", "sp_degrees"]


@dataclass
class SPBatch:
    """How one group's packed micro-batch is laid out on this rank (the issue's ``batch_meta``).

    It is the model's ``BatchMeta`` (``seqlens``, ``cu_seqlens``, ``max_seqlen``, ``backend``,
    ``position_ids``) extended with the group, its mode and this rank's share of the tokens."""

    mode: str
    group: "dist.ProcessGroup | None"
    seqlens: tuple[int, ...]
    local_index: Tensor  # [T_local] packed index of each local token; -1 would mark padding (never used)
    position_ids: Tensor  # [T_local] position of each local token inside its document
    layout: Layout
    group_rank: int
    backend: str = "auto"
    # Most head chunks pure Ulysses pipelines its transfers over (1: no pipelining). Off by
    # default: on 2x H200 (Llama-8B heads, causal bf16, fwd+bwd) 4 chunks gave 71.8 / 92.8 / 97.1 /
    # 88.4 % of single-GPU flash against 84.0 / 96.0 / 99.2 / 90.5 % unpipelined at 8K / 32K / 128K /
    # varlen 32K tokens per GPU: at degree 2 a rank exchanges only half its q/k/v over NVLink, which
    # costs less than what the overlap loses (smaller kernels, NCCL sharing the SMs with attention).
    ulysses_chunks: int = 1
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def ulysses_degree(self) -> int:
        return self.layout.ulysses

    @property
    def ring_degree(self) -> int:
        return self.layout.ring

    def cu_seqlens(self, device: torch.device) -> Tensor:
        """int32 cumulative document lengths of the whole packed batch, cached per device."""
        key = ("cu", device)
        if key not in self._tables:
            self._tables[key] = cu_seqlens_table(self.seqlens, device)
        return self._tables[key]

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    def ring_parts(self, device: torch.device) -> list[tuple[Part, Part]]:
        """Zigzag stream parts of every ring position, cached per device."""
        key = ("ring", device)
        if key not in self._tables:
            self._tables[key] = ring_parts(self.layout, device)
        return self._tables[key]

    def ring_peers(self) -> tuple[int, int]:
        """Global ranks of the next and previous ring positions in this rank's ring column."""
        if "ring_peers" not in self._tables:
            lay = self.layout
            pos, u = lay.coords(self.group_rank)
            peer = lambda p: global_rank(self.group, (p % lay.ring) * lay.ulysses + u)  # noqa: E731
            self._tables["ring_peers"] = (peer(pos + 1), peer(pos - 1))
        return self._tables["ring_peers"]

    def ring_ranks(self) -> tuple[int, ...]:
        """Global ranks of every ring position in this rank's ring column (TokenRing sends each
        block result straight to its owner)."""
        if "ring_ranks" not in self._tables:
            lay = self.layout
            u = lay.coords(self.group_rank)[1]
            self._tables["ring_ranks"] = tuple(global_rank(self.group, p * lay.ulysses + u) for p in range(lay.ring))
        return self._tables["ring_ranks"]

    def ulysses_plan(self, hq: int, hkv: int, device: torch.device) -> UlyssesPlan:
        """Head split, row and chunks of this rank's Ulysses row, cached per head shape and device,
        so every layer after the first does no table work on the host."""
        key = ("ulysses", hq, hkv, device)
        if key not in self._tables:
            lay = self.layout
            pos, u = lay.coords(self.group_rank)
            peers = [global_rank(self.group, pos * lay.ulysses + j) for j in range(lay.ulysses)]
            self._tables[key] = ulysses_plan(hq, hkv, peers, u, lay.ulysses_sizes(pos), self.group,
                                             self.ulysses_chunks, device)
        return self._tables[key]


def sp_degrees(mode: str, world: int, ulysses_degree: int | None, num_heads: int | None) -> tuple[int, int]:
    """(Ulysses degree, ring degree) of an SP group of ``world`` ranks in ``mode``."""
    heads = num_heads or world
    if mode == "local":
        if world != 1:
            raise ValueError(f"mode 'local' needs a group of one rank, got {world}; pick 'ulysses', 'ring', "
                             "'tokenring' or 'hybrid'")
        return 1, 1
    if mode == "ulysses":
        if world > heads:
            raise ValueError(f"Ulysses over {world} ranks needs at least {world} attention heads, the model has "
                             f"{heads}; use mode 'hybrid' (Ulysses within at most {heads} ranks) or 'ring'")
        return world, 1
    if mode in ("ring", "tokenring"):
        return 1, world
    if ulysses_degree is None:
        # Ulysses inside a node's fast links, ring across: the largest proper divisor of the group
        # within a node and within the head count.
        node = int(os.environ.get("LOCAL_WORLD_SIZE") or 8)
        ulysses_degree = max(d for d in range(1, max(world, 2)) if world % d == 0 and d <= min(node, heads))
    if ulysses_degree < 1 or world % ulysses_degree:
        raise ValueError(f"hybrid ulysses_degree={ulysses_degree} must divide the group size {world}")
    return ulysses_degree, world // ulysses_degree


def make_sp_batch(seqlens: Sequence[int], mode: str, group: "dist.ProcessGroup | None", *,
                  ulysses_degree: int | None = None, backend: str = "auto",
                  device: torch.device | str | None = None, ulysses_chunks: int = 1,
                  num_heads: int | None = None) -> SPBatch:
    """Lay out a group's packed documents (global lengths ``seqlens``) on this rank.

    ``group`` None means a single rank (mode ``local``). ``device`` places ``local_index`` and
    ``position_ids`` (CPU by default). ``ulysses_chunks`` bounds the head chunks over which pure
    Ulysses overlaps its transfers with attention (1, the default, turns the overlap off; see
    ``SPBatch.ulysses_chunks`` for why). ``num_heads`` (the model's query heads), when given,
    bounds the default hybrid Ulysses degree and lets a Ulysses group larger than the head count
    fail here rather than in the first layer.
    """
    if ulysses_chunks < 1:
        raise ValueError(f"ulysses_chunks must be >= 1, got {ulysses_chunks}")
    if mode not in SP_MODES:
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; choose one of {SP_MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if group is None and mode != "local":
        raise ValueError(f"mode {mode!r} needs a process group; use mode 'local' for group None")
    world = 1 if group is None else dist.get_world_size(group)
    group_rank = 0 if group is None else dist.get_rank(group)
    if group_rank < 0:
        raise ValueError("this rank is not a member of the given process group")
    u, r = sp_degrees(mode, world, ulysses_degree, num_heads)
    layout = Layout(tuple(int(n) for n in seqlens), u, r)
    local_index = layout.local_index(group_rank)
    position_ids = layout.position_ids(local_index)
    return SPBatch(mode, group, layout.seqlens, local_index.to(device), position_ids.to(device), layout, group_rank,
                   backend, ulysses_chunks)


def shard_tokens(meta: SPBatch, x: Tensor, pad_value) -> Tensor:
    """Rows of ``x`` (indexed by packed position on dim 0) that this rank holds, in its layout;
    rows the layout marks as padding (-1) are filled with ``pad_value``."""
    if x.shape[0] != sum(meta.seqlens):
        raise ValueError(f"x has {x.shape[0]} rows but the micro-batch packs {sum(meta.seqlens)} tokens")
    index = meta.local_index.to(x.device)
    rows = x.index_select(0, index.clamp(min=0))
    pad = (index < 0).view(-1, *([1] * (x.dim() - 1)))
    return rows.masked_fill(pad, pad_value)  # a Python scalar: no host-to-device copy (and stream sync)


def sp_attention(q: Tensor, k: Tensor, v: Tensor, meta: SPBatch, group: "dist.ProcessGroup | None", mode: str,
                 causal: bool = True, softmax_scale: float | None = None) -> Tensor:
    """Attention of this rank's tokens (q ``[T_local, Hq, D]``, k/v ``[T_local, Hkv, D]``, local
    layout) against all keys of their documents, over the group: ``[T_local, Hq, D]``."""
    if mode != meta.mode or group is not meta.group:
        raise ValueError(f"sp_attention called with mode {mode!r} and a different group than the SPBatch "
                         f"(mode {meta.mode!r}) was made for; pass meta.mode and meta.group")
    if q.shape[0] != meta.local_index.numel():
        raise ValueError(f"q has {q.shape[0]} tokens but this rank's layout holds {meta.local_index.numel()}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    lay = meta.layout
    if lay.ulysses > 1:
        plan = meta.ulysses_plan(q.shape[1], k.shape[1], q.device)
        if lay.ring == 1:
            return ulysses_attention(q, k, v, plan, meta.cu_seqlens(q.device), meta.max_seqlen, causal, scale,
                                     meta.backend)
        q, k, v = seq_to_heads(q, k, v, plan)
    if lay.ring > 1 and mode == "tokenring":
        out = tokenring_attention(q, k, v, meta.ring_parts(q.device), lay.coords(meta.group_rank)[0],
                                  meta.ring_ranks(), group, causal, scale, meta.backend)
    elif lay.ring > 1:
        pos = lay.coords(meta.group_rank)[0]
        out = ring_attention(q, k, v, meta.ring_parts(q.device), pos, *meta.ring_peers(), group, causal, scale,
                             meta.backend)
    else:
        out = varlen_attention(q, k, v, meta.cu_seqlens(q.device), meta.max_seqlen, causal, scale, meta.backend)[0]
    if lay.ulysses > 1:
        out = heads_to_seq(out, plan)
    return out


# After sp_attention: the transform module imports it from here.
from seqmesh.parallel.sequence.transform import SequenceParallelAttention, apply_sequence_parallel  # noqa: E402
