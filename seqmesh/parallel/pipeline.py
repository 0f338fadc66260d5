"""Pipeline parallelism: stages of a model (``model_protocol.CausalLM``) and the (interleaved) 1F1B
executor over micro-batches.

Micro-batches have different lengths (the plan packs different documents into each group), so
activation shapes vary. Every stage of an HDP rank walks the same plan, lays out the same group
with ``make_sp_batch`` and therefore knows ``meta.local_index.numel()`` tokens for each
micro-batch on its own: the receive buffers are sized from the plan, no shape is exchanged.
Each message is tagged with its (virtual stage, micro-batch, direction): with virtual stages the
last stage also sends activations round to the first, so one pair of ranks carries both kinds.

Tags are not enough on NCCL, which ignores them, matches a pair's messages in posting order and
runs one communicator's operations one after another on one stream. On a single communicator
1F1B deadlocks there as soon as a message outgrows NCCL's buffers: stage 0 sends micro-batch 1's
activations while stage 1 is still sending micro-batch 0's gradient, and each send waits for a
receive queued behind the other's send. ``run_pipeline`` therefore takes ``channels``
(``Mesh.pipeline_channels``): one group per (kind, parity of the sending stage), so every pair of
ranks in every group carries messages one way and of one kind, which both ends post in the same
order (the schedule orders each kind identically on every stage).

With tensor parallelism inside each stage, stage p of a pipeline line talks only to stage p+1 of
the same TP rank, and what travels is that rank's token shard of the residual stream (the
``1/tp`` rows TP keeps between blocks), so PP adds no TP collective.

Tied input/output embeddings (Megatron's scheme, with one owner): the first stage holds the
embedding, the last stage a copy of it as its output head. After backward the copy's gradient is
summed into the owner's (``reduce_tied_gradient``), only the owner is in the optimizer (and in the
gradient norm and the checkpoint), and after the step the owner's updated weight is sent to the
copy (``sync_tied_weight``): the copies are equal bit for bit whatever the optimizer, and the
last stage keeps no optimizer state for a weight it does not own.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn

from seqmesh.parallel.model_protocol import CausalLM
from seqmesh.parallel.pipeline_schedule import interleaved_1f1b, stage_layers
from seqmesh.parallel.sequence import SPBatch
from seqmesh.parallel.shard_spec import record_stage
from seqmesh.parallel.tensor import TensorParallel, gather_tokens, tensor_parallel


def _held(tp: TensorParallel | None, module: nn.Module) -> TensorParallel | None:
    """``tp`` narrowed to the parameters ``module`` holds (TP gradient sums and norm exclusions of one stage)."""
    if tp is None:
        return None
    held = {id(p) for p in module.parameters()}
    return dataclasses.replace(tp, replicated=tuple(p for p in tp.replicated if id(p) in held),
                               kv_shared=tuple(p for p in tp.kv_shared if id(p) in held))


class PipelineStage(nn.Module):
    """Layers ``layers`` of ``model`` (plus the embedding on stage 0, final norm and LM head on the last).

    Submodules keep the full model's names (``model.layers.5.mlp...``), so parameter names, state
    dicts and gradients line up with the unsplit model; modules of other stages are not held.
    ``model`` may be tensor parallel (``apply_tensor_parallel``): activations are then the TP rank's
    token shard, and the last stage gathers the final hidden states as the unsplit model does.
    """

    def __init__(self, model: CausalLM, stage: int, num_stages: int, layers: range) -> None:
        super().__init__()
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
        if not layers or layers.start < 0 or layers.stop > model.dims.num_layers:
            raise ValueError(f"layer range {layers} is empty or outside the model's {model.dims.num_layers} layers")
        self.stage, self.num_stages, self.dims = stage, num_stages, model.dims
        self.residual_dtype = model.residual_dtype
        self.model = nn.Module()
        self.model.rotary_emb = model.model.rotary_emb
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        if self.is_last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
        self.tensor_parallel = _held(tensor_parallel(model), self)
        # Its parameters keep their full-model names; their shard specs name the stage that owns them.
        record_stage(self, stage)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def activation_rows(self, meta: SPBatch) -> int:
        """Rows of the hidden states entering this stage: the rank's tokens, or its 1/tp shard of them under TP."""
        tokens = meta.local_index.numel()
        return tokens if self.tensor_parallel is None else -(-tokens // self.tensor_parallel.size)

    def forward(self, x: torch.Tensor, meta: SPBatch) -> torch.Tensor:
        """Token ids [T] on the first stage, hidden states [rows, hidden] elsewhere; final-normed [T, hidden] on the last."""
        if self.is_first:
            x = self.model.embed_tokens(x)
            x = x if self.residual_dtype is None else x.to(self.residual_dtype)  # as the unsplit model's forward
        cos, sin = self.model.rotary_emb(meta.position_ids)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, meta)
        if not self.is_last:
            return x
        x = self.model.norm(x)
        if self.tensor_parallel is not None:
            x = gather_tokens(x, self.tensor_parallel.group)[:meta.local_index.numel()]
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class PipelineModel(nn.Module):
    """One rank's pipeline chunks as one module under the full model's names (optimizer, checkpoints, metrics).

    ``chunks[c]`` is virtual stage ``c * pp + pp_rank``; this module registers every module they
    hold except a tied embedding's copy on the last stage (see the module docstring), so its
    ``parameters()`` and ``state_dict()`` are exactly what this rank owns. ``dims``, ``config``,
    ``num_params`` and ``tensor_parallel`` answer as the whole model's do, for this rank's share.
    """

    def __init__(self, model: CausalLM, chunks: list[PipelineStage],
                 tied_group: "dist.ProcessGroup | None" = None) -> None:
        super().__init__()
        self.dims, self.config, self.residual_dtype = model.dims, model.config, model.residual_dtype
        self.chunks = list(chunks)  # a plain list: the modules are registered below under their full names
        self.tied_group = tied_group
        first, last = self.chunks[0], self.chunks[-1]
        self.model = nn.Module()
        self.model.rotary_emb = model.model.rotary_emb
        self.model.layers = nn.ModuleDict({k: v for c in self.chunks for k, v in c.model.layers.items()})
        if first.is_first:
            self.model.embed_tokens = first.model.embed_tokens
        if last.is_last:
            self.model.norm = last.model.norm
            if self.tied_copy is None:
                self.lm_head = last.lm_head
        self.tensor_parallel = _held(tensor_parallel(model), self)

    @property
    def _split_tied(self) -> bool:
        return self.dims.tie_embeddings and self.chunks[0].num_stages > 1

    @property
    def tied_copy(self) -> nn.Parameter | None:
        """The last stage's copy of the tied embedding (not owned: no optimizer state, not checkpointed)."""
        last = self.chunks[-1]
        return last.lm_head.weight if self._split_tied and last.is_last else None

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """This rank's side of a tied embedding split over stages: the owner (first stage) or the copy (last)."""
        if not self._split_tied:
            return None
        return self.model.embed_tokens.weight if self.chunks[0].is_first else self.tied_copy

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PipelineModel:
        # The chunks hold every module of the rank, the tied copy too, so conversions (.to) go through them.
        for chunk in self.chunks:
            chunk._apply(fn, recurse)
        return self

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise TypeError("a PipelineModel runs through run_pipeline(model.chunks, ...), not as one module")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters this rank computes with (the tied copy included); the embedding table, a lookup, excluded on request."""
        held = {id(p): p for c in self.chunks for p in c.parameters()}
        total = sum(p.numel() for p in held.values())
        first, last = self.chunks[0], self.chunks[-1]
        if exclude_embeddings and first.is_first:
            embed = first.model.embed_tokens.weight
            if not (last.is_last and last.lm_head.weight is embed):
                total -= embed.numel()
        return total

    @torch.no_grad()
    def reduce_tied_gradient(self) -> None:
        """Sum the copy's gradient into the owner's (call after backward, before the HDP reduction); no-op elsewhere."""
        weight = self.tied_weight
        if weight is None:
            return
        if weight.grad is None:  # a rank idle all step still takes part
            weight.grad = torch.zeros_like(weight)
        dist.reduce(weight.grad, op=dist.ReduceOp.SUM, group=self.tied_group, group_dst=0)
        if weight is self.tied_copy:
            weight.grad = None

    @torch.no_grad()
    def sync_tied_weight(self) -> None:
        """Copy the owner's weight onto the last stage's copy (after every optimizer step and after loading)."""
        weight = self.tied_weight
        if weight is not None:
            dist.broadcast(weight.data, group=self.tied_group, group_src=0)


def split_model(model: CausalLM, pp_rank: int, pp: int, virtual: int, seq_len: int, device: torch.device,
                tied_group: "dist.ProcessGroup | None" = None) -> PipelineModel:
    """This rank's chunks of ``model`` (moved to ``device``), layers split by ``stage_layers`` over ``pp * virtual``.

    ``model`` must be identical on every rank (same seed, or the same weights loaded); the split is
    a pure function of its shapes, so all ranks agree on it without exchanging anything.
    ``tied_group``: the two-rank group of this rank's first and last stage (``Mesh.embedding_group``),
    needed when the model ties its embeddings.
    """
    if virtual < 1:
        raise ValueError(f"virtual stages per rank must be >= 1, got {virtual}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline rank {pp_rank} outside 0..{pp - 1}")
    stages = pp * virtual
    if model.dims.num_layers < stages:
        raise ValueError(f"the model's {model.dims.num_layers} decoder layers cannot fill {pp} pipeline ranks x "
                         f"{virtual} virtual stages (each stage needs one layer); lower parallel.pp or "
                         f"parallel.pp_virtual so that pp x pp_virtual <= {model.dims.num_layers}")
    bounds = stage_layers(model.dims, stages, seq_len)
    chunks = [PipelineStage(model, c * pp + pp_rank, stages, bounds[c * pp + pp_rank]) for c in range(virtual)]
    for chunk in chunks:
        chunk.to(device)
    split = PipelineModel(model, chunks, tied_group)
    if split.tied_weight is not None and tied_group is None:
        raise ValueError("the model ties its input and output embeddings across pipeline stages; pass the first and "
                         "last stage's group (Mesh.embedding_group) as tied_group")
    return split


@dataclass
class StageMicroBatch:
    """One (micro-batch, group) work item as laid out on this rank: ids for stage 0, labels for the last."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    meta: SPBatch


LossFn = Callable[[PipelineStage, torch.Tensor, torch.Tensor], torch.Tensor]
# Point-to-point groups: activations from even / odd stages, then gradients from even / odd stages.
Channels = tuple["dist.ProcessGroup | None", "dist.ProcessGroup | None", "dist.ProcessGroup | None",
                 "dist.ProcessGroup | None"]


def _tag(virtual_stage: int, microbatch: int, num_microbatches: int, gradient: bool) -> int:
    """Message tag: with virtual stages one pair of ranks carries activations and gradients both ways."""
    return 2 * (virtual_stage * num_microbatches + microbatch) + int(gradient)


def _ops(num_items: int, pp: int, p: int, chunks: int) -> Iterator[tuple[str, int, int, int]]:
    """(op, chunk, item, items in the schedule): interleaving needs whole rounds of ``pp`` items, so the list
    is padded with placeholders (which every stage of the line skips alike)."""
    m = num_items if chunks == 1 else -(-num_items // pp) * pp
    for op, c, i in interleaved_1f1b(m, pp, p, chunks):
        yield op, c, i, m


def run_pipeline(chunks: list[PipelineStage], microbatches: list[StageMicroBatch | None], loss_fn: LossFn,
                 denominator: int, stage_ranks: list[int], activation_dtype: torch.dtype,
                 channels: Channels | None = None,
                 forward_context: Callable[[], ContextManager] = nullcontext,
                 idle: Callable[[str, int], None] | None = None) -> torch.Tensor:
    """Forward and backward of ``microbatches`` through this rank's model chunks; gradients accumulate.

    ``chunks[c]`` is virtual stage ``c * pp + pp_rank`` (one chunk: plain 1F1B, several: interleaved
    1F1B); ``stage_ranks[p]`` is the global rank of pipeline stage p on this rank's (HDP, TP) line.
    ``loss_fn(stage, hidden, labels)`` gives a micro-batch's loss sum on the last virtual stage; each
    is backpropagated divided by ``denominator`` (the step's global target count), as without PP.
    A ``None`` item is a placeholder: every stage of the line must have it at the same position,
    and all of them skip it (no compute, no message). ``forward_context`` wraps each forward and
    loss (autocast), never a backward. ``channels[2 * gradient + sender % 2]`` is the group of a
    message (see the module docstring; None: the default group for all, enough on gloo).
    ``idle(op, c)`` is called where a placeholder of the plan (not one padding a round) would run op
    "F" or "B" of chunk ``c``: ZeRO-3 joins the chunk's layer collectives there, which the same stage's
    other HDP ranks issue at the same position of the same schedule.
    Returns the summed (undivided) loss on the rank holding the last virtual stage, zero elsewhere.
    """
    pp = len(stage_ranks)
    p = chunks[0].stage % pp
    for c, chunk in enumerate(chunks):
        if chunk.num_stages != pp * len(chunks) or chunk.stage != c * pp + p:
            raise ValueError(f"chunk {c} is virtual stage {chunk.stage} of {chunk.num_stages}; with {pp} stage ranks "
                             f"and {len(chunks)} chunks it must be {c * pp + p} of {pp * len(chunks)}")
    device = chunks[0].model.rotary_emb.inv_freq.device
    hidden = chunks[0].dims.hidden_size
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    sends: list[dist.Work] = []
    loss_sum = torch.zeros((), device=device)

    def channel(gradient: bool, sender: int) -> "dist.ProcessGroup | None":
        return None if channels is None else channels[2 * gradient + sender % pp % 2]

    for op, c, i, m in _ops(len(microbatches), pp, p, len(chunks)):
        mb = microbatches[i] if i < len(microbatches) else None
        if mb is None:
            if idle is not None and i < len(microbatches):
                idle(op, c)
            continue
        stage, vs = chunks[c], chunks[c].stage
        prev_rank, next_rank = stage_ranks[(vs - 1) % pp], stage_ranks[(vs + 1) % pp]
        if op == "F":
            if stage.is_first:
                x = mb.input_ids
            else:
                x = torch.empty(stage.activation_rows(mb.meta), hidden, dtype=activation_dtype, device=device)
                dist.recv(x, prev_rank, group=channel(False, vs - 1), tag=_tag(vs, i, m, False))
                x.requires_grad_()
            with forward_context():
                y = stage(x, mb.meta)
                loss = loss_fn(stage, y, mb.labels) if stage.is_last else None
            if loss is not None:
                loss_sum += loss.detach()
                outputs[c, i] = loss / denominator
            else:
                sends.append(dist.isend(y.detach().to(activation_dtype).contiguous(), next_rank,
                                        group=channel(False, p), tag=_tag(vs + 1, i, m, False)))
                outputs[c, i] = y
            inputs[c, i] = x
        else:
            out, x = outputs.pop((c, i)), inputs.pop((c, i))
            if stage.is_last:
                out.backward()
            else:
                grad = torch.empty(out.shape, dtype=activation_dtype, device=device)
                dist.recv(grad, next_rank, group=channel(True, vs + 1), tag=_tag(vs, i, m, True))
                out.backward(grad.to(out.dtype))
            if not stage.is_first:
                sends.append(dist.isend(x.grad.contiguous(), prev_rank, group=channel(True, p),
                                        tag=_tag(vs - 1, i, m, True)))
    for work in sends:
        work.wait()
    return loss_sum
