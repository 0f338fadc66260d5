"""Regional compilation (``model.compile_layers``): each decoder layer's per-token work through Inductor.

Why: in the Llama-1B-shaped step at 8K tokens on an H100, 27% of the kernel time went to elementwise
kernels (fp32 residual adds, fp32 -> bf16 casts under autocast, RMSNorm, RoPE, SwiGLU), each a full
pass over memory, and 13% of it was idle between launches. Inductor fuses those passes around the
GEMMs into a few kernels per layer.

What is compiled: a layer's two halves around its attention core (``DecoderLayer.attention_inputs``:
input norm, Q/K/V projections, RoPE; ``DecoderLayer.after_attention``: O projection, residual,
post-attention norm, MLP, residual), each one graph. The core itself stays eager between them, by
design: it reads the micro-batch's document layout (Python ints per document, a process group for
sequence parallelism) and runs backend kernels with their own autograd (varlen flash, cuDNN per
length bucket, ring and Ulysses collectives), nothing Inductor could fuse. Compiling the whole layer
instead (``layer.compile(dynamic=True)``, tried on torch 2.13) cut it into 11 graphs with 10 graph
breaks per forward: the input norm alone (the break is nested two modules deep, inside ``self_attn``,
so Dynamo restarts at the outer call), the projections with RoPE, fragments of the core between its
data-dependent ``cu_seqlens.tolist()`` reads (with the document lengths as symbols), the O
projection alone, and the rest.

As torchtitan compiles per transformer block, one compiled function serves every layer: the halves
are the same code for each, the layer is an argument, so a model of any depth compiles each half
once per distinct situation (training or no_grad, autocast or not, a one-token stream), not once per
layer. ``dynamic=True``: every micro-batch has its own token count, which stays symbolic; the
model's widths are fixed by the weights' static shapes.

Composition (``apply_compile_layers`` runs last, on the layers a rank holds):

* activation checkpointing: the wrapper stays outside; its recompute in backward runs the same
  compiled forward again (same graph, same saved tensors, as non-reentrant checkpointing requires);
* tiled decoder layers (``model.layer_tile_tokens``): each tile runs the compiled halves;
* float8 linears: their own compiled modules are inlined into the halves' graphs;
* tensor parallelism: the column- and row-parallel linears' collectives are traced into the halves;
* sequence parallelism and every attention backend: the core is eager, whichever it is;
* pipeline stages: a stage calls its layers as the whole model does (not tested under PP).

Inductor's partitioner chooses what the halves save for backward: it recomputes the fused element-wise
work rather than keep its fp32 results, so a compiled layer keeps about 0.83x an eager one at Llama-1B's
shape. The planner's memory count (``trainer/memory_model.py``) counts that set, checked byte for byte
against the tensors autograd saves (``tests/test_memory_model.py``).

What does not compose is refused by the config (``RunConfig.validate``): the tiled MLP (a Python
loop inside an autograd function that recomputes tiles in its backward), ZeRO-3 and parameter
offload (both replace the layer's ``forward`` with one that swaps its weights around the call, before
this transform runs), and activation offload without checkpointing (its scopes are hooks on
``self_attn``, which the split layer does not call as a module).

The compiled halves on CUDA no longer go through ``model._fused``'s separate RoPE and SwiGLU
compiles: inside a region being compiled, ``apply_rotary`` and ``swiglu`` trace the plain functions.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from seqmesh import first_use
from seqmesh.trainer.model import BatchMeta, DecoderLayer
from seqmesh.trainer.tiled import TiledMLP
from seqmesh.trainer.tiled_layer import TiledDecoderLayer


@functools.cache
def _compiled(half: Callable) -> Callable:
    """``half`` (an unbound ``DecoderLayer`` method) compiled once for the process; compiled lazily, at the
    first call, so building a model never imports Dynamo."""
    first_use.track_compiles()
    return torch.compile(half, dynamic=True)


class _CompiledHalves:
    """The halves of ``DecoderLayer``, each through its one compiled function (the layer is its argument)."""

    def attention_inputs(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        return _compiled(DecoderLayer.attention_inputs)(self, x, cos, sin)

    def after_attention(self, x: Tensor, attn_out: Tensor) -> Tensor:
        return _compiled(DecoderLayer.after_attention)(self, x, attn_out)


class CompiledDecoderLayer(_CompiledHalves, DecoderLayer):
    """A decoder layer run as its compiled halves around the eager attention core."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: BatchMeta) -> Tensor:
        return self.split_forward(x, cos, sin, meta)


class CompiledTiledDecoderLayer(_CompiledHalves, TiledDecoderLayer):
    """A tiled decoder layer whose tiles run the compiled halves."""


_COMPILED: dict[type, type] = {DecoderLayer: CompiledDecoderLayer, TiledDecoderLayer: CompiledTiledDecoderLayer}


def apply_compile_layers(layers: Iterable[nn.Module]) -> None:
    """Compile every decoder layer of ``layers`` (module docstring), in place; idempotent.

    As ``apply_tiled_layers``, it swaps each layer's class (inside an activation-checkpoint wrapper), so
    children, hooks, parameter names and state dicts are the plain layer's. Apply it after every other
    transform that rewrites the layers (tensor parallelism, float8, tiling); nothing is traced until the
    first forward, which sees the layer as it is then.
    """
    for layer in layers:
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        if type(inner) in _COMPILED.values():
            continue
        if type(inner) not in _COMPILED:
            raise ValueError(f"apply_compile_layers: {type(inner).__name__} is not seqmesh's DecoderLayer (or its "
                             "tiled form); regional compilation compiles that layer's halves around its attention")
        if "forward" in vars(layer) or "forward" in vars(inner):
            raise ValueError("apply_compile_layers: a transform replaced this layer's forward (ZeRO-3 or parameter "
                             "offload, which swap its weights around each call); the compiled halves would never "
                             "run: set model.compile_layers=false")
        if isinstance(inner.mlp, TiledMLP):
            raise ValueError("apply_compile_layers: the layer's MLP is tiled (model.mlp_tile_tokens), a Python loop "
                             "inside an autograd function that Dynamo breaks the graph at and recompiles for every "
                             "token count; tile the whole layer instead (model.layer_tile_tokens) or set "
                             "model.compile_layers=false")
        inner.__class__ = _COMPILED[type(inner)]
