"""Faults, injected one at a time, and what the trainer does about each (docs/faults.md is the table).

Small CPU gloo runs (2 ranks, a 2-layer model, the byte tokenizer); every test asserts the outcome
and measures the time to detect it. The killed Ray worker is tests/test_launch_cluster.py (slow).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from seqmesh.trainer.checkpoint import load_latest, save_checkpoint
from tests.distributed import run_distributed
from tests.test_loop import _overrides

REPO = Path(__file__).resolve().parents[1]


def _with(base: dict, **changes) -> dict:
    """``base`` with dotted keys replaced: _with(o, **{"optim.nonfinite": "skip"})."""
    out = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step_dirs(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every floating tensor of a step's files, by file and key path (the RNG states left out)."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                if k != "rng":
                    walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for path in sorted(step_dir.glob("*.pt")):
        walk(path.name, torch.load(path, weights_only=True))
    return found


# ---- 1 + 2: stop/resume equality, and a bit flip in the newest checkpoint's payload -------------------------


def _train_run(rank: int, world: int, overrides: dict, run_dir: str) -> dict:
    from seqmesh.trainer.config import config_from_dict
    from seqmesh.trainer.loop import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    return {"summary": summary, "warnings": [str(w.message) for w in caught]}


def test_bit_flipped_checkpoint_is_skipped_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path: Path,
                                                                                             corpus: Path) -> None:
    src = corpus
    base = _with(_overrides(src, tmp_path, None, False), steps=8, ckpt_every=2, ckpt_keep=3)
    run_distributed(_train_run, 2, base, str(tmp_path / "straight"))
    run_distributed(_train_run, 2, _with(base, stop_at=6), str(tmp_path / "cut"))
    assert _step_dirs(tmp_path / "cut") == ["step_00000002", "step_00000004", "step_00000006"]
    victim = tmp_path / "cut" / "checkpoints" / "step_00000006" / "rank1.pt"  # rank 1's model/optimizer pieces
    data = bytearray(victim.read_bytes())
    size = len(data)
    data[size // 2] ^= 0x01  # one bit, same size: only the SHA-256 can tell
    victim.write_bytes(bytes(data))
    assert victim.stat().st_size == size

    t0 = time.perf_counter()
    resumed = run_distributed(_train_run, 2, _with(base, resume=True), str(tmp_path / "cut"))
    wall = time.perf_counter() - t0
    assert resumed[0]["summary"]["resumed_from"] == 4
    assert any(re.search(r"skipping checkpoint step 6: .*step_00000006/rank1\.pt does not match its SHA-256", w)
               for w in resumed[0]["warnings"]), resumed[0]["warnings"]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "straight")  # bit for bit, all 8 steps
    print(f"\nfault 2: bit flip detected on resume, resumed from step 4; resumed run (4 steps) {wall:.1f} s")


# ---- 3: disk full while checkpointing -------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    handle = args[1] if len(args) > 1 else kwargs.get("f")
    if hasattr(handle, "write"):
        handle.write(b"\0" * 4096)  # a partial file, as a real full disk leaves
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tiny(value: float) -> dict:
    return {"model": {"w": torch.full((64,), value)}, "extra": {"v": value}}


def test_disk_full_while_checkpointing_is_a_clear_error_and_leaves_the_previous_checkpoint(tmp_path: Path,
                                                                                           monkeypatch) -> None:
    save_checkpoint(tmp_path, 1, _tiny(1.0))
    monkeypatch.setattr(torch, "save", _enospc)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        save_checkpoint(tmp_path, 2, _tiny(2.0))
    detect_ms = (time.perf_counter() - t0) * 1e3
    monkeypatch.undo()
    message = str(info.value)
    root = tmp_path / "checkpoints"
    assert f"the disk holding {root} is full (No space left on device;" in message
    assert "GiB free of" in message and "ckpt_keep" in message and "run_dir" in message and "resume=true" in message
    assert "previous checkpoints are intact" in message
    assert _step_dirs(tmp_path) == ["step_00000001"]  # no .tmp-step_00000002 left holding the space
    step, state = load_latest(tmp_path)
    assert step == 1 and torch.equal(state["model"]["w"], torch.full((64,), 1.0))
    print(f"\nfault 3: {detect_ms:.0f} ms; message: {message}")


def _disk_full_on_one_rank(rank: int, world: int, run_dir: str, where: str) -> dict:
    import seqmesh.trainer.checkpoint as ckpt

    save_checkpoint(run_dir, 1, {"model": {"w": torch.ones(4)}, "own": torch.full((4,), float(rank))})
    if where == "payload" and rank == 1:
        torch.save = _enospc
    if where == "manifest" and rank == 0:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        ckpt.json.dump = full  # the manifest, written by rank 0 only, after every payload went through
    t0 = time.perf_counter()
    try:
        save_checkpoint(run_dir, 2, {"model": {"w": torch.ones(4)}, "own": torch.full((4,), float(rank))})
    except RuntimeError as e:
        return {"error": str(e), "s": time.perf_counter() - t0}
    return {"error": None}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["payload", "manifest"])
def test_disk_full_on_one_rank_raises_on_every_rank(tmp_path: Path, where: str) -> None:
    results = run_distributed(_disk_full_on_one_rank, 2, str(tmp_path), where)
    failing = 1 if where == "payload" else 0
    for r in results:
        assert r["error"] and f"rank {failing}: the disk holding" in r["error"] and "is full" in r["error"]
        assert r["s"] < 10
    assert _step_dirs(tmp_path) == ["step_00000001"]
    assert load_latest_step(tmp_path) == 1  # its manifest and checksums still hold
    print(f"\nfault 3 ({where} on rank {failing}): every rank raised within {max(r['s'] for r in results):.2f} s")


# ---- 4: NaN/Inf loss --------------------------------------------------------------------------------------------


def _train_with_nan_at(rank: int, world: int, overrides: dict, run_dir: str, bad_step: int) -> dict:
    """train() with the loss of step ``bad_step`` (1-based) made NaN on rank 1 only: the forward of
    that step's groups returns NaN, so its backward fills the gradients with NaN."""
    import seqmesh.trainer.loop as loop
    from seqmesh.trainer.config import config_from_dict

    current = {"step": -1}
    get = loop.PlanAhead.get

    def get_recording(self, step, lengths, group=None):
        current["step"] = step + 1
        return get(self, step, lengths, group)

    loss_sum_of = loop.loss_sum_of

    def poisoned(*args, **kwargs):
        out = loss_sum_of(*args, **kwargs)
        return out * float("nan") if rank == 1 and current["step"] == bad_step else out

    loop.PlanAhead.get, loop.loss_sum_of = get_recording, poisoned
    t0 = time.perf_counter()
    try:
        summary = loop.train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - the test looks at the type and message
        return {"error": e, "at": current["step"], "s": time.perf_counter() - t0}
    return {"error": None, "summary": summary}


def test_nan_loss_aborts_naming_the_step_and_writes_nothing_corrupt(tmp_path: Path, corpus: Path) -> None:
    from seqmesh.trainer.guards import NonFiniteError

    src = corpus
    cfg = _with(_overrides(src, tmp_path, None, False), steps=5, ckpt_every=1, ckpt_keep=10)
    assert cfg.get("optim", {}).get("nonfinite") is None  # the default policy: abort
    results = run_distributed(_train_with_nan_at, 2, cfg, str(tmp_path / "run"), 3)
    for r in results:  # only rank 1 saw the NaN; both stop, at that step
        assert isinstance(r["error"], NonFiniteError), r
        assert re.match(r"step 3: the loss( and the gradient norm)? (is|are) not finite", str(r["error"])), r
        assert "optim.nonfinite=skip" in str(r["error"]) and "resume=true" in str(r["error"])
        assert r["at"] == 3
    run = tmp_path / "run"
    assert _step_dirs(run) == ["step_00000001", "step_00000002"]  # nothing of step 3 was saved
    assert len(_losses(run)) == 2 and all(math.isfinite(x) for x in _losses(run))
    tensors = _checkpoint_tensors(run / "checkpoints" / "step_00000002")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    print(f"\nfault 4 (abort): {results[0]['error']}")


def test_nan_loss_with_skip_policy_drops_the_step_and_counts_it(tmp_path: Path, corpus: Path) -> None:
    src = corpus
    cfg = _with(_overrides(src, tmp_path, None, False), steps=5, ckpt_every=1, ckpt_keep=10,
                **{"optim.nonfinite": "skip"})
    results = run_distributed(_train_with_nan_at, 2, cfg, str(tmp_path / "run"), 3)
    assert all(r["error"] is None for r in results), results
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_step"] for r in records] == [False, False, True, False, False]
    assert math.isnan(records[2]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert records[3]["lr"] == records[2]["lr"]  # the lr schedule did not advance either
    assert results[0]["summary"]["skipped_steps"] == 1
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1
    # No optimizer update: step 3's checkpoint holds step 2's parameters and optimizer state exactly.
    before = _checkpoint_tensors(run / "checkpoints" / "step_00000002")
    after = _checkpoint_tensors(run / "checkpoints" / "step_00000003")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for step in range(1, 6):  # and nothing non-finite was written
        tensors = _checkpoint_tensors(run / "checkpoints" / f"step_{step:08d}")
        assert all(torch.isfinite(t).all() for t in tensors.values())
    changed = _checkpoint_tensors(run / "checkpoints" / "step_00000004")
    assert any(not torch.equal(after[k], changed[k]) for k in after)  # training went on after the skip


# ---- 5: a sequence no group can hold ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["static", "adaptive"])
def test_a_sequence_no_group_can_hold_fails_before_the_step_with_the_fix(tmp_path: Path, corpus: Path,
                                                                          policy: str) -> None:
    from seqmesh.trainer.plan_ahead import PlanningError

    src = corpus
    # 1e4 bytes per token over 1e8 static: a rank holds 40 tokens, a group of both 80; pieces are up to 96.
    cost_model = {"alpha1_ms_per_tok2": 1e-6, "alpha2_ms_per_tok": 1e-3, "beta_ms": 1.0, "a2a_GBps": {"2": 10.0},
                  "comm_bytes_per_token": 1e3, "mem_bytes_per_token": 1e4, "mem_static_bytes": 1e8,
                  "mem_limit_bytes": 1e8 + 4e5}
    (tmp_path / "cm.json").write_text(json.dumps(cost_model))
    cfg = _with(_overrides(src, tmp_path, None, False), steps=3,
                scheduler={"lookahead": 0, "policy": policy, "cost_model": str(tmp_path / "cm.json")})
    results = run_distributed(_train_run_error, 2, cfg, str(tmp_path / "run"))
    for r in results:
        assert r["type"] == PlanningError.__name__, r
        m = re.search(r"step (\d+): .*a sequence of (\d+) tokens (?:fits no group|does not fit).*?(\d+) ranks.*? "
                      r"(?:holds|memory holds) (\d+) tokens", r["message"])
        assert m, r["message"]
        length, capacity = int(m.group(2)), int(m.group(4))
        assert length > capacity and capacity == (80 if policy == "adaptive" else 40)
        assert m.group(1) == "1"  # the first step, counted as metrics.jsonl counts
        for fix in ("data.max_seq_len", "memory.limit_gb", "scheduler.sp", "scheduler.group_sizes"):
            assert fix in r["message"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not _losses(tmp_path / "run")  # no step ran
    print(f"\nfault 5 ({policy}): {results[0]['s']:.1f} s into train(): {results[0]['message']}")


def _train_run_error(rank: int, world: int, overrides: dict, run_dir: str) -> dict:
    from seqmesh.trainer.config import config_from_dict
    from seqmesh.trainer.loop import train

    t0 = time.perf_counter()
    try:
        train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "message": str(e), "s": time.perf_counter() - t0}
    return {"type": None, "message": "", "s": time.perf_counter() - t0}


# ---- 6: plan digest mismatch between ranks ----------------------------------------------------------------------


def _plan_on_both(rank: int, world: int, tamper: str) -> dict:
    import functools

    from seqmesh.scheduler import CostModel, plan_step
    from seqmesh.scheduler.plan import Plan
    from seqmesh.trainer.plan_ahead import PlanAhead

    cost_model = CostModel(alpha1_ms_per_tok2=1e-6, alpha2_ms_per_tok=0.01, beta_ms=5.0, a2a_GBps={2: 50.0},
                           comm_bytes_per_token=1e4, mem_bytes_per_token=1e4, mem_static_bytes=1e8,
                           mem_limit_bytes=1e10)
    planner = PlanAhead(functools.partial(plan_step, gpus=world, cost_model=cost_model, policy="static"), rank,
                        background=False)
    lengths = [900, 300, 4000, 1200, 50, 700]
    planner.get(0, lengths)  # agreement first: the same call passes when nothing is tampered with
    if rank == 1:
        if tamper == "digest":  # this rank reads the broadcast plan differently (another seqmesh version, say)
            Plan.digest = lambda self: "0123456789abcdef"
        elif tamper == "batch":  # this rank's sampler drew another batch of the same size
            lengths = [901, 300, 4000, 1200, 50, 700]
        elif tamper == "short":  # ... or one of another size: the plan does not even cover it
            lengths = lengths[:-1]
    t0 = time.perf_counter()
    try:
        planner.get(1, lengths)
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "message": str(e), "s": time.perf_counter() - t0}
    return {"type": None, "s": time.perf_counter() - t0}


@pytest.mark.timeout(120)  # a hang would sit in a gloo collective for 30 min: fail the test instead
@pytest.mark.parametrize("tamper", ["digest", "batch", "short"])
def test_plan_mismatch_between_ranks_raises_on_every_rank_not_a_hang(tamper: str) -> None:
    results = run_distributed(_plan_on_both, 2, tamper)
    expected = {"digest": "ranks hold different plans or batches (plan digests",
                "batch": "ranks hold different plans or batches",
                "short": "the broadcast plan does not fit the batch of rank(s) [1]"}[tamper]
    for r in results:
        assert r["type"] == "PlanMismatchError" and r["message"].startswith("step 2: "), r
        assert expected in r["message"]
        assert r["s"] < 5
    print(f"\nfault 6 ({tamper}): both ranks raised within {max(r['s'] for r in results) * 1e3:.0f} ms: "
          f"{results[0]['message']}")


# ---- 7: Ctrl-C to the driver --------------------------------------------------------------------------------------


def test_ctrl_c_stops_cleanly_with_a_resume_hint_and_exit_130(tmp_path: Path, corpus: Path) -> None:
    src = corpus
    run_dir = tmp_path / "run"
    args = ["steps=5000", "launch.num_workers=1", "launch.dashboard=false", "launch.monitor_interval_s=0",
            "launch.prometheus_port=null", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", f"data.source={src}",
            "data.tokenizer=byte", "data.max_seq_len=96", "data.global_batch=6", f"data.cache_dir={tmp_path / 'cache'}",
            "ckpt_every=2", "scheduler.lookahead=0", f"run_dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "seqmesh", "train", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("step_*")):  # any: older ones are pruned (ckpt_keep)
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run ended or stalled before its first checkpoint:\n" + proc.communicate(timeout=30)[1][-4000:])
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # this test's own session only
    assert proc.returncode == 130, (out[-3000:], err[-3000:])
    assert "Traceback" not in out + err, (out[-3000:], err[-3000:])
    assert "seqmesh train: interrupted (Ctrl-C)" in err
    assert f"resume=true run_dir={run_dir}" in err
    hint = err.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert hint.startswith("seqmesh train steps=5000 ") and "run_dir=" + str(run_dir) in hint
    assert load_latest_step(run_dir) >= 2  # the published checkpoints load
    print(f"\nfault 7: stopped {stop_s:.1f} s after SIGINT; printed: {err.strip().splitlines()[-3:]}")


def load_latest_step(run_dir: Path) -> int:
    from seqmesh.trainer.checkpoint import _read_manifest, _steps, _verify

    for step, step_dir in reversed(_steps(run_dir / "checkpoints")):
        reason, manifest = _read_manifest(step_dir)
        if manifest is not None and _verify(step_dir, manifest, manifest["files"]) is None:
            return step
    return -1
