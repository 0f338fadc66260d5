"""Tensor parallelism (Megatron-style, with sequence parallelism) as a transform on the plain model.

``apply_tensor_parallel(model, group)`` rewrites a model (``model_protocol.CausalLM``) in place for
the ``tp`` ranks of ``group`` (one TP group of the mesh, TP innermost), swapping modules only: the
model's own forward then runs unchanged on the rank's heads and MLP slice.

* q/k/v and gate/up become ``ColumnParallelLinear`` (each rank computes its heads / its slice of the
  MLP's inner width), o and down ``RowParallelLinear`` (partial sums); the attention module's head
  counts become the rank's. Query heads are split over TP; key/value
  heads are split too when TP divides their count, and when their count divides TP each KV head is
  replicated on the ``tp / num_kv_heads`` ranks whose query heads read it (their gradients are then
  summed over those ranks). Any other combination is an error.
* Sequence parallelism between the blocks: the residual stream, the norms and the residual adds
  hold ``1/tp`` of the rank's tokens. Column-parallel layers start with an all-gather along tokens
  and row-parallel layers end with a reduce-scatter along tokens, which moves the same bytes as
  Megatron's plain all-reduce but keeps activations (and norm compute) sharded; the column-parallel
  GEMMs keep only the token shard of their input for backward and gather it again there. Each
  block's ``project`` (how its q/k/v, or gate/up, read their one input) becomes
  ``GatheredProjections``: one all-gather and one autograd function for all of the block's GEMMs. The token
  stream is padded to a multiple of ``tp`` (at most ``tp - 1`` zero rows that never reach attention
  or the loss).
* The embedding is vocabulary-parallel (each rank looks up its rows, a reduce-scatter sums and
  shards), and so is the output head; the loss is ``vocab_parallel_cross_entropy``, which combines
  per-rank maxima, exp-sums and target logits with all-reduces of ``T`` numbers and never gathers
  the ``[T, vocab]`` logits. A vocabulary that TP does not divide is padded with rows that no token
  looks up and whose logits are left out of the softmax.

Parameters keep their HF names with local shapes, so a TP checkpoint resumes at the same TP.
Parameters that stay identical on every TP rank (the norms' gains, row-parallel biases, replicated
KV heads) see only their rank's tokens or heads, so their gradients are partial:
``reduce_tensor_parallel_gradients`` sums them once per step, after the last micro-batch (like the
HDP reduction, and for the same reason: ranks run different numbers of micro-batches).

Attention inside a TP rank sees only its local heads, and its sequence-parallel group (``meta.group``,
from ``Mesh.sp_group``) holds the same-TP-rank peers of the HDP plane, so TP and the per-step SP
regrouping compose without either knowing about the other.

Why own autograd functions rather than DTensor's ``parallelize_module``: the micro-batch is one
packed stream whose length changes every micro-batch and is rarely a multiple of TP, the attention is
``sp_attention`` with its own collectives on a different group every micro-batch, and the loss
ignores padding labels. DTensor would need ``to_local``/``from_local`` around attention, uneven
``Shard(0)`` redistributions on every block and its ``loss_parallel`` only for the last step, while
the whole Megatron scheme is two differentiable collectives (all-gather / reduce-scatter along
tokens) and one fused loss on plain tensors -- which also run unchanged on gloo for the CPU tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seqmesh.parallel.model_protocol import decoder_layers
from seqmesh.parallel.shard_spec import ShardSpec, set_shard_spec, shard_spec, tp_replicated, tp_slice

if TYPE_CHECKING:
    from seqmesh.parallel.model_protocol import CausalLM, ModelDims


@dataclass(frozen=True)
class TensorParallel:
    """What the transform did to one model: the TP group and the parameters that need care."""

    group: dist.ProcessGroup
    size: int
    rank: int
    vocab_size: int  # the real vocabulary (before padding to a multiple of size)
    vocab_start: int  # first vocabulary row of this rank's shard
    replicated: tuple[nn.Parameter, ...]  # identical on every TP rank; gradient summed over all of them
    kv_shared: tuple[nn.Parameter, ...]  # a KV head's weights, held by kv_copies consecutive ranks
    kv_copies: int

    def norm_excluded(self) -> tuple[nn.Parameter, ...]:
        """Parameters whose identical copy another TP rank counts in the global gradient norm."""
        excluded = self.replicated if self.rank else ()
        return excluded + (self.kv_shared if self.rank % self.kv_copies else ())


def check_tensor_parallel(dims: ModelDims, tp: int) -> None:
    """Raise a ValueError naming the model dimension that ``tp`` ranks cannot split, and the fix."""
    if tp < 1:
        raise ValueError(f"tensor parallel degree must be >= 1, got {tp}")
    if dims.num_heads % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the model's {dims.num_heads} attention heads; "
                         f"choose a tp that divides {dims.num_heads}")
    kv = dims.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(f"parallel.tp={tp} and the model's {kv} key/value heads: tp must divide the KV heads "
                         f"(they are split) or be a multiple of them (each is replicated on tp/{kv} ranks); "
                         f"choose tp among the divisors or multiples of {kv}")
    if dims.intermediate_size % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the MLP width intermediate_size="
                         f"{dims.intermediate_size}; choose a tp that divides it")
    if (tp - 1) * -(-dims.vocab_size // tp) >= dims.vocab_size:
        raise ValueError(f"parallel.tp={tp} is too large for a vocabulary of {dims.vocab_size}: the last rank's "
                         f"shard would hold no real token; use a smaller tp")


def _gather_tokens(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_tokens(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """All-gather along tokens; its gradient is the reduce-scatter (each rank's partial input grads summed)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _gather_tokens(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _reduce_scatter_tokens(grad, ctx.group), None


class _ReduceScatterTokens(torch.autograd.Function):
    """Sum partial results over TP and keep this rank's tokens; its gradient is the all-gather."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _reduce_scatter_tokens(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_tokens(grad, ctx.group), None


class _GatheredColumnLinears(torch.autograd.Function):
    """All-gather along tokens, then several column-parallel GEMMs of the gathered input, saving only
    this rank's token shard for backward, which gathers it again (Megatron's sequence parallelism).

    Autograd around a plain all-gather + ``nn.Linear`` would keep the gathered ``[tp * t, hidden]``
    input whole on every TP rank (under autocast one bf16 copy per GEMM: three for q/k/v, two for
    gate/up), so activation memory per token would not fall with TP; a second all-gather in backward
    costs far less than those copies. Under autocast the GEMMs run in the autocast dtype, forward and
    backward (re-entered there: backward runs outside the forward's autocast context), and the input
    gradient is summed over the GEMMs and reduce-scattered in the input's dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, rows: int,
                *params: Tensor | None) -> tuple[Tensor, ...]:
        ctx.group, ctx.rows = group, rows
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        ctx.dtype = torch.get_autocast_dtype(x.device.type)
        weights, biases = params[0::2], params[1::2]
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights)
        h = _gather_tokens(x, group)[:rows]
        if ctx.autocast:
            h = h.to(ctx.dtype)
        return tuple(F.linear(h, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        h = _gather_tokens(x, ctx.group)[:ctx.rows]
        with torch.autocast(x.device.type, dtype=ctx.dtype, enabled=ctx.autocast):
            dh = sum(torch.matmul(g, w).to(x.dtype) for g, w in zip(grads, weights))
            dws = [torch.matmul(g.t(), h) for g in grads]
        dbs = [g.sum(0) if has else None for g, has in zip(grads, ctx.has_bias)]
        dx = _reduce_scatter_tokens(_pad_rows(dh, x.shape[0] * dist.get_world_size(ctx.group)), ctx.group)
        return (dx, None, None, *(t for pair in zip(dws, dbs) for t in pair))


def gathered_column_linears(x: Tensor, group: dist.ProcessGroup, rows: int,
                            linears: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
    """The column-parallel ``linears`` of the first ``rows`` gathered tokens of the TP ranks' shards ``x``."""
    params = [t for m in linears for t in (m.weight, m.bias)]
    return _GatheredColumnLinears.apply(x, group, rows, *params)


def gather_tokens(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``[t, ...]`` token shards of the TP ranks -> ``[tp * t, ...]`` on every rank (differentiable)."""
    return _GatherTokens.apply(x, group)


def reduce_scatter_tokens(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Partial ``[tp * t, ...]`` on every rank -> this rank's ``[t, ...]`` of their sum (differentiable)."""
    return _ReduceScatterTokens.apply(x, group)


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return x if x.shape[0] == rows else F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


class ColumnParallelLinear(nn.Linear):
    """Output rows ``[start, start + out_features)`` of a linear of ``full_features`` outputs.

    An ``nn.Linear`` holding the slice (names and init stay HF's) that reads the TP ranks' token
    shards: ``forward`` all-gathers them (a block's ``GatheredProjections`` does that once for all
    its column-parallel linears). ``copies`` TP ranks hold this identical slice (a replicated KV
    head); the first of them writes it to a checkpoint. The placement is the weight's ``ShardSpec``.
    """

    def __init__(self, linear: nn.Linear, start: int, length: int, group: dist.ProcessGroup,
                 copies: int = 1) -> None:
        super().__init__(linear.in_features, length, bias=linear.bias is not None, device="meta")
        self.weight = _param(linear.weight[start:start + length])
        if linear.bias is not None:
            self.bias = _param(linear.bias[start:start + length])
        self.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        for p, full in ((self.weight, linear.weight), (self.bias, linear.bias)):
            set_shard_spec(p, tp_slice(full.shape if full is not None else (), 0, start, length, rank, size,
                                       copies=copies, writer=rank % copies == 0))

    @property
    def spec(self) -> ShardSpec:
        return shard_spec(self.weight)

    @property
    def start(self) -> int:
        return self.spec.start

    @property
    def full_features(self) -> int:
        return self.spec.full_shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return gathered_column_linears(x, self.group, x.shape[0] * dist.get_world_size(self.group), (self,))[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows {self.start}..{self.start + self.out_features} of {self.full_features}"


class GatheredProjections(nn.Module):
    """Several column-parallel linears of one token-sharded input: one all-gather for all of them.

    Replaces the model's ``project`` of an attention or MLP block; ``rows`` (the tokens attention
    needs) trims the gathered padding, None keeps every gathered row (the MLP's, token-wise).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: Tensor, linears: tuple[nn.Module, ...], rows: int | None = None) -> tuple[Tensor, ...]:
        if rows is None:
            rows = x.shape[0] * dist.get_world_size(self.group)
        return gathered_column_linears(x, self.group, rows, linears)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` over this rank's input slice, summed and token-sharded by a reduce-scatter; + bias once."""

    def __init__(self, linear: nn.Linear, start: int, end: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group, self.tp = group, dist.get_world_size(group)
        self.weight = _param(linear.weight[:, start:end])
        self.bias = None if linear.bias is None else _param(linear.bias)
        rank = dist.get_rank(group)
        set_shard_spec(self.weight, tp_slice(linear.weight.shape, 1, start, end - start, rank, self.tp))
        if self.bias is not None:  # added once after the reduce-scatter: the same on every TP rank
            set_shard_spec(self.bias, tp_replicated(self.bias.shape, rank, self.tp))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [T, in/tp] for the rank's T tokens (all TP ranks' gathered rows) -> this rank's token shard
        of the sum; T is padded to a multiple of TP first (the padding rows never reach attention or the loss)."""
        rows = -(-x.shape[0] // self.tp) * self.tp
        y = reduce_scatter_tokens(_pad_rows(F.linear(x, self.weight), rows), self.group)
        return y if self.bias is None else y + self.bias


def _shard_attention(attn: nn.Module, dims: ModelDims, tp: int, rank: int, group: dist.ProcessGroup) -> None:
    """This rank's heads of one attention block: q/k/v column-parallel, o row-parallel, local head counts."""
    d = dims.head_dim
    heads = dims.num_heads // tp
    if dims.num_kv_heads % tp == 0:
        kv_heads, copies = dims.num_kv_heads // tp, 1
        first_kv = rank * kv_heads
    else:  # tp is a multiple of the KV heads: this rank's query heads all read one KV head
        copies = tp // dims.num_kv_heads
        kv_heads, first_kv = 1, rank // copies
    attn.q_proj = ColumnParallelLinear(attn.q_proj, rank * heads * d, heads * d, group)
    attn.k_proj = ColumnParallelLinear(attn.k_proj, first_kv * d, kv_heads * d, group, copies)
    attn.v_proj = ColumnParallelLinear(attn.v_proj, first_kv * d, kv_heads * d, group, copies)
    attn.o_proj = RowParallelLinear(attn.o_proj, rank * heads * d, (rank + 1) * heads * d, group)
    attn.num_heads, attn.num_kv_heads = heads, kv_heads
    attn.project = GatheredProjections(group)


def _shard_mlp(mlp: nn.Module, dims: ModelDims, tp: int, rank: int, group: dist.ProcessGroup) -> None:
    """This rank's slice of the MLP's inner width: gate/up column-parallel, down row-parallel."""
    width = dims.intermediate_size // tp
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, rank * width, width, group)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, rank * width, width, group)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, rank * width, (rank + 1) * width, group)
    mlp.project = GatheredProjections(group)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + n)`` of the (padded) table; tokens -> this rank's token shard of the embeddings."""

    def __init__(self, weight: nn.Parameter, start: int, tp: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight, self.start, self.tp, self.group = weight, start, tp, group

    def forward(self, input_ids: Tensor) -> Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0.0)
        rows = -(-input_ids.shape[0] // self.tp) * self.tp
        return reduce_scatter_tokens(_pad_rows(x, rows), self.group)


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, ``[T, n_real]``: padding rows are left out of the product."""

    def __init__(self, weight: nn.Parameter, real_rows: int) -> None:
        super().__init__()
        self.weight, self.real_rows = weight, real_rows

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight[:self.real_rows])


def apply_tensor_parallel(model: CausalLM, group: dist.ProcessGroup) -> TensorParallel:
    """Shard ``model`` (identical on every rank of ``group``) in place over the TP ranks of ``group``.

    Afterwards ``model(input_ids, meta)`` still returns the final hidden states of all the rank's
    tokens (gathered from the sequence shards, identical on the TP ranks), ``model.logits`` returns
    this rank's vocabulary columns, which ``vocab_parallel_cross_entropy`` turns into the loss.
    Apply it before activation checkpointing and before wrapping the optimizer (ZeRO).
    """
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("the model is already tensor parallel; apply_tensor_parallel once")
    dims = model.dims
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    check_tensor_parallel(dims, tp)
    replicated: list[nn.Parameter] = []
    kv_shared: list[nn.Parameter] = []
    kv_copies = 1 if dims.num_kv_heads % tp == 0 else tp // dims.num_kv_heads
    with torch.no_grad():
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            _shard_attention(attn, dims, tp, rank, group)
            _shard_mlp(mlp, dims, tp, rank, group)
            replicated += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            replicated += [b for b in (attn.o_proj.bias, mlp.down_proj.bias) if b is not None]
            if kv_copies > 1:
                kv_shared += [p for m in (attn.k_proj, attn.v_proj) for p in m.parameters()]
        replicated.append(model.model.norm.weight)

        shard = -(-dims.vocab_size // tp)
        start = rank * shard
        real = max(0, min(dims.vocab_size, start + shard) - start)
        table = model.model.embed_tokens.weight
        embed = _param(_pad_rows(table[start:start + real], shard))
        model.model.embed_tokens = VocabParallelEmbedding(embed, start, tp, group)
        head = embed if dims.tie_embeddings else _param(_pad_rows(model.lm_head.weight[start:start + real], shard))
        model.lm_head = VocabParallelHead(head, real)
        for p in (embed, head):  # rows [start, start + real) of the vocabulary, then padding rows
            set_shard_spec(p, tp_slice((dims.vocab_size, *table.shape[1:]), 0, start, real, rank, tp,
                                       padding=shard - real))
        for p in model.parameters():  # norms' gains and whatever else stays whole: identical on every TP rank
            if shard_spec(p) is None:
                set_shard_spec(p, tp_replicated(p.shape, rank, tp))

    # The blocks leave the final norm's output sharded along tokens; every TP rank gets all of its
    # tokens back (the gradient of the gather sums the ranks' partial gradients of the vocab shards).
    def gather_output(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        input_ids = args[0] if args else kwargs["input_ids"]
        return gather_tokens(out, group)[:input_ids.shape[0]]

    model.register_forward_hook(gather_output, with_kwargs=True)
    info = TensorParallel(group, tp, rank, dims.vocab_size, start, tuple(replicated), tuple(kv_shared), kv_copies)
    model.tensor_parallel = info
    return info


def tensor_parallel(model: nn.Module) -> TensorParallel | None:
    """The model's TP description, or None for a model ``apply_tensor_parallel`` has not touched."""
    return getattr(model, "tensor_parallel", None)


@torch.no_grad()
def reduce_tensor_parallel_gradients(model: nn.Module) -> None:
    """Sum the partial gradients of TP-replicated parameters over their TP ranks (in place, one all-reduce).

    Call once per step after the last backward, before the HDP reduction; a no-op without TP.
    """
    tp = tensor_parallel(model)
    if tp is None:
        return
    for p in tp.replicated + tp.kv_shared:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sum_tensor_parallel_copies(tp, [p.grad for p in tp.replicated], [p.grad for p in tp.kv_shared])


@torch.no_grad()
def sum_tensor_parallel_copies(tp: TensorParallel, replicated: Sequence[Tensor], kv_shared: Sequence[Tensor]) -> None:
    """Sum, in place and in one all-reduce over ``tp.group``, tensors that every TP rank holds for a replicated
    parameter (summed over all TP ranks) and for a shared KV head's (summed over the ``tp.kv_copies`` ranks
    sharing it).

    The tensors may be whole gradients or any same-placed part of them (ZeRO-3 passes the pieces of its
    gradient shard), provided every TP rank passes the same shapes in the same order.
    """
    # A replicated KV head's gradient goes to its own slot of a [kv heads, ...] layout, zeros elsewhere,
    # so one all-reduce over the whole TP group sums it over exactly the ranks that share it.
    slots = tp.size // tp.kv_copies
    slot = tp.rank // tp.kv_copies
    spread = []
    for t in kv_shared:
        full = t.new_zeros((slots, *t.shape))
        full[slot] = t
        spread.append(full)
    pieces = list(replicated) + spread
    if not pieces:
        return
    flat = torch.cat([t.reshape(-1) for t in pieces])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=tp.group)
    reduced = flat.split([t.numel() for t in pieces])
    for t, r in zip(replicated, reduced):
        t.copy_(r.view_as(t))
    for t, r in zip(kv_shared, reduced[len(replicated):]):
        t.copy_(r.view(slots, *t.shape)[slot])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, start: int, group: dist.ProcessGroup,
                ignore_index: int) -> Tensor:
        ctx.dtype = logits.dtype
        logits = logits.float()
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - top[:, None]).exp_()
        local = labels - start
        here = (local >= 0) & (local < logits.shape[1])
        index = local.clamp(0, max(logits.shape[1] - 1, 0))[:, None]
        target = torch.where(here, logits.gather(1, index).squeeze(1) - top, 0.0)
        sums = torch.stack([exp.sum(dim=-1), target])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, target = sums
        valid = labels != ignore_index
        loss = torch.where(valid, sum_exp.log() - target, 0.0).sum()
        exp.div_(sum_exp[:, None])
        ctx.save_for_backward(exp, index, here & valid, valid)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        softmax, index, hit, valid = ctx.saved_tensors
        softmax.scatter_add_(1, index, -hit.to(softmax.dtype)[:, None])
        softmax.mul_(valid.to(softmax.dtype)[:, None] * grad)
        return softmax.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, labels: Tensor, tp: TensorParallel, ignore_index: int) -> Tensor:
    """Sum over tokens (labels not ``ignore_index``) of the cross-entropy, from this rank's vocabulary columns.

    ``logits`` [T, n] are the columns ``[tp.vocab_start, tp.vocab_start + n)``; the result (fp32) is
    identical on every TP rank and equals ``F.cross_entropy(full_logits, labels, reduction="sum")``.
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} tokens but labels {labels.shape[0]}")
    return _VocabParallelCrossEntropy.apply(logits, labels, tp.vocab_start, tp.group, ignore_index)
