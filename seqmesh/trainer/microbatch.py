"""What the trainer hands the step runner (``seqmesh.parallel.step_runner``): how a plan group's documents
are laid out over the group (``layout_group`` / ``batch_layout``), the token loss (``loss_sum_of``) and the
forward context (``autocast``). Training (``trainer/loop.py``) and evaluation (``trainer/evaluate.py``)
both run through a runner with these, so there is one copy of each.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from seqmesh.parallel.pipeline import StageMicroBatch
from seqmesh.parallel.sequence import make_sp_batch, shard_tokens
from seqmesh.parallel.step_runner import Layout
from seqmesh.parallel.tensor import tensor_parallel, vocab_parallel_cross_entropy
from seqmesh.scheduler.plan import Group
from seqmesh.trainer.config import ParallelConfig
from seqmesh.trainer.data import IGNORE_INDEX, pack
from seqmesh.trainer.tiled import lm_loss_sum


def autocast(dtype: str, device: torch.device) -> ContextManager:
    """The forward context of ``model.dtype``: bf16 autocast, or nothing."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def layout_group(docs: list[torch.Tensor], group: "dist.ProcessGroup | None", parallel: ParallelConfig,
                 device: torch.device, mode: str = "") -> StageMicroBatch:
    """Pack one group's documents and lay them out over the group in its SP mode (``mode``, the plan
    group's; ``""``: ``parallel.sp_mode``): this rank's ids and labels."""
    packed = pack(docs)
    mode = "local" if group is None else mode or parallel.sp_mode
    if mode == "auto":
        raise ValueError("parallel.sp_mode=auto needs the plan to name each group's mode (plan_step does); this "
                         "group has none: plan with seqmesh.scheduler.plan_step under the run's cost model")
    meta = make_sp_batch(packed.seqlens, mode, group, ulysses_degree=parallel.ulysses_degree,
                         backend=parallel.attn_backend, device=device)
    return StageMicroBatch(shard_tokens(meta, packed.input_ids.to(device), 0),
                           shard_tokens(meta, packed.labels.to(device), IGNORE_INDEX), meta)


def batch_layout(docs_of: Callable[[Group], list[torch.Tensor]], parallel: ParallelConfig,
                 device: torch.device) -> Layout:
    """The step runner's ``layout``: a plan group's documents (``docs_of``) packed and laid out over the group."""
    return lambda group, process_group: layout_group(docs_of(group), process_group, parallel, device, group.mode)


def loss_sum_of(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                loss_tile_tokens: int = 0, loss_kernel: str = "torch") -> torch.Tensor:
    """Token loss sum of final hidden states (vocabulary parallel under TP; otherwise ``model.loss_kernel``, in
    tiles of ``model.loss_tile_tokens``, 0: untiled)."""
    tp = tensor_parallel(model)
    if tp is None:
        return lm_loss_sum(model, hidden, labels, loss_tile_tokens, loss_kernel)
    return vocab_parallel_cross_entropy(model.logits(hidden), labels, tp, IGNORE_INDEX)
