"""FP8 linear layers (``model.linear_dtype=fp8``): the decoder layers' large matrices in float8.

Hopper's float8 matrix units run about twice the bf16 rate (1461 against 792 TFLOP/s measured on
an H200, shared/NOTES.md), and the linears are most of a Llama step's FLOPs. torchao's float8
training (``convert_to_float8_training``) is the well-kept implementation: each selected
``nn.Linear`` becomes a ``Float8Linear`` that casts its input, weight and output gradient to e4m3
with dynamic tensorwise scales and multiplies with ``torch._scaled_mm``; the fp32 master weight,
its name and the optimizer are unchanged, so checkpoints and HF weights map as before.

Which linears (torchao's own tensorwise thresholds): both dimensions multiples of 16 (a
``_scaled_mm`` requirement) and not small (``in_features <= 4096 and out_features <= 1024`` lose to
the casts, e.g. Llama-1B's 2048 -> 512 K/V projections); never the LM head, whose output feeds the
softmax over the whole vocabulary and whose weight is the embedding when tied.

The casts are elementwise passes (absolute max, scale, convert) that eager mode runs as separate
kernels, which would eat the gain; each converted linear is therefore compiled (``torch.compile``),
which fuses them, as torchao and torchtitan prescribe.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from seqmesh import first_use

# torchao's tensorwise filter: below these sizes the scaling passes cost more than the faster product.
_SMALL_IN, _SMALL_OUT = 4096, 1024
_EXCLUDED = ("lm_head",)


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Whether ``module`` (at ``fqn``) becomes a float8 linear (module docstring: which linears)."""
    if not isinstance(module, nn.Linear) or any(part in _EXCLUDED for part in fqn.split(".")):
        return False
    out_features, in_features = module.weight.shape
    if in_features % 16 or out_features % 16:
        return False
    return not (in_features <= _SMALL_IN and out_features <= _SMALL_OUT)


def check_float8_device(device: torch.device) -> None:
    """Raise, naming the fix, unless ``device`` can train float8 linears (CUDA, compute capability >= 8.9,
    torchao installed)."""
    if device.type != "cuda":
        raise ValueError(f"model.linear_dtype=fp8 needs a CUDA GPU with float8 matrix units (Hopper, Ada or newer); "
                         f"this run's device is {device.type}: set model.linear_dtype=bf16")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"model.linear_dtype=fp8: {torch.cuda.get_device_name(device)} (compute capability "
                         f"{capability[0]}.{capability[1]}) has no float8 matrix units (8.9 or newer needed); set "
                         "model.linear_dtype=bf16")
    if importlib.util.find_spec("torchao") is None:
        raise ImportError("model.linear_dtype=fp8 needs torchao (pip install torchao, its float8 training); install "
                          "it or set model.linear_dtype=bf16")


def apply_float8_linears(model: nn.Module, device: torch.device) -> list[str]:
    """Swap the eligible linears of ``model`` for compiled torchao ``Float8Linear``s, in place; returns their names.

    Call before the optimizer is built (the parameters are the same objects, but the optimizer
    should see the final modules) and before the model moves to ``device``'s stages (any order is
    fine for the weights: they stay fp32 masters).
    """
    check_float8_device(device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    chosen = [name for name, module in model.named_modules() if float8_eligible(module, name)]
    if not chosen:
        raise ValueError("model.linear_dtype=fp8: no linear of this model is large enough for float8 (all are "
                         f"under {_SMALL_IN} x {_SMALL_OUT} or not multiples of 16); set model.linear_dtype=bf16")
    convert_to_float8_training(model, module_filter_fn=float8_eligible,
                               config=Float8LinearConfig.from_recipe_name("tensorwise"))
    first_use.track_compiles()
    # All converted linears share one code object (Module._call_impl): each weight shape, and each
    # change from static to dynamic token counts, is a recompile of it, which must stay under Dynamo's
    # per-code limit (8 by default) for a model with several linear shapes.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in model.modules():
        if isinstance(module, Float8Linear):
            module.compile()
    return chosen
