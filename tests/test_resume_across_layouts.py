"""The real step loop stops at one layout and resumes at another: the run goes on as if never stopped.

``train()`` writes layout-free checkpoints (``seqmesh.trainer.reshard``), so a job restarted on
another number or arrangement of devices picks up its run directory. Two changes, each saved after
step 2 and resumed for steps 3 and 4 by the same two processes: TP=2 -> HDP=2 with ZeRO-1, and
PP=2 (tied embeddings split over the stages) -> HDP=2 with replicated optimizer states. Losses,
gradient norms and the final model must equal an uninterrupted single-process run: step 3's loss
checks the restored weights, step 4's and the final model the restored AdamW moments, step
counts and lr schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqmesh.parallel.mesh import Mesh
from seqmesh.trainer.build import build_model, build_optimizer
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data.tokenizer import BYTE_VOCAB_SIZE
from seqmesh.trainer.reshard import load_resharded, named_parameters
from tests.distributed import run_distributed

STEPS = 4
SAVE_AT = 2
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
# (case, layout that saves, layout that resumes)
CASES = [("tp2_to_hdp2_zero1", {"tp": 2}, {"zero_stage": 1}),
         ("pp2_to_hdp2", {"pp": 2, "zero_stage": 1}, {"zero_stage": 0})]


def _overrides(src: str, tmp: str, world: int, parallel: dict, stop_at: int | None = None,
               resume: bool = False) -> dict:
    return {
        # Tiled MLPs hold their projections through an unregistered wrapper; the TP slices must still be found.
        "model": {**MODEL, "mlp_tile_tokens": 16},
        "data": {"source": src, "tokenizer": "byte", "max_seq_len": 96, "global_batch": 6, "cache_dir": f"{tmp}/cache"},
        "parallel": parallel, "launch": {"num_workers": world},
        # A larger Adam eps keeps elements with a near-zero gradient from turning last-bit differences of
        # the gradient sums (each layout sums in its own order) into visible parameter differences.
        "optim": {"warmup_steps": 1, "lr": 1e-2, "eps": 1e-6},
        "scheduler": {"lookahead": 0},
        "steps": STEPS, "stop_at": stop_at, "ckpt_every": SAVE_AT, "resume": resume,
    }


def _records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _train(rank: int, world: int, overrides: dict, run_dir: str) -> dict:
    """``train()`` into ``run_dir``; its summary and rank 0's metric records."""
    from seqmesh.trainer.loop import train

    summary = train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    return {"summary": summary, "records": _records(run_dir) if rank == 0 else []}


def _stop_and_resume(rank: int, world: int, src: str, tmp: str) -> dict:
    out = {}
    for case, saved_with, resumed_with in CASES:
        run_dir = f"{tmp}/{case}"
        stopped = _train(rank, world, _overrides(src, tmp, world, saved_with, stop_at=SAVE_AT), run_dir)
        out[case] = {"stopped": stopped,
                     "resumed": _train(rank, world, _overrides(src, tmp, world, resumed_with, resume=True), run_dir)}
    return out


def _final_model(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpoint loaded into the whole model in this process (one more layout change)."""
    cfg = config_from_dict(_overrides("", str(tmp), 1, {}))
    model = build_model(cfg.model, BYTE_VOCAB_SIZE, torch.device("cpu"))
    step, _ = load_resharded(run_dir, model, build_optimizer(model, cfg.optim), Mesh(1, 0))
    assert step == STEPS
    return {name: p.detach().clone() for name, p in named_parameters(model).items()}


def test_train_resumes_at_another_layout_as_if_never_stopped(tmp_path: Path, corpus: Path) -> None:
    src = str(corpus)
    ref = run_distributed(_train, 1, _overrides(src, str(tmp_path), 1, {}), str(tmp_path / "reference"))[0]
    runs = run_distributed(_stop_and_resume, 2, src, str(tmp_path))[0]
    ref_model = _final_model(tmp_path / "reference", tmp_path)
    for case, saved_with, _ in CASES:
        stopped, resumed = runs[case]["stopped"], runs[case]["resumed"]
        assert [r["step"] for r in stopped["records"]] == [1, 2], case
        assert resumed["summary"]["resumed_from"] == SAVE_AT, case
        manifest = json.loads((tmp_path / case / "checkpoints" / f"step_{SAVE_AT:08d}" / "manifest.json").read_text())
        layout = manifest["index"]["rank0.pt"]["layout"]
        assert {k: layout[k] for k in ("tp", "pp", "hdp")} == {"tp": saved_with.get("tp", 1),
                                                               "pp": saved_with.get("pp", 1), "hdp": 1}, case
        # The log holds the first layout's steps 1-2 and the second layout's steps 3-4.
        records = resumed["records"]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), case
        assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in ref["records"]], rel=1e-5), case
        assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in ref["records"]],
                                                                  rel=1e-4), case
        for name, value in _final_model(tmp_path / case, tmp_path).items():
            torch.testing.assert_close(value, ref_model[name], rtol=1e-5, atol=1e-4,
                                       msg=lambda m, name=name: f"{case}: {name}: {m}")
