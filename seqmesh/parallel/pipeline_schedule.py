"""Pipeline stage partition (balanced by FLOPs) and the 1F1B order of one stage's work.

Pure functions of shapes and counts, so every rank of a pipeline derives the same partition and
the same schedule without exchanging anything.

Cost model of the partition (training FLOPs per token, forward + backward = 3x forward):
- a decoder layer: 2 FLOPs per weight of its q/k/v/o and gate/up/down projections, plus causal
  attention, ``2 * heads * head_dim * seq_len`` (QK^T and PV over on average half the context);
- the LM head (+ loss): ``2 * hidden * vocab`` (the cross-entropy itself is O(vocab), folded in);
- the embedding: a row lookup, costed at ``hidden`` (its backward is a scatter-add).
Norms and RoPE are O(hidden) per token and ignored. With a large vocabulary the head weighs
several layers, so the last stage gets fewer layers than a count-only split would give it.
"""

from __future__ import annotations

from typing import Literal

from seqmesh.parallel.model_protocol import ModelDims

Op = tuple[Literal["F", "B"], int]


def module_costs(dims: ModelDims, seq_len: int) -> tuple[float, list[float], float]:
    """(embedding, per-layer, LM head) training FLOPs per token at documents of ``seq_len`` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    h, q, kv = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    weights = h * q + 2 * h * kv + q * h + 3 * h * dims.intermediate_size
    layer = 3.0 * (2 * weights + 2 * q * seq_len)
    return 3.0 * h, [layer] * dims.num_layers, 3.0 * 2 * h * dims.vocab_size


def partition_layers(embed: float, layers: list[float], head: float, pp: int) -> list[range]:
    """Contiguous layer ranges of the ``pp`` stages minimising the most expensive stage.

    Stage 0 also pays ``embed`` and the last stage ``head``; every stage holds at least one layer.
    Exact dynamic programme over split points (O(pp * layers^2), a few hundred entries at most).
    """
    n = len(layers)
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if n < pp:
        raise ValueError(f"{n} decoder layers cannot fill {pp} pipeline stages (each needs one); "
                         f"lower parallel.pp to at most {n}")
    prefix = [0.0]
    for c in layers:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (embed if stage == 0 else 0.0) + (head if stage == pp - 1 else 0.0)

    inf = float("inf")
    # best[s][b]: least max-cost of stages 0..s-1 covering layers [0, b); cut[s][b]: start of stage s-1.
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for b in range(s, n - (pp - s) + 1):
            for a in range(s - 1, b):
                value = max(best[s - 1][a], cost(s - 1, a, b))
                if value < best[s][b]:
                    best[s][b], cut[s][b] = value, a
    bounds, b = [], n
    for s in range(pp, 0, -1):
        a = cut[s][b]
        bounds.append(range(a, b))
        b = a
    return bounds[::-1]


def stage_layers(dims: ModelDims, pp: int, seq_len: int) -> list[range]:
    """The layer range of every stage for this model, balanced by ``module_costs``."""
    embed, layers, head = module_costs(dims, seq_len)
    return partition_layers(embed, layers, head, pp)


def one_f_one_b(num_microbatches: int, num_stages: int, stage: int) -> list[Op]:
    """1F1B order of forward ("F", i) and backward ("B", i) passes on ``stage``.

    Stage s first runs ``num_stages - 1 - s`` forwards (warm-up), then alternates one forward and
    one backward, then drains the backwards: at most ``num_stages - s`` micro-batches keep their
    activations alive at once, whatever the number of micro-batches.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
    if num_microbatches < 1:
        raise ValueError(f"the pipeline needs at least one micro-batch, got {num_microbatches}")
    warmup = min(num_stages - 1 - stage, num_microbatches)
    ops: list[Op] = [("F", i) for i in range(warmup)]
    for i in range(warmup, num_microbatches):
        ops += [("F", i), ("B", i - warmup)]
    ops += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
    return ops


def interleaved_1f1b(num_microbatches: int, num_stages: int, stage: int, chunks: int) -> list[tuple[str, int, int]]:
    """Interleaved 1F1B (Megatron's virtual stages): (op, chunk, micro-batch) on ``stage``.

    The rank holds ``chunks`` model chunks, virtual stages ``chunk * num_stages + stage``; it runs
    forwards in rounds of ``num_stages`` micro-batches per chunk, backwards with the chunks in
    reverse, which shrinks the bubble by ``chunks`` at the price of more point-to-point messages.
    With one chunk this is plain ``one_f_one_b``.
    """
    if chunks < 1:
        raise ValueError(f"chunks (virtual stages per rank) must be >= 1, got {chunks}")
    if chunks == 1:
        return [(op, 0, i) for op, i in one_f_one_b(num_microbatches, num_stages, stage)]
    if num_stages < 2 or num_microbatches % num_stages:
        raise ValueError(f"interleaved 1F1B needs >= 2 stages and a micro-batch count divisible by them, got "
                         f"{num_microbatches} micro-batches over {num_stages} stages; use chunks=1 or pad the plan")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
    total = num_microbatches * chunks

    def unit(k: int, forward: bool) -> tuple[int, int]:
        rnd, pos = divmod(k, num_stages * chunks)
        chunk = pos // num_stages
        return (chunk if forward else chunks - 1 - chunk), rnd * num_stages + pos % num_stages

    warmup = min((num_stages - stage - 1) * 2 + (chunks - 1) * num_stages, total)
    ops = [("F", *unit(k, True)) for k in range(warmup)]
    for k in range(warmup, total):
        ops += [("F", *unit(k, True)), ("B", *unit(k - warmup, False))]
    ops += [("B", *unit(k, False)) for k in range(total - warmup, total)]
    return ops
