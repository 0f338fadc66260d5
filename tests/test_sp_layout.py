"""Token layouts: every token exactly once, zigzag balances causal work, bad input is refused clearly."""

from __future__ import annotations

import pytest
import torch

from seqmesh.parallel.sequence import make_sp_batch, shard_tokens
from seqmesh.parallel.sequence.layout import Layout, split_sizes


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (4, 1), (1, 4), (2, 2), (2, 3)])
def test_every_token_once_with_its_document_position(ulysses, ring):
    seqlens = (1, 7, 24, 5, 13)
    lay = Layout(seqlens, ulysses, ring)
    index = torch.cat([lay.local_index(g) for g in range(lay.world)])
    assert torch.equal(index.sort().values, torch.arange(sum(seqlens)))
    starts = torch.tensor((0, *seqlens)).cumsum(0)[:-1]
    expected = torch.arange(sum(seqlens)) - starts.repeat_interleave(torch.tensor(seqlens))
    for g in range(lay.world):
        assert torch.equal(lay.position_ids(lay.local_index(g)), expected[lay.local_index(g)])


@pytest.mark.parametrize("length", [64, 67])
def test_zigzag_balances_causal_work(length):
    """Causal work of a token = number of keys it sees (position + 1); ring positions get equal
    shares (within one full-length token's work when the length is not a multiple of 2W)."""
    lay = Layout((length,), 1, 4)
    work = [int((lay.local_index(g) + 1).sum()) for g in range(4)]
    assert max(work) - min(work) <= (0 if length % 8 == 0 else length)
    assert sum(work) == length * (length + 1) // 2


def test_split_sizes_front_loaded():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(1, 4) == [1, 0, 0, 0]


def test_shard_tokens_and_clear_errors():
    meta = make_sp_batch([3, 2], "local", None)
    assert torch.equal(shard_tokens(meta, torch.arange(5) * 10, -100), torch.arange(5) * 10)
    with pytest.raises(ValueError, match="rows"):
        shard_tokens(meta, torch.arange(4), 0)
    with pytest.raises(ValueError, match="unknown sequence-parallel mode"):
        make_sp_batch([3], "zigzag", None)
    with pytest.raises(ValueError, match="needs a process group"):
        make_sp_batch([3], "ring", None)
    with pytest.raises(ValueError, match="positive ints"):
        make_sp_batch([3, 0], "local", None)
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_sp_batch([3], "local", None, backend="flash3")


def test_degrees_by_mode(monkeypatch):
    from seqmesh.parallel.sequence import sp_degrees

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # 8 ranks per node assumed

    assert sp_degrees("ulysses", 4, None, 8) == (4, 1)
    assert sp_degrees("ring", 4, None, None) == (1, 4)
    assert sp_degrees("tokenring", 4, None, 2) == (1, 4)  # K/V heads never split: any head count
    assert sp_degrees("hybrid", 8, None, 32) == (4, 2)  # largest proper divisor within a node
    assert sp_degrees("hybrid", 16, None, 4) == (4, 4)  # ... and within the head count
    assert sp_degrees("hybrid", 8, 2, None) == (2, 4)
    with pytest.raises(ValueError, match="needs at least 16 attention heads"):
        sp_degrees("ulysses", 16, None, 8)
    with pytest.raises(ValueError, match="must divide"):
        sp_degrees("hybrid", 6, 4, None)
