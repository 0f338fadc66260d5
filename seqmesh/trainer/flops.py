"""Model FLOPs of a packed variable-length batch, and the peak FLOP/s MFU is measured against.

MFU is only comparable between systems when everyone counts the same way, so the convention is
fixed here once and stated precisely (it is Megatron-LM's, extended to packed documents):

* A matrix product ``[m, k] @ [k, n]`` costs ``2 * m * k * n`` FLOPs (one multiply, one add).
* Training = forward + backward = **3 x forward** (the backward computes the gradient of the input
  and of the weight, each as costly as the forward product).
* **Linear terms** scale with the number of real tokens ``sum(L_i)``: per layer the Q, K, V and O
  projections (K and V at the GQA width ``num_key_value_heads * head_dim``) and the three SwiGLU
  matrices (gate, up, down); once per token the LM head (``hidden_size x vocab_size``).
* **Attention terms** scale with ``sum(L_i ** 2)`` per document: ``Q K^T`` and ``P V`` each cost
  ``2 * L^2 * num_attention_heads * head_dim`` per layer when every query sees every key. With
  ``causal_half=True`` (the default) half of that is counted, since a causal kernel skips the masked
  half (the exact triangle is ``L (L + 1) / 2``; the ``L / 2`` difference per document is below 0.1%
  for documents of a thousand tokens and is ignored, as Megatron-LM, torchtitan and the
  FlashAttention benchmarks do). Documents never attend to each other, so a packed micro-batch
  costs ``sum(L_i^2)``, not ``(sum L_i)^2``.
* **Not counted**: padding (callers pass only real lengths), embedding lookups (no product),
  norms, RoPE, softmax, activation functions, biases and the loss (elementwise, under 1% of the
  total), and recomputation from activation checkpointing. These are *model* FLOPs (MFU), not
  hardware FLOPs (HFU): a run that recomputes does more work for the same MFU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch


@dataclass(frozen=True)
class _Dims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int


def _dims(config: Any) -> _Dims:
    """Read the sizes that matter from a transformers config (``LlamaConfig``, ``Qwen2Config``...).

    A plain dict with the same keys (``config.to_dict()``, as stored in run directories) works too.
    """
    if isinstance(config, Mapping):
        config = SimpleNamespace(**config)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                           "vocab_size") if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"model config {type(config).__name__} lacks {missing}: train_flops needs a "
                         "Llama-family transformers config (LlamaConfig, Qwen2Config, ...)")
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return _Dims(int(config.hidden_size), int(config.intermediate_size), heads, int(kv_heads),
                 int(head_dim), int(config.num_hidden_layers), int(config.vocab_size))


def _lengths(seqlens: Iterable[int] | torch.Tensor) -> list[int]:
    values = seqlens.tolist() if isinstance(seqlens, torch.Tensor) else list(seqlens)
    lengths = [int(v) for v in values]
    bad = [v for v in lengths if v < 0]
    if bad:
        raise ValueError(f"sequence lengths must be >= 0, got {bad[:5]}: pass real document lengths "
                         "(e.g. cu_seqlens.diff()), not offsets")
    return lengths


def seqlens_from_cu_seqlens(cu_seqlens: torch.Tensor | Iterable[int]) -> list[int]:
    """Document lengths from cumulative offsets ``[0, L_0, L_0 + L_1, ...]`` (flash-attn layout)."""
    offsets = _lengths(cu_seqlens)
    if not offsets or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {offsets[:8]}")
    return [b - a for a, b in zip(offsets, offsets[1:])]


def forward_flops(config: Any, seqlens: Iterable[int] | torch.Tensor, *, causal_half: bool = True) -> float:
    """Forward-pass FLOPs of documents with lengths ``seqlens`` (convention: module docstring)."""
    d = _dims(config)
    lengths = _lengths(seqlens)
    tokens = sum(lengths)
    squares = sum(n * n for n in lengths)
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    per_token_layer = 2 * (d.hidden * q_width          # Q
                           + 2 * d.hidden * kv_width   # K, V
                           + q_width * d.hidden        # O
                           + 3 * d.hidden * d.intermediate)  # SwiGLU gate, up, down
    attention_per_square = 2 * 2 * q_width * (0.5 if causal_half else 1.0)  # Q K^T and P V
    linear = tokens * (d.layers * per_token_layer + 2 * d.hidden * d.vocab)
    attention = squares * d.layers * attention_per_square
    return float(linear + attention)


def train_flops(config: Any, seqlens: Iterable[int] | torch.Tensor, *, causal_half: bool = True) -> float:
    """Forward + backward model FLOPs (3 x forward) of one batch of packed documents.

    ``seqlens`` are the real lengths (no padding) of every document the batch trained on, e.g. the
    concatenation of ``seqlens_from_cu_seqlens(cu)`` over all micro-batches of the step.
    """
    return 3.0 * forward_flops(config, seqlens, causal_half=causal_half)


# Dense (no structured sparsity) peak tensor-core FLOP/s per device from the vendors' data sheets.
# Order matters: more specific names first (``H100 PCIe`` before ``H100``, ``L40S`` before ``L4``).
# torch.cuda.get_device_name() gives e.g. "NVIDIA H100 80GB HBM3" for the SXM part.
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bGH200\b", {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"\bGB200\b", {"bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0}),
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0}),
    (r"\bH200\b", {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"\bH100\b.*\bPCIE\b", {"bf16": 756.5, "fp16": 756.5, "fp8": 1513.0}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.9}),
    (r"\bH100\b", {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"\bH800\b", {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"\bH20\b", {"bf16": 148.0, "fp16": 148.0, "fp8": 296.0}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0}),
    (r"\bA800\b", {"bf16": 312.0, "fp16": 312.0}),
    (r"\bA10G\b", {"bf16": 125.0, "fp16": 125.0}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0}),
    (r"\bL40S\b", {"bf16": 362.1, "fp16": 362.1, "fp8": 733.0}),
    (r"\bL40\b", {"bf16": 181.0, "fp16": 181.0, "fp8": 362.0}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp8": 242.5}),
    (r"\bV100\b", {"fp16": 125.0}),
    (r"\bMI300X\b", {"bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9}),
    (r"\bMI325X\b", {"bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9}),
    (r"\bMI250X\b", {"bf16": 383.0, "fp16": 383.0}),
]
_DTYPES = ("bf16", "fp16", "fp8")


def peak_flops(device_name: str, dtype: str = "bf16", *, override_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device for ``dtype``, or None when it is not known.

    None (CPUs, unlisted GPUs, a dtype the part lacks) makes MFU "unknown" rather than a guess: a
    made-up denominator would make MFU figures incomparable. ``override_tflops`` (the config's
    ``metrics.peak_tflops``) is the user's own figure and wins over the table; it is how a CPU run
    can show an MFU at all.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not in the peak table; use one of {_DTYPES}")
    if override_tflops is not None:
        if not override_tflops > 0:
            raise ValueError(f"metrics.peak_tflops must be > 0 (TFLOP/s of one device), got {override_tflops}")
        return float(override_tflops) * 1e12
    name = device_name.upper()
    for pattern, column in _PEAK_TFLOPS:
        if re.search(pattern, name):
            tflops = column.get(dtype)
            return None if tflops is None else tflops * 1e12
    return None


def device_name(device: torch.device | str | None = None) -> str:
    """The name ``peak_flops`` looks up: the CUDA device's marketing name, or ``"cpu"``.

    Without an argument: the current CUDA device when there is one, else ``"cpu"``.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def mfu(flops_per_device: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops_per_device / seconds / peak
