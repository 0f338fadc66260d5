"""Where each token of a group's packed micro-batch lives, for every sequence-parallel mode.

A group of ``W = ulysses * ring`` ranks is a 2D grid: group rank ``g = pos * ulysses + u``, so the
Ulysses peers of a rank are neighbours (fast links) and the ring runs across. Each ring position
``pos`` owns a *stream* of tokens; its ``ulysses`` ranks split that stream contiguously.

* ``ring == 1``: the stream is the whole packed batch in order.
* ``ring > 1`` (zigzag): every document is cut into ``2 * ring`` contiguous chunks; position ``pos``
  owns chunks ``pos`` and ``2*ring-1-pos`` of every document, so each position does the same causal
  work. Its stream is all its first chunks (part A, document order) then all its second chunks
  (part B): both parts are contiguous, so each ring step is a few plain varlen kernel calls with no
  gathers.

Lengths that are not multiples of ``2 * ring`` are not padded: chunk sizes differ by at most one,
larger chunks first. Then a non-empty chunk never faces an empty one on the causal path (chunk
``c`` non-empty implies every chunk before it is too), and there are no padding tokens that could
leak into attention or the loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one, larger first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _offsets(sizes: list[int]) -> list[int]:
    return [0, *itertools.accumulate(sizes)]


@dataclass(frozen=True)
class RingPosition:
    """Per-document chunk sizes of one ring position's two stream parts."""

    a: tuple[int, ...]  # size of chunk ``pos`` of each document
    b: tuple[int, ...]  # size of chunk ``2*ring-1-pos`` of each document

    @property
    def len_a(self) -> int:
        return sum(self.a)

    @property
    def len_b(self) -> int:
        return sum(self.b)


@dataclass(frozen=True)
class Layout:
    """The token layout of one group: pure integers, identical on every rank of the group."""

    seqlens: tuple[int, ...]
    ulysses: int
    ring: int

    def __post_init__(self) -> None:
        if not self.seqlens or any(not isinstance(n, int) or n <= 0 for n in self.seqlens):
            raise ValueError(f"seqlens must be a non-empty sequence of positive ints, got {self.seqlens!r}")
        if self.ulysses < 1 or self.ring < 1:
            raise ValueError(f"degrees must be >= 1, got ulysses={self.ulysses}, ring={self.ring}")

    @property
    def world(self) -> int:
        return self.ulysses * self.ring

    def coords(self, group_rank: int) -> tuple[int, int]:
        """(ring position, ulysses index) of a group rank."""
        return divmod(group_rank, self.ulysses)

    def ring_position(self, pos: int) -> RingPosition:
        chunks = [split_sizes(n, 2 * self.ring) for n in self.seqlens]
        return RingPosition(tuple(c[pos] for c in chunks), tuple(c[2 * self.ring - 1 - pos] for c in chunks))

    def stream(self, pos: int) -> torch.Tensor:
        """Packed indices of ring position ``pos``'s stream (part A then part B when ring > 1)."""
        if self.ring == 1:
            return torch.arange(sum(self.seqlens))
        parts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for doc_start, n in zip(_offsets(list(self.seqlens)), self.seqlens):
            starts = _offsets(split_sizes(n, 2 * self.ring))
            for part, c in zip(parts, (pos, 2 * self.ring - 1 - pos)):
                part.append(torch.arange(doc_start + starts[c], doc_start + starts[c + 1]))
        return torch.cat(parts[0] + parts[1])

    def stream_len(self, pos: int) -> int:
        if self.ring == 1:
            return sum(self.seqlens)
        p = self.ring_position(pos)
        return p.len_a + p.len_b

    def ulysses_sizes(self, pos: int) -> list[int]:
        """Tokens held by each Ulysses rank of ring position ``pos``."""
        return split_sizes(self.stream_len(pos), self.ulysses)

    def local_index(self, group_rank: int) -> torch.Tensor:
        pos, u = self.coords(group_rank)
        start = _offsets(self.ulysses_sizes(pos))
        return self.stream(pos)[start[u]:start[u + 1]]

    def position_ids(self, local_index: torch.Tensor) -> torch.Tensor:
        """Position of each token inside its document (what RoPE needs under any layout)."""
        lens = torch.tensor(self.seqlens)
        starts = torch.tensor(_offsets(list(self.seqlens))[:-1])
        packed = torch.arange(int(lens.sum())) - starts.repeat_interleave(lens)
        return packed[local_index]
