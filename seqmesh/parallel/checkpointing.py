"""Activation checkpointing as a transform on a plain model: recompute each decoder layer in backward.

Long-context training runs out of memory in activations first; keeping only each layer's input
costs one extra forward (~33% more compute) and is what every long-context trainer does by default.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Wrap every module of ``layers`` in place (non-reentrant: works with non-tensor args and SP collectives)."""
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def remove_activation_checkpointing(layers: nn.ModuleList, count: int) -> None:
    """Unwrap the first ``count`` modules of ``layers`` in place (those that keep their activations again);
    parameter names and checkpoints do not change (the wrapper's prefix is never saved)."""
    for i in range(count):
        layers[i] = getattr(layers[i], "_checkpoint_wrapped_module", layers[i])
