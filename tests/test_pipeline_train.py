"""Pipeline parallelism in the real step loop: PP x HDP x TP runs of ``train()`` equal one process.

Every layout trains the same tiny model (tied embeddings, 4 layers) on the same data for 3 steps;
per-step losses, gradient norms (clipping is active) and the final parameters must equal a
single-process run. One world size per spawn, several layouts per spawn (start-up dominates).
On two GPUs, the pipeline's point-to-point traffic over NCCL with messages past NCCL's buffers.
"""

from __future__ import annotations

import datetime
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.pipeline import StageMicroBatch, run_pipeline, split_model
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.build import build_model, build_optimizer
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.data import IGNORE_INDEX, num_targets, pack
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.data.tokenizer import BYTE_VOCAB_SIZE
from seqmesh.trainer.model import Transformer, tiny_config
from seqmesh.trainer.reshard import load_resharded, named_parameters
from seqmesh.parallel.sequence import apply_sequence_parallel, make_sp_batch, shard_tokens
from tests.conftest import write_corpus
from tests.distributed import run_distributed
from tests.tolerances import loss_rel

STEPS = 3
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2}


def _corpus(tmp: Path) -> Path:
    """Documents of very different lengths, so that the adaptive planner changes its groups from step to step."""
    rng = random.Random(4)
    return write_corpus(tmp, [rng.choice([4, 8, 12, 20, 30, 60, 90, 150]) for _ in range(40)])


# Time and memory of the adaptive planner, fixed (not derived from the model or the machine): at
# most 70 tokens per rank and micro-batch, so the longest documents run in SP groups of two, and
# with these documents some steps leave a rank idle in a micro-batch (a placeholder work item).
COST_MODEL = {"alpha1_ms_per_tok2": 1e-6, "alpha2_ms_per_tok": 1e-3, "beta_ms": 0.0, "a2a_GBps": {"2": 1.0},
              "comm_bytes_per_token": 1e3, "mem_bytes_per_token": 1e4, "mem_static_bytes": 0.0,
              "mem_limit_bytes": 7e5}


def _overrides(src: str, tmp: str, world: int, *, tp: int = 1, pp: int = 1, virtual: int = 1, zero: int = 0,
               scheduler: dict | None = None, stop_at: int | None = None, resume: bool = False,
               checkpointed: bool = False) -> dict:
    return {
        # Tiling the MLP and the loss changes no result either (it runs on the pipeline's own layers and head).
        "model": {**MODEL, "activation_checkpointing": checkpointed,
                  **({"mlp_tile_tokens": 16, "loss_tile_tokens": 16} if checkpointed else {})},
        "data": {"source": src, "tokenizer": "byte", "max_seq_len": 96, "global_batch": 6, "cache_dir": f"{tmp}/cache"},
        "parallel": {"tp": tp, "pp": pp, "pp_virtual": virtual, "zero_stage": zero}, "launch": {"num_workers": world},
        # A larger Adam eps than the default keeps elements with a near-zero gradient from turning
        # last-bit differences of the sums (any other split sums in another order) into visible
        # parameter differences; every element with a real gradient still moves by ~lr per step.
        "optim": {"warmup_steps": 1, "lr": 1e-2, "eps": 1e-6},
        "scheduler": {"lookahead": 0, **(scheduler or {})},
        "steps": STEPS, "stop_at": stop_at, "ckpt_every": STEPS, "resume": resume,
    }


def _adaptive(tmp: str) -> dict:
    path = Path(tmp, "cost_model.json")
    path.write_text(json.dumps(COST_MODEL))
    return {"policy": "adaptive", "cost_model": str(path)}


def _run(rank: int, world: int, name: str, overrides: dict, tmp: str) -> dict:
    """``train()`` into ``tmp/name``; rank 0's metric records."""
    from seqmesh.trainer.loop import train

    run_dir = f"{tmp}/{name}"
    train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    return {"records": records}


def _runs(rank: int, world: int, runs: list[tuple[str, str, dict]], tmp: str, extras: tuple = ()) -> dict:
    """Several runs in one spawn, each ``(key, run directory, overrides)``, then ``extras`` (functions of rank, world)."""
    out = {key: _run(rank, world, name, overrides, tmp) for key, name, overrides in runs}
    out.update({fn.__name__: fn(rank, world) for fn in extras})
    return out


def _final_model(tmp: str, name: str) -> dict[str, torch.Tensor]:
    """The run's final parameters, unsharded: its last (layout-free) checkpoint loaded into the whole model in
    this process. ``load_resharded`` refuses a checkpoint whose parameter names or shapes differ from the
    model's, so a pipeline run must have saved every parameter exactly once (a tied copy not at all)."""
    cfg = config_from_dict(_overrides("", tmp, 1))
    model = build_model(cfg.model, BYTE_VOCAB_SIZE, torch.device("cpu"))
    load_resharded(f"{tmp}/{name}", model, build_optimizer(model, cfg.optim), Mesh(1, 0))
    return {key: p.detach().clone() for key, p in named_parameters(model).items()}


def _check_same_as_reference(name: str, per_rank: list[dict], ref: dict, tmp: str) -> None:
    records, ref_records = per_rank[0][name]["records"], ref["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in ref_records], rel=1e-5), name
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in ref_records], rel=1e-4), name
    # The step's model FLOPs do not depend on the layout (MFU divides them over all devices).
    assert [r["flops"] for r in records] == [r["flops"] for r in ref_records]
    params = _final_model(tmp, name)
    # Adam moves an element with a near-zero gradient by a share of lr that hangs on the last bits
    # of its gradient sum (summed in another order here): isolated elements may differ by a percent
    # of one step's lr (1e-2); everything else agrees to fp32 rounding.
    for key, value in params.items():
        torch.testing.assert_close(value, ref["model"][key], rtol=1e-5, atol=1e-4,
                                   msg=lambda m, key=key: f"{name}: {key}: {m}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[str, str, dict]:
    """The corpus and the single-process reference run (model in its own checkpoint)."""
    tmp = tmp_path_factory.mktemp("pp_train")
    src = str(_corpus(tmp))
    ref = run_distributed(_run, 1, "reference", _overrides(src, str(tmp), 1), str(tmp))[0]
    ref["model"] = _final_model(str(tmp), "reference")
    assert ref["records"][0]["grad_norm"] > 1.0, "clipping (optim.grad_clip=1) must be active for the norm to matter"
    return src, str(tmp), ref


def test_pp2_and_interleaved_equal_one_process_and_resume_exactly(workspace) -> None:
    src, tmp, ref = workspace
    runs = [("pp2_zero1", "pp2_zero1", _overrides(src, tmp, 2, pp=2, zero=1)),
            ("pp2_v2_zero2", "pp2_v2_zero2", _overrides(src, tmp, 2, pp=2, virtual=2, zero=2)),
            ("pp2_checkpointed", "pp2_checkpointed", _overrides(src, tmp, 2, pp=2, checkpointed=True)),
            ("stopped", "resume", _overrides(src, tmp, 2, pp=2, zero=1, stop_at=2)),
            ("resumed", "resume", _overrides(src, tmp, 2, pp=2, zero=1, resume=True))]
    per_rank = run_distributed(_runs, 2, runs, tmp)
    for name in ("pp2_zero1", "pp2_v2_zero2", "pp2_checkpointed"):
        _check_same_as_reference(name, per_rank, ref, tmp)
    # Stopped after step 2 and resumed (model and ZeRO shards per rank): the straight run's losses
    # and final model, bit for bit.
    assert [r["step"] for r in per_rank[0]["stopped"]["records"]] == [1, 2]
    losses = {key: [r["loss"] for r in per_rank[0][key]["records"]] for key in ("resumed", "pp2_zero1")}
    assert losses["resumed"] == losses["pp2_zero1"]
    resumed, straight = _final_model(tmp, "resume"), _final_model(tmp, "pp2_zero1")
    assert resumed.keys() == straight.keys()
    for key, value in resumed.items():
        assert torch.equal(value, straight[key]), key


def test_a_bf16_residual_stream_crosses_pipeline_stages_as_bf16(workspace) -> None:
    """``model.residual_dtype=bf16`` under bf16 autocast: stage boundaries carry the stream in bf16. The
    first step's loss is then the one-process bf16 run's up to the accumulation order of its fp32 GEMM sums
    (a process with fewer threads splits them otherwise: on an AMD EPYC 1e-7 of the loss, bitwise on the
    Intel machines this ran on before), far closer to it than the fp32 stream's loss is; a boundary in
    fp32 would run the second stage's residual adds in fp32, a loss about midway between the two, so the
    test asks for less than an eighth of that distance. Its gradient norm agrees within bf16 rounding of
    reordered gradient sums (2^-8 of an element; far less of the norm); later steps are not compared: Adam
    turns such last-bit differences of near-zero gradients into visible ones."""
    src, tmp, _ = workspace

    def bf16(overrides: dict, residual: str) -> dict:
        overrides["model"].update(dtype="bf16", residual_dtype=residual)
        return overrides

    one = run_distributed(_runs, 1, [("bf16", "bf16_one", bf16(_overrides(src, tmp, 1), "bf16")),
                                     ("fp32", "fp32_one", bf16(_overrides(src, tmp, 1), "fp32"))], tmp)[0]
    pp2 = run_distributed(_runs, 2, [("bf16", "bf16_pp2", bf16(_overrides(src, tmp, 2, pp=2), "bf16"))], tmp)[0]
    first = {key: runs[stream]["records"][0] for key, runs, stream in
             (("one", one, "bf16"), ("pp2", pp2, "bf16"), ("fp32", one, "fp32"))}
    stream_effect = abs(first["fp32"]["loss"] - first["one"]["loss"])
    assert stream_effect > 0
    assert abs(first["pp2"]["loss"] - first["one"]["loss"]) < stream_effect / 8, first
    assert first["pp2"]["grad_norm"] == pytest.approx(first["one"]["grad_norm"], rel=2.0**-8)


# Two HDP ranks in a pipeline of two: rank 1 sits out micro-batches 0 and 2, and the SP group of
# both ranks is rank 1's first work item but rank 0's second. Taking items by position in the
# plan (placeholders for idle micro-batches) keeps both ranks' SP collectives in the same order
# under 1F1B; numbering each rank's own items would pair the backward of one micro-batch on rank 0
# with the forward of another on rank 1.
PLAN = plan_from_assignment(2, [[(0, 1, [0, 1])], [(0, 2, [2])], [(0, 1, [3])], [(0, 2, [4, 5])]])
LENGTHS = [37, 5, 64, 12, 29, 41]
VOCAB = 97


def _small_model() -> Transformer:
    torch.manual_seed(0)
    return apply_sequence_parallel(Transformer(tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=4, num_attention_heads=4,
                                                           num_key_value_heads=2)))


def _docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _placeholder_step(rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The loop's pipeline step over PLAN with pp=2 x hdp=2: loss and HDP-summed gradients (tied pair summed)."""
    from seqmesh.trainer.loop import run_pipeline_step

    cfg = config_from_dict({"model": MODEL, "parallel": {"pp": 2, "sp_mode": "ulysses"},
                            "launch": {"num_workers": world}})
    mesh = Mesh(world, rank, pp=2)
    mesh.ensure_sp_groups((g.first, g.count) for mb in PLAN.microbatches for g in mb.groups)
    model = split_model(_small_model(), mesh.pp_rank, mesh.pp, 1, 96, torch.device("cpu"), mesh.embedding_group)
    docs = _docs()
    loss = run_pipeline_step(model, PLAN, lambda g: [docs[s] for s in g.sequences], mesh, cfg.model, cfg.parallel,
                             torch.device("cpu"), num_targets(LENGTHS))
    model.reduce_tied_gradient()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=mesh.hdp_group)
    dist.all_reduce(loss)
    return loss.item() / num_targets(LENGTHS), {n: p.grad for n, p in model.named_parameters()}


def test_pp2_hdp2_adaptive_and_tp2_equal_one_process(workspace) -> None:
    src, tmp, ref = workspace
    # Interleaved (two chunks per rank): placeholders also pad the items to whole rounds of pp.
    runs = [("pp2_v2_hdp2_adaptive", "pp2_v2_hdp2_adaptive", _overrides(src, tmp, 4, pp=2, virtual=2, zero=1,
                                                                        scheduler=_adaptive(tmp))),
            ("pp2_tp2", "pp2_tp2", _overrides(src, tmp, 4, pp=2, tp=2))]
    per_rank = run_distributed(_runs, 4, runs, tmp, (_placeholder_step,))
    for name, _, _ in runs:
        _check_same_as_reference(name, per_rank, ref, tmp)
    records = per_rank[0]["pp2_v2_hdp2_adaptive"]["records"]
    sizes = [tuple(r["plan_group_sizes"]) for r in records]
    idle = [sum(r["plan_group_sizes"]) < 2 * r["plan_microbatches"] for r in records]
    assert any(2 in s for s in sizes) and len(set(sizes)) > 1 and any(idle), (
        f"the plans (group sizes {sizes}, a rank idle: {idle}) no longer cover SP groups, changing groups and idle "
        "ranks; adjust COST_MODEL's mem_limit_bytes")

    # The hand-made plan with idle ranks and a shared SP group at different work positions.
    model, docs, ref_loss = _small_model(), _docs(), 0.0
    for group in [g for mb in PLAN.microbatches for g in mb.groups]:
        packed = pack([docs[s] for s in group.sequences])
        hidden = model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))
        loss = token_loss_sum(model.logits(hidden), packed.labels) / num_targets(LENGTHS)
        loss.backward()
        ref_loss += loss.item()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    # Ranks 0 and 2 are the two stages of HDP index 0: together they own every parameter once.
    assert sorted(n for r in (0, 2) for n in per_rank[r]["_placeholder_step"][1]) == sorted(ref_grads)
    for rank in per_rank:
        loss, grads = rank["_placeholder_step"]
        assert loss == pytest.approx(ref_loss, rel=loss_rel(sum(LENGTHS), VOCAB))
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pp2_tp2_hdp2_sp2_zero_equals_one_process(workspace) -> None:
    src, tmp, ref = workspace
    # Every micro-batch in SP groups of two (Ulysses over the TP ranks' local heads), ZeRO-1 over HDP.
    runs = [("pp2_tp2_hdp2", "pp2_tp2_hdp2", _overrides(src, tmp, 8, pp=2, tp=2, zero=1,
                                                        scheduler={"policy": "static", "sp": 2}))]
    per_rank = run_distributed(_runs, 8, runs, tmp)
    _check_same_as_reference("pp2_tp2_hdp2", per_rank, ref, tmp)


def test_layouts_that_do_not_fit_fail_clearly() -> None:
    base = {"model": MODEL, "launch": {"num_workers": 6}}
    with pytest.raises(ConfigError, match="not divisible by parallel.tp x parallel.pp = 1 x 4"):
        config_from_dict({**base, "parallel": {"pp": 4}})
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp x pp = 2 x 2"):
        Mesh(6, 0, tp=2, pp=2)
    with pytest.raises(ConfigError, match="6 pipeline stages but model.num_layers=4"):
        config_from_dict({**base, "parallel": {"pp": 6}})
    with pytest.raises(ConfigError, match="pp x pp_virtual <= 4"):
        config_from_dict({**base, "parallel": {"pp": 3, "pp_virtual": 2}})
    with pytest.raises(ConfigError, match="needs parallel.pp > 1"):
        config_from_dict({**base, "parallel": {"pp_virtual": 2}})
    with pytest.raises(ConfigError, match="offload.target=none"):
        config_from_dict({**base, "parallel": {"pp": 2}, "offload": {"target": "cpu"}})
    with pytest.raises(ValueError, match="cannot fill 3 pipeline ranks x 2 virtual stages"):
        split_model(_small_model(), 0, 3, 2, 96, torch.device("cpu"))


# On NCCL, which ignores tags and runs a communicator's messages in order, 1F1B over one group
# deadlocks once a message outgrows its buffers (a few MB); these messages are 4096 x 2048 fp32 = 32 MB.
GPU_LENGTHS = [1500, 2596, 4096, 3000, 1096, 700, 3396]
GPU_GROUPS = [[0, 1], [2], [3, 4], [5, 6]]
GPU_MODEL = dict(vocab_size=1000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=16)


def _gpu_model(device: torch.device) -> Transformer:
    torch.manual_seed(0)
    return apply_sequence_parallel(Transformer(tiny_config(**GPU_MODEL))).to(device)


def _gpu_items(device: torch.device) -> list[StageMicroBatch]:
    """The micro-batches, laid out for one rank, with the exact ``math`` attention (fp32, any device)."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, GPU_MODEL["vocab_size"], (n,), generator=g) for n in GPU_LENGTHS]
    items = []
    for group in GPU_GROUPS:
        packed = pack([docs[s] for s in group])
        meta = make_sp_batch(packed.seqlens, "local", None, backend="math", device=device)
        items.append(StageMicroBatch(shard_tokens(meta, packed.input_ids.to(device), 0),
                                     shard_tokens(meta, packed.labels.to(device), IGNORE_INDEX), meta))
    return items


def _stage_loss(stage, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_loss_sum(stage.logits(hidden), labels)


def _nccl_pp_step(rank: int, world: int, virtual: int, device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    """PP=world over the pipeline's channels, tied embeddings: loss and gradients (the tied pair summed)."""
    mesh = Mesh(world, rank, pp=world)
    model = split_model(_gpu_model(device), mesh.pp_rank, mesh.pp, virtual, 4096, device, mesh.embedding_group)
    loss = run_pipeline(model.chunks, _gpu_items(device), _stage_loss, num_targets(GPU_LENGTHS), mesh.pp_ranks(),
                        torch.float32, channels=mesh.pipeline_channels)
    model.reduce_tied_gradient()
    dist.all_reduce(loss)
    return loss.item() / num_targets(GPU_LENGTHS), {n: p.grad.cpu() for n, p in model.named_parameters()}


def _nccl_worker(rank: int, world: int, init_file: str, out: str, virtual: int) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.FileStore(init_file, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=device)
    try:
        result = _nccl_pp_step(rank, world, virtual, device)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


@pytest.mark.gpu
@pytest.mark.parametrize("virtual", [1, 2], ids=["1f1b", "interleaved"])
def test_nccl_pipeline_with_large_messages_equals_one_gpu(tmp_path: Path, virtual: int) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    device = torch.device("cuda", 0)
    model, ref_loss = _gpu_model(device), 0.0
    for item in _gpu_items(device):
        loss = token_loss_sum(model.logits(model(item.input_ids, item.meta)), item.labels) / num_targets(GPU_LENGTHS)
        loss.backward()
        ref_loss += loss.item()
    ref_grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
    del model
    torch.cuda.empty_cache()
    # A deadlock ends in the NCCL timeout (120 s), which fails the worker and so this test.
    mp.start_processes(_nccl_worker, args=(2, str(tmp_path / "store"), str(tmp_path), virtual), nprocs=2,
                       join=True, start_method="spawn")
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert sorted(n for _, grads in results for n in grads) == sorted(ref_grads)
    for loss, grads in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)
