"""Layout-free checkpoints: saved at one (TP, PP, HDP, ZeRO) layout and resumed at another, the weights come back
bit for bit, the next step's loss is the uninterrupted run's and training goes on as it would have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.pipeline import PipelineStage
from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.parallel.tensor import (apply_tensor_parallel, reduce_tensor_parallel_gradients, tensor_parallel,
                                     vocab_parallel_cross_entropy)
from seqmesh.trainer.build import build_optimizer, build_sharded_optimizer
from seqmesh.trainer.checkpoint import save_checkpoint
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data import IGNORE_INDEX, num_targets, pack
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, tiny_config
from seqmesh.trainer.reshard import _reseed, load_resharded, named_parameters, needed_files, save_resharded
from tests.distributed import run_distributed
from tests.test_tensor_parallel import VOCAB, full_tensors, make_docs, make_model
from tests.tolerances import loss_rel

UNTIED = "mqa_bias_untied"  # one KV head (both TP ranks hold it), biases, untied head; vocabulary 97 (TP pads it)
TIED = "gqa_tied"
STEPS = [[37, 5, 64, 12], [8, 17, 50, 3], [61, 4, 15, 26], [20, 33, 9, 41]]
SAVE_AT = 2  # steps done when the checkpoint is written; the uninterrupted run goes on with steps 2 and 3
MAX_NORM = 1.0
GLOBAL = {"extra": {"note": "global"}, "sampler": {"epoch": 0, "step": SAVE_AT}}


def _schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """lr / (1 + step): a resume that lost the optimizer's current lr would step 3x too far."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def _config(stage: int, state_dtype: str):
    return config_from_dict({"parallel": {"zero_stage": stage}, "optim": {"lr": 1e-2, "state_dtype": state_dtype}})


def _build(case: str, mesh: Mesh, stage: int, state_dtype: str, seed: int = 0):
    model = make_model(case, seed)
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh.tp_group)
    opt = build_sharded_optimizer(model, _config(stage, state_dtype).optim, stage, mesh)
    return model, opt, _schedule(opt.optimizer)


def _step(model, opt, mesh: Mesh, step: int, schedules: list) -> float:
    """One optimizer step over STEPS[step]; each HDP rank runs every hdp-th document. Returns the global loss."""
    lengths = STEPS[step]
    packed = pack(make_docs(lengths, seed=100 + step)[mesh.hdp_rank::mesh.hdp])
    logits = model.logits(model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None)))
    tp = tensor_parallel(model)
    loss_sum = (token_loss_sum(logits, packed.labels) if tp is None else
                vocab_parallel_cross_entropy(logits, packed.labels, tp, IGNORE_INDEX))
    (loss_sum / num_targets(lengths)).backward()
    reduce_tensor_parallel_gradients(model)
    opt.reduce_gradients()
    loss_sum = loss_sum.detach()
    if mesh.hdp > 1:
        dist.all_reduce(loss_sum, group=mesh.hdp_group)
    opt.clip_grad_norm_(MAX_NORM)
    opt.step()
    for schedule in schedules:
        schedule.step()
    opt.zero_grad()
    return loss_sum.item() / num_targets(lengths)


def _full(model, mesh: Mesh, case: str) -> dict[str, torch.Tensor]:
    named = {n: p.detach().clone() for n, p in named_parameters(model).items()}
    if mesh.tp == 1:
        return named
    return full_tensors(named, dict(make_model(case).named_parameters()), mesh.tp_group,
                        tensor_parallel(model).kv_copies)


def _bytes(state: dict) -> dict:
    """A copy of an optimizer state_dict's states, one-byte codes as uint8 (fp8 tensors do not survive pickling)."""
    def copy(v):
        if not isinstance(v, torch.Tensor):
            return v
        return (v.view(torch.uint8) if v.dtype.itemsize == 1 else v).clone()
    return {i: {k: copy(v) for k, v in st.items()} for i, st in state.items()}


def _run_and_save(case: str, mesh: Mesh, stage: int, state_dtype: str, run_dir: str) -> dict:
    model, opt, schedule = _build(case, mesh, stage, state_dtype)
    for step in range(SAVE_AT):
        _step(model, opt, mesh, step, [schedule])
    save_resharded(run_dir, SAVE_AT, model, opt, mesh, {**GLOBAL, "lr_scheduler": schedule.state_dict()})
    out = {"params": _full(model, mesh, case), "state": _bytes(opt.optimizer.state_dict()["state"])}
    out["next"] = [_step(model, opt, mesh, step, [schedule]) for step in range(SAVE_AT, len(STEPS))]
    out["after"] = _full(model, mesh, case)
    return out


class _TwoStages:
    """Two pipeline stages' optimizers over one model in one process: clipping over both, as one PP step."""

    def __init__(self, model: Transformer, stages: list[PipelineStage]) -> None:
        self.model, self.opts = model, [build_optimizer(s, _config(0, "fp8").optim) for s in stages]

    def reduce_gradients(self) -> None:
        return None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad()


def _run_pipeline_stages_and_save(rank: int, run_dir: str) -> dict:
    """PP=2: every rank trains the whole model (two per-stage FP8AdamW), then saves the stage it would hold."""
    single = Mesh(1, 0)
    model = make_model(UNTIED)
    stages = [PipelineStage(model, s, 2, range(s, s + 1)) for s in range(2)]
    opt = _TwoStages(model, stages)
    schedules = [_schedule(o) for o in opt.opts]
    for step in range(SAVE_AT):
        _step(model, opt, single, step, schedules)
    save_resharded(run_dir, SAVE_AT, stages[rank], opt.opts[rank], Mesh(2, rank, pp=2),
                   {**GLOBAL, "lr_scheduler": schedules[rank].state_dict()})
    params = _full(model, single, UNTIED)
    return {"params": params, "stage_names": sorted(named_parameters(stages[rank])),
            "next": [_step(model, opt, single, step, schedules) for step in range(SAVE_AT, len(STEPS))]}


def _save_layouts(rank: int, world: int, root: str) -> dict:
    return {"tp2": _run_and_save(UNTIED, Mesh(world, rank, tp=2), 0, "fp32", f"{root}/tp2"),
            "zero1": _run_and_save(UNTIED, Mesh(world, rank), 1, "fp8", f"{root}/zero1"),
            "pp2": _run_pipeline_stages_and_save(rank, f"{root}/pp2")}


def _load_and_continue(case: str, mesh: Mesh, stage: int, state_dtype: str, run_dir: str) -> dict:
    model, opt, schedule = _build(case, mesh, stage, state_dtype, seed=7)  # all weights must come from the checkpoint
    step, state = load_resharded(run_dir, model, opt, mesh, seed=0)
    out = {"step": step, "rand": torch.rand(3), "params": _full(model, mesh, case),
           "global": {k: state.pop(k) for k in GLOBAL}, "lr": [g["lr"] for g in opt.param_groups]}
    schedule.load_state_dict(state.pop("lr_scheduler"))
    assert not state, f"unexpected global keys {sorted(state)}"
    out["next"] = [_step(model, opt, mesh, s, [schedule]) for s in range(step, len(STEPS))]
    out["after"] = _full(model, mesh, case)
    return out


def _load_layouts(rank: int, world: int, root: str) -> dict:
    return {"tp2->hdp2": _load_and_continue(UNTIED, Mesh(world, rank), 1, "fp32", f"{root}/tp2"),
            "tp1->tp2": _load_and_continue(TIED, Mesh(world, rank, tp=2), 0, "int8", f"{root}/tp1")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reshard")
    saved = run_distributed(_save_layouts, 2, str(root))
    saved_tp1 = _run_and_save(TIED, Mesh(1, 0), 0, "int8", f"{root}/tp1")
    loaded = run_distributed(_load_layouts, 2, str(root))
    return {"root": root, "saved": saved, "tp1": saved_tp1, "loaded": loaded}


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs"


def _assert_resumed(resumed: dict, reference: dict, what: str, rel_after: float) -> None:
    """Same weights, the next step's loss within the rounding of another layout's sums, and the steps after close
    to the uninterrupted run's."""
    _assert_same_weights(resumed["params"], reference["params"], what)
    assert resumed["step"] == SAVE_AT and resumed["global"] == GLOBAL
    assert resumed["lr"] == [pytest.approx(1e-2 / (1 + SAVE_AT))] * 2  # the param groups' lr came back
    rel = loss_rel(sum(STEPS[SAVE_AT]), VOCAB)
    assert resumed["next"][0] == pytest.approx(reference["next"][0], rel=rel, abs=0), what
    assert resumed["next"][1:] == pytest.approx(reference["next"][1:], rel=rel_after), what


def test_tp2_resumes_as_tp1_x_hdp2_with_zero1(runs) -> None:
    reference = runs["saved"][0]["tp2"]
    for rank, loaded in enumerate(runs["loaded"]):
        _assert_resumed(loaded["tp2->hdp2"], reference, f"rank {rank}", rel_after=1e-5)
        for name, p in reference["after"].items():  # fp32 AdamW moments reshard exactly
            torch.testing.assert_close(loaded["tp2->hdp2"]["after"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    # Both TP ranks held the one KV head: it was written once.
    index = json.loads((runs["root"] / "tp2/checkpoints/step_00000002/manifest.json").read_text())["index"]
    holders = [f for f, entry in index.items() if "model.layers.0.self_attn.k_proj.weight" in entry["params"]]
    assert holders == ["rank0.pt"]
    assert index["rank1.pt"]["params"]["model.layers.0.self_attn.q_proj.weight"]["region"] == [0, 16, 16, 0, 512]


def test_tp1_resumes_as_tp2_with_requantized_int8_states(runs) -> None:
    for rank, loaded in enumerate(runs["loaded"]):
        _assert_resumed(loaded["tp1->tp2"], runs["tp1"], f"rank {rank}", rel_after=1e-4)


def test_layout_change_reseeds_rng_deterministically(runs) -> None:
    for rank, loaded in enumerate(runs["loaded"]):
        _reseed(0, SAVE_AT, rank)
        assert torch.equal(loaded["tp2->hdp2"]["rand"], torch.rand(3))
    assert not torch.equal(runs["loaded"][0]["tp2->hdp2"]["rand"], runs["loaded"][1]["tp2->hdp2"]["rand"])


def _concat_shards(per_rank: list[dict], group: int, key: str) -> torch.Tensor:
    """The HDP ranks' ZeRO-1 pieces of one param group's state, concatenated in rank order."""
    return torch.cat([r["zero1"]["state"][group][key] for r in per_rank if group in r["zero1"]["state"]])


def test_hdp2_zero1_resumes_on_one_rank(runs) -> None:
    """HDP=2 ZeRO-1 (FP8 states) -> one rank: with ZeRO-1 the blocks of the flat space stay, the states are exact;
    with ZeRO-0 the blocks become per-parameter, so states are requantized."""
    saved = runs["saved"]
    reference = saved[0]["zero1"]
    exact = _load_and_continue(UNTIED, Mesh(1, 0), 1, "fp8", str(runs["root"] / "zero1"))
    _assert_resumed(exact, reference, "ZeRO-1 -> ZeRO-1", rel_after=1e-5)
    model, opt, _ = _build(UNTIED, Mesh(1, 0), 1, "fp8")
    load_resharded(runs["root"] / "zero1", model, opt, Mesh(1, 0))
    state = _bytes(opt.optimizer.state_dict()["state"])
    for group in state:
        for key in ("exp_avg", "exp_avg_sq"):  # fp8's exp_avg_sq bytes carry both moments' block scales
            assert torch.equal(state[group][key], _concat_shards(saved, group, key)), (group, key)

    stage2 = _load_and_continue(UNTIED, Mesh(1, 0), 2, "fp8", str(runs["root"] / "zero1"))
    _assert_resumed(stage2, reference, "ZeRO-1 -> ZeRO-2", rel_after=1e-5)
    requantized = _load_and_continue(UNTIED, Mesh(1, 0), 0, "fp8", str(runs["root"] / "zero1"))
    _assert_resumed(requantized, reference, "ZeRO-1 -> ZeRO-0", rel_after=1e-4)


def test_pipeline_stages_resume_unsplit(runs) -> None:
    saved = runs["saved"]
    names = saved[0]["pp2"]["stage_names"] + saved[1]["pp2"]["stage_names"]
    assert "model.embed_tokens.weight" in saved[0]["pp2"]["stage_names"]
    assert "lm_head.weight" in saved[1]["pp2"]["stage_names"] and len(set(names)) == len(names)
    resumed = _load_and_continue(UNTIED, Mesh(1, 0), 0, "fp8", str(runs["root"] / "pp2"))
    _assert_resumed(resumed, saved[0]["pp2"], "PP=2 -> PP=1", rel_after=1e-4)
    # At PP=2 each stage reads only its own file (and the shared state); unsplit, one rank reads both.
    manifest = json.loads((runs["root"] / "pp2/checkpoints/step_00000002/manifest.json").read_text())
    model = make_model(UNTIED)
    for stage in range(2):
        held = PipelineStage(model, stage, 2, range(stage, stage + 1))
        assert needed_files(manifest, held, Mesh(2, stage, pp=2)) == [f"rank{stage}.pt", "shared.pt"]
    assert needed_files(manifest, model, Mesh(1, 0)) == ["rank0.pt", "rank1.pt", "shared.pt"]


def test_same_layout_resume_is_bit_exact_and_restores_rng(tmp_path) -> None:
    mesh = Mesh(1, 0)
    model, opt, schedule = _build(UNTIED, mesh, 1, "fp8")
    _step(model, opt, mesh, 0, [schedule])
    save_resharded(tmp_path, 1, model, opt, mesh, {"lr_scheduler": schedule.state_dict()})
    rand = torch.rand(4)
    losses = [_step(model, opt, mesh, s, [schedule]) for s in (1, 2)]
    model2, opt2, schedule2 = _build(UNTIED, mesh, 1, "fp8", seed=3)
    torch.manual_seed(123)
    step, state = load_resharded(tmp_path, model2, opt2, mesh)
    schedule2.load_state_dict(state["lr_scheduler"])
    assert step == 1 and torch.equal(torch.rand(4), rand)
    assert [_step(model2, opt2, mesh, s, [schedule2]) for s in (1, 2)] == losses
    want = _bytes(opt.optimizer.state_dict()["state"])
    for group, state in _bytes(opt2.optimizer.state_dict()["state"]).items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(want[group][key])), (group, key)


def _tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    return Transformer(tiny_config(**{**values, **overrides}))


def test_missing_parameters_and_shape_mismatches_are_named(tmp_path) -> None:
    mesh = Mesh(1, 0)
    model, opt, _ = _build(UNTIED, mesh, 0, "fp32")
    save_resharded(tmp_path, 1, model, opt, mesh, GLOBAL)

    deeper = _tiny(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"lacks parameter\(s\) \['model\.layers\.2\.input_layernorm\.weight'"):
        load_resharded(tmp_path, deeper, build_sharded_optimizer(deeper, _config(0, "fp32").optim, 0, mesh), mesh)

    shallower = _tiny(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"parameter\(s\) \['model\.layers\.1\..*no rank of this model holds"):
        load_resharded(tmp_path, shallower, build_sharded_optimizer(shallower, _config(0, "fp32").optim, 0, mesh), mesh)

    narrower = _tiny(intermediate_size=48)
    with pytest.raises(ValueError, match=r"parameter model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\) "
                                         r"in the checkpoint but \(48, 32\) in this model"):
        load_resharded(tmp_path, narrower, build_sharded_optimizer(narrower, _config(0, "fp32").optim, 0, mesh), mesh)


def test_checkpoint_without_layout_index_is_refused(tmp_path) -> None:
    mesh = Mesh(1, 0)
    model, opt, _ = _build(UNTIED, mesh, 0, "fp32")
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    with pytest.raises(ValueError, match="no layout-free index.*load_latest"):
        load_resharded(tmp_path, model, opt, mesh)
    assert load_resharded(Path(tmp_path) / "empty", model, opt, mesh) is None
