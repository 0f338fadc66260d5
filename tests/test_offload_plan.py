"""The parameter-offload plan and the host optimizer's NVMe states: placements, errors before the first step,
states on disk bitwise those in memory, and no file left behind."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from seqmesh.scheduler.offload_plan import OffloadInputs, OffloadPlanError, plan_offload, staging_bytes_for
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.optim import FP8AdamW
from seqmesh.trainer.optim.state_files import swap_states_to_files

GiB = 2**30
# A Llama-8B-like shape: 32 layers of 218M weights, 1.05B outside them, fp32 masters, fp8 states.
BASE = OffloadInputs(num_layers=32, layer_params=218_112_000, root_params=1_050_673_152, param_bytes=4,
                     state_bytes=2.0, state_share=1.0, act_bytes=10 * GiB, device_bytes=60 * GiB, host_bytes=120 * GiB,
                     disk_bytes=500 * GiB, h2d_GBps=50.0, disk_GBps=2.0, adam_Mparams_s=1000.0, layer_ms=30.0)


def streamed_params(plan) -> int:
    return plan.streamed_layers * BASE.layer_params


def test_plan_keeps_what_fits_on_the_device_and_streams_the_rest() -> None:
    """The root and every layer that fits live on the device with their gradients and states (only there); the
    host holds the streamed layers' weights, gradients, states and the staging buffers."""
    plan = plan_offload(BASE)
    per_param = 4 + 4 + 2  # fp32 weights, one gradient buffer (ZeRO-1 on one rank), fp8 states
    layer = BASE.layer_params * 4
    room = BASE.device_bytes - BASE.root_params * per_param - BASE.act_bytes - 4 * layer
    assert plan.resident_layers == int(room // (BASE.layer_params * per_param))
    assert 0 < plan.resident_layers < 32 and plan.streamed_layers == 32 - plan.resident_layers
    assert plan.device_bytes <= BASE.device_bytes - BASE.act_bytes
    assert plan.optimizer == "cpu" and "resident" in plan.report() and plan.step_ms > plan.compute_ms
    assert plan.host_bytes == streamed_params(plan) * per_param + staging_bytes_for(layer)
    # ZeRO-2 keeps the accumulated gradients until the reduction beside the reduced shard; over 4 ranks each
    # rank's shard and states are a quarter (on both sides)
    two = plan_offload(dataclasses.replace(BASE, zero_stage=2))
    assert two.host_bytes == streamed_params(two) * (4 * 3 + 2) + staging_bytes_for(layer)
    four = plan_offload(dataclasses.replace(BASE, state_share=0.25))
    assert four.host_bytes == streamed_params(four) * (4 + 4 * 1.25 + 0.5) + staging_bytes_for(layer)
    # a device that holds everything streams nothing: no host bytes, no host update
    whole = plan_offload(dataclasses.replace(BASE, device_bytes=400 * GiB))
    assert (whole.resident_layers, whole.streamed_layers, whole.host_bytes, whole.optimizer_ms) == (32, 0, 0, 0)


def test_plan_moves_states_to_nvme_then_fails_naming_the_bytes_and_settings() -> None:
    plan = plan_offload(BASE)
    staging = staging_bytes_for(BASE.layer_params * 4)
    tight = dataclasses.replace(BASE, host_bytes=streamed_params(plan) * 8 + staging + GiB)  # not the states
    assert plan_offload(tight).optimizer == "nvme"
    assert plan_offload(tight).disk_bytes == streamed_params(plan) * 2
    with pytest.raises(OffloadPlanError, match=r"offload.optimizer=nvme.*offload.path"):
        plan_offload(dataclasses.replace(tight, disk_bytes=1 * GiB))
    with pytest.raises(OffloadPlanError, match=r"host memory must hold .* streamed layers.*offload.host_mem_gb.*"
                                               r"optim.master_weights=false"):
        plan_offload(dataclasses.replace(BASE, host_bytes=1 * GiB))
    with pytest.raises(OffloadPlanError, match=r"the device needs .* memory.limit_gb"):
        plan_offload(dataclasses.replace(BASE, device_bytes=12 * GiB))
    with pytest.raises(OffloadPlanError, match="offload.resident_layers"):
        plan_offload(dataclasses.replace(BASE, resident_layers=32))


def test_weights_on_nvme_leave_host_memory_to_staging_and_are_priced_at_the_disk_rate() -> None:
    on_disk = plan_offload(dataclasses.replace(BASE, params="nvme", resident_layers=0))
    in_memory = plan_offload(dataclasses.replace(BASE, resident_layers=0))
    streamed = 32 * BASE.layer_params  # the root stays on the device
    assert on_disk.host_bytes == streamed * 2 + staging_bytes_for(BASE.layer_params * 4)  # the fp8 states only
    assert on_disk.disk_bytes == streamed * 8 and "NVMe (mapped files)" in on_disk.report()
    assert on_disk.exposed_transfer_ms > in_memory.exposed_transfer_ms  # 2 GB/s disk instead of 50 GB/s PCIe
    with pytest.raises(OffloadPlanError, match=r"weights and gradients \(offload.params=nvme\) need .* offload.path"):
        plan_offload(dataclasses.replace(BASE, params="nvme", disk_bytes=10 * GiB))


def test_the_update_runs_where_the_measured_rates_make_it_faster() -> None:
    """The streamed layers' update. Host: the measured CPU rate. Device: each parameter's weight, gradient and
    states in, weight and states out over the link, the two directions overlapped (bf16 weights, fp8 states: 6
    bytes in). The 16-core H100 host measured 499M parameters/s compiled, pinned copies ~50 GB/s: the device wins;
    a slow link (or a fast host) turns it. The resident layers update on the device, unpriced."""
    bf16 = dataclasses.replace(BASE, param_bytes=2, adam_Mparams_s=499.0, update="auto", device_bytes=30 * GiB)
    plan = plan_offload(bf16)
    streamed = streamed_params(plan)
    assert plan.update == "device" and "update on the device" in plan.report()
    assert plan.optimizer_ms == pytest.approx(streamed * (2 * 2 + 2.0) / 50e9 * 1e3)  # the larger direction
    assert plan_offload(dataclasses.replace(bf16, h2d_GBps=2.0)).update == "host"
    host = plan_offload(dataclasses.replace(bf16, update="host"))
    assert host.update == "host" and host.optimizer_ms == pytest.approx(streamed / 499e6 * 1e3)
    assert plan_offload(dataclasses.replace(bf16, h2d_GBps=2.0, update="device")).update == "device"
    # a measured staged rate (``measure_staged_update_GBps``) prices the device's update instead of the copy rate
    staged = plan_offload(dataclasses.replace(bf16, staged_GBps=25.0))
    assert staged.optimizer_ms == pytest.approx(streamed * (2 * 2 + 2.0) / 25e9 * 1e3)
    assert staged.rates_GBps == {"copy": 50.0, "staged update": 25.0} and "staged update 25.0" in staged.report()
    staging = staging_bytes_for(BASE.layer_params * 2)
    tight = dataclasses.replace(bf16, host_bytes=streamed * 4 + staging + GiB)  # states go to NVMe: host update
    assert plan_offload(tight).optimizer == "nvme" and plan_offload(tight).update == "host"
    with pytest.raises(OffloadPlanError, match="offload.update=auto or host"):
        plan_offload(dataclasses.replace(tight, update="device"))
    with pytest.raises(ValueError, match="choose auto, host or device"):
        plan_offload(dataclasses.replace(bf16, update="gpu"))
    # the host rate is measured only where the host may run the update
    unmeasured = dataclasses.replace(bf16, adam_Mparams_s=None)
    assert plan_offload(dataclasses.replace(unmeasured, update="device")).optimizer_ms == plan.optimizer_ms
    with pytest.raises(ValueError, match="adam_Mparams_s=None must be > 0"):
        plan_offload(unmeasured)


def test_config_refuses_what_parameter_offload_does_not_compose_with() -> None:
    ok = {"offload": {"params": "cpu"}, "parallel": {"zero_stage": 1}, "launch": {"num_workers": 1}}
    config_from_dict(ok)
    for bad, match in [({"parallel": {"zero_stage": 0}}, "zero_stage=1"),
                       ({"parallel": {"zero_stage": 1, "tp": 2}, "launch": {"num_workers": 2}}, "tp=1"),
                       ({"offload": {"params": "cpu", "target": "cpu"}}, "model.activation_checkpointing=true"),
                       ({"offload": {"params": "none", "optimizer": "nvme"}}, "needs offload.params=cpu"),
                       ({"offload": {"params": "gpu"}}, "offload.params"),
                       ({"offload": {"params": "cpu", "optimizer": "nvme"}, "optim": {"state_dtype": "fp32"}},
                        "optim.state_dtype to fp8"),
                       ({"offload": {"params": "cpu", "update": "device"}, "optim": {"state_dtype": "fp32"}},
                        "offload.update=auto"),
                       ({"offload": {"params": "none", "update": "host"}}, "needs offload.params=cpu"),
                       ({"offload": {"params": "cpu", "update": "gpu"}}, "offload.update")]:
        merged = {k: {**ok.get(k, {}), **bad.get(k, {})} for k in set(ok) | set(bad)}
        with pytest.raises(ConfigError, match=match):
            config_from_dict(merged)


@pytest.mark.parametrize("state_dtype", ["fp8", "int8", "bf16"])
def test_nvme_states_are_bitwise_the_in_memory_ones_and_leave_no_file(tmp_path: Path, state_dtype: str) -> None:
    torch.manual_seed(0)
    ps = [torch.randn(n) for n in (9000, 131, 5000)]
    qs = [p.clone() for p in ps]
    ref = FP8AdamW(ps, state_dtype=state_dtype, host_chunk_elems=4096)
    opt = FP8AdamW(qs, state_dtype=state_dtype, host_chunk_elems=4096)
    files = swap_states_to_files(opt, str(tmp_path), engine="threads")
    for step in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        ref.step()
        opt.step()
        if step == 1:  # a checkpoint round trip through files
            opt.load_state_dict(opt.state_dict())
        # between steps the moments exist only as files (meta placeholders in memory), one per nonzero piece
        assert all(t.device.type == "meta" for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        assert len(files.files()) == len(files.written) and opt.state_files.pool.in_use_bytes == 0
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    a, b = ref.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(a[i][k].view(torch.uint8), b[i][k].view(torch.uint8))
               for i in a for k in a[i] if torch.is_tensor(a[i][k]))
    # an I/O failure inside a step raises, returns every staging buffer, and closing removes every file
    for q in qs:
        q.grad = torch.randn(q.shape)
    real_write = files.store.write
    files.store.write = lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        opt.step()
    files.store.write = real_write
    assert files.pool.in_use_bytes == 0
    files.close()
    assert os.listdir(tmp_path) == []


def test_offload_dirs_of_killed_processes_are_removed(tmp_path: Path) -> None:
    """A killed process (or one ending with ``os._exit``) runs no finalizer: the next file store on the host removes
    directories whose process is gone, and keeps those of live processes and of other hosts."""
    import socket
    import subprocess
    import sys

    from seqmesh.parallel.offload.files import FileStore

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f"seqmesh-offload-{host}-{dead}-00000000"
    live = tmp_path / f"seqmesh-offload-{host}-{os.getppid()}-00000000"
    other = tmp_path / f"seqmesh-offload-otherhost-{dead}-00000000"
    for d in (stale, live, other):
        d.mkdir()
        (d / "blob-1.bin").write_bytes(b"x")
    store = FileStore(tmp_path, engine="threads")
    assert not stale.exists() and live.exists() and other.exists()
    store.close()


def test_the_host_norm_pass_is_part_of_the_predicted_step() -> None:
    """Before the update the host sums the squares of the streamed gradients it steps: the step prices it at
    its measured rate (on an H100's host the unpriced norm pass was most of a 9.0 s step), over this rank's
    share under ZeRO. On one rank's ZeRO-1 each layer's sum runs as it lands, behind the rest of backward:
    only what that backward cannot cover is priced, and at least the last layer's own pass. The clip's
    scaling is no pass of its own (the update scales as it reads)."""
    from seqmesh.trainer.param_offload import measure_host_norm_Mparams_s

    plain = plan_offload(BASE)
    assert plain.grad_norm_ms == 0.0  # a rate not given is not priced
    slow = plan_offload(dataclasses.replace(BASE, norm_Mparams_s=50.0))
    whole = streamed_params(slow) / 50e6 * 1e3
    backward_after_first = (BASE.num_layers - 1) * BASE.layer_ms  # recomputation + backward of each later layer
    assert slow.grad_norm_ms == pytest.approx(whole - backward_after_first)
    assert slow.step_ms == pytest.approx(plain.step_ms + slow.grad_norm_ms)
    assert f"gradient norm {slow.grad_norm_ms:.0f}" in slow.report()
    fast = plan_offload(dataclasses.replace(BASE, norm_Mparams_s=1e5))  # hidden but for the last layer's pass
    assert fast.grad_norm_ms == pytest.approx(BASE.layer_params / 1e11 * 1e3)
    half = plan_offload(dataclasses.replace(BASE, norm_Mparams_s=500.0, state_share=0.5))  # after the reduction
    assert half.grad_norm_ms == pytest.approx(streamed_params(half) * 0.5 / 500e6 * 1e3)
    assert measure_host_norm_Mparams_s(torch.bfloat16, numel=1 << 16, repeats=1) > 0


def test_one_ranks_update_hides_behind_the_next_forward() -> None:
    """On one rank the streamed layers' update runs during the next step's forward, in layer order, each layer
    waiting for its own chunks only: the predicted step leaves out what all but the last layer's forward covers,
    never more than the update itself. Under sharded ZeRO the update's shards are gathered right after it, so
    nothing hides."""
    plan = plan_offload(BASE)
    assert 0 < plan.resident_layers < BASE.num_layers
    forward = (BASE.num_layers - 1) * BASE.layer_ms / 3
    assert plan.optimizer_hidden_ms == pytest.approx(min(plan.optimizer_ms, forward))
    fast = plan_offload(dataclasses.replace(BASE, adam_Mparams_s=1e6, update="host"))
    assert 0 < fast.optimizer_hidden_ms == pytest.approx(fast.optimizer_ms)  # a short update hides whole
    assert plan.step_ms == pytest.approx(plan.compute_ms + plan.exposed_transfer_ms + plan.optimizer_ms
                                         - plan.optimizer_hidden_ms)
    assert "behind the next forward" in plan.report()
    sharded = plan_offload(dataclasses.replace(BASE, state_share=0.5))
    assert sharded.optimizer_hidden_ms == 0.0


def test_resident_layers_keep_their_activations_in_the_memory_left() -> None:
    """Under checkpointing every layer is recomputed but the resident ones that fit in the device memory the
    placement leaves (beside the activations and the step's working sets): each keeps its activations and is
    spared a forward (MFU does not count recomputation). Streamed layers are always recomputed."""
    ckpt = dataclasses.replace(BASE, checkpointing=True)
    none_kept = plan_offload(dataclasses.replace(ckpt, layer_act_bytes=0.0))
    assert none_kept.kept_layers == 0
    recomputed = none_kept.streamed_layers + none_kept.resident_layers
    assert none_kept.compute_ms == pytest.approx((BASE.num_layers + recomputed / 3) * BASE.layer_ms)
    slack = BASE.device_bytes - none_kept.device_bytes - BASE.act_bytes  # what the placement leaves
    left = slack * 3 / 4
    plan = plan_offload(dataclasses.replace(ckpt, layer_act_bytes=left / 2.5, working_bytes=slack / 4))
    assert plan.kept_layers == 2 and plan.resident_layers == none_kept.resident_layers
    assert plan.compute_ms == pytest.approx(none_kept.compute_ms - 2 * BASE.layer_ms / 3)
    assert "2 of those on the device not recomputed" in plan.report()
    # without checkpointing every resident layer keeps its activations already: nothing to choose
    plain = plan_offload(dataclasses.replace(BASE, layer_act_bytes=left / 2.5))
    assert plain.kept_layers == 0
    assert plain.compute_ms == pytest.approx((BASE.num_layers + plain.streamed_layers / 3) * BASE.layer_ms)


# A 13B-like bf16 shape without master weights on an 80 GB device (35 layers of 376M weights).
BF16 = dataclasses.replace(BASE, num_layers=35, layer_params=375_783_424, root_params=1_001_000_000, param_bytes=2,
                           act_bytes=6 * GiB, device_bytes=71 * GiB, update="device", adam_Mparams_s=None)


def test_layers_with_their_states_on_the_host_take_the_link_off_the_forward() -> None:
    """With ``host_states`` a layer may keep its weights and gradients on the device and its states on the host
    (4 bytes of device memory per parameter instead of 6, 2 bytes each way on the link instead of 10 in): the plan
    tries every count of them and takes the fastest. Here they replace the streamed layers, whose update the
    next forward could not cover; the wait left is the furthest a layer's update runs past the forward reaching
    it."""
    streaming = plan_offload(BF16)
    assert streaming.host_state_layers == 0 and streaming.streamed_layers > 0
    plan = plan_offload(dataclasses.replace(BF16, host_states=True))
    assert plan.host_state_layers > 0 and plan.step_ms < streaming.step_ms
    assert plan.resident_layers + plan.host_state_layers + plan.streamed_layers == BF16.num_layers
    assert plan.device_bytes + BF16.act_bytes <= BF16.device_bytes
    layer_states = BF16.layer_params * BF16.state_bytes
    states_ms = layer_states / (BF16.h2d_GBps * 1e9) * 1e3
    if plan.streamed_layers == 0:
        assert plan.host_bytes == pytest.approx(plan.host_state_layers * layer_states)
        assert plan.optimizer_ms == pytest.approx(plan.host_state_layers * states_ms)
        late = max((k + 1) * states_ms - (plan.resident_layers + k) * BF16.layer_ms / 3
                   for k in range(plan.host_state_layers))
        assert plan.step_ms == pytest.approx(plan.compute_ms + plan.exposed_transfer_ms + max(0.0, late))
    assert f"{plan.host_state_layers} with their optimizer states on the host" in plan.report()
    # a measured rate of the states' staging prices their update; slow enough, streaming wins again
    measured = plan_offload(dataclasses.replace(BF16, host_states=True, states_GBps=BF16.h2d_GBps / 2))
    assert measured.host_state_layers and not measured.streamed_layers
    assert measured.optimizer_ms == pytest.approx(2 * measured.host_state_layers * states_ms)
    assert plan_offload(dataclasses.replace(BF16, host_states=True, states_GBps=0.01)).host_state_layers == 0
    # the whole model fits: nothing moves
    roomy = plan_offload(dataclasses.replace(BF16, host_states=True, device_bytes=400 * GiB))
    assert (roomy.resident_layers, roomy.host_state_layers, roomy.streamed_layers) == (35, 0, 0)


def test_host_states_hold_a_model_the_host_cannot_stream() -> None:
    """Streaming keeps 6 bytes per parameter on the host, a host-state layer 2: a host too small for the first
    placement takes the second; too small for both, the error is the streaming placement's."""
    layer_states = BF16.layer_params * BF16.state_bytes
    small = dataclasses.replace(BF16, host_bytes=25 * layer_states, optimizer="cpu")
    with pytest.raises(OffloadPlanError, match="host memory must hold"):
        plan_offload(small)
    plan = plan_offload(dataclasses.replace(small, host_states=True))
    assert plan.host_state_layers > 0 and plan.host_bytes <= small.host_bytes
    with pytest.raises(OffloadPlanError, match="host memory must hold"):
        plan_offload(dataclasses.replace(small, host_states=True, host_bytes=layer_states / 2))
