"""What a step does when its loss or gradients are not finite (``optim.nonfinite``).

``abort`` (the default) raises ``NonFiniteError`` naming the step, before the optimizer touches
the parameters: nothing of that step is applied or checkpointed, and the newest checkpoint is
the last good state. ``skip`` drops the step instead: no optimizer update and no lr-schedule
step (the batch is consumed), logged as ``skipped_step`` in metrics.jsonl and counted as
``skipped_steps`` in summary.json.

Why abort by default: Megatron-LM and DeepSpeed skip a step on overflow only under fp16 dynamic
loss scaling, where an inf gradient is an expected, transient event that lowers the scale;
seqmesh trains in fp32 or bf16 (no loss scaling), where a NaN/Inf is a divergence or a bad batch,
and Megatron-LM raises on it (``--check-for-nan-in-loss-and-grad``, on by default). ``skip``
is there for runs that prefer to ride over a rare bad batch.

Every rank takes the same decision: the flag is all-reduced over the world (under PP each stage
computes the gradient norm of its own parameters only), so no rank steps while another skips --
with ZeRO that would leave ranks in different collectives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

POLICIES = ("abort", "skip")


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient norm was NaN/Inf under ``optim.nonfinite=abort``."""


def step_unless_nonfinite(policy: str, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | float,
                          optimizer, schedule) -> bool:
    """Step ``optimizer`` and ``schedule`` when the loss and gradient norm are finite on every rank;
    otherwise skip both (``skip``: returns True) or raise ``NonFiniteError`` (``abort``). ``step`` is
    the 1-based step number, as logged. The caller zeroes the gradients either way."""
    if policy not in POLICIES:
        raise ValueError(f"optim.nonfinite={policy!r}; choose one of {', '.join(POLICIES)}")
    loss_bad = not math.isfinite(float(loss_sum))
    norm_bad = not math.isfinite(float(grad_norm))
    flags = torch.tensor([float(loss_bad), float(norm_bad)], device=loss_sum.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, norm_bad = bool(flags[0]), bool(flags[1])
    if not (loss_bad or norm_bad):
        optimizer.step()
        schedule.step()
        return False
    if policy == "skip":
        return True
    what = " and ".join(w for w, bad in (("the loss", loss_bad), ("the gradient norm", norm_bad)) if bad)
    raise NonFiniteError(
        f"step {step}: {what} {'are' if loss_bad and norm_bad else 'is'} not finite (NaN/Inf; loss sum {float(loss_sum)}, gradient norm {float(grad_norm)}); "
        f"stopped before the optimizer update, so no parameter and no checkpoint holds it. Resume from the newest "
        f"checkpoint (resume=true) with a lower optim.lr, longer optim.warmup_steps or optim.grad_clip, or check "
        f"the data of this step; optim.nonfinite=skip drops such steps instead of stopping")
