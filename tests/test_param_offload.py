"""Parameter offload (``parallel/offload/params.py``, ``parallel/placed_zero.py``): streaming changes no bit.

Why bitwise (not a tolerance): the offloaded layers run the same forward ops on the same inputs and
weights (copies are exact) and their recomputation in backward is the resident model's own
backward under activation checkpointing; the host accumulates each micro-batch's gradient with one
addition in micro-batch order, which is ``AccumulateGrad``'s arithmetic; the host step is
``FP8AdamW``'s torch backend on the same flat buffer (chunked at block borders, which changes no
bit). The module docstring of ``params.py`` gives the argument in full. The placement itself (root and
resident layers in one ZeRO flat space on the device, the streamed layers in another on the host) equals
one flat space bit for bit with fp32 weights: every parameter starts on a quantization block, and the
clip norm is summed in fp64 (``zero.sum_of_squares``).
"""

from __future__ import annotations

import pytest
import torch

from seqmesh.parallel.checkpointing import apply_activation_checkpointing
from seqmesh.parallel.offload.params import attach_param_offload, detach_param_offload, get_param_offload
from seqmesh.parallel.placed_zero import PlacedZero
from seqmesh.parallel.zero import ZeroOptimizer
from seqmesh.trainer.data import num_targets
from seqmesh.trainer.model import Transformer, tiny_config
from seqmesh.trainer.optim import FP8AdamW
from seqmesh.trainer.param_offload import device_owned
from tests.test_zero import STEPS, backward, param_groups, step_docs

VOCAB = 97
MAX_NORM = 0.2


def make_model(layers: int = 3, dtype: torch.dtype = torch.float32, checkpointing: bool = False,
               hidden: int = 32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)).to(dtype)
    if checkpointing:
        apply_activation_checkpointing(model.model.layers)
    return model


def _fp8_adamw(state_dtype: str):
    return lambda groups: FP8AdamW(groups, lr=1e-2, betas=(0.9, 0.95), state_dtype=state_dtype, host_chunk_elems=4096,
                                     staged_chunk_elems=4096)


def make_zero(model: Transformer, stage: int, state_dtype: str = "fp8") -> ZeroOptimizer:
    return ZeroOptimizer(param_groups(model), _fp8_adamw(state_dtype), stage=stage)


def make_placed(model: Transformer, stage: int, resident: int, state_dtype: str = "fp8", device: str = "cpu",
                allocate=None, host_state: int = 0) -> PlacedZero:
    """The offload's optimizer: the root and the first ``resident + host_state`` layers in a flat space on
    ``device`` (the last ``host_state`` of them with their states on the host), the rest in one on the host."""
    kept = {id(p) for p in device_owned(model, resident + host_state)}
    away = {id(p) for layer in list(model.model.layers)[resident:resident + host_state] for p in layer.parameters()}
    placed = PlacedZero(param_groups(model), lambda p: id(p) in kept, _fp8_adamw(state_dtype), stage=stage,
                        device=torch.device(device), host_allocate=allocate, states_on_host=lambda p: id(p) in away)
    for module in model.modules():  # what ZeRO does not move (rotary tables)
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return placed


def stream(model: Transformer, opt: PlacedZero, resident: int, device: str = "cpu", **kw):
    layers = list(model.model.layers)
    return attach_param_offload(model, layers[resident:], opt.host_part, device, leading=layers[:resident], **kw)


def reduced(opt, model: Transformer) -> list[torch.Tensor]:
    """Each parameter's reduced gradient on one rank, in the model's order whatever the flat layout (stage 2
    frees ``p.grad``, so it is read from the flat shards)."""
    where = {}
    for part in getattr(opt, "parts", (opt,)):
        for p, o in zip(part._ordered, part._offsets):
            where[id(p)] = part.shard_grad[o:o + p.numel()]
    return [where[id(p)].detach().cpu().clone() for p in model.parameters()]


EARLY_NORMS: list[bool] = []  # per step of ``run``: the host's squared norm was summed during the last backward


def run(model: Transformer, opt, steps: int = 3, micro: int = 3):
    """Per step: the documents in ``micro`` micro-batches (the last announced, as the step runner does), reduce,
    record gradients, clip, step."""
    losses, grads = [], []
    EARLY_NORMS.clear()
    for step in range(steps):
        docs, denominator = step_docs(step), num_targets(STEPS[step])
        losses.append([])
        for i in range(micro):
            if i == micro - 1:
                opt.overlap_next_backward()
            losses[-1].append(backward(model, docs[i::micro], denominator))
        host = getattr(opt, "host_part", None)
        EARLY_NORMS.append(host is not None and host._ready_sq is not None)
        opt.reduce_gradients()
        grads.append(reduced(opt, model))
        opt.clip_grad_norm_(MAX_NORM)
        opt.step()
        opt.zero_grad()
    getattr(opt, "synchronize", lambda: None)()  # a streamed layers' update may still run behind ``step``
    return losses, grads, [p.detach().clone() for p in model.parameters()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("stage,resident,prefetch,dtype,state_dtype,checkpointed,update_device", [
    (1, 0, 1, torch.float32, "fp8", False, None),  # every layer streamed
    (2, 1, 2, torch.bfloat16, "fp8", True, None),  # bf16 weights without masters (stochastic rounding), ZeRO-2
    (1, 0, 0, torch.float32, "int8", True, None),  # no prefetch: each layer fetched when it runs
    (2, 0, 2, torch.float32, "fp8", False, None),
    (1, 2, 1, torch.bfloat16, "bf16", False, None),
    (2, 0, 2, torch.bfloat16, "fp8", True, "cpu"),  # the update staged (offload.update=device), here as copies
])
def test_streamed_gradients_and_updates_are_bitwise_those_of_the_same_placement_kept(
        stage, resident, prefetch, dtype, state_dtype, checkpointed, update_device) -> None:
    ref_model = make_model(dtype=dtype, checkpointing=checkpointed)
    ref = run(ref_model, make_placed(ref_model, stage, resident, state_dtype))
    model = make_model(dtype=dtype, checkpointing=checkpointed)
    opt = make_placed(model, stage, resident, state_dtype)
    opt.optimizer.update_device = torch.device(update_device) if update_device else None
    off = stream(model, opt, resident, prefetch=prefetch)
    got = run(model, opt)
    # one rank's ZeRO-1 sums the host's squares while the rest of the last backward runs (the same bits)
    assert EARLY_NORMS == [stage == 1] * 3
    assert got[0] == ref[0]  # losses
    for step_ref, step_got in zip(ref[1], got[1]):
        for a, b in zip(step_ref, step_got):
            assert torch.equal(bits(a), bits(b))
    for a, b in zip(ref[2], got[2]):
        assert torch.equal(bits(a), bits(b))
    # between steps every streamed parameter is its host master and no device copy is held
    assert all(not u.loaded and not u.in_use for u in off.streamed)
    flat = opt.host_part.flat
    assert all(p.data.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
               for layer in list(model.model.layers)[resident:] for p in layer.parameters())
    detach_param_offload(model)
    assert get_param_offload(model) is None


@pytest.mark.parametrize("stage,resident,state_dtype", [(1, 0, "fp8"), (2, 1, "int8"), (1, 3, "fp8"),
                                                        (2, 2, "bf16")])
def test_the_placement_is_bitwise_one_flat_space(stage: int, resident: int, state_dtype: str) -> None:
    """fp32 weights: the two flat spaces (root and ``resident`` layers; the rest) step every parameter as one ZeRO
    flat space does, clipping and stochastic rounding included (every element keeps its key)."""
    ref_model = make_model()
    ref = run(ref_model, make_zero(ref_model, stage, state_dtype))
    model = make_model()
    opt = make_placed(model, stage, resident, state_dtype)
    assert (opt.host_part is None) == (resident == 3)
    got = run(model, opt)
    assert got[0] == ref[0]
    for a, b in zip(ref[2], got[2]):
        assert torch.equal(bits(a), bits(b))
    whole = make_zero(make_model(), stage, state_dtype).optimizer.param_groups
    starts = sorted(g["index_offset"] for g in opt.optimizer.param_groups)
    assert starts[0] == 0 and len(starts) > len(whole) if resident < 3 else len(starts) == len(whole)


def test_zero1_host_gradients_are_copied_over_owed_zeros() -> None:
    """ZeRO-1's host gradient buffer is not zero-filled each step: the offload owes its zeros. A layer's first
    landing overwrites its slots (a parameter sent no gradient gets zeros), and a layer that sent nothing
    by the reduction reads zeros there; a negative zero lands as ``0 + g`` does, positive."""
    model = make_model()
    opt = make_placed(model, 1, 0)
    off = stream(model, opt, 0)
    run(model, opt, steps=1)  # the host buffer now holds last step's gradients, in name zeros
    host = opt.host_part
    assert host.flat_grad.abs().sum() > 0
    first, second = off.streamed[0], off.streamed[1]
    grads = [torch.full_like(p, -0.0) if i == 0 else None for i, p in enumerate(first.params)]
    off.take_grads(first, grads)
    opt.reduce_gradients()
    assert torch.equal(bits(first.params[0].grad), bits(torch.zeros_like(first.params[0])))  # +0, not -0
    assert torch.count_nonzero(host.flat_grad) == 0
    opt.zero_grad()
    detach_param_offload(model)  # and the buffer is zeros when ZeRO owns it again
    assert torch.count_nonzero(host.flat_grad) == 0 and second.stale is False


@pytest.mark.parametrize("target", ["cpu", "nvme"])
def test_activation_offload_composes_bitwise(tmp_path, target: str) -> None:
    """Activation offload after parameter offload (checkpointed layers): a streamed layer's saved inputs go to the
    host or to files like a checkpointed layer's, and every gradient, loss and update keeps its bits."""
    from seqmesh.parallel.offload import attach_offload, offload_session
    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.trainer.data import pack
    from seqmesh.trainer.loss import token_loss_sum

    def train(model, opt):
        out = []
        for step in range(2):
            docs, denominator = step_docs(step), num_targets(STEPS[step])
            for i in range(3):
                packed = pack(docs[i::3])
                meta = make_sp_batch(packed.seqlens, "local", None)
                with offload_session(model, meta):
                    loss = token_loss_sum(model.logits(model(packed.input_ids, meta)), packed.labels)
                    (loss / denominator).backward()
                out.append(loss.detach())
            opt.reduce_gradients()
            out.extend(reduced(opt, model))
            opt.clip_grad_norm_(MAX_NORM)
            opt.step()
            opt.zero_grad()
        opt.synchronize()
        return out + [p.detach().clone() for p in model.parameters()]

    ref_model = make_model(checkpointing=True)
    ref = train(ref_model, make_placed(ref_model, 1, 1))
    model = make_model(checkpointing=True)
    opt = make_placed(model, 1, 1)
    stream(model, opt, 1, prefetch=1)
    act = attach_offload(model, list(model.model.layers), device="cpu", target=target, ratio=1.0, min_bytes=0,
                         path=str(tmp_path), engine="threads", host_limit_bytes=1 << 28)
    got = train(model, opt)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(bits(a), bits(b))
    assert act.stats.offloaded_tensors > 0 and act.stats.restored_bytes == act.stats.offloaded_bytes
    assert act.files is None or act.files.files() == []


@pytest.mark.parametrize("prefetch", [0, 1, 2, 5])
def test_each_layer_crosses_twice_per_micro_batch_except_those_kept_for_backward(prefetch: int) -> None:
    """Forward copies every streamed layer once (ahead of use when ``prefetch`` > 0), backward again, except the
    last ``prefetch`` layers, which forward leaves loaded for backward; nothing is loaded between steps. The first
    copies wait for the resident layer in front (the update behind the last step may still run when the model's
    forward begins), and its recomputation in backward fetches nothing."""
    model = make_model(layers=4, checkpointing=True)
    opt = make_placed(model, 1, 1)
    off = stream(model, opt, 1, prefetch=prefetch)
    loaded_at_start: list[bool] = []
    model.register_forward_pre_hook(lambda *_: loaded_at_start.append(any(u.loaded for u in off.streamed)))
    copies: list[int] = []
    fetch = off.fetch

    def counting(unit):
        if not unit.loaded:
            copies.append(unit.index)
        fetch(unit)

    off.fetch = counting
    run(model, opt, steps=1, micro=2)
    streamed = [u.index for u in off.streamed]  # layers 1, 2, 3
    assert streamed == [0, 1, 2]
    kept = streamed[max(0, len(streamed) - prefetch):] if prefetch else []
    per_micro = streamed + [i for i in reversed(streamed) if i not in kept]
    assert copies == per_micro * 2  # the root and the resident layer live on the device: never copied
    assert all(not u.loaded for u in off.streamed)
    assert loaded_at_start == [False, False]


@pytest.mark.parametrize("stage", [1, 2])
def test_weights_in_mapped_files_are_bitwise_and_leave_no_file(tmp_path, stage: int) -> None:
    """``offload.params=nvme``: ZeRO's host buffers are memory-mapped files (``offload/mapped.py``); the same bits,
    and the files are unlinked as soon as they are mapped."""
    from seqmesh.parallel.offload.mapped import mapped_zeros

    ref_model = make_model()
    ref = run(ref_model, make_placed(ref_model, stage, 1))
    model = make_model()
    opt = make_placed(model, stage, 1, allocate=lambda n, dtype: mapped_zeros(n, dtype, tmp_path / "w"))
    stream(model, opt, 1, prefetch=1, pin_masters=False)
    got = run(model, opt)
    assert got[0] == ref[0]
    flat = lambda r: [g for step in r[1] for g in step] + r[2]  # noqa: E731
    for a, b in zip(flat(ref), flat(got), strict=True):
        assert torch.equal(bits(a), bits(b))
    assert list((tmp_path / "w").iterdir()) == []


def test_mapped_weights_refuse_a_volume_too_small(tmp_path) -> None:
    import shutil

    from seqmesh.parallel.offload.errors import OffloadSpaceError
    from seqmesh.parallel.offload.mapped import mapped_zeros

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OffloadSpaceError, match=r"offload.path=.*larger volume or use offload.params=cpu"):
        mapped_zeros(free + (1 << 30), torch.uint8, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _zero1_rank(rank: int, world: int, offload: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ZeRO-1 over ``world`` ranks, rank r running documents r, r + world, ... as micro-batches; one step.
    Returns each flat space's full reduced gradient (gathered) and the parameters after the step."""
    import torch.distributed as dist

    model = make_model()
    opt = make_placed(model, 1, 1)
    if offload:
        stream(model, opt, 1, prefetch=1)
    docs, denominator = step_docs(0), num_targets(STEPS[0])
    for d in docs[rank::world]:
        backward(model, [d], denominator)
    opt.reduce_gradients()
    full = []
    for part in opt.parts:
        full.append(torch.empty(world * part.shard_size))
        dist.all_gather_into_tensor(full[-1], part.shard_grad.clone())
    opt.clip_grad_norm_(float("inf"))
    opt.step()
    return full, [p.detach().clone() for p in model.parameters()]


def _per_document_grads(rank: int, world: int) -> list[list[torch.Tensor]]:
    """Each document's gradient alone, per flat space in its order (the terms every run sums); run in a worker
    like the ranks, so that CPU kernels use the same threads (a GEMM's bits depend on them)."""
    model = make_model()
    opt = make_placed(model, 1, 1)
    docs, denominator = step_docs(0), num_targets(STEPS[0])
    out = []
    for d in docs:
        backward(model, [d], denominator)
        out.append([part.flat_grad.clone() for part in opt.parts])
        opt.zero_grad()
    return out


def test_two_rank_zero1_offload_matches_single_process() -> None:
    from tests.distributed import run_distributed

    offloaded = run_distributed(_zero1_rank, 2, True)
    resident = run_distributed(_zero1_rank, 2, False)
    # Offload changes no bit of the distributed run (gradients and updates; see the module docstring).
    for a, b in zip(offloaded[0][0] + offloaded[0][1], resident[0][0] + resident[0][1], strict=True):
        assert torch.equal(a, b)
    # Against one process the only difference is the order of the fp32 sum over documents: each of the k
    # per-document gradients g_i is computed alike (one document per micro-batch, same bits), and any two
    # summation orders of k terms differ by at most 2 (k - 1) u sum_i |g_i| elementwise (u = 2^-24, the
    # unit roundoff; each order is within (k - 1) u sum |g_i| of the exact sum).
    terms = run_distributed(_per_document_grads, 1)[0]
    k, u = len(terms), 2.0**-24
    for space in range(2):
        single = torch.zeros_like(terms[0][space])
        for g in terms:
            single += g[space]
        bound = 2 * (k - 1) * u * torch.stack([g[space] for g in terms]).abs().sum(0)
        got = offloaded[0][0][space][:single.numel()]
        assert ((got - single).abs() <= bound).all()
        assert not torch.equal(bound, torch.zeros_like(bound))


def _train_loop(rank: int, world: int, overrides: dict, run_dir: str) -> list[float]:
    import json
    from pathlib import Path

    from seqmesh.trainer.config import config_from_dict
    from seqmesh.trainer.loop import train

    train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    if rank:  # rank 0 writes the metrics and may still be writing them when another rank returns
        return []
    return [json.loads(line)["loss"] for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_step_loop_with_parameter_offload_matches_and_resumes(tmp_path) -> None:
    """The whole loop (config -> build -> plan -> steps -> checkpoints) over 2 ranks, ZeRO-1, optimizer states in
    files: offload gives the losses of the resident run bit for bit, a run stopped and resumed continues exactly,
    and no offload file outlives its process."""
    from tests.conftest import CORPUS_SIZES, tiny_overrides, write_corpus
    from tests.distributed import run_distributed

    src = write_corpus(tmp_path, CORPUS_SIZES)

    def overrides(offload: bool, stop_at: int | None = None, resume: bool = False) -> dict:
        off = {"params": "cpu", "optimizer": "nvme", "path": str(tmp_path / "off"), "h2d_GBps": 10.0,
               "disk_GBps": 1.0, "adam_Mparams_s": 100.0, "host_mem_gb": 4.0, "resident_layers": "1"} \
            if offload else {}
        return tiny_overrides(
            data={"source": str(src), "tokenizer": "byte", "max_seq_len": 96, "global_batch": 6,
                  "cache_dir": str(tmp_path / "cache")},
            launch={"num_workers": 2}, optim={"warmup_steps": 2, "state_dtype": "fp8"},
            parallel={"zero_stage": 1, "overlap_grad_reduce": False}, offload=off,
            steps=6, stop_at=stop_at, ckpt_every=3, resume=resume, scheduler={"lookahead": 0})

    resident = run_distributed(_train_loop, 2, overrides(False), str(tmp_path / "a"))[0]
    offloaded = run_distributed(_train_loop, 2, overrides(True), str(tmp_path / "b"))[0]
    assert len(offloaded) == 6 and offloaded == resident
    run_distributed(_train_loop, 2, overrides(True, stop_at=3), str(tmp_path / "c"))
    resumed = run_distributed(_train_loop, 2, overrides(True, resume=True), str(tmp_path / "c"))[0]
    assert resumed == offloaded
    assert [p for p in (tmp_path / "off").rglob("*") if p.is_file()] == []


def _gpu_run(model: Transformer, opt, steps: int = 2):
    """``run`` on CUDA with the deterministic ``math`` attention (PyTorch's flash backward is not reproducible)."""
    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.trainer.data import pack
    from seqmesh.trainer.loss import token_loss_sum

    losses, grads = [], []
    for step in range(steps):
        docs, denominator = step_docs(step), num_targets(STEPS[step])
        for i in range(3):
            if i == 2:
                opt.overlap_next_backward()  # ZeRO-1 on one rank: each layer's squares summed as it lands
            packed = pack(docs[i::3])
            meta = make_sp_batch(packed.seqlens, "local", None, backend="math", device="cuda")
            loss = token_loss_sum(model.logits(model(packed.input_ids.cuda(), meta)), packed.labels.cuda())
            (loss / denominator).backward()
            losses.append(loss.item())
        opt.reduce_gradients()
        grads.append(reduced(opt, model))
        opt.clip_grad_norm_(MAX_NORM)
        opt.step()
        opt.zero_grad()
    getattr(opt, "synchronize", lambda: None)()  # the streamed layers' update behind ``step``
    torch.cuda.synchronize()
    return losses, grads, [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("stage,hidden,update,resident", [
    (1, 32, "host", 1), (2, 32, "host", 1), (1, 32, "host", 0), (2, 32, "host", 2),
    (1, 1536, "host", 1), (1, 1536, "device", 1)])
def test_gpu_offload_bitwise_resident(stage: int, hidden: int, update: str, resident: int) -> None:
    """On CUDA: the root and ``resident`` layers in a flat space on the GPU, the rest streamed from masters pinned
    in place (hidden 1536: a flat buffer over ``PIN_MIN_BYTES``) or pageable, side-stream fetches and prefetch,
    gradients landing through pinned staging on the worker thread (added into ZeRO-1's slots, taken into
    ZeRO-2's), the streamed layers' FP8AdamW update on the host or staged on the GPU (``offload.update=device``):
    bitwise the device-resident run (one flat space, Triton step on the device)."""
    from seqmesh.parallel.offload.params import PIN_MIN_BYTES

    ref_model = make_model(layers=4, hidden=hidden).cuda()
    ref = _gpu_run(ref_model, make_zero(ref_model, stage))
    model = make_model(layers=4, hidden=hidden)
    opt = make_placed(model, stage, resident, device="cuda")
    if update == "device":
        opt.optimizer.update_device = torch.device("cuda")
    off = stream(model, opt, resident, "cuda", prefetch=2)
    host = opt.host_part.flat
    assert off.cuda and bool(off._unpin) == (host.numel() * 4 >= PIN_MIN_BYTES) and host.is_pinned() == \
        bool(off._unpin)
    assert opt.device_part.flat.is_cuda
    got = _gpu_run(model, opt)
    assert got[0] == ref[0]
    for a, b in zip([g for step in ref[1] for g in step] + ref[2], [g for step in got[1] for g in step] + got[2],
                    strict=True):
        assert torch.equal(bits(a), bits(b))
    assert off.staging.in_use_bytes == 0 and not off._pending
    detach_param_offload(model)


def test_a_model_larger_than_the_device_is_priced_without_its_states_under_offload():
    """The run's cost model is built before the offload plan: counting the whole model's states on the
    device there refused every model that offload exists to fit (a 13B shape on an 80 GB GPU). Under
    ``offload.params`` it counts none (the plan adds what the device keeps); without offload the same
    limit is still refused, naming the fix."""
    from seqmesh.trainer.build import build_cost_model
    from seqmesh.trainer.config import config_from_dict

    model = Transformer(tiny_config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    states = 10 * model.num_params(exclude_embeddings=True)  # fp32 weights and gradients, fp8 moments
    cfg = config_from_dict({"memory": {"limit_gb": states / 2 / 2**30}})

    def build(offloaded: bool):
        return build_cost_model(model, torch.device("cpu"), cfg.model, cfg.parallel, cfg.memory, hdp=1,
                                state_dtype="fp8", params_offloaded=offloaded)

    with pytest.raises(ValueError, match="leaves no room.*shard model states further or raise the limit"):
        build(False)
    offloaded = build(True)
    assert offloaded.mem_static_bytes < states / 10 < offloaded.mem_limit_bytes


@pytest.mark.parametrize("saved_placed", [True, False])
def test_checkpoints_move_between_the_placement_and_one_flat_space(tmp_path, saved_placed: bool) -> None:
    """A layout-free checkpoint of the offload's optimizer resumes a run without offload, and the other way
    round; the step after the resume is bitwise the uninterrupted run's (each element's state and key are the
    same in both layouts)."""
    from seqmesh.parallel.mesh import Mesh
    from seqmesh.trainer.reshard import load_resharded, save_resharded

    def build(placed: bool):
        model = make_model()
        return model, (make_placed(model, 1, 1) if placed else make_zero(model, 1))

    model, opt = build(saved_placed)
    run(model, opt, steps=2)
    save_resharded(tmp_path, 2, model, opt, Mesh(1, 0), {})
    uninterrupted = run(model, opt, steps=1)
    resumed_model, resumed_opt = build(not saved_placed)
    assert load_resharded(tmp_path, resumed_model, resumed_opt, Mesh(1, 0))[0] == 2
    resumed = run(resumed_model, resumed_opt, steps=1)
    assert resumed[0] == uninterrupted[0]
    for a, b in zip(uninterrupted[2], resumed[2], strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("update_device", [None, "cpu"])
def test_the_update_behind_the_step_marks_the_masters_each_fetch_waits_for(update_device) -> None:
    """One rank: the streamed layers' update runs behind ``step`` and each fetch waits for its own layer's masters
    only (``FP8AdamW.wait_for``). What the update marks written must be that very memory, or a fetch would wait
    for the whole update (never for too little: an unmarked layer waits for the end)."""
    model = make_model(layers=4)
    opt = make_placed(model, 1, 1)
    opt.optimizer.update_device = torch.device(update_device) if update_device else None
    off = stream(model, opt, 1)
    run(model, opt, steps=1)
    opt.synchronize()
    assert opt.optimizer._updater is not None  # overlapped
    assert all(opt.optimizer._written.wait(unit.host) for unit in off.streamed)
    detach_param_offload(model)
    assert opt.optimizer._updater is None


def built_for_offload(cfg):
    """The run's own model (seeded) and its cost model without the model's states, on the CPU."""
    from seqmesh.trainer.build import build_cost_model, build_model

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg.model, VOCAB, device)
    return model, build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=1, state_dtype="fp8",
                                   params_offloaded=True)


def test_resident_layers_the_plan_keeps_drop_their_checkpointing_and_change_no_bit() -> None:
    """Under checkpointing the plan lets resident layers that fit in the memory left keep their activations: their
    checkpoint wrappers come off (the streamed ones keep theirs, looked through), the planner's bytes per token
    count them, and the step's loss and gradients are bit for bit those of the run that recomputes them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.trainer.data import pack
    from seqmesh.trainer.loss import token_loss_sum
    from seqmesh.trainer.param_offload import apply_param_offload
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(model={"num_layers": 3, "activation_checkpointing": True},
                          parallel={"zero_stage": 1, "overlap_grad_reduce": False}, optim={"state_dtype": "fp8"},
                          offload={"params": "cpu", "optimizer": "cpu", "resident_layers": "2", "h2d_GBps": 10.0,
                                   "adam_Mparams_s": 100.0, "host_mem_gb": 4.0})
    device = torch.device("cpu")

    def step_grads(model, opt):
        packed = pack(step_docs(0)[0::3])
        meta = make_sp_batch(packed.seqlens, "local", None)
        loss = token_loss_sum(model.logits(model(packed.input_ids, meta)), packed.labels)
        opt.overlap_next_backward()
        loss.backward()
        opt.reduce_gradients()
        return loss.detach(), reduced(opt, model)

    ref_model, _ = built_for_offload(cfg)
    ref = step_grads(ref_model, make_zero(ref_model, 1))
    model, cost_model = built_for_offload(cfg)
    opt, plan, planned = apply_param_offload(model, cfg, cost_model, device, param_groups(model), _fp8_adamw("fp8"))
    layers = model.model.layers
    assert plan.resident_layers == 2 and plan.kept_layers == 2
    assert not isinstance(layers[0], CheckpointWrapper) and not isinstance(layers[1], CheckpointWrapper)
    assert isinstance(layers[2], CheckpointWrapper)
    assert planned.mem_bytes_per_token > cost_model.mem_bytes_per_token
    got = step_grads(model, opt)
    assert torch.equal(ref[0], got[0])
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(bits(a), bits(b))
    detach_param_offload(model)


def test_keep_activations_false_recomputes_every_layer() -> None:
    """``offload.keep_activations=false``: the plan keeps no layer's activations and every wrapper stays."""
    from seqmesh.trainer.build import build_cost_model, build_model
    from seqmesh.trainer.param_offload import apply_param_offload
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(model={"num_layers": 3, "activation_checkpointing": True},
                          parallel={"zero_stage": 1, "overlap_grad_reduce": False}, optim={"state_dtype": "fp8"},
                          offload={"params": "cpu", "optimizer": "cpu", "resident_layers": "2", "h2d_GBps": 10.0,
                                   "adam_Mparams_s": 100.0, "host_mem_gb": 4.0, "keep_activations": False})
    model = build_model(cfg.model, VOCAB, torch.device("cpu"))
    cost_model = build_cost_model(model, torch.device("cpu"), cfg.model, cfg.parallel, cfg.memory, hdp=1,
                                  state_dtype="fp8", params_offloaded=True)
    _, plan, planned = apply_param_offload(model, cfg, cost_model, torch.device("cpu"), param_groups(model),
                                           _fp8_adamw("fp8"))
    assert plan.kept_layers == 0 and planned.mem_bytes_per_token == cost_model.mem_bytes_per_token
    assert all(hasattr(layer, "_checkpoint_wrapped_module") for layer in model.model.layers)
    detach_param_offload(model)


@pytest.mark.parametrize("stage,resident,host_state,dtype,streamed", [
    (1, 0, 3, torch.bfloat16, False),  # every layer: the update behind the step, zeros owed to each layer
    (1, 1, 1, torch.float32, True),  # resident, host-state and streamed layers: both updates behind the step
    (2, 1, 2, torch.bfloat16, False),  # ZeRO-2: the update inside the step
])
def test_layers_with_states_on_the_host_are_bitwise_the_placement_without(stage, resident, host_state, dtype,
                                                                            streamed) -> None:
    """``PlacedZero(states_on_host=)`` and ``attach_host_states``: the host-state layers' runs are inner tensors of
    their own; on one rank their update runs behind the step and each layer's forward waits for its own part and
    zeroes its own gradients (ZeRO leaves them the zeros). Same bits, states included, as the same placement
    stepped inside the step, and the same weights as every state beside its weights (on a CPU device the states
    are in the same memory: the staged copies are the GPU test's)."""
    from seqmesh.parallel.offload.host_states import attach_host_states, detach_host_states

    on_device = resident + host_state
    ref_model, whole_model = make_model(dtype=dtype, checkpointing=True), make_model(dtype=dtype, checkpointing=True)
    ref_opt, whole_opt = make_placed(ref_model, stage, resident, host_state=host_state), \
        make_placed(whole_model, stage, on_device)
    if streamed:
        stream(ref_model, ref_opt, on_device)
        stream(whole_model, whole_opt, on_device)
    ref, whole = run(ref_model, ref_opt), run(whole_model, whole_opt)
    for a, b in zip(ref[2], whole[2]):
        assert torch.equal(bits(a), bits(b))
    model = make_model(dtype=dtype, checkpointing=True)
    opt = make_placed(model, stage, resident, host_state=host_state)
    assert len(opt.host_state_tensors) == 2  # the layers' matrices and their norm weights: one run of each group
    layers = list(model.model.layers)
    states = attach_host_states(model, layers[resident:on_device], opt)
    assert states.active == (stage == 1)
    if streamed:
        stream(model, opt, on_device)
    got = run(model, opt)
    assert got[0] == ref[0]
    for step_ref, step_got in zip(ref[1], got[1]):
        for a, b in zip(step_ref, step_got):
            assert torch.equal(bits(a), bits(b))
    for a, b in zip(ref[2], got[2]):
        assert torch.equal(bits(a), bits(b))
    for a, b in zip(ref_opt.state_dict()["optimizer"]["state"].values(),
                    opt.state_dict()["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    detach_param_offload(model)
    detach_host_states(model)
    assert not opt.optimizer._overlapped and opt.optimizer._updater is None


def test_a_host_state_layer_waits_for_its_update_and_zeroes_its_own_gradients(monkeypatch) -> None:
    """The update of the host-state layers held behind the step: ``zero_grad`` leaves their gradients for the
    update to read, the resident layer's forward runs, and the first host-state layer's forward waits until its
    part is written, then zeroes its gradients, once per step (not again in the next micro-batch)."""
    import threading

    from seqmesh.parallel.offload.host_states import attach_host_states

    model = make_model(layers=3, checkpointing=True)
    opt = make_placed(model, 1, 1, host_state=2)
    layers = list(model.model.layers)
    attach_host_states(model, layers[1:], opt)
    inner = opt.optimizer
    release, run_ = threading.Event(), inner._run

    def held(bucket, *args, **kwargs):
        if threading.current_thread().name.startswith("seqmesh-host-update"):  # the update behind the step
            assert release.wait(30)
        run_(bucket, *args, **kwargs)
    docs, denominator = step_docs(0), num_targets(STEPS[0])
    backward(model, docs, denominator)
    opt.reduce_gradients()
    opt.clip_grad_norm_(MAX_NORM)
    monkeypatch.setattr(inner, "_run", held)
    grads = [p.grad for p in layers[1].parameters()]
    opt.step()
    opt.zero_grad()
    assert any(g.abs().sum() > 0 for g in grads)  # owed: the update behind still reads them
    assert all(p.grad.abs().sum() == 0 for p in layers[0].parameters())  # the resident layer's zeroed at once
    seen = []
    layers[1].register_forward_pre_hook(lambda *_: seen.append([float(g.abs().sum()) for g in grads]))
    timer = threading.Timer(0.2, release.set)
    timer.start()
    docs, denominator = step_docs(1), num_targets(STEPS[1])
    for micro in (docs[0::2], docs[1::2]):
        backward(model, micro, denominator)
    assert release.is_set() and seen[0] == [0.0] * len(grads)  # waited, then zeroed before its own hook ran
    assert len(seen) == 2 and any(v > 0 for v in seen[1])  # the next micro-batch adds to them: zeroed once
    inner.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("stage,resident,host_state", [(1, 1, 2), (1, 0, 4), (2, 1, 2)])
def test_gpu_host_state_layers_bitwise_resident(stage: int, resident: int, host_state: int) -> None:
    """On CUDA: layers whose moments live in pinned host memory, staged to the GPU a chunk at a time while their
    weights and gradients stay there (on one rank behind the step, on a side stream, beside the next forward),
    next to resident and streamed layers: bitwise the device-resident run."""
    from seqmesh.parallel.offload.host_states import attach_host_states, detach_host_states

    ref_model = make_model(layers=4, hidden=1536).cuda()
    ref = _gpu_run(ref_model, make_zero(ref_model, stage))
    model = make_model(layers=4, hidden=1536)
    on_device = resident + host_state
    opt = make_placed(model, stage, resident, device="cuda", host_state=host_state)
    opt.optimizer.update_device = torch.device("cuda")
    layers = list(model.model.layers)
    states = attach_host_states(model, layers[resident:on_device], opt)
    assert states.active == (stage == 1)
    if on_device < len(layers):
        stream(model, opt, on_device, "cuda", prefetch=2)
    got = _gpu_run(model, opt)
    inner = opt.optimizer
    for t in opt.host_state_tensors:
        assert t.is_cuda and all(inner.state[t][k].device.type == "cpu" and inner.state[t][k].is_pinned()
                                 for k in ("exp_avg", "exp_avg_sq"))
    assert got[0] == ref[0]
    for a, b in zip([g for step in ref[1] for g in step] + ref[2], [g for step in got[1] for g in step] + got[2],
                    strict=True):
        assert torch.equal(bits(a), bits(b))
    detach_param_offload(model)
    detach_host_states(model)


@pytest.mark.gpu
def test_gpu_staged_update_rates_are_measured_below_the_copy_rate_bound() -> None:
    """The plan's measured rates of the staged update (a streamed layer's, a host-state layer's) are positive and
    finite, and the streamed one moves no more bytes in per second than the link's two directions together."""
    from seqmesh.parallel.offload.bandwidth import measure_both_ways_GBps, measure_h2d_GBps
    from seqmesh.trainer.param_offload import measure_staged_update_GBps

    device = torch.device("cuda")
    link = measure_h2d_GBps(device, 64 << 20)
    both = measure_both_ways_GBps(device, 64 << 20)
    assert 0 < both < 2 * link  # each way, with the other direction busy: at most both directions' sum
    for states_only in (False, True):
        for in_flight in (1, 3):
            rate = measure_staged_update_GBps(device, "fp8", torch.bfloat16, states_only, pieces=2,
                                              in_flight=in_flight)
            assert 0 < rate < float("inf")
            if not states_only:
                assert rate < 2 * link


def test_the_run_wires_host_state_layers_after_kept_layers_lose_their_wrappers(monkeypatch) -> None:
    """``apply_param_offload`` with a plan of one resident, one host-state and one streamed layer, the first two
    keeping their activations: the host-state layer's hooks sit on the module that runs (its wrapper came off),
    and two whole steps (the update behind the first read by the second) give the resident run's bits."""
    import dataclasses

    import seqmesh.trainer.param_offload as param_offload
    from seqmesh.parallel.offload.host_states import detach_host_states
    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.trainer.data import pack
    from seqmesh.trainer.loss import token_loss_sum
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(model={"num_layers": 3, "activation_checkpointing": True},
                          parallel={"zero_stage": 1, "overlap_grad_reduce": False}, optim={"state_dtype": "fp8"},
                          offload={"params": "cpu", "optimizer": "cpu", "resident_layers": "1", "h2d_GBps": 10.0,
                                   "adam_Mparams_s": 100.0, "host_mem_gb": 4.0})
    planned = param_offload.plan_offload
    monkeypatch.setattr(param_offload, "plan_offload", lambda x: dataclasses.replace(
        planned(x), resident_layers=1, host_state_layers=1, streamed_layers=1, kept_layers=2))
    device = torch.device("cpu")

    def steps(model, opt):
        out = []
        for step in range(2):
            packed = pack(step_docs(step)[0::3])
            loss = token_loss_sum(model.logits(model(packed.input_ids, make_sp_batch(packed.seqlens, "local", None))),
                                  packed.labels)
            opt.overlap_next_backward()
            loss.backward()
            opt.reduce_gradients()
            out.append((loss.detach(), reduced(opt, model)))
            opt.clip_grad_norm_(MAX_NORM)
            opt.step()
            opt.zero_grad()
        opt_sync = getattr(opt, "synchronize", None)
        if opt_sync:
            opt_sync()
        return out, [p.detach().clone() for p in model.parameters()]

    ref_model, _ = built_for_offload(cfg)
    ref = steps(ref_model, make_zero(ref_model, 1))
    model, cost_model = built_for_offload(cfg)
    opt, plan, _ = param_offload.apply_param_offload(model, cfg, cost_model, device, param_groups(model),
                                                     _fp8_adamw("fp8"))
    layers = model.model.layers
    assert len(opt.host_state_tensors) == 2 and not hasattr(layers[1], "_checkpoint_wrapped_module")
    assert layers[1]._forward_pre_hooks  # the host-state layer waits for its update in the module that runs
    got = steps(model, opt)
    for (loss_ref, grads_ref), (loss_got, grads_got) in zip(ref[0], got[0]):
        assert torch.equal(loss_ref, loss_got)
        for a, b in zip(grads_ref, grads_got):
            assert torch.equal(bits(a), bits(b))
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(bits(a), bits(b))
    detach_param_offload(model)
    detach_host_states(model)
