"""A tiny Llama trained 3 steps with sequence parallelism 1, 2 and 4 (every mode) gives the same
losses and gradients: RoPE positions, attention and the per-token loss are exact under sharding."""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqmesh.parallel.sequence import apply_sequence_parallel, make_sp_batch, shard_tokens
from seqmesh.trainer.data.packing import IGNORE_INDEX, pack
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, tiny_config
from tests.distributed import run_distributed

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
STEP_LENGTHS = ([17, 3, 29], [8, 40], [1, 23, 9, 11])  # most not multiples of 2 x degree
CONFIGS = [("local", 1, None), ("ulysses", 2, None), ("ring", 2, None), ("tokenring", 2, None), ("ulysses", 4, None),
           ("ring", 4, None), ("tokenring", 4, None), ("hybrid", 4, 2)]


def _documents(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randint(0, SMALL["vocab_size"], (n,), generator=g) for n in STEP_LENGTHS[step]]


def _train(rank, world, configs):
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = []
    for mode, size, ulysses in configs:
        group = {1: None, 2: halves[rank // 2], 4: dist.group.WORLD}[size]
        torch.manual_seed(0)
        model = apply_sequence_parallel(Transformer(tiny_config(**SMALL)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, grads = [], []
        for step in range(len(STEP_LENGTHS)):
            packed = pack(_documents(step))
            meta = make_sp_batch(packed.seqlens, mode, group, ulysses_degree=ulysses)
            ids = shard_tokens(meta, packed.input_ids, 0)
            labels = shard_tokens(meta, packed.labels, IGNORE_INDEX)
            loss = token_loss_sum(model.logits(model(ids, meta)), labels) / packed.num_targets
            loss.backward()
            flat = torch.cat([loss.detach().view(1)] + [p.grad.flatten() for p in model.parameters()])
            if group is not None:  # each rank has the loss and gradients of its own tokens: sum them
                dist.all_reduce(flat, group=group)
            for p, g in zip(model.parameters(), flat[1:].split([p.numel() for p in model.parameters()])):
                p.grad.copy_(g.view_as(p))
            losses.append(flat[0].item())
            grads.append(flat[1:].clone())
            opt.step()
            opt.zero_grad()
        results.append((losses, grads))
    return results


def test_tiny_llama_trains_identically_with_sp_1_2_4():
    per_rank = run_distributed(_train, 4, CONFIGS)
    ref_losses, ref_grads = per_rank[0][0]
    assert all(abs(a - b) > 1e-4 for a, b in zip(ref_losses, ref_losses[1:])), "the model must actually train"
    for rank, results in enumerate(per_rank):
        for (mode, size, _), (losses, grads) in zip(CONFIGS, results):
            what = f"rank {rank} {mode} x{size}"
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0, msg=what)
            for step, (g, r) in enumerate(zip(grads, ref_grads)):
                err = (g - r).abs().max().item()
                assert err <= 1e-5 * r.abs().max().item(), f"{what} step {step}: gradient error {err:.3g}"
