"""Every transform that turns the plain model into this rank's parallel model, in one order.

As torchtitan's ``parallelize_llama``: the model (``trainer/model.py``) stays plain and each
parallelism is a small function from ``seqmesh.parallel`` (or ``trainer/tiled.py``) that swaps
modules in place, keeping HF's parameter names:

1. tensor parallelism (``parallel/tensor.py``): column/row-parallel linears, local head counts,
   vocabulary-parallel embedding and head, Megatron's sequence parallelism between the blocks;
2. sequence parallelism (``parallel/sequence/transform.py``): each layer's attention core becomes
   attention over the micro-batch's SP group (``SPBatch.mode`` / ``group``, per micro-batch);
3. activation checkpointing (``parallel/checkpointing.py``): each decoder layer recomputed in backward;
4. tiled MLP (``trainer/tiled.py``): the MLP run a tile of tokens at a time;
5. activation offload (``parallel/offload``): saved activations to host memory or NVMe.

The order matters: TP and SP replace modules inside the layers, so they come before checkpointing
wraps the layers; tiling and offload act on the (wrapped) layers. Pipeline stages (``split_model``)
and ZeRO (the optimizer; ZeRO-3 also wraps each layer's forward) come after, in ``build.py``.
The offload policy needs the cost model, which needs the TP-sharded model, so the step loop runs
steps 1-3 at build time (``build_model``) and 4-5 once the cost model exists (``apply_offload``):
both call this function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seqmesh.parallel.checkpointing import apply_activation_checkpointing
from seqmesh.parallel.model_protocol import CausalLM
from seqmesh.parallel.offload import attach_offload
from seqmesh.parallel.sequence import apply_sequence_parallel
from seqmesh.parallel.tensor import apply_tensor_parallel
from seqmesh.trainer.tiled import apply_tiled_mlp


def held_layers(model: CausalLM) -> list[nn.Module]:
    """The decoder layers a model (or a pipeline rank, whose ``model.layers`` is keyed by layer index) holds,
    as registered (activation-checkpoint wrappers included)."""
    layers = model.model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def parallelize(model: CausalLM, *, tp_group: "torch.distributed.ProcessGroup | None" = None,
                sequence_parallel: bool = True, activation_checkpointing: bool = False, mlp_tile_tokens: int = 0,
                offload: dict[str, Any] | None = None) -> CausalLM:
    """Apply the requested transforms to ``model`` in place, in the module docstring's order; returns it.

    ``tp_group``: shard over this TP group (None: no TP). ``sequence_parallel``: SP attention cores
    (in place and idempotent; a ``local`` batch computes exactly what the plain model does).
    ``mlp_tile_tokens``: tile the MLPs (0: no). ``offload``: keyword arguments of ``attach_offload``
    (``device``, ``target``, ``cost_model``, ...), or None for no offload.
    """
    if tp_group is not None:
        apply_tensor_parallel(model, tp_group)
    if sequence_parallel:
        apply_sequence_parallel(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model.model.layers)
    if mlp_tile_tokens:
        apply_tiled_mlp(held_layers(model), mlp_tile_tokens)
    if offload is not None:
        attach_offload(model, held_layers(model), **offload)
    return model
