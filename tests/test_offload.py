"""Activation offload: bitwise-equal gradients, nothing left behind, clear errors, the ratio policy.

Gradients are compared bit for bit with the deterministic ``math`` attention backend: offload is a
copy, so any difference at all is a bug (a wrong tensor restored, a buffer reused too early).
"""

from __future__ import annotations

import copy
import errno
import shutil
from pathlib import Path

import pytest
import torch

from seqmesh.parallel.checkpointing import apply_activation_checkpointing
from seqmesh.parallel.offload import (HostMemoryError, OffloadError, OffloadPathError, OffloadPolicy,
                                      OffloadSpaceError, attach_offload, get_offloader, offload_session)
from seqmesh.parallel.offload.files import FileStore
from seqmesh.parallel.offload.pool import HostPool, size_class
from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.scheduler import default_cost_model
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, tiny_config

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
SEQLENS = [30, 17, 21]
TOKENS = sum(SEQLENS)


def _aio_built() -> bool:
    from seqmesh.parallel.offload.files import aio_built

    return aio_built()


def _base() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(**SMALL))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (TOKENS,), generator=g), torch.randint(0, 97, (TOKENS,), generator=g)


def _model(base: Transformer, checkpointed: bool) -> Transformer:
    model = copy.deepcopy(base)
    if checkpointed:
        apply_activation_checkpointing(model.model.layers)
    return model


def _attach(model: Transformer, target: str, path: Path, **kwargs):
    kwargs = {"ratio": 1.0, "min_bytes": 0, "host_limit_bytes": 1 << 26, "engine": "threads", **kwargs}
    return attach_offload(model, model.model.layers, device="cpu", target=target, path=str(path), **kwargs)


def _step(model: Transformer, seed: int = 1, autocast: bool = False) -> dict[str, torch.Tensor]:
    ids, labels = _batch(seed)
    meta = make_sp_batch(SEQLENS, "local", None, backend="math")
    with offload_session(model, meta):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = token_loss_sum(model.logits(model(ids, meta)), labels)
        (loss / TOKENS).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_bitwise(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref[name]), f"{name}: max diff {(g - ref[name]).abs().max().item()}"


def _no_leftovers(model: Transformer) -> None:
    off = get_offloader(model)
    assert off.pool.in_use_bytes == 0
    if off.files is not None:
        assert off.files.files() == []


@pytest.mark.parametrize("checkpointed", [False, True], ids=["attention", "checkpointed"])
@pytest.mark.parametrize("target", ["cpu", "nvme"])
def test_gradients_bitwise_equal_without_offload(tmp_path: Path, checkpointed: bool, target: str) -> None:
    base = _base()
    ref = _step(_model(base, checkpointed))
    model = _model(base, checkpointed)
    off = _attach(model, target, tmp_path)
    allocations = []
    for _ in range(2):
        _assert_bitwise(_step(model), ref)
        _no_leftovers(model)
        allocations.append(off.pool.allocations)
    per_step = off.stats.offloaded_tensors // 2
    # The second step reuses the first step's host buffers. In memory that is exact. With files a
    # buffer returns only when its write finishes, so how many are live at once depends on the disk's
    # timing; what holds on any machine is that each offloaded tensor holds at most one buffer, so
    # the pool never grows past one step's tensors however many steps run.
    if target == "cpu":
        assert allocations[1] == allocations[0], allocations
    else:
        assert allocations[0] <= allocations[1] <= per_step, (allocations, per_step)
    # what was offloaded: the layer inputs (+ RoPE cos/sin, once) under checkpointing, else several
    # tensors per layer (attention's input, q, k, v, output, LSE)
    if checkpointed:
        assert per_step == SMALL["num_hidden_layers"] + 2
    else:
        assert per_step >= 5 * SMALL["num_hidden_layers"]
    assert off.stats.deduplicated > 0 and off.stats.restored_bytes == off.stats.offloaded_bytes


def test_autocast_bf16_bitwise_equal(tmp_path: Path) -> None:
    base = _base()
    ref = _step(_model(base, True), autocast=True)
    model = _model(base, True)
    _attach(model, "cpu", tmp_path)
    _assert_bitwise(_step(model, autocast=True), ref)


@pytest.mark.skipif(not _aio_built(), reason="DeepSpeed async I/O (libaio) is not built here")
def test_deepspeed_aio_engine_bitwise_equal(tmp_path: Path) -> None:
    base = _base()
    ref = _step(_model(base, True))
    model = _model(base, True)
    off = _attach(model, "nvme", tmp_path, engine="aio")
    assert off.files.engine.name == "aio"
    _assert_bitwise(_step(model), ref)
    _no_leftovers(model)


def test_only_chosen_layers_are_offloaded(tmp_path: Path) -> None:
    base = _base()
    ref = _step(_model(base, True))
    model = _model(base, True)
    off = _attach(model, "nvme", tmp_path, ratio=0.5)
    _assert_bitwise(_step(model), ref)
    assert off.stats.groups_last == (0,)  # floor(0.5 * 3) = 1 layer, the first
    assert off.stats.resident_bytes > 0
    big = _model(base, True)
    off_big = _attach(big, "cpu", tmp_path, min_bytes=1 << 30)  # nothing is worth it
    _step(big)
    assert off_big.stats.offloaded_tensors == 0


def test_no_files_or_buffers_after_exception_and_state_intact(tmp_path: Path) -> None:
    base = _base()
    model = _model(base, True)
    off = _attach(model, "nvme", tmp_path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p, g in zip(model.parameters(), _step(model, seed=1).values()):  # a first step: the optimizer has state
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())

    def fail_forward(module, args, output):
        raise RuntimeError("injected forward failure")

    handle = model.model.layers[2].register_forward_hook(fail_forward)
    with pytest.raises(RuntimeError, match="injected forward failure"):
        _step(model)
    handle.remove()
    _no_leftovers(model)

    def fail_backward(grad):
        raise RuntimeError("injected backward failure")

    handle = model.model.norm.register_forward_hook(lambda m, args, out: out.register_hook(fail_backward) and None)
    with pytest.raises(RuntimeError, match="injected backward failure"):
        _step(model)
    handle.remove()
    _no_leftovers(model)
    model.zero_grad(set_to_none=True)

    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    after = opt.state_dict()
    for i, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][i][k], v)
    # the step can be retried: same gradients as a model that never failed, from the same parameters
    fresh = _model(base, True)
    fresh.load_state_dict(model.state_dict())
    _assert_bitwise(_step(model, seed=2), _step(fresh, seed=2))
    assert off.stats.sessions == 4


def test_out_of_space_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(_base(), True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    off = _attach(model, "nvme", tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(off.files.engine, "_write_chunk", full_disk)
    with pytest.raises(OffloadSpaceError, match=r"offload\.path=.*no space left.*offload\.ratio") as err:
        _step(model)
    assert str(tmp_path) in str(err.value)
    monkeypatch.undo()
    _no_leftovers(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    model.zero_grad(set_to_none=True)

    # a volume reported full before the write starts fails the same way, without writing
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OffloadSpaceError, match="0.0 MiB free"):
        _step(model)
    monkeypatch.undo()
    _no_leftovers(model)


def test_unwritable_path_names_the_setting(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    model = _model(_base(), True)
    with pytest.raises(OffloadPathError, match=r"offload\.path=.*file/sub.*writable directory"):
        _attach(model, "nvme", not_a_dir / "sub")


def test_host_memory_budget_names_the_setting(tmp_path: Path) -> None:
    model = _model(_base(), True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    _attach(model, "cpu", tmp_path, host_limit_bytes=8192)
    with pytest.raises(HostMemoryError, match=r"offload\.host_mem_gb.*offload\.target=nvme"):
        _step(model)
    _no_leftovers(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    # file offload only stages bytes in host memory: the same budget suffices there
    ref = _step(_model(_base(), True))
    spill = _model(_base(), True)
    _attach(spill, "nvme", tmp_path, host_limit_bytes=size_class(TOKENS * SMALL["hidden_size"] * 4))
    _assert_bitwise(_step(spill), ref)


def test_released_activation_cannot_be_reused(tmp_path: Path) -> None:
    model = _model(_base(), True)
    _attach(model, "cpu", tmp_path)
    ids, labels = _batch()
    meta = make_sp_batch(SEQLENS, "local", None, backend="math")
    with pytest.raises(RuntimeError, match="before backward"):
        with offload_session(model, meta):
            loss = token_loss_sum(model.logits(model(ids, meta)), labels)
            raise RuntimeError("failed before backward")
    with pytest.raises(OffloadError, match="micro-batch failed"):
        loss.backward()


def test_auto_ratio_uses_the_cost_model(tmp_path: Path) -> None:
    cost = default_cost_model(params=8e9, hidden_size=4096, num_layers=32, device_flops=4e14, mem_limit_bytes=80e9,
                              dp_shards=8)
    pcie = OffloadPolicy(num_groups=32, cost_model=cost, h2d_GBps=25.0)
    disk = OffloadPolicy(num_groups=32, cost_model=cost, h2d_GBps=25.0, disk_GBps=0.9)
    per_token = 4096 * 2  # a checkpointed bf16 layer input
    # PCIe hides a Llama-8B layer input at any length (NOTES: +1.7% measured); never the last layer under auto
    assert pcie.select([2048], 1, per_token).ratio == 1.0
    assert pcie.select([262144], 1, per_token).groups == frozenset(range(31))
    # a disk hides a share that grows with the length (attention's s^2 against the bytes' s)
    short, long_ = disk.select([2048], 1, per_token), disk.select([262144], 1, per_token)
    assert 0 < short.ratio < long_.ratio < 1.0 and len(short.groups) < len(long_.groups)
    # sequence parallelism divides compute and bytes alike; its all-to-alls add time to hide behind
    assert disk.select([262144], 4, per_token).ratio >= long_.ratio
    half = OffloadPolicy(num_groups=8, ratio=0.5).select([100], 1, per_token)
    assert half.groups == frozenset({0, 2, 4, 6}) and half.lookahead == 2  # spread out, prefetched a gap ahead
    assert OffloadPolicy(num_groups=8, ratio=1.0).select([100], 1, per_token).groups == frozenset(range(8))
    assert OffloadPolicy(num_groups=8, ratio=0.0).select([100], 1, per_token).groups == frozenset()
    with pytest.raises(ValueError, match="needs a cost model"):
        OffloadPolicy(num_groups=8)
    # attached with ratio auto: bandwidths measured here, the estimate refined by the first micro-batch
    model = _model(_base(), True)
    off = attach_offload(model, model.model.layers, device="cpu", target="cpu", cost_model=cost, min_bytes=0,
                         host_limit_bytes=1 << 26)
    assert off.policy.ratio is None and off.policy.h2d_GBps > 0
    _step(model)
    assert off.bytes_per_token == pytest.approx(SMALL["hidden_size"] * 4 + 2 * 16 * 4)  # fp32 input + cos/sin


def test_host_pool_classes_alignment_budget() -> None:
    for n in (1, 4095, 4097, 10**6, 3 * 2**30 + 5):
        c = size_class(n)
        assert c >= n and c % 4096 == 0 and (c - n) <= max(4095, n // 8)
    pool = HostPool(1 << 20, pin=False)
    a = pool.acquire(300_000)
    assert a is not None and a.data_ptr() % 4096 == 0 and a.numel() == size_class(300_000)
    pool.release(a)
    assert pool.acquire(299_000) is not None and pool.allocations == 1  # same class: reused
    assert pool.acquire(900_000) is None  # over budget while the first is in use
    with pytest.raises(ValueError, match="not handed out"):
        pool.release(torch.empty(4096, dtype=torch.uint8))
    pool.close()
    assert pool.allocated_bytes == 0


def test_host_pool_hands_out_a_larger_free_buffer_rather_than_free_it_for_a_new_size() -> None:
    """Alternating sizes that do not fit the budget together (a layer's gradients, then a resident unit's in
    pieces and their shorter last piece) reuse the buffers already made: freeing and page-locking anew costs
    tens of milliseconds per buffer on a GPU host. With room in the budget a new size still gets its own
    class (no waste where memory is free)."""
    pool = HostPool(1 << 20, pin=False)
    big = [pool.acquire(400_000) for _ in range(2)]
    for b in big:
        pool.release(b)
    for _ in range(3):  # a step: pieces of another size, a short last piece, then the big size again
        held = [pool.acquire(300_000), pool.acquire(200_000)]
        assert all(h is not None and h.numel() >= size_class(400_000) for h in held)
        for h in held:
            pool.release(h)
    assert pool.allocations == 2 and pool.allocated_bytes == 2 * size_class(400_000)
    small = pool.acquire(100_000)  # fits beside the two: its own class
    assert small is not None and small.numel() == size_class(100_000) and pool.allocations == 3
    pool.close()


@pytest.mark.parametrize("engine", ["threads", pytest.param("aio", marks=pytest.mark.skipif(
    not _aio_built(), reason="DeepSpeed async I/O (libaio) is not built here"))])
def test_file_store_roundtrip_and_cleanup(tmp_path: Path, engine: str) -> None:
    store = FileStore(tmp_path, engine=engine, threads=2, chunk_bytes=8192)
    pool = HostPool(1 << 20, pin=False)
    src, dst = pool.acquire(3 * 8192), pool.acquire(3 * 8192)
    src.copy_(torch.randint(0, 256, src.shape, dtype=torch.uint8))
    path = store.new_path()
    for f in store.write(src, path):
        f.result()
    for f in store.read(dst, path):
        f.result()
    assert torch.equal(src, dst)
    directory = store.dir
    store.close()
    assert not directory.exists()  # the private directory goes at close (and at exit)


def _sp_worker(rank: int, world: int, root: str) -> tuple[bool, int]:
    from seqmesh.parallel.sequence import apply_sequence_parallel, shard_tokens

    base = _base()
    ids, labels = _batch()
    results = []
    for offload in (False, True):
        model = apply_sequence_parallel(_model(base, True))
        if offload:
            _attach(model, "nvme", Path(root) / f"rank{rank}")
        meta = make_sp_batch(SEQLENS, "ulysses", torch.distributed.group.WORLD, backend="math")
        local_ids, local_labels = shard_tokens(meta, ids, 0), shard_tokens(meta, labels, -100)
        with offload_session(model, meta):
            token_loss_sum(model.logits(model(local_ids, meta)), local_labels).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    off = get_offloader(model)
    return all(torch.equal(a, b) for a, b in zip(*results)), off.stats.offloaded_tensors


def test_sequence_parallel_ranks_offload_their_shards(tmp_path: Path) -> None:
    from tests.distributed import run_distributed

    for equal, offloaded in run_distributed(_sp_worker, 2, str(tmp_path)):
        assert equal and offloaded == SMALL["num_hidden_layers"] + 2


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["cpu", "nvme"])
def test_gpu_offload_bitwise_and_prefetched(tmp_path: Path, target: str) -> None:
    """On CUDA: pinned buffers, side-stream copies and prefetch give the same gradients, and
    backward waits synchronously only for the layer it starts with."""
    torch.manual_seed(0)
    base = Transformer(tiny_config(**{**SMALL, "num_hidden_layers": 6})).cuda()
    seqlens = [512, 300, 212]
    ids = torch.randint(0, 97, (sum(seqlens),), device="cuda")
    labels = torch.randint(0, 97, (sum(seqlens),), device="cuda")

    def step(model):
        meta = make_sp_batch(seqlens, "local", None, backend="math", device="cuda")
        with offload_session(model, meta):
            token_loss_sum(model.logits(model(ids, meta)), labels).backward()
        torch.cuda.synchronize()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = step(_model(base, True))
    model = _model(base, True)
    off = attach_offload(model, model.model.layers, device="cuda", target=target, ratio=1.0, min_bytes=0,
                         path=str(tmp_path), engine="threads", host_limit_bytes=1 << 28)
    assert off.pool.pin
    _assert_bitwise(step(model), ref)
    assert off.stats.sync_loads <= 1  # only the last layer's input; cos/sin arrive with the prefetch
    assert off.pool.in_use_bytes == 0 and (off.files is None or off.files.files() == [])
    buf = off.pool.acquire(1 << 20)
    assert buf.is_pinned()
    off.pool.release(buf)
