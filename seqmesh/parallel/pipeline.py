"""Pipeline parallelism: stages of a ``Transformer`` and the (interleaved) 1F1B executor over micro-batches.

Micro-batches have different lengths (the plan packs different documents into each group), so
activation shapes vary. Every stage of an HDP rank walks the same plan, lays out the same group
with ``make_sp_batch`` and therefore knows ``meta.local_index.numel()`` tokens for each
micro-batch on its own: the receive buffers are sized from the plan, no shape is exchanged.
Each message is tagged with its (virtual stage, micro-batch, direction): with virtual stages the
last stage also sends activations round to the first, so one pair of ranks carries both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from seqmesh.parallel.pipeline_schedule import interleaved_1f1b
from seqmesh.parallel.sequence import SPBatch
from seqmesh.trainer.model import Transformer


class PipelineStage(nn.Module):
    """Layers ``layers`` of ``model`` (plus the embedding on stage 0, final norm and LM head on the last).

    Submodules keep the full model's names (``model.layers.5.mlp...``), so parameter names, state
    dicts and gradients line up with the unsplit model; modules of other stages are not held.
    """

    def __init__(self, model: Transformer, stage: int, num_stages: int, layers: range) -> None:
        super().__init__()
        if model.dims.tie_embeddings and num_stages > 1:
            raise ValueError("pipeline parallelism with tied input/output embeddings would split one weight over "
                             "the first and last stage; set tie_word_embeddings=False or parallel.pp=1")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
        if not layers or layers.start < 0 or layers.stop > model.dims.num_layers:
            raise ValueError(f"layer range {layers} is empty or outside the model's {model.dims.num_layers} layers")
        self.stage, self.num_stages, self.dims = stage, num_stages, model.dims
        self.model = nn.Module()
        self.model.rotary_emb = model.model.rotary_emb
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        if self.is_last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def forward(self, x: torch.Tensor, meta: SPBatch) -> torch.Tensor:
        """Token ids [T] on the first stage, hidden states [T, hidden] elsewhere; final-normed on the last."""
        if self.is_first:
            x = self.model.embed_tokens(x)
        cos, sin = self.model.rotary_emb(meta.position_ids)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, meta)
        return self.model.norm(x) if self.is_last else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


@dataclass
class StageMicroBatch:
    """One (micro-batch, group) work item as laid out on this rank: ids for stage 0, labels for the last."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    meta: SPBatch

    @property
    def tokens(self) -> int:
        return self.meta.local_index.numel()


LossFn = Callable[[PipelineStage, torch.Tensor, torch.Tensor], torch.Tensor]


def _tag(virtual_stage: int, microbatch: int, num_microbatches: int, gradient: bool) -> int:
    """Message tag: with virtual stages one pair of ranks carries activations and gradients both ways."""
    return 2 * (virtual_stage * num_microbatches + microbatch) + int(gradient)


def run_pipeline(chunks: list[PipelineStage], microbatches: list[StageMicroBatch], loss_fn: LossFn,
                 denominator: int, stage_ranks: list[int], activation_dtype: torch.dtype,
                 group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """Forward and backward of ``microbatches`` through this rank's model chunks; gradients accumulate.

    ``chunks[c]`` is virtual stage ``c * pp + pp_rank`` (one chunk: plain 1F1B, several: interleaved
    1F1B); ``stage_ranks[p]`` is the global rank of pipeline stage p on this rank's (HDP, TP) line.
    ``loss_fn(stage, hidden, labels)`` gives a micro-batch's loss sum on the last virtual stage; each
    is backpropagated divided by ``denominator`` (the step's global target count), as without PP.
    Returns the summed (undivided) loss on the rank holding the last virtual stage, zero elsewhere.
    """
    pp, m = len(stage_ranks), len(microbatches)
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
    for op, c, i in interleaved_1f1b(m, pp, p, len(chunks)):
        stage, mb, vs = chunks[c], microbatches[i], chunks[c].stage
        prev_rank, next_rank = stage_ranks[(vs - 1) % pp], stage_ranks[(vs + 1) % pp]
        if op == "F":
            if stage.is_first:
                x = mb.input_ids
            else:
                x = torch.empty(mb.tokens, hidden, dtype=activation_dtype, device=device)
                dist.recv(x, prev_rank, group=group, tag=_tag(vs, i, m, False))
                x.requires_grad_()
            y = stage(x, mb.meta)
            if stage.is_last:
                loss = loss_fn(stage, y, mb.labels)
                loss_sum += loss.detach()
                outputs[c, i] = loss / denominator
            else:
                sends.append(dist.isend(y.detach().to(activation_dtype).contiguous(), next_rank, group=group,
                                        tag=_tag(vs + 1, i, m, False)))
                outputs[c, i] = y
            inputs[c, i] = x
        else:
            out, x = outputs.pop((c, i)), inputs.pop((c, i))
            if stage.is_last:
                out.backward()
            else:
                grad = torch.empty(mb.tokens, hidden, dtype=activation_dtype, device=device)
                dist.recv(grad, next_rank, group=group, tag=_tag(vs, i, m, True))
                out.backward(grad.to(out.dtype))
            if not stage.is_first:
                sends.append(dist.isend(x.grad.contiguous(), prev_rank, group=group, tag=_tag(vs - 1, i, m, True)))
    for work in sends:
        work.wait()
    return loss_sum
