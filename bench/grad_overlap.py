"""How much of the HDP gradient reduction hides behind backward (``parallel.overlap_grad_reduce``).

Each of ``--ranks`` processes (gloo on CPU, NCCL with one GPU each) trains a Llama-shaped model
through the real step runner, two micro-batches per step, at ZeRO stages 0, 1 and 2, with the
reduction after backward and during the last backward, alternating step by step so that both
see the same machine load. Per stage:

* ``reduce_ms``: the reduction after backward (``runner.reduce``) without overlap -- all of it exposed;
* ``step_ms_off`` / ``step_ms_on``: forward + backward + reduction, without and with overlap (medians);
* ``hidden_pct``: ``(step_ms_off - step_ms_on) / reduce_ms``, the share of the reduction that overlap hid;
* ``exposed_ms_on``: what ``runner.reduce`` still waits for with overlap.

Summary: ``reduce_hidden_pct`` (mean over stages) and ``step_time_vs_no_overlap`` (mean ratio of
step times, <1 = faster with overlap). On the 2-core CI machine the collectives' own CPU work (gloo
sums and copies on loopback) competes with backward for the same cores, so the CPU figure is a lower
bound for what links with their own engines (NVLink, InfiniBand with NCCL) can hide.

    python -m bench.grad_overlap                 # 2 processes, CPU (gloo)
    python -m bench.grad_overlap --ranks 8       # 8 GPUs (NCCL), one process each
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import write_result
from seqmesh.parallel.mesh import Mesh
from seqmesh.parallel.sequence import apply_sequence_parallel
from seqmesh.parallel.step_runner import LocalRunner
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.build import build_sharded_optimizer
from seqmesh.trainer.config import config_from_dict
from seqmesh.trainer.data import num_targets
from seqmesh.trainer.microbatch import autocast, batch_layout, loss_sum_of
from seqmesh.trainer.model import Transformer, tiny_config

STAGES = (0, 1, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    mesh = Mesh(world, rank)
    tokens = args.tokens
    lengths = [tokens] * (2 * world)
    # two micro-batches per rank, each a document of its own: the second backward is the last
    plan = plan_from_assignment(world, [[(r, 1, [r]) for r in range(world)],
                                        [(r, 1, [world + r]) for r in range(world)]])
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, args.vocab, (n,), generator=gen) for n in lengths]
    rows = []
    for stage in STAGES:
        cfg = config_from_dict({"parallel": {"zero_stage": stage}, "launch": {"num_workers": world}})
        runners = {}
        for overlap in (False, True):
            torch.manual_seed(0)
            model = Transformer(tiny_config(vocab_size=args.vocab, hidden_size=args.hidden,
                                            intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                            num_attention_heads=args.hidden // 64,
                                            num_key_value_heads=args.hidden // 64)).to(device)
            apply_sequence_parallel(model)
            opt = build_sharded_optimizer(model, cfg.optim, stage, mesh, overlap=overlap, bucket_mb=args.bucket_mb)
            # bf16 autocast on GPUs (as training runs there), fp32 on CPU
            context = functools.partial(autocast, "bf16" if device.type == "cuda" else "fp32", device)
            runners[overlap] = (LocalRunner(model, opt, mesh, loss_sum_of, device, forward_context=context), opt)
        layout = batch_layout(lambda g: [docs[s] for s in g.sequences], cfg.parallel, device)
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for i in range(args.warmup + args.steps):
            for overlap in (False, True) if i % 2 == 0 else (True, False):
                runner, opt = runners[overlap]
                dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                loss_sum = runner.run(plan, layout, num_targets(lengths))
                _sync(device)
                t1 = time.perf_counter()
                runner.reduce(loss_sum)
                _sync(device)
                t2 = time.perf_counter()
                opt.zero_grad()  # no optimizer step: every step measures the same work
                if i >= args.warmup:
                    times[overlap].append((t2 - t0, t2 - t1))
        step_off = statistics.median(t for t, _ in times[False]) * 1e3
        step_on = statistics.median(t for t, _ in times[True]) * 1e3
        reduce_off = statistics.median(r for _, r in times[False]) * 1e3
        reduce_on = statistics.median(r for _, r in times[True]) * 1e3
        rows.append({"zero_stage": stage, "rank": rank, "buckets": len(runners[True][1].reduction.buckets),
                     "step_ms_off": round(step_off, 2), "step_ms_on": round(step_on, 2),
                     "reduce_ms": round(reduce_off, 2), "exposed_ms_on": round(reduce_on, 2),
                     "hidden_pct": round(100 * (step_off - step_on) / reduce_off, 1)})
    return rows


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: dict) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(init_file, world), rank=rank,
                            world_size=world)
    try:
        out[rank] = _measure(rank, world, args, device)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch and rank")
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out-dir", default=None, help="where the result file goes (default: bench/results)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(args.ranks, os.path.join(tmp, "store"), args, out), nprocs=args.ranks,
                           join=True, start_method="spawn")
        rows = [row for rank in range(args.ranks) for row in out[rank]]
    per_stage = {s: [r for r in rows if r["zero_stage"] == s] for s in STAGES}
    hidden = [statistics.mean(r["hidden_pct"] for r in rs) for rs in per_stage.values()]
    ratio = [statistics.mean(r["step_ms_on"] / r["step_ms_off"] for r in rs) for rs in per_stage.values()]
    write_result("grad_overlap", vars(args), rows, {"reduce_hidden_pct": round(statistics.mean(hidden), 1),
                                                    "step_time_vs_no_overlap": round(statistics.mean(ratio), 3)},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()
