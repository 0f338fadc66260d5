"""CUDA caching-allocator settings for variable-length training, applied before the first allocation.

Every step packs different sequence lengths, so activation tensors change size all the time; with
the allocator's default fixed segments the freed blocks of one step rarely fit the next, and a
run with a memory limit (``memory.limit_gb``) was seen on an H200 to fail with 8 GiB
"reserved but unallocated" while the planner's 28 GiB of live tensors fitted the 36 GiB limit.
Expandable segments grow and shrink one mapping instead, which removes that fragmentation
(the setting torchtitan and Megatron recommend for long, variable sequences). A value the user
already set in ``PYTORCH_CUDA_ALLOC_CONF`` is kept.
"""

from __future__ import annotations

import os

SETTING = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` unless the user chose one; must run before CUDA allocates."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", SETTING)
