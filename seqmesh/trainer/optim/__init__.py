"""Low-precision AdamW: block-quantized moments (fp8 | int8 | bf16 | fp32), fused on GPU, ZeRO-1 shardable."""

from seqmesh.trainer.optim.fp8_adamw import BACKENDS, STATE_DTYPES, FP8AdamW
from seqmesh.trainer.optim.sharding import zero1_shard

__all__ = ["BACKENDS", "STATE_DTYPES", "FP8AdamW", "zero1_shard"]
