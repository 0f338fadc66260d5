"""Pipeline parallelism: cost-balanced stages, a deadlock-free 1F1B order, and PP runs equal to one process."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.pipeline import PipelineStage, StageMicroBatch, run_pipeline, split_model
from seqmesh.parallel.pipeline_schedule import (interleaved_1f1b, module_costs, one_f_one_b, partition_layers,
                                                stage_layers)
from seqmesh.parallel.sequence import apply_sequence_parallel, make_sp_batch, shard_tokens
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.data import IGNORE_INDEX, num_targets, pack
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, model_dims, tiny_config
from tests.distributed import run_distributed
from tests.tolerances import loss_rel

VOCAB = 97
LENGTHS = [37, 5, 64, 12, 2, 29, 41, 8, 17]
LOSS_REL = loss_rel(sum(LENGTHS), 128)  # the MLP's width (128) is the longest sum behind a token's loss
# Micro-batches of different total lengths (42, 41, 105, 27): shapes every stage derives itself.
GROUPS = [[0, 1], [3, 5], [2, 6], [7, 8, 4]]


def _model() -> Transformer:
    torch.manual_seed(0)
    return apply_sequence_parallel(Transformer(tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=4, num_attention_heads=4,
                                                           num_key_value_heads=2, tie_word_embeddings=False)))


def _docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _loss(stage: PipelineStage, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_loss_sum(stage.logits(hidden), labels)


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the same micro-batches one after another, each loss over the global target count."""
    model, docs = _model(), _docs()
    denominator, total = num_targets(LENGTHS), 0.0
    for group in GROUPS:
        packed = pack([docs[s] for s in group])
        loss = token_loss_sum(model.logits(model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))),
                              packed.labels)
        (loss / denominator).backward()
        total += loss.item()
    return total / denominator, {n: p.grad.clone() for n, p in model.named_parameters()}


def _layout(docs: list[torch.Tensor], group: "dist.ProcessGroup | None", mode: str) -> StageMicroBatch:
    packed = pack(docs)
    meta = make_sp_batch(packed.seqlens, "local" if group is None else mode, group)
    return StageMicroBatch(shard_tokens(meta, packed.input_ids, 0), shard_tokens(meta, packed.labels, IGNORE_INDEX),
                           meta)


def _chunks(model: Transformer, mesh: Mesh, virtual: int = 1) -> list[PipelineStage]:
    bounds = stage_layers(model.dims, mesh.pp * virtual, seq_len=64)
    return [PipelineStage(model, c * mesh.pp + mesh.pp_rank, mesh.pp * virtual, bounds[c * mesh.pp + mesh.pp_rank])
            for c in range(virtual)]


def _grads(chunks: list[PipelineStage]) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for chunk in chunks for n, p in chunk.named_parameters()}


def _line(mesh: Mesh) -> list[int]:
    return [mesh.global_rank(p, mesh.hdp_rank, mesh.tp_rank) for p in range(mesh.pp)]


def _pp_step(rank: int, world: int, virtual: int) -> tuple[float, dict[str, torch.Tensor]]:
    mesh = Mesh(world, rank, pp=world)
    chunks, docs = _chunks(_model(), mesh, virtual), _docs()
    mbs = [_layout([docs[s] for s in group], None, "local") for group in GROUPS]
    loss_sum = run_pipeline(chunks, mbs, _loss, num_targets(LENGTHS), _line(mesh), torch.float32)
    return loss_sum.item() / num_targets(LENGTHS), _grads(chunks)


@pytest.mark.parametrize("virtual", [1, 2], ids=["1f1b", "interleaved"])
def test_pp2_equals_single_process(virtual: int) -> None:
    ref_loss, ref_grads = _reference()
    results = run_distributed(_pp_step, 2, virtual)
    assert results[0][0] == 0.0
    assert results[1][0] == pytest.approx(ref_loss, rel=LOSS_REL)
    names = [n for _, grads in results for n in grads]
    assert sorted(names) == sorted(ref_grads), "the stages together hold each parameter exactly once"
    for _, grads in results:
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# HDP=2 inside each stage: micro-batch 0 runs sequence parallel over both HDP ranks, the others
# split the documents between them (rank 1 sits out the last micro-batch).
PLAN = plan_from_assignment(2, [
    [(0, 2, [0, 1])],
    [(0, 1, [3, 5]), (1, 1, [2])],
    [(0, 1, [6]), (1, 1, [7, 8])],
    [(0, 1, [4])],
])


def _pp_hdp_step(rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    mesh = Mesh(world, rank, pp=2)
    mesh.ensure_sp_groups((g.first, g.count) for mb in PLAN.microbatches for g in mb.groups)
    chunks, docs = _chunks(_model(), mesh), _docs()
    # Item k is micro-batch k's group of this rank, a placeholder where it sits out (as in the step loop).
    groups = [next((g for g in mb.groups if mesh.hdp_rank in g.ranks), None) for mb in PLAN.microbatches]
    mbs = [None if g is None else _layout([docs[s] for s in g.sequences], mesh.sp_group(g.first, g.count), "ulysses")
           for g in groups]
    loss_sum = run_pipeline(chunks, mbs, _loss, num_targets(LENGTHS), _line(mesh), torch.float32)
    for p in chunks[0].parameters():
        dist.all_reduce(p.grad, group=mesh.hdp_group)
    if mesh.pp_rank == mesh.pp - 1:
        # A group's loss is summed over its SP ranks' token shares; the plan's groups cover every document once.
        dist.all_reduce(loss_sum, group=mesh.hdp_group)
    return loss_sum.item() / num_targets(LENGTHS), _grads(chunks)


def test_pp2_hdp2_with_sequence_parallel_equals_single_process() -> None:
    ref_loss, ref_grads = _reference()
    results = run_distributed(_pp_hdp_step, 4)
    for rank, (loss, grads) in enumerate(results):
        if rank >= 2:
            assert loss == pytest.approx(ref_loss, rel=LOSS_REL)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sorted(set(results[0][1]) | set(results[2][1])) == sorted(ref_grads)


def test_partition_is_the_exact_min_max_split() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        layers = (torch.rand(7, generator=g) * 10).tolist()
        embed, head = float(torch.rand((), generator=g)) * 5, float(torch.rand((), generator=g)) * 30
        for pp in (1, 2, 3):
            got = partition_layers(embed, layers, head, pp)
            assert [r.start for r in got][0] == 0 and got[-1].stop == 7
            assert all(a.stop == b.start and len(a) for a, b in zip(got, got[1:]))

            def worst(bounds: list[range]) -> float:
                return max(sum(layers[i] for i in r) + (embed if s == 0 else 0) + (head if s == pp - 1 else 0)
                           for s, r in enumerate(bounds))

            brute = min(worst([range(a, b) for a, b in zip((0, *cuts), (*cuts, 7))])
                        for cuts in itertools.combinations(range(1, 7), pp - 1))
            assert worst(got) == pytest.approx(brute)


def test_large_vocabulary_head_gets_fewer_layers() -> None:
    dims = model_dims(tiny_config(vocab_size=128_000, hidden_size=256, intermediate_size=704, num_hidden_layers=8))
    embed, layers, head = module_costs(dims, seq_len=1024)
    assert head > layers[0]
    bounds = stage_layers(dims, 2, seq_len=1024)
    assert len(bounds[0]) > len(bounds[1])
    assert [len(r) for r in stage_layers(model_dims(tiny_config(num_hidden_layers=8, vocab_size=64)), 2, 64)] == [4, 4]


def test_partition_rejects_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="cannot fill 3 pipeline stages"):
        partition_layers(0.0, [1.0, 1.0], 0.0, 3)


def test_split_model_owns_each_parameter_once_under_full_names() -> None:
    """Stages' state dicts together are the unsplit model's; a tied head is the last stage's unowned copy."""
    for tied in (False, True):
        config = tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        torch.manual_seed(0)
        full = Transformer(config)
        # Splitting communicates nothing; the tied pair's group is only kept for the step.
        ranks = [split_model(Transformer(config), r, 2, 2, 64, torch.device("cpu"), tied_group=object())
                 for r in range(2)]
        owned = [n for rank in ranks for n in rank.state_dict()]
        expected = [n for n in full.state_dict() if not (tied and n == "lm_head.weight")]
        assert sorted(owned) == sorted(expected)
        assert [c.stage for c in ranks[0].chunks] == [0, 2] and [c.stage for c in ranks[1].chunks] == [1, 3]
        first, last = ranks
        assert (first.tied_weight is first.model.embed_tokens.weight) == tied
        assert (last.tied_copy is last.chunks[-1].lm_head.weight) == tied
        assert all(p is not last.chunks[-1].lm_head.weight for p in last.parameters()) == tied
    with pytest.raises(ValueError, match="Mesh.embedding_group"):
        split_model(Transformer(config), 0, 2, 1, 64, torch.device("cpu"))


def test_1f1b_keeps_at_most_the_stages_ahead_alive() -> None:
    for stages, microbatches in [(2, 5), (4, 3), (4, 8)]:
        for s in range(stages):
            live = 0
            for op, _ in one_f_one_b(microbatches, stages, s):
                live += 1 if op == "F" else -1
                assert 0 <= live <= stages - s


@pytest.mark.parametrize("stages,microbatches,chunks", [(2, 5, 1), (4, 3, 1), (3, 1, 1), (2, 4, 2), (4, 8, 2),
                                                        (3, 6, 3)])
def test_schedule_runs_to_completion(stages: int, microbatches: int, chunks: int) -> None:
    """Simulate blocking receives: F i of virtual stage v waits for F i of v-1, B i for B i of v+1."""
    orders = [interleaved_1f1b(microbatches, stages, s, chunks) for s in range(stages)]
    every = sorted((op, c, i) for op in "FB" for c in range(chunks) for i in range(microbatches))
    assert all(sorted(ops) == every for ops in orders)
    last = stages * chunks - 1
    done: set[tuple[int, str, int]] = set()
    cursor = [0] * stages
    while any(c < len(o) for c, o in zip(cursor, orders)):
        progressed = False
        for s in range(stages):
            if cursor[s] == len(orders[s]):
                continue
            op, c, i = orders[s][cursor[s]]
            v = c * stages + s
            ready = ((v == 0 or (v - 1, "F", i) in done) if op == "F" else
                     (v, "F", i) in done and (v == last or (v + 1, "B", i) in done))
            if ready:
                done.add((v, op, i))
                cursor[s] += 1
                progressed = True
        assert progressed, f"deadlock at cursors {cursor}"


def test_interleaving_needs_whole_rounds_of_microbatches() -> None:
    with pytest.raises(ValueError, match="divisible"):
        interleaved_1f1b(5, 2, 0, 2)
