"""Linear + cross-entropy in one pass over token chunks, through Liger-Kernel's fused op.

Why: the LM head of a 128K vocabulary is the largest single matrix of a Llama-1B, and the plain
loss writes its logits whole ([T, V] in bf16, then again in fp32 for the softmax, and their
gradient), several GB of memory traffic per 8K-token document that no FLOP count pays for.
Liger's ``LigerFusedLinearCrossEntropyFunction`` computes the logits a chunk of tokens at a time,
runs a Triton softmax-cross-entropy kernel that overwrites each chunk with its own gradient, and
accumulates the input and weight gradients during the forward; backward only scales them by the
incoming gradient. So the head costs exactly its three matrix products (seqmesh's own tiled loss,
``trainer/tiled.py``, recomputes the forward product in backward: four) and the logits never exist
whole.

Gradients are returned from backward (scaled by the upstream gradient there), so autograd divides
them by the global token count and accumulates them like any other op's; the weight gradient is
accumulated in fp32 (``accum_dtype``) when the weight is fp32 (master weights under autocast).

Only on CUDA, with ``liger_kernel`` importable (a pure-Python wheel on top of Triton); callers ask
``liger_available`` first, and ``liger_linear_cross_entropy_sum`` raises naming the fix otherwise.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor


def liger_available() -> bool:
    """True when ``liger_kernel`` can be imported (it needs Triton, hence a CUDA build of torch)."""
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def chunk_mem_const(tokens: int, hidden: int, vocab: int, chunk_tokens: int) -> int:
    """Liger's ``chunk_mem_const`` that makes its token chunks about ``chunk_tokens`` long.

    Liger sizes chunks so that one chunk's logits hold ``chunk_mem_const * tokens * hidden``
    elements: ``chunk = next_pow2(ceil(tokens / ceil(vocab / (c * hidden))))``. Its default (1) gives
    256-token chunks at 8K tokens and a 128K vocabulary, and each chunk then reads and writes the
    whole fp32 weight gradient (1 GB for Llama-1B's head) in a product whose inner dimension is only
    256: memory-bound. Chunks of a few thousand tokens keep the products compute-bound.
    """
    if min(tokens, hidden, vocab, chunk_tokens) < 1:
        raise ValueError(f"tokens, hidden, vocab and chunk_tokens must be >= 1, got {tokens}, {hidden}, {vocab}, "
                         f"{chunk_tokens}")
    return max(1, math.ceil(vocab * min(chunk_tokens, tokens) / (hidden * tokens)))


def liger_linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                                   chunk_tokens: int = 8192) -> Tensor:
    """Sum over tokens whose label is not ``ignore_index`` of cross-entropy(``hidden @ weight.T``) (fp32).

    ``hidden`` [T, H], ``weight`` [V, H] (no bias), ``labels`` [T]; runs under the caller's autocast.
    ``chunk_tokens``: about how many tokens one chunk of logits holds (``chunk_mem_const``).
    """
    if not hidden.is_cuda:
        raise ValueError("model.loss_kernel=liger runs on CUDA only (Triton kernels); use model.loss_kernel=torch "
                         "on this device")
    if not liger_available():
        raise ImportError("model.loss_kernel=liger needs the liger-kernel package (pip install liger-kernel, which "
                          "needs triton); install it or set model.loss_kernel=torch")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden [T, H], weight [V, H] and labels [T], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    tokens, width = hidden.shape
    accum = torch.float32 if weight.dtype == torch.float32 else None
    # Positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    # reduction, softcap, return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy,
    # return_predicted_tokens, ce_impl, ce_mode, chunk_mem_const) -- autograd.Function takes no keywords.
    loss, *_ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, None, None, ignore_index, 0.0, 0.0, "sum", None, False, accum, False, False, False,
        None, None, chunk_mem_const(tokens, width, weight.shape[0], chunk_tokens))
    return loss.float()
