import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from seqmesh.trainer.checkpoint import (_sha256, capture_rng_state, load_latest, load_latest_files, restore_rng_state,
                                        save_checkpoint)
from tests.distributed import run_distributed


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_steps(model, opt, sched, n: int) -> list[float]:
    """Steps whose data and dropout-like noise come from all three RNGs, so a lost RNG state shows."""
    losses = []
    for _ in range(n):
        x = torch.randn(5, 8) + float(np.random.rand()) + random.random()
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def full_state(model, opt, sched, position: int) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "rng": capture_rng_state(), "sampler": {"epoch": 0, "position": position},
            "extra": {"tokens_seen": 1234, "note": "ok"}}


def test_round_trip_is_bit_exact(tmp_path):
    model, opt, sched = build()
    train_steps(model, opt, sched, 3)
    save_checkpoint(tmp_path, 3, full_state(model, opt, sched, position=15))
    expected_losses = train_steps(model, opt, sched, 3)
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_rand = (torch.rand(4), np.random.rand(3), random.random())

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    model2, opt2, sched2 = build(seed=7)  # different weights, empty optimizer
    step, state = load_latest(tmp_path)
    assert step == 3
    assert state["sampler"] == {"epoch": 0, "position": 15}
    assert state["extra"] == {"tokens_seen": 1234, "note": "ok"}
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["lr_scheduler"])
    restore_rng_state(state["rng"])
    assert train_steps(model2, opt2, sched2, 3) == expected_losses
    for got, want in zip(model2.parameters(), expected_params):
        assert torch.equal(got, want)
    assert torch.equal(torch.rand(4), expected_rand[0])
    assert np.array_equal(np.random.rand(3), expected_rand[1])
    assert random.random() == expected_rand[2]
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000003" / "manifest.json").read_text())
    assert manifest["extra"] == {"tokens_seen": 1234, "note": "ok"} and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"shared.pt", "rank0.pt"}


def test_rng_helpers_round_trip_in_memory():
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(2), random.gauss(0, 1))
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(2), random.gauss(0, 1))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def tiny_state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "rng": capture_rng_state(), "extra": {"v": value}}


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, tiny_state(float(step)), keep=3)
    victim = tmp_path / "checkpoints" / "step_00000020" / "shared.pt"
    victim.write_bytes(victim.read_bytes()[:-50])
    with pytest.warns(UserWarning, match=r"step_00000020/shared\.pt.*truncated"):
        step, state = load_latest(tmp_path)
    assert step == 10 and torch.equal(state["model"]["w"], torch.full((4,), 10.0))


def test_corrupt_bytes_and_missing_manifest_are_skipped(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tiny_state(float(step)), keep=3)
    victim = tmp_path / "checkpoints" / "step_00000003" / "rank0.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    (tmp_path / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, _ = load_latest(tmp_path)
    assert step == 1
    messages = " | ".join(str(w.message) for w in caught)
    assert "step_00000003/rank0.pt does not match its SHA-256" in messages
    assert "step_00000002/manifest.json is missing" in messages


def test_keep_prunes_old_steps_and_temp_dirs(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_00000099").mkdir(parents=True)  # a crashed save
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, tiny_state(float(step)), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    assert load_latest(tmp_path)[0] == 4
    # Resumed from step 3 (say step 4 was damaged): saving step 4 again replaces it, and a save
    # below the newest step drops the abandoned later steps.
    save_checkpoint(tmp_path, 4, tiny_state(40.0), keep=2)
    assert torch.equal(load_latest(tmp_path)[1]["model"]["w"], torch.full((4,), 40.0))
    save_checkpoint(tmp_path, 2, tiny_state(2.0), keep=5)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest(tmp_path) is None


class Opaque:
    pass


def test_arbitrary_objects_are_refused_on_save_and_on_load(tmp_path):
    with pytest.raises(RuntimeError, match=r"optimizer\['hook'\].*Opaque.*weights_only"):
        save_checkpoint(tmp_path, 1, {"optimizer": {"hook": Opaque()}})
    with pytest.raises(RuntimeError, match=r"state\['extra'\].*JSON"):
        save_checkpoint(tmp_path, 1, {"extra": {"when": torch.zeros(1)}})
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()

    # A payload smuggled past save (with a correct checksum) is still refused by weights_only=True.
    step_dir = save_checkpoint(tmp_path, 1, tiny_state(1.0))
    torch.save({"model": Opaque()}, step_dir / "shared.pt")
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["shared.pt"] = {"sha256": _sha256(step_dir / "shared.pt"),
                                      "bytes": (step_dir / "shared.pt").stat().st_size}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match=r"weights_only=True\) refused.*Unsupported global.*Opaque"):
        load_latest(tmp_path)


def test_fp8_tensors_and_views_store_compactly(tmp_path):
    flat = torch.randn(1 << 16)
    state = {"optimizer": {"exp_avg": torch.randn(8).to(torch.float8_e4m3fn), "shard": flat[:4]}}
    step_dir = save_checkpoint(tmp_path, 5, state)
    assert (step_dir / "rank0.pt").stat().st_size < 16_000  # not the 256 KiB flat buffer
    _, loaded = load_latest(tmp_path)
    assert loaded["optimizer"]["exp_avg"].dtype == torch.float8_e4m3fn
    assert torch.equal(loaded["optimizer"]["exp_avg"].float(), state["optimizer"]["exp_avg"].float())
    assert torch.equal(loaded["optimizer"]["shard"], flat[:4])


def test_index_goes_into_the_manifest_and_only_chosen_files_are_read(tmp_path):
    step_dir = save_checkpoint(tmp_path, 3, tiny_state(3.0), index={"holds": ["w"]})
    assert json.loads((step_dir / "manifest.json").read_text())["index"] == {"rank0.pt": {"holds": ["w"]}}
    (step_dir / "rank0.pt").write_bytes(b"damaged")  # not chosen below: neither verified nor read
    step, manifest, payloads = load_latest_files(tmp_path, lambda manifest: ["shared.pt"], mmap=True)
    assert step == 3 and manifest["step"] == 3 and list(payloads) == ["shared.pt"]
    assert torch.equal(payloads["shared.pt"]["model"]["w"], torch.full((4,), 3.0))
    with pytest.warns(UserWarning, match=r"step_00000003/rank0\.pt has 7 bytes"):
        assert load_latest(tmp_path) is None

    def refuse(manifest):
        raise ValueError(f"step {manifest['step']} cannot serve this run")

    with pytest.raises(ValueError, match="step 3 cannot serve this run"):
        load_latest_files(tmp_path, refuse)
    with pytest.raises(RuntimeError, match="index must be JSON-serialisable"):
        save_checkpoint(tmp_path, 4, tiny_state(4.0), index={"t": torch.zeros(1)})


def test_another_world_size_is_refused_with_the_way_out(tmp_path):
    step_dir = save_checkpoint(tmp_path, 1, tiny_state(1.0))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["world_size"] = 2
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1.*load_resharded"):
        load_latest(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, {}, keep=0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {})


def _distributed_save_load(rank: int, world: int, run_dir: str):
    import torch.distributed as dist

    torch.manual_seed(100 + rank)
    for step in (1, 2):
        state = {"model": {"w": torch.full((3,), float(step))},
                 "optimizer": {"shard": torch.full((2,), 10.0 * step + rank)},
                 "rng": capture_rng_state(), "sampler": {"rank": rank, "position": step * 4 + rank}}
        save_checkpoint(run_dir, step, state)
        torch.rand(2)  # the training between checkpoints moves the RNG on
    newest = Path(run_dir) / "checkpoints" / "step_00000002"
    files = sorted(p.name for p in newest.iterdir())
    dist.barrier()
    if rank == 0:  # damage rank 1's part of the newest step: every rank must fall back together
        (newest / "rank1.pt").write_bytes((newest / "rank1.pt").read_bytes()[:10])
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, state = load_latest(run_dir)
    restore_rng_state(state["rng"])
    return {"files": files, "step": step, "w": state["model"]["w"], "shard": state["optimizer"]["shard"],
            "sampler": state["sampler"], "warnings": [str(w.message) for w in caught], "rand": torch.rand(2)}


def test_multi_rank_layout_and_collective_fallback(tmp_path):
    results = run_distributed(_distributed_save_load, 2, str(tmp_path))
    for rank, out in enumerate(results):
        assert out["files"] == ["manifest.json", "rank0.pt", "rank1.pt", "shared.pt"]
        assert out["step"] == 1
        assert torch.equal(out["w"], torch.full((3,), 1.0))
        assert torch.equal(out["shard"], torch.full((2,), 10.0 + rank))
        assert out["sampler"] == {"rank": rank, "position": 4 + rank}
    assert any("step_00000002/rank1.pt" in w for w in results[0]["warnings"])
    assert results[1]["warnings"] == []
    # Each rank got its own RNG state of step 1 back: the state right after its own seeding.
    for rank, out in enumerate(results):
        torch.manual_seed(100 + rank)
        assert torch.equal(out["rand"], torch.rand(2))
