"""Sequence parallelism as a transform: each layer's attention core becomes attention over the SP group.

The plain model attends over the tokens of its own process (``kernels.attention.VarlenCausalAttention``).
``apply_sequence_parallel(model)`` swaps every layer's ``self_attn.core`` for
``SequenceParallelAttention``, which takes the same call and dispatches on the micro-batch's
``SPBatch`` (``meta.mode`` and ``meta.group``, chosen per micro-batch by the plan) exactly as
``sp_attention`` does: ``local`` needs no communication, ``ulysses`` / ``ring`` / ``hybrid`` run
over the group. Everything else in the model is per token, so nothing else changes; with a
``local`` batch the result is the plain model's.
"""

from __future__ import annotations

from torch import Tensor, nn

from seqmesh.parallel.model_protocol import CausalLM, decoder_layers
from seqmesh.parallel.sequence import SPBatch, sp_attention


class SequenceParallelAttention(nn.Module):
    """Causal attention of this rank's tokens against all keys of their documents, over ``meta.group``."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, meta: SPBatch, softmax_scale: float) -> Tensor:
        return sp_attention(q, k, v, meta, meta.group, meta.mode, causal=True, softmax_scale=softmax_scale)


def apply_sequence_parallel(model: CausalLM) -> CausalLM:
    """Give every decoder layer of ``model`` the sequence-parallel attention core (in place; idempotent).

    Apply before or after tensor parallelism (it only sees the local heads), before or after
    activation checkpointing; the model then takes ``SPBatch`` metadata of any mode.
    """
    for layer in decoder_layers(model):
        if not isinstance(layer.self_attn.core, SequenceParallelAttention):
            layer.self_attn.core = SequenceParallelAttention()
    return model
