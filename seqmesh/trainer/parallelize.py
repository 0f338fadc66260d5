"""Every transform that turns the plain model into this rank's parallel model, in one order.

As torchtitan's ``parallelize_llama``: the model (``trainer/model.py``) stays plain and each
parallelism is a small function from ``seqmesh.parallel`` (or ``trainer/tiled.py``) that swaps
modules in place, keeping HF's parameter names. The whole order, as ``build.build_parallel_model``
runs it once per rank:

phase 1, ``parallelize`` (on the whole model, at build time: ``build.build_model``)
  1. tensor parallelism (``parallel/tensor.py``): column/row-parallel linears, local head counts,
     vocabulary-parallel embedding and head, Megatron's sequence parallelism between the blocks;
  2. sequence parallelism (``parallel/sequence/transform.py``): each layer's attention core becomes
     attention over the micro-batch's SP group (``SPBatch.mode`` / ``group``, per micro-batch);
  3. activation checkpointing (``parallel/checkpointing.py``): each decoder layer recomputed in backward;
between the phases (``build.py``)
  4. pipeline stages (``split_model``): this rank keeps its chunks of layers;
  5. ZeRO (the optimizer; ZeRO-3 also shards the parameters -- what this rank holds after steps 1 and 4:
     its TP shard of its stages -- over its HDP group and wraps each layer's forward);
  -  the cost model, priced from what this rank now holds (its TP shard, its stages);
  8. parameter offload (``parallel/offload/params.py``, planned in ``trainer/param_offload.py``), in place of 5:
     with ``offload.params``, the plan splits the model (built on the host) between a ZeRO-1/2 flat space on
     the device (root, resident layers) and one on the host (``parallel/placed_zero.py``), the host's layers
     are streamed to the device around each use, and the cost model keeps only what stays there; under ZeRO-3
     it is 5 with each rank's shards, gradients and optimizer states on the host (``Zero3Optimizer.host_shards``);
phase 2, ``apply_tiling_and_offload`` (on this rank's layers, once the cost model exists: ``build.apply_offload``)
  6. tiled MLP and tiled layers (``trainer/tiled.py``, ``trainer/tiled_layer.py``): the MLP, and each layer
     (its attention a tile of queries at a time where it is local), run a tile of tokens at a time;
  7. activation offload (``parallel/offload``): saved activations to host memory or NVMe, as much as
     the cost model says the transfers hide behind compute (``offload.ratio=auto``);
  9. regional compilation (``trainer/compile_layers.py``, ``model.compile_layers``): each layer's per-token
     halves around its attention core through Inductor, last, so that it compiles the layers as every
     other transform left them (inside the checkpoint wrappers, tiled or not).

Why two phases: TP and SP replace modules inside the layers, so they come before checkpointing
wraps the layers; the offload policy needs the cost model, which needs the TP-sharded (and, under
PP, split) model, so tiling and offload act last, on the wrapped layers this rank holds. Compilation
is traced at the first forward, which sees the modules as they are then, so its place only has to
follow the transforms that swap the layer's class (tiling) and precede none that replaces its forward.
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
from seqmesh.trainer.compile_layers import apply_compile_layers
from seqmesh.trainer.tiled import apply_tiled_mlp
from seqmesh.trainer.tiled_layer import apply_tiled_layers


def held_layers(model: CausalLM) -> list[nn.Module]:
    """The decoder layers a model (or a pipeline rank, whose ``model.layers`` is keyed by layer index) holds,
    as registered (activation-checkpoint wrappers included)."""
    layers = model.model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def parallelize(model: CausalLM, *, tp_group: "torch.distributed.ProcessGroup | None" = None,
                activation_checkpointing: bool = False) -> CausalLM:
    """Phase 1 (steps 1-3 of the module docstring) on ``model``, in place; returns it.

    ``tp_group``: shard over this TP group (None: no TP). Sequence-parallel attention cores always (in
    place and idempotent; a ``local`` batch computes exactly what the plain model does).
    """
    if tp_group is not None:
        apply_tensor_parallel(model, tp_group)
    apply_sequence_parallel(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model.model.layers)
    return model


def apply_tiling_and_offload(model: CausalLM, *, mlp_tile_tokens: int = 0, layer_tile_tokens: int = 0,
                             offload: dict[str, Any] | None = None, compile_layers: bool = False) -> CausalLM:
    """Phase 2 (steps 6, 7 and 9 of the module docstring) on the layers ``model`` holds, in place; returns it.

    ``mlp_tile_tokens``: tile the MLPs (0: no). ``layer_tile_tokens``: tile each layer's norms, projections,
    residuals and MLP around its whole attention (0: no). ``offload``: keyword arguments of ``attach_offload``
    (``device``, ``target``, ``cost_model``, ...), or None for no offload. ``compile_layers``: compile each
    layer's per-token halves.
    """
    if mlp_tile_tokens:
        apply_tiled_mlp(held_layers(model), mlp_tile_tokens)
    if layer_tile_tokens:
        apply_tiled_layers(held_layers(model), layer_tile_tokens)
    if offload is not None:
        attach_offload(model, held_layers(model), **offload)
    if compile_layers:
        apply_compile_layers(held_layers(model))
    return model
