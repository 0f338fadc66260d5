"""The per-process record of one-off work: counts diff per step, keys are noted once, compiles are tracked."""

from __future__ import annotations

import torch

from seqmesh import first_use


def test_since_reports_only_what_happened_after_the_snapshot(monkeypatch):
    monkeypatch.setattr(first_use, "_seen", set())
    before = first_use.counts()
    assert first_use.first("graph", ("forward", 4096)) is True
    assert first_use.first("graph", ("forward", 4096)) is False
    assert first_use.first("graph", ("backward", 4096)) is True
    first_use.note("process_group")
    assert first_use.since(before) == {"graph": 2, "process_group": 1}
    assert first_use.since(first_use.counts()) == {}


def test_compiles_and_recompiles_count_once_tracked(monkeypatch):
    monkeypatch.setattr(first_use, "_compiles_tracked", False)
    compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="eager", dynamic=True)
    compiled(torch.ones(3))
    assert "compile" not in first_use.counts()  # not tracked: dynamo is not read
    first_use.track_compiles()
    before = first_use.counts()
    compiled(torch.ones(5))  # another length: the dynamic graph serves it
    assert first_use.since(before) == {}
    compiled(torch.ones(5, dtype=torch.float64))  # another dtype: a recompile
    assert first_use.since(before) == {"compile": 1}
