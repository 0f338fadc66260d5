"""How many bytes of device memory a token costs in this model's step, counted from its modules.

The planner packs documents into a micro-batch until the cost model says memory is full, so an
under-count is an out-of-memory error. The generic count (Korthikanti et al.: ~34 hidden-sized
bf16 values per token and layer) describes a GPT block; seqmesh's Llama step keeps more:

* under bf16 autocast the residual stream and the RMSNorm outputs are fp32 (the weights are fp32
  masters and ``rms_norm`` runs in fp32 under autocast), and each linear casts its input to bf16
  for itself, so Q, K and V each keep their own bf16 copy of the normed input (gate and up too);
* the SwiGLU MLP keeps three ``intermediate_size`` tensors (gate, up, their product), 24 hidden
  values per token for Llama-1B's 4x MLP instead of GPT's 8;
* the loss's working set, which the generic count leaves out: the logits of a tile, of a Liger
  chunk, or of every token when the loss is neither tiled nor fused.

On one H200 the Llama-1B bench step (8 documents of 8K, no recompute, tiled loss of 8192) peaked at
126-136 GiB with every document in one micro-batch (shared/NOTES.md); the generic count had
predicted 87 GiB for it and this one predicts 128 GiB. On an H100 (79.2 GiB) the generic count
let six such documents share a micro-batch (103 GiB by this count), and the step ran out of
memory (bench/results/train_h100_partial.json); this count allows three (66 GiB).
"""

from __future__ import annotations

import dataclasses

from seqmesh.trainer.config import ModelConfig
from seqmesh.trainer.model import ModelDims


def _activation_bytes(model_cfg: ModelConfig) -> int:
    """Bytes of a saved activation: bf16 under autocast, else the fp32 of the weights."""
    return 2 if model_cfg.dtype == "bf16" else 4


def _attention_saved_bytes(dims: ModelDims, act: int) -> float:
    """Attention keeps rotated q and k, v, its output (the o projection's input) and the LSE."""
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    return float(act * (2 * q + 2 * kv) + 4 * dims.num_heads)


def _residual_bytes(model_cfg: ModelConfig) -> int:
    """Bytes of a residual-stream value: a layer's input, which checkpointing and tiled layers keep."""
    return 2 if model_cfg.residual_dtype == "bf16" else 4


def layer_saved_bytes(dims: ModelDims, model_cfg: ModelConfig) -> float:
    """Bytes one token keeps for backward in one decoder layer that is not recomputed."""
    h, f = dims.hidden_size, dims.intermediate_size
    autocast = model_cfg.dtype == "bf16"
    act, stream, residual = _activation_bytes(model_cfg), 4, _residual_bytes(model_cfg)
    attention = _attention_saved_bytes(dims, act)
    # A tiled layer keeps its input and attention's tensors; the rest is a tile's (layer_tile_working_bytes).
    if model_cfg.layer_tile_tokens:
        return float(residual * h + attention)
    if model_cfg.compile_layers and autocast:
        # Inductor's partitioner (counted: tests/test_memory_model.py) keeps no fp32 tensor but the layer's
        # input (bf16 with model.residual_dtype=bf16) and each norm's 1/rms: besides attention's, three
        # hidden-sized bf16 tensors (each norm's output once, shared by its linears), three of the MLP's width
        # and RoPE's cos and sin in bf16; it recomputes the residual adds and casts in backward.
        return float(residual * h + 3 * act * h + 3 * act * f + 2 * stream + 2 * act * dims.head_dim + attention)
    # Norm inputs (fp32 stream; an eager norm of a bf16 stream under autocast still keeps fp32 copies, so
    # a bf16 residual is not counted smaller here), each linear's own cast of the normed input (shared
    # without autocast).
    norms = 2 * stream * h
    attn_inputs = 3 * act * h if autocast else stream * h
    mlp_inputs = 2 * act * h if autocast else stream * h
    # gate, up and their product; a tiled MLP keeps only its input (its tile is in mlp_tile_working_bytes).
    mlp = stream * h if model_cfg.mlp_tile_tokens else mlp_inputs + 3 * act * f
    return float(norms + attn_inputs + attention + mlp)


def kept_layer_bytes_per_token(dims: ModelDims, model_cfg: ModelConfig) -> float:
    """Bytes per token one layer adds by keeping its saved tensors instead of only its input (checkpointed):
    what parameter offload's plan spends on each resident layer it does not recompute."""
    return layer_saved_bytes(dims, model_cfg) - _residual_bytes(model_cfg) * dims.hidden_size


def layer_tile_working_bytes(dims: ModelDims, model_cfg: ModelConfig) -> float:
    """A tiled layer's tile: the untiled layer's per-token saved set besides attention's, recomputed in backward
    with its gradients (twice), for ``model.layer_tile_tokens`` tokens."""
    if not model_cfg.layer_tile_tokens:
        return 0.0
    untiled = layer_saved_bytes(dims, dataclasses.replace(model_cfg, layer_tile_tokens=0))
    per_token = untiled - _attention_saved_bytes(dims, _activation_bytes(model_cfg))
    return float(model_cfg.layer_tile_tokens * 2 * per_token)


def activation_bytes_per_token(dims: ModelDims, model_cfg: ModelConfig) -> float:
    """Device bytes per token of a micro-batch, every layer together, at the step's peak.

    Without recompute every layer's saved tensors, plus one layer's worth of gradients in flight
    during its backward. With recompute each layer's input (fp32, or bf16 under
    ``model.residual_dtype=bf16``), plus the recomputed layer's saved tensors and its gradients. An
    untiled, unfused loss adds the whole logits per token (bf16, their fp32 copy and its gradient); Liger
    adds its fp32 gradient of the hidden states."""
    saved = layer_saved_bytes(dims, model_cfg)
    stream = 4
    if model_cfg.activation_checkpointing:
        per_token = dims.num_layers * _residual_bytes(model_cfg) * dims.hidden_size + 2 * saved
    else:
        per_token = (dims.num_layers + 1) * saved
    if model_cfg.loss_kernel == "liger":
        per_token += stream * dims.hidden_size
    elif not model_cfg.loss_tile_tokens:
        per_token += _logits_bytes(dims, model_cfg)
    return float(per_token)


def loss_working_bytes(dims: ModelDims, model_cfg: ModelConfig) -> float:
    """Bytes of the loss's working set that do not grow with the micro-batch: a tile's logits (tiled loss),
    or Liger's chunk of bf16 logits and its fp32 accumulator of the head's weight gradient."""
    if model_cfg.loss_kernel == "liger":
        chunk = model_cfg.loss_tile_tokens or 8192
        return float(chunk * dims.vocab_size * 2 + 4 * dims.vocab_size * dims.hidden_size)
    if model_cfg.loss_tile_tokens:
        return float(model_cfg.loss_tile_tokens * _logits_bytes(dims, model_cfg))
    return 0.0


def mlp_tile_working_bytes(dims: ModelDims, model_cfg: ModelConfig) -> float:
    """A tiled MLP's tile of intermediates, recomputed in backward with its gradients (twice its saved set)."""
    if not model_cfg.mlp_tile_tokens:
        return 0.0
    act = 2 if model_cfg.dtype == "bf16" else 4
    return float(model_cfg.mlp_tile_tokens * 2 * 3 * act * dims.intermediate_size)


def _logits_bytes(dims: ModelDims, model_cfg: ModelConfig) -> int:
    """Per token: the logits in the compute dtype, their fp32 copy for the softmax, and its fp32 gradient."""
    return dims.vocab_size * ((2 if model_cfg.dtype == "bf16" else 4) + 4 + 4)
