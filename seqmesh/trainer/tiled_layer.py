"""Decoder layers computed a tile of tokens at a time (ALST's sequence tiling), attention included.

What bounds the longest single sequence on one GPU, once the loss and the MLP are tiled and the
checkpointed layer inputs live on the host, is the working set of the one layer being recomputed and
differentiated. Untiled, it holds every per-token tensor of the layer at once. ``TiledDecoderLayer``
runs the per-token parts (norms, projections, RoPE, residuals, MLP) a tile at a time and recomputes a
tile inside backward; what is still whole-length is what attention keeps.

Where attention runs on this process (no sequence or tensor parallelism), the layer goes one step
further (``_QueryTiledLayer``): attention too runs a tile of queries at a time, against the keys
before them, so whole-length it keeps only the layer input, K and V, the attention output and its
LSE; and in backward the output gradient (given), the input gradient (returned) and fp32 sums of dK
and dV. Backward walks the tiles last to first: causal keys are attended only by their own and later
queries, so when a tile is reached its dK and dV are complete and its Q/K/V projections can be
differentiated at once, so Q, dQ, the attention output's gradient and the projections' inputs never
exist at full length. A query tile's attention is its own tokens, causally, and the prefix of the
document that crosses its start, not causally, a tile of keys a call, merged by their LSEs as ring
attention merges its blocks; no attention is recomputed. At the Llama-8B shape that is ~44 KB per token in
bf16 against ~90 for attention over the whole sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from seqmesh.kernels.attention import (VarlenCausalAttention, attention_backward, attention_forward,
                                       cu_seqlens_table, merge_partial)
from seqmesh.trainer.model import BatchMeta, DecoderLayer
from seqmesh.trainer.tiled import autocast_state, grad_params, tiled_rows, tiles


@dataclass(frozen=True)
class _Block:
    """One attention call of a query tile: query rows ``q`` (absolute) against key rows ``k``, documents laid
    out by the boundary tables ``cu_q``/``cu_k`` (relative to each block's first row)."""

    q: slice
    k: slice
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    causal: bool


def tile_blocks(offsets: Sequence[int], a: int, b: int, device: torch.device,
                tables: dict[tuple[int, ...], Tensor] | None = None) -> list[_Block]:
    """The attention calls of queries ``[a, b)`` of a packed stream whose documents start at ``offsets``
    (cumulative, last = length): the tile against itself, causal within each document it holds, and, if
    a document began before ``a``, that document's rows of the tile against its keys before ``a``, at most
    ``b - a`` keys a call. Why the key chunks: a call's transient buffers grow with its keys (FlashAttention-2's
    backward expands dK and dV to every query head, 16 KB per key at the Llama-8B shape), and a whole
    prefix of a million keys would add that much per token to the peak. ``tables`` keeps the boundary
    tables already made (by their lengths), so the tiles of a long document share one per length instead
    of copying a new one to the device for every call."""
    tables = {} if tables is None else tables

    def table(lengths: list[int]) -> Tensor:
        key = tuple(lengths)
        if key not in tables:
            tables[key] = cu_seqlens_table(lengths, device)
        return tables[key]

    cuts = [a, *(o for o in offsets if a < o < b), b]
    lengths = [e - s for s, e in itertools.pairwise(cuts)]
    diag = table(lengths)
    blocks = [_Block(slice(a, b), slice(a, b), diag, diag, max(lengths), max(lengths), True)]
    start = max(o for o in offsets if o <= a)
    if start < a:
        end = min(next(o for o in offsets if o > a), b)
        cu_q = table([end - a])
        for c in range(start, a, b - a):
            keys = min(b - a, a - c)
            blocks.append(_Block(slice(a, end), slice(c, c + keys), cu_q, table([keys]), end - a, keys, False))
    return blocks


def _rows(s: slice, a: int) -> slice:
    """``s`` relative to a tile that starts at row ``a``."""
    return slice(s.start - a, s.stop - a)


class _QueryTiledLayer(torch.autograd.Function):
    """``layer.split_forward`` over one packed stream, every part a tile of queries at a time (module docstring).

    Inputs after the non-tensor arguments: the layer input ``x`` and RoPE's ``cos``/``sin`` (no gradient),
    then the layer's parameters that need gradients, whose fp32 sums over tiles backward returns.
    """

    @staticmethod
    def forward(ctx, layer: DecoderLayer, blocks_per_tile: list[list[_Block]], backend: str, x: Tensor, cos: Tensor,
                sin: Tensor, *params: Tensor) -> Tensor:
        attn, n = layer.self_attn, x.shape[0]
        scale = attn.head_dim**-0.5
        with torch.no_grad():
            for i, blocks in enumerate(blocks_per_tile):
                a, b = blocks[0].q.start, blocks[0].q.stop
                q, k, v = layer.attention_inputs(x[a:b], cos[a:b], sin[a:b])
                if i == 0:
                    keys, values = k.new_empty((n, *k.shape[1:])), v.new_empty((n, *v.shape[1:]))
                    outs = q.new_empty((n, *q.shape[1:]))
                    lses = torch.empty(q.shape[1], n, dtype=torch.float32, device=q.device)
                keys[a:b], values[a:b] = k, v
                outs[a:b], lses[:, a:b] = _tile_attention(q, keys, values, blocks, scale, backend)
                y = layer.after_attention(x[a:b], outs[a:b])
                if i == 0:
                    ys = y.new_empty((n, *y.shape[1:]))
                ys[a:b] = y
        ctx.save_for_backward(x, cos, sin, keys, values, outs, lses)
        ctx.layer, ctx.blocks_per_tile, ctx.backend, ctx.params = layer, blocks_per_tile, backend, params
        ctx.autocast = autocast_state(x.device.type)
        return ys

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, cos, sin, keys, values, outs, lses = ctx.saved_tensors
        layer, params = ctx.layer, ctx.params
        scale = layer.self_attn.head_dim**-0.5
        device_type, enabled, dtype = ctx.autocast
        need_x, need_p = ctx.needs_input_grad[3], ctx.needs_input_grad[6:]
        dx = torch.empty_like(x) if need_x else None
        dps = [torch.zeros_like(p, dtype=torch.float32) if need else None for p, need in zip(params, need_p)]
        wanted_p = [p for p, dp in zip(params, dps) if dp is not None]
        dkeys = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
        dvalues = torch.zeros(values.shape, dtype=torch.float32, device=values.device)

        def accumulate(grads: Sequence[Tensor | None]) -> None:
            for dp, g in zip((dp for dp in dps if dp is not None), grads):
                if g is not None:
                    dp += g

        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for blocks in reversed(ctx.blocks_per_tile):
                a, b = blocks[0].q.start, blocks[0].q.stop
                # O projection, norm, MLP and residuals: the gradient of the attention output and of x.
                x_out = x[a:b].detach().requires_grad_(need_x)
                o = outs[a:b].detach().requires_grad_()
                grads = torch.autograd.grad(layer.after_attention(x_out, o), [o, *([x_out] if need_x else []),
                                            *wanted_p], dy[a:b], allow_unused=True)
                d_out, dx_residual = grads[0], grads[1] if need_x else None
                accumulate(grads[1 + need_x:])
                # Attention: this tile's dQ, and its share of dK/dV, which completes the tile's own rows.
                x_in = x[a:b].detach().requires_grad_(need_x)
                q, k, v = layer.attention_inputs(x_in, cos[a:b], sin[a:b])
                dq = _tile_attention_backward(d_out, q.detach(), keys, values, outs, lses, dkeys, dvalues, blocks,
                                              scale, ctx.backend)
                grads = torch.autograd.grad((q, k, v), [*([x_in] if need_x else []), *wanted_p],
                                            (dq, dkeys[a:b].to(k.dtype), dvalues[a:b].to(v.dtype)),
                                            allow_unused=True)
                accumulate(grads[need_x:])
                if need_x:
                    dx[a:b] = dx_residual + grads[0]
        return (None, None, None, dx, None, None,
                *(None if dp is None else dp.to(p.dtype) for dp, p in zip(dps, params)))


def _tile_attention(q: Tensor, keys: Tensor, values: Tensor, blocks: list[_Block], scale: float,
                    backend: str) -> tuple[Tensor, Tensor]:
    """A query tile's attention output and LSE: its blocks' results merged in fp32."""
    diag, *prefix = blocks
    out, lse = attention_forward(q, keys[diag.k], values[diag.k], diag.cu_q, diag.cu_k, diag.max_q, diag.max_k,
                                 causal=True, scale=scale, backend=backend)
    if prefix:  # every prefix block has the same query rows: one fp32 accumulator for them all
        rows = _rows(prefix[0].q, diag.q.start)
        acc_out, acc_lse = out[rows].float(), lse[:, rows].clone()
        for blk in prefix:
            merge_partial(acc_out, acc_lse, *attention_forward(q[rows], keys[blk.k], values[blk.k], blk.cu_q,
                                                               blk.cu_k, blk.max_q, blk.max_k, causal=False,
                                                               scale=scale, backend=backend))
        out[rows], lse[:, rows] = acc_out.to(out.dtype), acc_lse
    return out, lse


def _tile_attention_backward(d_out: Tensor, q: Tensor, keys: Tensor, values: Tensor, outs: Tensor, lses: Tensor,
                             dkeys: Tensor, dvalues: Tensor, blocks: list[_Block], scale: float,
                             backend: str) -> Tensor:
    """A query tile's dQ; its blocks' dK and dV are added to the fp32 sums ``dkeys``/``dvalues``."""
    a = blocks[0].q.start
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for blk in blocks:
        rows = _rows(blk.q, a)
        gq, gk, gv = attention_backward(d_out[rows], q[rows], keys[blk.k], values[blk.k], outs[blk.q],
                                        lses[:, blk.q], blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, causal=blk.causal,
                                        scale=scale, backend=backend)
        dq[rows] += gq
        dkeys[blk.k] += gk
        dvalues[blk.k] += gv
    return dq.to(q.dtype)


class TiledDecoderLayer(DecoderLayer):
    """A decoder layer whose per-token work runs ``tile_tokens`` tokens at a time (module docstring).

    With attention on this process the whole layer is query-tiled (``_QueryTiledLayer``). Under sequence or
    tensor parallelism the attention core is another op (Ulysses, ring) or sees more tokens than the layer
    holds, so the layer is computed as three ops: (1) input norm, Q/K/V projections and RoPE
    (``attention_inputs``), tiled; (2) the core over the whole Q, K, V; (3) O projection, residual,
    post-attention norm, MLP and residual (``after_attention``), tiled. Either way a tiled op keeps only its
    inputs and recomputes a tile inside backward: one more forward of the per-token parts.

    ``apply_tiled_layers`` turns a ``DecoderLayer`` into this class in place (as FSDP2's
    ``fully_shard`` swaps a module's class), so children, hooks, parameter names and state dicts
    stay those of the plain layer, and a tiled MLP inside (``model.mlp_tile_tokens``) still composes.
    """

    tile_tokens: int

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: BatchMeta) -> Tensor:
        if x.shape[0] <= self.tile_tokens:
            return self.split_forward(x, cos, sin, meta)
        attn = self.self_attn
        if type(attn.core) is VarlenCausalAttention and x.shape[0] == cos.shape[0] == sum(meta.seqlens):
            offsets = list(itertools.accumulate(meta.seqlens, initial=0))
            tables: dict[tuple[int, ...], Tensor] = {}
            blocks = [tile_blocks(offsets, a, b, x.device, tables) for a, b in tiles(x.shape[0], self.tile_tokens)]
            return _QueryTiledLayer.apply(self, blocks, meta.backend, x, cos, sin, *grad_params(self))
        qkv_params = grad_params(self.input_layernorm) + [
            p for m in (attn.q_proj, attn.k_proj, attn.v_proj) for p in grad_params(m)]
        q, k, v = tiled_rows(self.attention_inputs, (x, cos, sin), qkv_params, self.tile_tokens)
        out = attn.core(q, k, v, meta, attn.head_dim**-0.5)
        out_params = [p for m in (attn.o_proj, self.post_attention_layernorm, self.mlp) for p in grad_params(m)]
        return tiled_rows(lambda h, o: (self.after_attention(h, o),), (x, out), out_params, self.tile_tokens)[0]

    def extra_repr(self) -> str:
        return f"tile_tokens={self.tile_tokens}"


def apply_tiled_layers(layers: nn.ModuleList | nn.ModuleDict, tile_tokens: int) -> None:
    """Tile every decoder layer of ``layers`` by ``tile_tokens`` tokens (``TiledDecoderLayer``), in place.

    Before or after activation checkpointing (a wrapped layer is tiled inside its wrapper); a layer
    already tiled keeps its tile size.
    """
    if tile_tokens < 1:
        raise ValueError(f"apply_tiled_layers: tile_tokens must be >= 1, got {tile_tokens}")
    for layer in (layers.values() if isinstance(layers, nn.ModuleDict) else layers):
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        if isinstance(inner, TiledDecoderLayer):
            continue
        if type(inner) is not DecoderLayer:
            raise ValueError(f"apply_tiled_layers: {type(inner).__name__} is not seqmesh's DecoderLayer; sequence "
                             "tiling computes the plain layer's attention inputs and MLP itself")
        inner.__class__ = TiledDecoderLayer
        inner.tile_tokens = int(tile_tokens)
