"""Which attention graphs the trainer builds before its first step (``build.warm_attention``)."""

from __future__ import annotations

import torch

from seqmesh.parallel.mesh import Mesh
from seqmesh.trainer import build
from seqmesh.trainer.config import config_from_dict
from tests.conftest import cost_model_of


def warm(net, cfg, mesh, cost_model, device):
    return build.warm_attention(net, cfg.parallel, cfg.scheduler, mesh, cost_model, device,
                                max_seq_len=cfg.data.max_seq_len, dtype=cfg.model.dtype)


def _setup(monkeypatch, **sections):
    cfg = config_from_dict({"launch": {"num_workers": 4}, "model": {"dtype": "bf16"}, **sections})
    net = build.build_model(cfg.model, 300, torch.device("cpu"))
    cost_model = cost_model_of(cfg, net, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(build, "warm_cudnn_graphs",
                        lambda longest, *args: calls.append((longest, *args)) or len(longest))
    return cfg, net, cost_model, calls


def test_each_group_size_warms_its_heads_up_to_what_it_holds(monkeypatch):
    """Adaptive over 4 ranks: sizes 1, 2, 4 run 8/4, 4/2, 2/1 query/KV heads per rank (Ulysses), each up
    to the longest document its memory holds, capped by data.max_seq_len."""
    cfg, net, cost_model, _ = _setup(monkeypatch, scheduler={"policy": "adaptive"})
    cap = {d: cost_model.capacity(d) for d in (1, 2, 4)}
    assert cap[1] < cap[2] < cap[4]
    cfg, net, cost_model, calls = _setup(monkeypatch, scheduler={"policy": "adaptive"},
                                         data={"max_seq_len": cap[2]})
    assert warm(net, cfg, Mesh(4, 0), cost_model, torch.device("cuda")) == 3
    (longest, head_dim, scale, dtype, device, backend), = calls
    assert longest == {(8, 4): cap[1], (4, 2): cap[2], (2, 1): cap[2]}
    assert (head_dim, scale, dtype, backend) == (32, 32**-0.5, torch.bfloat16, "auto")


def test_static_policy_warms_its_one_degree_and_the_switch_turns_it_off(monkeypatch):
    cfg, net, cost_model, calls = _setup(monkeypatch, scheduler={"policy": "static", "sp": 2},
                                         data={"max_seq_len": 4096})
    warm(net, cfg, Mesh(4, 0), cost_model, torch.device("cuda"))
    assert calls[0][0] == {(4, 2): 4096}
    cfg, net, cost_model, calls = _setup(monkeypatch, parallel={"warm_attention": False})
    assert warm(net, cfg, Mesh(4, 0), cost_model, torch.device("cuda")) == 0
    assert warm(net, config_from_dict({}), Mesh(1, 0), cost_model, torch.device("cpu")) == 0
    assert calls == []


def test_rank_head_counts_follow_the_ulysses_head_split():
    """32/8 heads: halves and sixteenths keep GQA groups whole; thirds (11, 11, 10 query heads) cut through
    groups of 4, so those ranks get their KV heads repeated to one per query head; 6/2 over 4 ranks mixes
    whole groups (2/1), a cut group (2/2 regular after the cut) and single heads."""
    from seqmesh.parallel.sequence.ulysses import rank_head_counts

    assert rank_head_counts(32, 8, 1) == {(32, 8)}
    assert rank_head_counts(32, 8, 2) == {(16, 4)}
    assert rank_head_counts(32, 8, 16) == {(2, 1)}
    assert rank_head_counts(32, 8, 3) == {(11, 11), (10, 10)}
    assert rank_head_counts(6, 2, 4) == {(2, 1), (2, 2), (1, 1)}
