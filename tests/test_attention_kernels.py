"""Varlen attention backends against a float64 per-document reference, and the two properties
sequence parallelism builds on: block results merge exactly through the LSE, and a block's
backward against the merged output/LSE gives exactly its share of the gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqmesh import first_use
from seqmesh.kernels import attention as attention_module
from seqmesh.kernels.attention import (attention_backward, attention_forward, bucket_length, cu_seqlens_table,
                                      cudnn_buckets, doc_runs, host_offsets, resolve_backend, varlen_attention,
                                      warm_cudnn_graphs)

SEQLENS = [1, 5, 2, 9, 3]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _cu(lens, device="cpu"):
    return torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)


def _qkvd(lens, hq, hkv, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t, d = sum(lens), 16
    return [torch.randn(t, h, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            for h in (hq, hkv, hkv, hq)]


def _reference(q, k, v, dout, lens, causal):
    q, k, v = (x.detach().double().cpu().requires_grad_(True) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    outs, lses, start = [], [], 0
    for n in lens:
        qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        s = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        lses.append(torch.logsumexp(s, -1))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(dout.double().cpu())
    return out.detach(), torch.cat(lses, 1).detach(), q.grad, k.grad, v.grad


def _assert_close(got, ref, dtype, what):
    err = (got.double().cpu() - ref).abs().max().item()
    tol = TOL[dtype] * ref.abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def _check_backend(backend, dtype, device="cpu"):
    for causal in (True, False):
        for hq, hkv in ((4, 4), (6, 2)):
            q, k, v, dout = _qkvd(SEQLENS, hq, hkv, dtype, device)
            qkv = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out, lse = varlen_attention(*qkv, _cu(SEQLENS, device), max(SEQLENS), causal, backend=backend)
            out.backward(dout)
            ref = _reference(q, k, v, dout, SEQLENS, causal)
            what = f"{backend} {dtype} causal={causal} heads={hq}/{hkv}"
            assert lse.dtype == torch.float32 and lse.shape == (hq, sum(SEQLENS))
            _assert_close(out, ref[0], dtype, what + " out")
            _assert_close(lse, ref[1], torch.float32 if dtype == torch.float32 else dtype, what + " lse")
            for name, x, r in zip(("dq", "dk", "dv"), qkv, ref[2:]):
                _assert_close(x.grad, r, dtype, f"{what} {name}")


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_match_reference(backend, dtype):
    _check_backend(backend, dtype)


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_blocks_merge_through_lse_and_backward_takes_the_merged_softmax(backend):
    """Keys of every document split into two blocks (non-causal, the ring's off-diagonal case):
    LSE-merged forward and per-block backwards against the merged out/LSE equal the whole."""
    lens = [4, 7, 1, 6]
    q, k, v, dout = _qkvd(lens, 4, 2, torch.float32)
    cu, scale = _cu(lens), q.shape[-1] ** -0.5
    # block 0: the first ceil(n/2) keys of each document, block 1: the rest (empty for length 1)
    first = [(n + 1) // 2 for n in lens]
    starts = _cu(lens)[:-1].tolist()
    idx = [torch.cat([torch.arange(s, s + f) for s, f in zip(starts, first)]),
           torch.cat([torch.arange(s + f, s + n) for s, f, n in zip(starts, first, lens)])]
    cuk = [_cu(first), _cu([n - f for n, f in zip(lens, first)])]
    parts = [attention_forward(q, k[i], v[i], cu, c, max(lens), max(lens), causal=False, scale=scale,
                               backend=backend) for i, c in zip(idx, cuk)]
    assert torch.isneginf(parts[1][1][:, _cu(lens)[2]]).all(), "a document without keys must get LSE -inf"
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(o * torch.exp(l - lse).t().unsqueeze(-1) for o, l in parts)
    ref = _reference(q, k, v, dout, lens, causal=False)
    _assert_close(out, ref[0], torch.float32, "merged out")
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for i, c in zip(idx, cuk):
        gq, gk, gv = attention_backward(dout, q, k[i], v[i], out, lse, cu, c, max(lens), max(lens), causal=False,
                                        scale=scale, backend=backend)
        dq += gq
        dk[i], dv[i] = gk, gv
    for name, got, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:]):
        _assert_close(got, r, torch.float32, f"blockwise {name}")


def test_backend_choice_and_errors():
    q = torch.zeros(3, 2, 8)
    assert resolve_backend("auto", q) == "cpu_flash"
    with pytest.raises(ValueError, match="does not support"):
        resolve_backend("torch_flash", q)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3", q)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        attention_forward(q, q[:2], q[:2], _cu([3]), _cu([2]), 3, 2, causal=True, scale=1.0, backend="math")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        varlen_attention(torch.zeros(3, 3, 8), q, q, _cu([3]), 3)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, q, q, _cu([3]).long(), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch_flash", "flash_attn"])
def test_cuda_backends_match_reference(backend):
    if backend == "flash_attn" and resolve_backend("auto", torch.zeros(1, 1, 8, device="cuda",
                                                                         dtype=torch.bfloat16)) != "flash_attn":
        pytest.skip("flash_attn is not installed")
    _check_backend(backend, torch.bfloat16, "cuda")


def test_doc_runs_give_long_documents_their_own_call_and_group_short_neighbours():
    #        lengths:  q 5 1 2 9 3 0 7,  k equal except document 5 (0 queries, 4 keys)
    cu_q = [0, 5, 6, 8, 17, 20, 20, 27]
    cu_k = [0, 5, 6, 8, 17, 20, 24, 31]
    assert doc_runs(cu_q, cu_k, 5) == [(True, 0, 1), (False, 1, 3), (True, 3, 4), (False, 4, 6), (True, 6, 7)]
    assert doc_runs(cu_q, cu_k, 100) == [(False, 0, 7)]
    assert doc_runs(cu_q, cu_k, 0) == [(True, i, i + 1) for i in range(7)]
    assert doc_runs([0], [0], 1) == []


def test_bucket_lengths_pad_at_most_a_sixteenth_and_keep_sixteen_per_octave():
    for n in range(1, 70000, 7):
        m = attention_module.bucket_length(n)
        assert n <= m <= n + max(n // 16, 1) and attention_module.bucket_length(m) == m
    assert attention_module.bucket_length(32768) == 32768 and attention_module.bucket_length(4097) == 4352
    assert len({attention_module.bucket_length(n) for n in range(4097, 8193)}) == 16  # 4352 ... 8192


def test_cudnn_backend_logic_on_cpu_stand_ins(monkeypatch):
    """The cudnn backend's own logic (runs of short documents, causal documents padded to their
    bucket, GQA passed through or expanded with the dk/dv head sums) with the CPU flash op standing in for cuDNN's
    dense kernel and for the varlen flash kernel: equal to the math backend, forward and backward."""
    cpu = attention_module

    def dense_forward(q, k, v, scale):
        return cpu._cpu_flash_forward(q, k, v, _cu([q.shape[0]]), _cu([k.shape[0]]), q.shape[0], k.shape[0], True,
                                      scale)

    def dense_backward(dout, q, k, v, out, lse, scale):
        return cpu._cpu_flash_backward(dout, q, k, v, out, lse, _cu([q.shape[0]]), _cu([k.shape[0]]), q.shape[0],
                                       k.shape[0], True, scale)

    monkeypatch.setattr(cpu, "_cudnn_dense_forward", dense_forward)
    monkeypatch.setattr(cpu, "_cudnn_dense_backward", dense_backward)
    monkeypatch.setattr(cpu, "_torch_flash_forward", cpu._cpu_flash_forward)
    monkeypatch.setattr(cpu, "_torch_flash_backward", cpu._cpu_flash_backward)
    monkeypatch.setattr(cpu, "CUDNN_MIN_DOC_TOKENS", 30)
    monkeypatch.setitem(cpu._REGISTRY, "cudnn", cpu._Backend(cpu._cudnn_forward, cpu._cudnn_backward, lambda q: True))
    # 37 -> 38 and 101 -> 104 padded; 64 exact; the rest on the varlen kernel; one long document alone;
    # K/V passed with their own head count (torch >= 2.11) or repeated for every query head (earlier)
    for gqa, lens, (hq, hkv) in [(True, [37, 2, 5, 101, 3, 64], (4, 4)), (True, [37, 2, 5, 101, 3, 64], (6, 2)),
                                 (False, [37, 2, 5, 101, 3, 64], (6, 2)), (True, [101], (6, 2)),
                                 (False, [101], (6, 2)), (True, [64], (4, 4))]:
        monkeypatch.setattr(cpu, "_CUDNN_GQA", gqa)
        q, k, v, dout = _qkvd(lens, hq, hkv, torch.float32)
        qkv = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out, lse = varlen_attention(*qkv, _cu(lens), max(lens), True, backend="cudnn")
        out.backward(dout)
        ref = _reference(q, k, v, dout, lens, True)
        _assert_close(out, ref[0], torch.float32, "out")
        _assert_close(lse, ref[1], torch.float32, "lse")
        for name, x, r in zip(("dq", "dk", "dv"), qkv, ref[2:]):
            _assert_close(x.grad, r, torch.float32, name)


def test_boundary_tables_carry_their_host_offsets(monkeypatch):
    """Tables from ``cu_seqlens_table`` (the SP batch's, the ring's parts) are never read back from the
    device: on CUDA that read waits for the queue. The cudnn backend's own logic, forward and backward
    under activation checkpointing, runs with ``Tensor.tolist`` failing outside the CPU ops that stand in
    for cuDNN's and the flash kernels (which read no boundaries on the host), and gives the reference's
    results."""
    table = cu_seqlens_table([3, 0, 5], "cpu")
    assert table.dtype == torch.int32 and table.tolist() == [0, 3, 3, 8] and host_offsets(table) == (0, 3, 3, 8)
    assert host_offsets(_cu([3, 0, 5])) == [0, 3, 3, 8]  # a plain table is read back
    cpu, real_tolist, in_stand_in = attention_module, torch.Tensor.tolist, []

    def read_back(self, *args, **kwargs):
        assert in_stand_in, "a boundary table was read back from the device"
        return real_tolist(self, *args, **kwargs)

    def stand_in(kernel):
        def run(*args):
            in_stand_in.append(kernel)
            try:
                return kernel(*args)
            finally:
                in_stand_in.pop()
        return run

    def dense_forward(q, k, v, scale):
        return cpu._cpu_flash_forward(q, k, v, _cu([q.shape[0]]), _cu([k.shape[0]]), q.shape[0], k.shape[0], True,
                                      scale)

    def dense_backward(dout, q, k, v, out, lse, scale):
        return cpu._cpu_flash_backward(dout, q, k, v, out, lse, _cu([q.shape[0]]), _cu([k.shape[0]]), q.shape[0],
                                       k.shape[0], True, scale)

    for name, kernel in (("_cudnn_dense_forward", dense_forward), ("_cudnn_dense_backward", dense_backward),
                         ("_torch_flash_forward", cpu._cpu_flash_forward),
                         ("_torch_flash_backward", cpu._cpu_flash_backward)):
        monkeypatch.setattr(cpu, name, stand_in(kernel))
    monkeypatch.setattr(cpu, "CUDNN_MIN_DOC_TOKENS", 30)
    monkeypatch.setitem(cpu._REGISTRY, "cudnn", cpu._Backend(cpu._cudnn_forward, cpu._cudnn_backward, lambda q: True))
    lens = [37, 2, 5, 101, 3]
    q, k, v, dout = _qkvd(lens, 6, 2, torch.float32)
    qkv = [x.clone().requires_grad_(True) for x in (q, k, v)]
    table = cu_seqlens_table(lens, "cpu")
    monkeypatch.setattr(torch.Tensor, "tolist", read_back)
    out = torch.utils.checkpoint.checkpoint(
        lambda *x: varlen_attention(*x, table, max(lens), True, backend="cudnn")[0], *qkv, use_reentrant=False)
    out.backward(dout)
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    ref = _reference(q, k, v, dout, lens, True)
    _assert_close(out, ref[0], torch.float32, "out")
    for name, x, r in zip(("dq", "dk", "dv"), qkv, ref[2:]):
        _assert_close(x.grad, r, torch.float32, name)


def _stub_cudnn(monkeypatch) -> None:
    """The cudnn backend's logic on CPU: zeros for cuDNN's dense kernels, the CPU flash op for the
    short runs, cuDNN from 30 tokens, and a fresh process's first-use record."""
    cpu = attention_module
    monkeypatch.setattr(cpu, "_cudnn_dense_forward", lambda q, k, v, scale: (torch.zeros_like(q),
                                                                             torch.zeros(q.shape[1], q.shape[0])))
    monkeypatch.setattr(cpu, "_cudnn_dense_backward", lambda dout, q, k, v, out, lse, scale: (q, k, v))
    monkeypatch.setattr(cpu, "_torch_flash_forward", cpu._cpu_flash_forward)
    monkeypatch.setattr(cpu, "_torch_flash_backward", cpu._cpu_flash_backward)
    monkeypatch.setattr(cpu, "CUDNN_MIN_DOC_TOKENS", 30)
    monkeypatch.setitem(cpu._REGISTRY, "cudnn", cpu._Backend(cpu._cudnn_forward, cpu._cudnn_backward, lambda q: True))
    monkeypatch.setattr(first_use, "_seen", set())


def new_graphs(lens: list[int], hq: int, hkv: int) -> dict[str, int]:
    """The first-use events of one forward and backward over documents ``lens`` on the cudnn backend."""
    before = first_use.counts()
    q, k, v, dout = (x.requires_grad_(True) for x in _qkvd(lens, hq, hkv, torch.float32))
    varlen_attention(q, k, v, _cu(lens), max(lens), True, backend="cudnn")[0].backward(dout)
    return first_use.since(before)


def test_cudnn_buckets_cover_every_length_once():
    for top in (4096, 5000, 98304, 131071):
        buckets = cudnn_buckets(top)
        assert buckets == sorted(set(buckets)) and buckets[-1] >= top
        assert {bucket_length(n) for n in range(4096, top + 1)} == set(buckets)


def test_warming_builds_every_graph_training_meets(monkeypatch):
    """After ``warm_cudnn_graphs`` up to 110 tokens for 4 query / 4 KV heads and 90 for 2 / 1, no document
    within those lengths builds a graph; longer ones and other head counts (query or KV) still do."""
    assert warm_cudnn_graphs({(4, 4): 110}, 16, 0.25, torch.float32, torch.device("cpu")) == 0  # not cuDNN on CPU
    _stub_cudnn(monkeypatch)
    built = warm_cudnn_graphs({(4, 4): 110, (2, 1): 90}, 16, 0.25, torch.float32, torch.device("cpu"),
                              backend="cudnn")
    assert built == len(cudnn_buckets(110)) + len(cudnn_buckets(90))
    assert new_graphs([37, 2, 5, 101, 3, 64, 110], 4, 4) == {}
    assert new_graphs([31, 55, 90], 2, 1) == {}
    assert new_graphs([100], 2, 1) == {"cudnn_graph": 2}  # longer than warmed for 2 heads
    assert new_graphs([37], 8, 8) == {"cudnn_graph": 2}
    assert new_graphs([37], 4, 2) == {"cudnn_graph": 2}  # cuDNN takes KV heads as they are: another graph


def test_cudnn_graph_builds_are_noted_once_per_bucket_and_direction(monkeypatch):
    """Each (bucket length, heads, head dim, dtype) the cudnn backend meets for the first time, forward and
    backward apart, is one first-use event (cuDNN builds a graph for it); documents of other lengths in
    the same buckets, or the same shapes again, note nothing."""
    _stub_cudnn(monkeypatch)
    # Long documents 37, 101, 64 -> buckets 38, 104, 64: three graphs forward, three backward.
    assert new_graphs([37, 2, 5, 101, 3, 64], 4, 4) == {"cudnn_graph": 6}
    assert new_graphs([38, 103, 4, 63], 4, 4) == {}  # the same buckets
    assert new_graphs([39, 64], 4, 4) == {"cudnn_graph": 2}  # 39 -> bucket 40
    assert new_graphs([37], 6, 2) == {"cudnn_graph": 2}  # other head counts: other graphs
    assert new_graphs([37, 2, 5, 101, 3, 64], 4, 4) == {}


def _needs_cudnn():
    if not attention_module._cudnn_supported(torch.zeros(1, 1, 8, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("the cudnn backend needs a Hopper or newer GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("min_tokens", [1, 4])
def test_cudnn_backend_matches_reference(monkeypatch, min_tokens):
    """Every document of 2+ tokens on cuDNN (min_tokens 1; it rejects single tokens), and a mix: documents of 5 and 9 tokens on cuDNN,
    the runs of shorter ones between them on the flash kernel (min_tokens 4)."""
    _needs_cudnn()
    monkeypatch.setattr(attention_module, "CUDNN_MIN_DOC_TOKENS", min_tokens)
    _check_backend("cudnn", torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_cudnn_blocks_merge_and_take_the_merged_softmax(monkeypatch):
    """The ring's off-diagonal case through the cudnn backend (which hands non-causal blocks to the
    flash kernel): different query and key lengths per document, backward against an external
    (merged) out/LSE, against the math backend."""
    _needs_cudnn()
    monkeypatch.setattr(attention_module, "CUDNN_MIN_DOC_TOKENS", 3)
    lens_q, lens_k = [6, 2, 9], [4, 5, 3]
    q, _, _, dout = _qkvd(lens_q, 8, 2, torch.bfloat16, "cuda")
    _, k, v, _ = _qkvd(lens_k, 8, 2, torch.bfloat16, "cuda", seed=1)
    cu_q, cu_k, scale = _cu(lens_q, "cuda"), _cu(lens_k, "cuda"), 0.25
    got = attention_forward(q, k, v, cu_q, cu_k, 9, 5, causal=False, scale=scale, backend="cudnn")
    ref = attention_forward(q.float(), k.float(), v.float(), cu_q, cu_k, 9, 5, causal=False, scale=scale,
                            backend="math")
    torch.testing.assert_close(got[0].float(), ref[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], ref[1], atol=2e-2, rtol=2e-2)
    merged_lse = ref[1] + 0.5  # as if another key block had contributed: the backward must use it as given
    grads = attention_backward(dout, q, k, v, ref[0].to(q.dtype), merged_lse, cu_q, cu_k, 9, 5, causal=False,
                               scale=scale, backend="cudnn")
    ref_grads = attention_backward(dout.float(), q.float(), k.float(), v.float(), ref[0], merged_lse, cu_q, cu_k, 9, 5,
                                   causal=False, scale=scale, backend="math")
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch_flash", "flash_attn", "cudnn", "math"])
def test_cuda_empty_key_documents_and_single_query_gqa(backend):
    """Documents without keys in a block (LSE -inf, not the kernels' +inf) and blocks whose longest
    query is one row with GQA (FlashAttention's swapped-heads path)."""
    if backend == "flash_attn" and resolve_backend("auto", torch.zeros(1, 1, 8, device="cuda",
                                                                         dtype=torch.bfloat16)) != "flash_attn":
        pytest.skip("flash_attn is not installed")
    if backend == "cudnn":
        _needs_cudnn()
    q, k, v, dout = _qkvd([1, 1, 1], 8, 2, torch.bfloat16, "cuda")
    cu_k = _cu([2, 0, 1], "cuda")
    out, lse = attention_forward(q, k[:3], v[:3], _cu([1, 1, 1], "cuda"), cu_k, 1, 2, causal=False, scale=0.25,
                                 backend=backend)
    ref_out, ref_lse = attention_forward(q.float(), k[:3].float(), v[:3].float(), _cu([1, 1, 1], "cuda"), cu_k, 1, 2,
                                         causal=False, scale=0.25, backend="math")
    assert torch.isneginf(lse[:, 1]).all() and torch.isfinite(lse[:, [0, 2]]).all()
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:, [0, 2]], ref_lse[:, [0, 2]], atol=2e-2, rtol=2e-2)
    grads = attention_backward(dout, q, k[:3], v[:3], out, lse, _cu([1, 1, 1], "cuda"), cu_k, 1, 2, causal=False,
                               scale=0.25, backend=backend)
    assert all(torch.isfinite(g).all() for g in grads)
