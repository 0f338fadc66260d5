"""Every sequence-parallel mode equals single-process attention on the full documents.

Each case shards deterministic q/k/v/dout with the mode's layout, runs ``sp_attention`` forward and
backward on gloo, and the parent reassembles output and gradients by packed index and compares
them with a float64 per-document reference. Many cases share one spawn to keep the suite fast.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seqmesh.parallel.sequence import make_sp_batch, shard_tokens, sp_attention
from tests.distributed import run_distributed

D = 8
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the scale of each quantity's terms (_scales)


def _case(mode, seqlens, heads=(4, 2), causal=True, dtype=torch.float32, ulysses=None, groups=None, seed=0,
          chunks=4):
    return dict(mode=mode, seqlens=tuple(seqlens), heads=heads, causal=causal, dtype=dtype, ulysses=ulysses,
                groups=groups, seed=seed, chunks=chunks)


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    t, (hq, hkv) = sum(case["seqlens"]), case["heads"]
    q, k, v, dout = (torch.randn(t, h, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    return [x.to(case["dtype"]) for x in (q, k, v, dout)]


def _worker(rank, world, cases):
    made = {}
    results = []
    for case in cases:
        groups = case["groups"] or (tuple(range(world)),)
        for ranks in groups:  # every rank creates every group, in the same order
            if ranks not in made:
                made[ranks] = dist.group.WORLD if len(ranks) == world else dist.new_group(list(ranks))
        mine = next((r for r in groups if rank in r), None)
        if mine is None:
            results.append(None)
            continue
        group = made[mine]
        meta = make_sp_batch(case["seqlens"], case["mode"], group, ulysses_degree=case["ulysses"],
                             ulysses_chunks=case["chunks"])
        q, k, v, dout = (shard_tokens(meta, x, 0) for x in _inputs(case))
        for x in (q, k, v):
            x.requires_grad_(True)
        out = sp_attention(q, k, v, meta, meta.group, meta.mode, causal=case["causal"])
        out.backward(dout)
        results.append(dict(index=meta.local_index, pos=meta.position_ids, out=out.detach(), dq=q.grad, dk=k.grad,
                            dv=v.grad, ranks=mine))
    return results


def _reference(case):
    q, k, v, dout = (x.double() for x in _inputs(case))
    for x in (q, k, v):
        x.requires_grad_(True)
    rep = case["heads"][0] // case["heads"][1]
    outs, start = [], 0
    for n in case["seqlens"]:
        qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0),
                                           is_causal=case["causal"])
        outs.append(o.transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(dout)
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _scales(case, ref):
    """The magnitude each quantity's rounding error is relative to: the largest of its result and of
    the terms that make it up, which can cancel to an exact 0 (dq and dk of a one-token causal
    document: the softmax over one key has no slope) while the kernel still rounds each term.
    out is a convex combination of v rows; dv sums P * dout; dq (dk) sums P * (dout.v - rowsum) * k
    (q) * softmax_scale, where |dout.v| <= D * max|dout| * max|v|."""
    q, k, v, dout = (x.double().abs().max().item() for x in _inputs(case))
    dp = D * dout * v * D**-0.5
    terms = dict(out=v, dv=dout, dq=dp * k, dk=dp * q)
    return {name: max(ref[name].abs().max().item(), term) for name, term in terms.items()}


def _check(cases, per_rank):
    for i, case in enumerate(cases):
        ref = _reference(case)
        scales = _scales(case, ref)
        pieces = [r[i] for r in per_rank if r[i] is not None]
        for ranks in {p["ranks"] for p in pieces}:  # each group of the case is checked on its own
            group_pieces = [p for p in pieces if p["ranks"] == ranks]
            index = torch.cat([p["index"] for p in group_pieces])
            total = sum(case["seqlens"])
            assert torch.equal(index.sort().values, torch.arange(total)), f"case {i}: tokens lost or duplicated"
            starts = torch.tensor([0, *case["seqlens"]]).cumsum(0)[:-1]
            packed_pos = torch.arange(total) - starts.repeat_interleave(torch.tensor(case["seqlens"]))
            assert torch.equal(torch.cat([p["pos"] for p in group_pieces]), packed_pos[index])
            for name in ("out", "dq", "dk", "dv"):
                got = torch.empty_like(ref[name])
                got[index] = torch.cat([p[name] for p in group_pieces]).double()
                tol = TOL[case["dtype"]] * scales[name]
                err = (got - ref[name]).abs().max().item()
                assert err <= tol, f"case {i} {case['mode']} {name}: max error {err:.3g} > {tol:.3g} ({case})"


def _cases():
    """(tag, case) pairs: degree-4 cases on the whole 4-rank world, degree-2 cases on its two halves at
    once (each half is a separate group, as the scheduler hands out), bf16 and edge cases."""
    halves = ((0, 1), (2, 3))
    tagged = []
    for world, groups in ((4, None), (3, ((1, 2, 3),)), (2, halves)):
        w2 = 2 * world
        mixed = [1, w2 + 3, 3, 2 * w2, 7, w2 - 1]  # lengths 1..4W, most not multiples of 2W
        modes = [("ulysses", None), ("ring", None)] + ([("hybrid", 2)] if world == 4 else [])
        if world == 3:  # an odd ring on a subgroup (rank 0 idle): tokenring's direct sends use global ranks
            modes = [("ring", None)]
        modes.append(("tokenring", None))
        for mode, u in modes:
            def add(tag, seqlens, **kw):
                tagged.append((tag, _case(mode, seqlens, ulysses=u, groups=groups, seed=len(tagged), **kw)))

            for causal in (True, False):
                add(mode, mixed, causal=causal)
            add(mode, [5, 1, w2 + 1], heads=(6, 3))  # uneven head split, KV expanded locally
            add(mode, [w2 * 3 + 1, 2], heads=(4, 1))  # fewer KV heads than ranks
            add(mode, [1])  # fewer tokens than ranks
            # whole KV groups per rank: pure Ulysses pipelines 2 (GQA) or 4 (MHA at degree 2) head chunks
            add(mode, mixed, heads=(4 * world, 2 * world))
            add(mode, [w2 + 5, 3], heads=(8, 8), causal=False)
            add(mode, [w2 + 5, 3], heads=(4 * world, 2 * world), chunks=1)
            add("bf16", [w2 * 4, 3], dtype=torch.bfloat16)
    tagged.append(("subgroup", _case("ring", [13], groups=((2, 3),), seed=len(tagged))))  # ranks 0, 1 idle
    tagged.append(("subgroup", _case("hybrid", [11, 4], ulysses=2, heads=(5, 5), seed=len(tagged))))
    return tagged


@pytest.fixture(scope="module")
def sp_run():
    """One 4-process spawn runs every case (spawning costs seconds; a case costs milliseconds)."""
    tagged = _cases()
    cases = [c for _, c in tagged]
    return tagged, run_distributed(_worker, 4, cases)


def _check_tag(sp_run, tag):
    tagged, per_rank = sp_run
    chosen = [i for i, (t, _) in enumerate(tagged) if t == tag]
    assert chosen
    _check([tagged[i][1] for i in chosen], [[r[i] for i in chosen] for r in per_rank])


@pytest.mark.parametrize("tag", ["ulysses", "ring", "tokenring", "hybrid", "bf16", "subgroup"])
def test_sp_matches_single_process(sp_run, tag):
    _check_tag(sp_run, tag)


class _OpLog(TorchDispatchMode):
    """Tensor ops outside the attention kernel and the bytes they write (views and bare
    allocations write nothing)."""

    ALLOC = {"empty", "new_empty", "empty_like", "empty_strided"}

    def __init__(self):
        super().__init__()
        self.in_kernel = False
        self.reset()

    def reset(self):
        self.ops, self.written = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.in_kernel:
            self.ops[name] += 1
            if not func.is_view and name not in self.ALLOC:
                outs = out if isinstance(out, (list, tuple)) else [out]
                self.written += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
        return out


def _lean_worker(rank, world):
    import seqmesh.parallel.sequence.ring as ring
    import seqmesh.parallel.sequence.tokenring as tokenring
    import seqmesh.parallel.sequence.ulysses as ulysses

    log, batches, results = _OpLog(), Counter(), {}
    for module in (ulysses, ring, tokenring):  # the kernels' own ops are not the wrapper's cost
        for name in ("attention_forward", "attention_backward"):
            def quiet(*a, _kernel=getattr(module, name), **k):
                log.in_kernel = True
                try:
                    return _kernel(*a, **k)
                finally:
                    log.in_kernel = False
            setattr(module, name, quiet)
    for name in ("batch_isend_irecv", "all_to_all_single"):
        def counted(*a, _real=getattr(dist, name), _name=name, **k):
            batches[_name] += 1
            return _real(*a, **k)
        setattr(dist, name, counted)
    for mode in ("ulysses", "ring", "tokenring"):
        meta = make_sp_batch([9, 20, 3], mode, dist.group.WORLD)
        q, k, v, dout = (shard_tokens(meta, x, 0) for x in _inputs(_case(mode, [9, 20, 3], heads=(8, 4))))
        for x in (q, k, v):
            x.requires_grad_(True)
        with torch.no_grad():  # the first call builds the SPBatch's tables
            sp_attention(q, k, v, meta, meta.group, meta.mode)
        batches.clear()
        log.reset()
        with log:
            sp_attention(q, k, v, meta, meta.group, meta.mode).backward(dout)
        size = {name: x.numel() * x.element_size() for name, x in dict(q=q, k=k, v=v).items()}
        results[mode] = dict(batches=dict(batches), ops=dict(log.ops), written=log.written, size=size)
    return results


def test_sp_calls_are_lean():
    """Per layer, pure Ulysses moves every byte once per direction (what DeepSpeed's permute +
    all-to-all does) in one batch of transfers per direction (DeepSpeed: one all-to-all per tensor),
    and no mode builds tables or syncs with the host after the SPBatch's first call."""
    for per_rank in run_distributed(_lean_worker, 2):
        uly = per_rank["ulysses"]
        assert uly["batches"] == {"batch_isend_irecv": 4}, uly["batches"]  # q/k/v, out, dout, dq/dk/dv
        qkv, out = sum(uly["size"].values()), uly["size"]["q"]
        assert uly["written"] == 2 * qkv + 2 * out, (uly["written"], qkv, out, uly["ops"])
        # TokenRing at degree 2, per pass: the queries out, the block result back (each one batch)
        assert per_rank["tokenring"]["batches"] == {"batch_isend_irecv": 4}, per_rank["tokenring"]["batches"]
        for result in per_rank.values():
            syncs = {op: n for op, n in result["ops"].items()
                     if op in ("_local_scalar_dense", "lift_fresh", "_to_copy")}
            assert not syncs, f"host syncs or per-call tables: {syncs}"
