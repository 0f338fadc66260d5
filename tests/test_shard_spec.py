"""Shard specs: what each transform records on the parameters it slices, read without knowing module classes."""

from __future__ import annotations

import pytest
from torch import nn

from seqmesh.parallel.shard_spec import (ShardSpec, named_parameters, record_stage, set_shard_spec, shard_spec,
                                         shard_specs, tp_replicated, tp_slice)


def test_slices_overlap_along_their_dimension() -> None:
    full = (10, 4)
    a, b = tp_slice(full, 0, 0, 5, 0, 2), tp_slice(full, 0, 5, 5, 1, 2)
    whole = ShardSpec(full)
    assert a.shape == (5, 4) and a.numel == 20 and whole.shape == full
    assert not a.intersects(b) and a.intersects(whole) and whole.intersects(b)
    assert whole.overlap(b) == (0, 5, 10)
    with pytest.raises(ValueError, match="dim 0 .* dim 1"):
        a.overlap(tp_slice(full, 1, 0, 2, 0, 2))


def test_padding_rows_are_part_of_the_local_shape_only() -> None:
    spec = tp_slice((97, 8), 0, 49, 48, 1, 2, padding=1)
    spec.check((49, 8), "embed")
    with pytest.raises(ValueError, match="embed: local shape"):
        spec.check((48, 8), "embed")


def test_unrecorded_parameters_are_whole_and_the_stage_is_kept() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    record_stage(model[1], 1)
    set_shard_spec(model[0].weight, tp_replicated((2, 3), 1, 2))
    specs = shard_specs(model, tp_rank=1)
    assert sorted(specs) == sorted(named_parameters(model))
    assert specs["0.weight"].writer is False  # TP rank 1 of a replicated weight: rank 0 writes it
    assert specs["0.bias"] == ShardSpec((2,), writer=False)
    assert specs["1.weight"].stage == 1 and shard_spec(model[1].weight).stage == 1
    record_stage(model, 0)  # a stage that comes later does not take over an owned parameter
    assert shard_spec(model[1].weight).stage == 1 and shard_spec(model[0].bias).stage == 0
