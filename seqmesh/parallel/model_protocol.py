"""What ``seqmesh.parallel`` knows of a model: the structure its transforms rewrite, as Protocols.

The transforms (tensor, sequence and pipeline parallelism, ZeRO-3, offload) never import
``seqmesh.trainer.model``; any model with this shape can be parallelised. The names are HF's
(``model.layers.N.self_attn.q_proj``), which is also what keeps checkpoints and HF weights
compatible across layouts. Parameter-less modules of a layer that a transform may swap:

* ``self_attn.core``: attention over the packed batch, ``(q, k, v, meta, softmax_scale) -> out``
  (``q [T, Hq, D]``, ``k/v [T, Hkv, D]``; the model's default attends over this process's tokens);
* ``self_attn.project`` / ``mlp.project``: how several linears read one input,
  ``(x, linears, rows=None) -> outputs``; ``rows`` is how many output rows the caller needs (the
  tokens attention sees), None for all of them.

Everything else of a layer runs per token, so under tensor parallelism the model's own forward
runs unchanged on the rank's heads and MLP slice.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
from torch import nn


class ModelDims(Protocol):
    """The model's shapes (whole model, before any sharding)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool


class AttentionBlock(Protocol):
    """``layer.self_attn``: q/k/v/o projections, the heads it computes (a TP rank's share after TP)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Module
    project: nn.Module
    core: nn.Module


class MLPBlock(Protocol):
    """``layer.mlp``: a gated MLP, ``down(act(gate(x)) * up(x))``."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Module
    project: nn.Module


class DecoderLayer(Protocol):
    self_attn: AttentionBlock
    mlp: MLPBlock
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module


class Backbone(Protocol):
    """``model.model``: embeddings, the decoder layers (``nn.ModuleList``; a pipeline rank's is an
    ``nn.ModuleDict`` keyed by layer index), the final norm and the rotary embedding, which maps
    ``position_ids [T]`` to ``(cos, sin)`` shared by all layers."""

    embed_tokens: nn.Module
    layers: nn.ModuleList | nn.ModuleDict
    norm: nn.Module
    rotary_emb: nn.Module


class CausalLM(Protocol):
    """The model: ``forward(input_ids [T], meta) -> final-normed hidden [T, hidden]``,
    ``logits(hidden)`` through ``lm_head``; ``dims`` its shapes and ``config`` its HF config."""

    dims: ModelDims
    config: Any
    model: Backbone
    lm_head: nn.Module
    residual_dtype: torch.dtype | None  # the residual stream's dtype; None: the embedding's

    def __call__(self, input_ids: torch.Tensor, meta: Any) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def num_params(self, exclude_embeddings: bool = False) -> int: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...


def decoder_layers(model: CausalLM) -> list[DecoderLayer]:
    """The decoder layers ``model`` holds, in order, seen through activation-checkpoint wrappers."""
    layers = model.model.layers
    held = layers.values() if isinstance(layers, nn.ModuleDict) else layers
    return [getattr(layer, "_checkpoint_wrapped_module", layer) for layer in held]
