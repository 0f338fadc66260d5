"""Attention over packed variable-length documents, with one interface for every backend.

Every sequence-parallel variant is built from two primitives, ``attention_forward`` (returns the
output *and* the log-sum-exp, so partial results over different key blocks can be merged exactly)
and ``attention_backward`` (takes an external output and LSE, so a block's gradients can be computed
against the *merged* softmax, which is what ring attention needs). ``varlen_attention`` wraps the
two in autograd for the single-group case.

Layout: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA); documents are the
ranges of int32 ``cu_q`` / ``cu_k`` (``[n+1]``, the same ``n``); the LSE is ``[Hq, Tq]`` fp32.
``causal`` requires every document's query and key ranges to have the same length (diagonal
blocks); off-diagonal blocks are non-causal. A query row whose document has no keys in the block
gets output 0 and LSE ``-inf`` on every backend, so such a block contributes nothing to a merge.

Backends, in the order ``auto`` tries them (docs/design.md, "Attention backend order"):
``flash_attn`` (Dao's varlen kernels, CUDA fp16/bf16, when importable), ``cudnn`` (Hopper and newer:
cuDNN's fused attention for long documents, PyTorch's flash kernel for the short ones), ``torch_flash``
(PyTorch's own varlen flash kernel, CUDA fp16/bf16), ``cpu_flash`` (PyTorch's CPU flash op, one call
per document) and ``math`` (plain fp32 matmuls per document: any device and dtype, slow, exact).

Why ``cudnn`` goes before ``torch_flash``: PyTorch's flash kernel is FlashAttention-2, written for
Ampere. On an H200 (causal, 32 query / 8 KV heads of 128, bf16) it ran 350 TFLOP/s forward and
255 backward at 32K tokens per document, while cuDNN's Hopper kernels ran 600-620 forward and
430-470 forward+backward at 8K-32K; in the 8B-shaped training step attention was 60% of the
kernel time with the flash kernel. cuDNN's dense kernel takes one document per call, so documents
shorter than ``CUDNN_MIN_DOC_TOKENS`` (where per-call overhead would show) stay on the varlen flash
kernel, a run of consecutive short documents in one call. Only causal (diagonal) blocks go to
cuDNN, each padded to a length bucket (``bucket_length``) so that a few cached graphs serve every
length; the ring's non-causal blocks cannot be padded without a key mask, which PyTorch's cuDNN
op does not take, and stay on the flash kernel. A bucket's first forward and first backward in a
process build its graphs, a one-off cost noted in ``seqmesh.first_use``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
from typing import Callable, Mapping, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmesh import first_use

BACKENDS = ("auto", "flash_attn", "cudnn", "torch_flash", "cpu_flash", "math")
# Shortest document (query and key tokens of the block) that the cudnn backend gives to cuDNN:
# measured on an H200 (causal, 32/8 heads of 128, bf16, forward+backward), cuDNN ran 210 / 313 / 379
# TFLOP/s at 2K / 4K / 8K tokens per document against 224 / 248 / 267 for the flash kernel.
CUDNN_MIN_DOC_TOKENS = 4096
_CUDNN_SHORTEST = 2  # cuDNN rejects single-token documents (s_q = s_kv = 1)
_HALF = (torch.float16, torch.bfloat16)


class _Backend(NamedTuple):
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    supports: Callable[[Tensor], bool]


# --------------------------------------------------------------------------- document boundaries


def cu_seqlens_table(lengths: Sequence[int], device: torch.device | str) -> Tensor:
    """int32 cumulative lengths ``[0, l0, l0 + l1, ...]`` on ``device``, remembering their host values.

    Why: the backends that pick kernels per document (cuDNN: a dense call for each long document, one
    varlen call for a run of short ones; the CPU ops) need the boundaries as Python ints, and reading
    them back from a CUDA tensor waits for every kernel queued before it: each layer's attention,
    forward and backward, would drain the GPU's queue and leave it idle while the host catches up (the
    eager 32K step was 15% idle on an H100). A table made here carries its host copy; others are read
    back (``host_offsets``)."""
    host = tuple(itertools.accumulate(lengths, initial=0))
    table = torch.tensor(host, dtype=torch.int32, device=device)
    table.host_offsets = host  # type: ignore[attr-defined]
    return table


def host_offsets(cu: Tensor) -> Sequence[int]:
    """The values of a boundary table as Python ints: its host copy when it has one, else read back."""
    host = getattr(cu, "host_offsets", None)
    return cu.tolist() if host is None else host


# --------------------------------------------------------------------------- per-document loops


def _doc_ranges(cu_q: Tensor, cu_k: Tensor, causal: bool) -> list[tuple[int, int, int, int]]:
    """Document boundaries as Python ints (the CPU backends loop over documents)."""
    oq, ok = host_offsets(cu_q), host_offsets(cu_k)
    if len(oq) != len(ok):
        raise ValueError(f"cu_q has {len(oq) - 1} documents but cu_k has {len(ok) - 1}; they must match")
    ranges = []
    for i in range(len(oq) - 1):
        qs, qe, ks, ke = oq[i], oq[i + 1], ok[i], ok[i + 1]
        if causal and qe - qs != ke - ks:
            raise ValueError(f"causal attention needs equal query and key lengths per document; document {i} "
                             f"has {qe - qs} queries and {ke - ks} keys (split it into a causal diagonal block "
                             "and non-causal off-diagonal blocks)")
        ranges.append((qs, qe, ks, ke))
    return ranges


def _bhsd(x: Tensor) -> Tensor:
    """[T, H, D] -> [1, H, T, D] view, the layout of PyTorch's SDPA ops."""
    return x.transpose(0, 1).unsqueeze(0)


def _cpu_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    for qs, qe, ks, ke in _doc_ranges(cu_q, cu_k, causal):
        if qe == qs or ke == ks:  # the op divides by zero on empty keys: such rows keep 0 / -inf
            continue
        o, l = op(_bhsd(q[qs:qe]), _bhsd(k[ks:ke]), _bhsd(v[ks:ke]), 0.0, causal, scale=scale)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)  # the op's own LSE dtype
    for qs, qe, ks, ke in _doc_ranges(cu_q, cu_k, causal):
        if qe == qs or ke == ks:
            continue
        g = op(_bhsd(dout[qs:qe]), _bhsd(q[qs:qe]), _bhsd(k[ks:ke]), _bhsd(v[ks:ke]), _bhsd(out[qs:qe]),
               lse[:, qs:qe].unsqueeze(0).contiguous(), 0.0, causal, scale=scale)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (x[0].transpose(0, 1) for x in g)
    return dq, dk, dv


def _math_scores(q, k, causal, scale):
    """fp32 scores [H, Lq, Lk] of one document, GQA expanded, causal mask applied."""
    group = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(group, dim=1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return s


def _math_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    for qs, qe, ks, ke in _doc_ranges(cu_q, cu_k, causal):
        if qe == qs or ke == ks:
            continue
        s = _math_scores(q[qs:qe], k[ks:ke], causal, scale)
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l.unsqueeze(-1))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, v[ks:ke].float().repeat_interleave(group, dim=1)).to(q.dtype)
        lse[:, qs:qe] = l
    return out, lse


def _math_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    for qs, qe, ks, ke in _doc_ranges(cu_q, cu_k, causal):
        if qe == qs or ke == ks:
            continue
        p = torch.exp(_math_scores(q[qs:qe], k[ks:ke], causal, scale) - lse[:, qs:qe].unsqueeze(-1))
        do, o = dout[qs:qe].float(), out[qs:qe].float()
        ve = v[ks:ke].float().repeat_interleave(group, dim=1)
        ke_ = k[ks:ke].float().repeat_interleave(group, dim=1)
        dvh = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, ve)
        ds = p * (dp - (do * o).sum(-1).transpose(0, 1).unsqueeze(-1)) * scale
        dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, ke_).to(q.dtype)
        dkh = torch.einsum("hqk,qhd->khd", ds, q[qs:qe].float())
        n = ke - ks
        dk[ks:ke] = dkh.view(n, hkv, group, -1).sum(2).to(k.dtype)
        dv[ks:ke] = dvh.view(n, hkv, group, -1).sum(2).to(v.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------- CUDA kernels


def _fix_empty_rows(lse: Tensor) -> Tensor:
    """Flash kernels mark rows without keys with LSE +inf (so their backward sees exp(-inf));
    seqmesh's contract is -inf, the neutral element of the LSE merge."""
    return lse.masked_fill_(torch.isposinf(lse), -math.inf)


def _max_q(max_q: int) -> int:
    # With max_q == 1 and GQA, FlashAttention-2 swaps query rows into the head dimension, which
    # reshapes q by the number of documents and changes the LSE layout; max_q is only a grid-size
    # hint, so a value of 2 keeps the regular varlen path without changing the result.
    return max(max_q, 2)


@functools.cache
def _rng_placeholder(device: torch.device) -> tuple[Tensor, Tensor]:
    """The philox state the flash backward reads only when dropout > 0 (seqmesh never drops)."""
    return (torch.zeros(2, dtype=torch.uint64, device=device), torch.zeros((), dtype=torch.uint64, device=device))


def _torch_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, _max_q(max_q), max_k, 0.0, causal, False,
        scale=scale)[:2]
    return out, _fix_empty_rows(lse)


def _torch_flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    rng, unused = _rng_placeholder(q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
        cu_q, cu_k, _max_q(max_q), max_k, 0.0, causal, rng, unused, scale=scale)
    return dq, dk, dv


def doc_runs(cu_q: Sequence[int], cu_k: Sequence[int], min_tokens: int) -> list[tuple[bool, int, int]]:
    """Documents ``[first, end)`` grouped into calls: ``(True, i, i + 1)`` for a document with at
    least ``min_tokens`` queries and keys (one dense call each), ``(False, i, j)`` for a maximal run
    of consecutive shorter ones (one varlen call: their tokens are contiguous in the packed stream)."""
    runs: list[tuple[bool, int, int]] = []
    for i in range(len(cu_q) - 1):
        long = min(cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]) >= min_tokens
        if long or not runs or runs[-1][0]:
            runs.append((long, i, i + 1))
        else:
            runs[-1] = (False, runs[-1][1], i + 1)
    return runs


# Whether cuDNN's dense attention ops take K/V with fewer heads than Q (``_kv_heads_for_cudnn``).
_CUDNN_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11)


def _kv_heads_for_cudnn(x: Tensor, group: int) -> Tensor:
    """K or V as cuDNN's dense kernels take them. From torch 2.11 they take fewer KV heads than query heads
    (query head h reads KV head h // group, the GQA convention of the flash kernels): measured on an H100
    with cuDNN 9.19 (``bench/cudnn_gqa_probe.py``), outputs and dk/dv equal to the expanded call's bit for
    bit, dq within an ulp (another summation order), and no K/V copies of every query head's size (16 KB
    per token at the Llama-8B shape, ~12 KB of it still held in backward). Earlier torch versions get the
    heads repeated, their dk/dv summed back by the caller."""
    return x if group == 1 or _CUDNN_GQA else x.repeat_interleave(group, dim=1)


def bucket_length(n: int) -> int:
    """The length a causal document is padded to for cuDNN: the next multiple of 1/16 of its octave.

    cuDNN builds (and caches) an execution graph per shape, and documents have all kinds of
    lengths: without buckets every new length would pay a graph build (tens to hundreds of ms,
    as other projects measured). Sixteen buckets per octave bound the padding to 1/16 of the
    length (at most ~13% more attention work, ~6% on average) and the graphs to 16 per doubling.
    """
    step = 1 << max(n.bit_length() - 5, 0)
    return -(-n // step) * step


def cudnn_buckets(max_tokens: int) -> list[int]:
    """Every length a causal document of at most ``max_tokens`` tokens is padded to on cuDNN."""
    buckets, n = [], max(CUDNN_MIN_DOC_TOKENS, _CUDNN_SHORTEST)
    while n <= max_tokens:
        buckets.append(bucket_length(n))
        n = buckets[-1] + 1
    return buckets


def warm_cudnn_graphs(longest: Mapping[tuple[int, int], int], head_dim: int, scale: float, dtype: torch.dtype,
                      device: torch.device, backend: str = "auto") -> int:
    """Build the cuDNN graphs (forward and backward) of every bucket up to ``longest[(hq, hkv)]`` tokens for
    each per-rank pair of query and KV head counts, before training; returns how many buckets were run.

    Why up front: a long-tail length mix keeps meeting new buckets for many steps. On 2x H200
    (Llama-1B shape, 14 steps, longest 98K) 13 steps built 4-24 graphs each at ~40-60 ms a graph,
    those steps ran up to 1.8x their steady time, and the cost model could fit none of them. A
    dummy document of each bucket length through the real entry points builds exactly the graphs
    (shapes and strides) training will ask for. Nothing is built where cuDNN is not the backend.
    The cost is the graph builds plus one attention pass per bucket, which grows with the square
    of the longest length (the trainer logs it); in that benchmark the whole run of a policy took
    131 s with the warm-up against 122 s without it, its steps no longer paying for graphs.
    """
    built = 0
    for (hq, hkv), top in sorted(longest.items()):
        if resolve_backend(backend, torch.empty(1, hq, head_dim, dtype=dtype, device=device)) != "cudnn":
            continue
        for m in cudnn_buckets(top):
            q = torch.zeros(m, hq, head_dim, dtype=dtype, device=device)
            kv = torch.zeros(m, hkv, head_dim, dtype=dtype, device=device)
            cu = cu_seqlens_table([m], device)
            out, lse = attention_forward(q, kv, kv, cu, cu, m, m, causal=True, scale=scale, backend="cudnn")
            attention_backward(q, q, kv, kv, out, lse, cu, cu, m, m, causal=True, scale=scale, backend="cudnn")
            built += 1
    return built


def _pad_tokens(x: Tensor, length: int) -> Tensor:
    return x if x.shape[0] == length else F.pad(x, (0, 0) * (x.dim() - 1) + (0, length - x.shape[0]))


def _cudnn_dense_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of one document, K/V of H or fewer heads (``_kv_heads_for_cudnn``):
    (out [S, H, D], lse [H, S])."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(_bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, True,
                                                             False, scale=scale)
    return res[0][0].transpose(0, 1), res[1].view(q.shape[1], q.shape[0])


def _cudnn_dense_backward(dout, q, k, v, out, lse, scale) -> tuple[Tensor, Tensor, Tensor]:
    rng, unused = _rng_placeholder(q.device)
    n = q.shape[0]
    grads = torch.ops.aten._cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous().view(1, q.shape[1], n, 1), rng,
        unused, None, None, None, n, n, 0.0, True, scale=scale)
    return tuple(x[0].transpose(0, 1) for x in grads)


def _cudnn_doc_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One causal document on cuDNN, padded at its end to ``bucket_length``: with a causal mask no
    real query sees a padding key, so the real rows come out as without padding."""
    n, group = q.shape[0], q.shape[1] // k.shape[1]
    m = bucket_length(n)
    first_use.first("cudnn_graph", ("forward", m, *q.shape[1:], k.shape[1], q.dtype, q.device))
    out, lse = _cudnn_dense_forward(*(_pad_tokens(x, m) for x in (q, _kv_heads_for_cudnn(k, group),
                                                                   _kv_heads_for_cudnn(v, group))), scale)
    return out[:n], lse[:, :n]


def _cudnn_doc_backward(dout, q, k, v, out, lse, scale) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``_cudnn_doc_forward``. Padding rows get zero q, k, v, output gradient and
    output, and LSE 0: their probabilities stay finite (exp(0 - 0)) and their dS = P (dP - D) is 0,
    so they add nothing to the real rows' gradients."""
    (n, hkv, d), group = k.shape, q.shape[1] // k.shape[1]
    m = bucket_length(n)
    first_use.first("cudnn_graph", ("backward", m, *q.shape[1:], hkv, q.dtype, q.device))
    padded = (_pad_tokens(x, m) for x in (dout, q, _kv_heads_for_cudnn(k, group), _kv_heads_for_cudnn(v, group),
                                          out))
    dq, dk, dv = _cudnn_dense_backward(*padded, F.pad(lse, (0, m - n)), scale)
    if dk.shape[1] != hkv:
        dk, dv = (x[:n].reshape(n, hkv, group, d).sum(2) for x in (dk, dv))
    return dq[:n], dk[:n], dv[:n]


def _cudnn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    oq, ok = host_offsets(cu_q), host_offsets(cu_k)
    runs = doc_runs(oq, ok, max(CUDNN_MIN_DOC_TOKENS, _CUDNN_SHORTEST))
    if not causal or (len(runs) == 1 and not runs[0][0]):
        return _torch_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    if len(runs) == 1:  # one long document: cuDNN's own outputs, without a second buffer to copy them into
        return tuple(t.contiguous() for t in _cudnn_doc_forward(q, k, v, scale))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for long, a, b in runs:
        qs, ks = slice(oq[a], oq[b]), slice(ok[a], ok[b])
        if long:
            out[qs], lse[:, qs] = _cudnn_doc_forward(q[qs], k[ks], v[ks], scale)
        else:
            out[qs], lse[:, qs] = _torch_flash_forward(q[qs], k[ks], v[ks], cu_q[a:b + 1] - oq[a],
                                                       cu_k[a:b + 1] - ok[a], *_run_max(oq, ok, a, b), causal, scale)
    return out, lse


def _cudnn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    oq, ok = host_offsets(cu_q), host_offsets(cu_k)
    runs = doc_runs(oq, ok, max(CUDNN_MIN_DOC_TOKENS, _CUDNN_SHORTEST))
    if not causal or (len(runs) == 1 and not runs[0][0]):
        return _torch_flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
    if len(runs) == 1:  # one long document (the longest-sequence case): no dq, dk, dv beside cuDNN's
        return tuple(t.contiguous() for t in _cudnn_doc_backward(dout, q, k, v, out, lse, scale))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for long, a, b in runs:
        qs, ks = slice(oq[a], oq[b]), slice(ok[a], ok[b])
        args = (dout[qs], q[qs], k[ks], v[ks], out[qs], lse[:, qs])
        if long:
            dq[qs], dk[ks], dv[ks] = _cudnn_doc_backward(*args, scale)
        else:
            dq[qs], dk[ks], dv[ks] = _torch_flash_backward(*args, cu_q[a:b + 1] - oq[a], cu_k[a:b + 1] - ok[a],
                                                           *_run_max(oq, ok, a, b), causal, scale)
    return dq, dk, dv


def _run_max(oq: list[int], ok: list[int], a: int, b: int) -> tuple[int, int]:
    return (max(oq[i + 1] - oq[i] for i in range(a, b)), max(ok[i + 1] - ok[i] for i in range(a, b)))


def _cudnn_supported(q: Tensor) -> bool:
    return (_cuda_half(q) and q.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


@functools.cache
def _flash_attn_interface():
    from flash_attn import flash_attn_interface

    return flash_attn_interface


def _call_with_known_kwargs(fn: Callable, **kwargs):
    """flash-attn renamed and added arguments across 2.x releases (window_size -> left/right,
    softcap, optional dq/dk/dv); pass each release exactly the names it declares."""
    # flash-attn >= 2.7 wraps them in torch.library custom ops, whose own signature is (*args, **kwargs)
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    if "window_size" in params:
        kwargs["window_size"] = (-1, -1)
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def _flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    fa = _flash_attn_interface()
    res = _call_with_known_kwargs(
        fa._flash_attn_varlen_forward, q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale,
        causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
        return_softmax=False)
    # 2.6+ returns (out, lse, S_dmask, rng_state); earlier 2.x (out, q, k, v, out_padded, lse, ...)
    out, lse = res[0], res[1] if len(res) == 4 else res[5]
    return out, _fix_empty_rows(lse)


def _flash_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    fa = _flash_attn_interface()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_with_known_kwargs(
        fa._flash_attn_varlen_backward, dout=dout.contiguous(), q=q.contiguous(), k=k.contiguous(),
        v=v.contiguous(), out=out.contiguous(), softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0,
        softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, deterministic=False, rng_state=None)
    return dq, dk, dv


@functools.cache
def _has_flash_attn() -> bool:
    """flash-attn 2's varlen kernels are importable (other packages under the same top-level name,
    such as the CuTe-DSL FlashAttention-4, lack them and are not used here)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        fa = _flash_attn_interface()
    except ImportError:
        return False
    return hasattr(fa, "_flash_attn_varlen_forward") and hasattr(fa, "_flash_attn_varlen_backward")


def _cuda_half(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in _HALF and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


_REGISTRY: dict[str, _Backend] = {
    "flash_attn": _Backend(_flash_attn_forward, _flash_attn_backward,
                           lambda q: _cuda_half(q) and _has_flash_attn()),
    "cudnn": _Backend(_cudnn_forward, _cudnn_backward, _cudnn_supported),
    "torch_flash": _Backend(_torch_flash_forward, _torch_flash_backward, _cuda_half),
    "cpu_flash": _Backend(_cpu_flash_forward, _cpu_flash_backward, lambda q: q.device.type == "cpu"),
    "math": _Backend(_math_forward, _math_backward, lambda q: True),
}


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend for ``q``'s device and dtype: ``auto`` picks the fastest that supports
    them; an explicit name is checked, so a misconfiguration fails here and not inside a kernel."""
    if backend == "auto":
        return next(name for name, b in _REGISTRY.items() if b.supports(q))
    if backend not in _REGISTRY:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if not _REGISTRY[backend].supports(q):
        raise ValueError(f"attention backend {backend!r} does not support {q.dtype} tensors on {q.device} with head "
                         f"dim {q.shape[-1]} (flash backends need CUDA fp16/bf16, head dim a multiple of 8 up to "
                         f"256, and flash_attn installed for 'flash_attn'; 'cudnn' also needs a Hopper or newer "
                         f"GPU and head dim <= 128); use backend='auto'")
    return backend


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0 or q.shape[2] != k.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) and the "
                         f"head dims must match ({q.shape[2]} vs {k.shape[2]})")


def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, *,
                      causal: bool, scale: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One block of attention without autograd: ``(out [Tq, Hq, D], lse [Hq, Tq] fp32)``."""
    _check_shapes(q, k, v)
    if q.shape[0] == 0 or k.shape[0] == 0:
        return q.new_zeros(q.shape), torch.full((q.shape[1], q.shape[0]), -math.inf, device=q.device)
    return _REGISTRY[resolve_backend(backend, q)].forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                       cu_k: Tensor, max_q: int, max_k: int, *, causal: bool, scale: float,
                       backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *final* ``out`` and ``lse`` of its query rows, which may
    include other key blocks: the block's share of dq, and its dk, dv (``Hkv`` heads)."""
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return _REGISTRY[resolve_backend(backend, q)].backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                                           causal, scale)


def merge_partial(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Fold one key block's ``(out, lse)`` into the running result of the same query rows, in place and in
    fp32 (``acc_out`` [Tq, Hq, D] fp32, ``acc_lse`` [Hq, Tq]): softmax-weighted by the blocks' LSEs, written as
    sigmoid/logsigmoid of their difference so that a block with LSE -inf (no keys) changes nothing. In bf16
    the error would grow with the number of blocks merged."""
    diff = lse - acc_lse
    acc_out.lerp_(out.float(), torch.sigmoid(diff).t().unsqueeze(-1))
    acc_lse.sub_(F.logsigmoid(-diff))


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, backend):
        out, lse = attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                     scale=scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        # The table itself, not a saved copy: saved-tensor hooks (activation offload) would return a
        # new tensor without its host offsets (``cu_seqlens_table``). It needs no gradient.
        ctx.args = (cu_seqlens, max_seqlen, causal, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        cu, max_seqlen, causal, scale, backend = ctx.args
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu, cu, max_seqlen, max_seqlen, causal=causal,
                                        scale=scale, backend=backend)
        return dq, dk, dv, None, None, None, None, None


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool = True,
                     softmax_scale: float | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Differentiable attention within each packed document: ``(out [T, Hq, D], lse [Hq, T])``.

    No token attends across a boundary of ``cu_seqlens`` (int32 ``[n+1]``, on q's device).
    """
    _check_shapes(q, k, v)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (the flash kernels read it as int*), got {cu_seqlens.dtype}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    resolve_backend(backend, q)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), causal, scale, backend)


class PackedDocs(Protocol):
    """How one packed stream's documents lie: what attention over it needs to know.

    ``seqlens`` are the documents' lengths (their tokens back to back), ``cu_seqlens(device)`` the
    int32 cumulative lengths on ``device`` (cached by the implementation: one per forward, not per
    layer), ``max_seqlen`` the longest, ``backend`` one of ``BACKENDS``. ``parallel.sequence.SPBatch``
    is one; it adds how the tokens are spread over a sequence-parallel group.
    """

    seqlens: tuple[int, ...]
    backend: str

    @property
    def max_seqlen(self) -> int: ...

    def cu_seqlens(self, device: torch.device) -> Tensor: ...


class VarlenCausalAttention(nn.Module):
    """Causal attention of a packed stream within each of its documents, all tokens on this process.

    The attention of a plain model: ``(q [T, Hq, D], k/v [T, Hkv, D], docs, scale) -> [T, Hq, D]``.
    Sequence parallelism swaps it for an attention over a group of ranks with the same call
    (``seqmesh.parallel.sequence.apply_sequence_parallel``). No parameters, so names and
    checkpoints do not see it.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, docs: PackedDocs, softmax_scale: float) -> Tensor:
        if q.shape[0] != sum(docs.seqlens):
            raise ValueError(
                f"local attention got {q.shape[0]} tokens for documents of {sum(docs.seqlens)}: the batch is "
                "sharded over a sequence-parallel group; apply seqmesh.parallel.sequence.apply_sequence_parallel "
                "to the model")
        return varlen_attention(q, k, v, docs.cu_seqlens(q.device), docs.max_seqlen, True, softmax_scale,
                                docs.backend)[0]
