"""Where each data-parallel rank's ZeRO-1 shard of a flat parameter buffer begins and ends.

ZeRO-1 with FP8AdamW: all ranks hold the same flat fp32 parameter buffer of ``total`` elements
(padded to ``padded_total`` so that collectives see equal pieces). Each step a rank reduce-scatters
the flat gradient (``reduce_scatter_tensor``), steps only ``flat[lo:hi]`` with an optimizer built as
``FP8AdamW([{"params": [flat[lo:hi]], "index_offset": lo}])`` (the slice's ``.grad`` set to its
piece of the reduced gradient), then all-gathers the parameters (``all_gather_into_tensor``).
Shard borders fall on whole quantization blocks, so every block, scale and random bit is the one an
unsharded optimizer over the whole buffer would have: the sharded run equals it bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple


class Shard(NamedTuple):
    lo: int
    hi: int
    size: int
    padded_total: int


def zero1_shard(total: int, world: int, rank: int, block_size: int) -> Shard:
    """Rank ``rank``'s slice ``[lo, hi)`` of ``total`` elements; every rank's piece is ``size`` long once the
    buffer is padded to ``padded_total = world * size`` (the last real slice may be shorter, or empty)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if total < 0 or block_size < 1:
        raise ValueError(f"need total >= 0 and block_size >= 1, got total={total}, block_size={block_size}")
    blocks = -(-total // block_size)
    size = -(-blocks // world) * block_size
    lo = min(rank * size, total)
    return Shard(lo, min(lo + size, total), size, world * size)
