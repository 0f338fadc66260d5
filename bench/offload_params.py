"""Parameter offload benchmark (issue 20): the largest model one GPU trains, the cost of streaming, bf16 without masters.

(a) Largest model: Llama-shaped models of growing size (``--sizes``, billions: hidden, layers and MLP
    from ``llama_shape``), bf16 weights without master copies (FP8AdamW, fp8 moments, stochastic
    rounding), ZeRO-1 on one rank, ``offload.params=cpu`` with the plan of
    ``seqmesh/scheduler/offload_plan.py`` (rates measured in the trial; ``--update`` the update's place),
    one document of ``--tokens`` (8K) per step, tiled loss. Each trial runs in a fresh subprocess under a
    time cap (an OOM leaves the allocator fragmented), its progress lines kept in its row: 1 warm-up step
    and ``--steps`` timed steps; MFU from ``trainer/flops.py``
    (recomputation not counted). The largest size that trains is run again *without* offload, which
    must fail to fit for the figure to mean anything (``fits_without_offload_at_max``). Host-state layers
    (``offload.host_states``) are on unless ``--no-host-states``; ``--compare-host-states`` runs each size
    again without them in the same command (``host_states_speedup_at_max``: that step over this one).
(b) Overhead: a Llama-3-8B shape (``--overhead-layers`` of its 32 layers) at 8K and 32K tokens, step
    time with every layer streamed (``resident_layers=0``, ``host_states=false``) vs the same model GPU-resident (ZeRO-1,
    activation checkpointing: the same recomputation), median of the timed steps. The streamed run
    updates where the plan puts the update (``offload.update=auto``); on a GPU it runs once more with
    the update on the host, and ``host_over_planned_update_step_<len>`` is that run's step over the planned one
    (``--no-host-rerun`` leaves it out: each trial's start-up takes minutes on a GPU machine's host, and the
    three trials of one length may not fit a 10-minute command).
(c) bf16 without master weights: a small byte-level model (``SR_SHAPE``) trained ``--sr-steps`` steps
    on windows of the Python standard library's text with bf16 weights (stochastic rounding) and with
    fp32 masters, for each of ``--sr-seeds`` paired seeds (same init, data and rounding seed per
    seed); the gap is the mean over seeds of the relative difference of the held-out loss after the
    last step, in percent (``sr_gap``). ``--sr-only`` runs this part alone, on a CPU too.

Not measured here: the longest single sequence and its working set per token (issue 20's sequence
tiling of the recomputed layer, measured by ``bench/offload.py --doc-tokens 0``). Their summary keys are
copied from that script's result files of the same device under ``bench/results`` (``sequence_summary``:
the longest sequence any of them trained, the 512K working set of the newest that measured it), each
with its file and commit in ``config.sequence_from``; null where no such file exists.

``--parts`` runs some of ``max``, ``overhead``, ``sr`` and ``--merge`` adds them to an earlier result
file of the same device (a GPU command of the device tool runs at most 10 minutes; the host optimizer
step of a model of billions of parameters takes minutes, so parts and sizes go one command at a time).
``--smoke`` runs every part on the CPU with tiny shapes (no memory limit there, so nothing fails to
fit). Writes ``bench/results/offload_params_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256,
                num_layers=32)
TINY = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=512, num_layers=4)
PARTS = ("max", "overhead", "sr")
# a step's parts, timed apart in every trial: forward + backward (with the streaming of offloaded weights and
# gradients), gradient reduction (the offloaded gradients handed to the host), global-norm clipping, the
# optimizer step (the host or staged step of offloaded layers)
PHASES = ("forward_backward", "reduce", "clip", "optimizer")
# Part (c)'s model: byte-level, small enough for a CPU (about 3.4M parameters).
SR_SHAPE = dict(hidden_size=256, intermediate_size=688, num_heads=8, num_kv_heads=4, vocab_size=256, num_layers=4)


# The loss a tile of tokens at a time: the logits of 8K tokens and a 128K vocabulary would take 10.5 GB (bf16, their
# fp32 copy and its gradient). Until 2026-12-08 the step tiled its loss while the run config said untiled, so the
# plan reserved those 10.5 GB and placed fewer layers on the device than fit (bench/offload_predict.py).
LOSS_TILE_TOKENS = 2048


def llama_shape(billions: float) -> dict[str, int]:
    """A Llama-family shape of about ``billions`` parameters: Llama-3 proportions (MLP 3.5x hidden, head 128,
    8 KV heads, 128K vocabulary); depth grows with width as in Llama-2/3 (64 layers at 8192 wide)."""
    for hidden, layers in ((4096, 32), (5120, 40), (6144, 48), (7168, 56), (8192, 64), (8192, 80), (10240, 80)):
        shape = dict(hidden_size=hidden, intermediate_size=int(hidden * 3.5) // 256 * 256, num_heads=hidden // 128,
                     num_kv_heads=8, vocab_size=128256, num_layers=layers)
        per_layer = 2 * hidden * hidden + 2 * hidden * 1024 + 3 * hidden * shape["intermediate_size"]
        total = layers * per_layer + 2 * 128256 * hidden
        if total >= billions * 1e9 * 0.97:
            scale = billions * 1e9 / total
            shape["num_layers"] = max(1, round(layers * scale))
            return shape
    raise ValueError(f"no Llama shape of {billions}B parameters in the table; choose at most 140")


def run_config(shape: dict[str, int], tokens: int, offload: bool, resident: int | None, dtype: str = "bf16",
               path: str | None = None, update: str = "auto", options: dict[str, Any] | None = None,
               headroom: float | None = None):
    """The ``RunConfig`` of one trial: the run's own config path (schema, checks) for the model and the offload
    (``options``: more ``offload.*`` settings; ``headroom``: ``memory.headroom``, None: the default)."""
    from seqmesh.trainer.config import config_from_dict

    off = {"params": "cpu", "optimizer": "auto", "update": update, "path": path or tempfile.gettempdir(),
           "resident_layers": "auto" if resident is None else str(resident), **(options or {})} if offload else {}
    return config_from_dict({
        "model": {"hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
                  "num_layers": shape["num_layers"], "num_heads": shape["num_heads"],
                  "num_kv_heads": shape["num_kv_heads"], "vocab_size": shape["vocab_size"], "tie_embeddings": False,
                  "dtype": dtype, "activation_checkpointing": True, "rope_theta": 500000.0,
                  # the step's loss (``_train_trial``), so that the plan reserves its tile, not the whole logits
                  "loss_tile_tokens": LOSS_TILE_TOKENS},
        "parallel": {"zero_stage": 1, "overlap_grad_reduce": False},
        "optim": {"state_dtype": "fp8", "master_weights": dtype != "bf16"},
        "data": {"max_seq_len": tokens}, "launch": {"num_workers": 1}, "offload": off,
        "memory": {} if headroom is None else {"headroom": headroom}})


def _model(shape: dict[str, int], dtype: str, device: str, checkpointing: bool, seed: int = 0):
    """The plain model of ``shape`` (``sr_gap``: no transform beyond optional checkpointing), initialised from
    ``seed``."""
    import torch

    from seqmesh.parallel.checkpointing import apply_activation_checkpointing
    from seqmesh.trainer.model import Transformer, tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      tie_word_embeddings=False)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    if checkpointing:
        apply_activation_checkpointing(model.model.layers)
    return model


def _groups(model) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _fp8_adamw(groups: list[dict]):
    from seqmesh.trainer.optim import FP8AdamW

    return FP8AdamW(groups, lr=3e-4, state_dtype="fp8")


def _zero(model):
    from seqmesh.parallel.zero import ZeroOptimizer

    return ZeroOptimizer(_groups(model), _fp8_adamw, stage=1)


def trial(shape: dict[str, int], tokens: int, steps: int, offload: bool, resident: int | None,
          device_name: str, dtype: str = "bf16", update: str = "auto", profile: str | None = None,
          options: dict[str, Any] | None = None, headroom: float | None = None) -> dict[str, Any]:
    """One model trained ``1 + steps`` steps on one device: times, MFU, memory; raises on OOM. ``profile``: a
    path for the profile of one more step (``_profiled``), after the timed ones."""
    import torch

    device = torch.device(device_name)
    path = tempfile.mkdtemp(prefix="seqmesh-bench-")  # offload files (NVMe states), removed with the trial
    try:
        return _train_trial(shape, tokens, steps, offload, resident, device, dtype, path, update, profile, options,
                            headroom)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _train_trial(shape: dict[str, int], tokens: int, steps: int, offload: bool, resident: int | None,
                 device: "torch.device", dtype: str, path: str, update: str, profile: str | None,
                 options: dict[str, Any] | None = None, headroom: float | None = None) -> dict[str, Any]:
    import torch

    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.parallel.offload.host_states import get_host_states
    from seqmesh.parallel.offload.params import get_param_offload
    from seqmesh.trainer.build import apply_weight_dtype, build_cost_model, build_model
    from seqmesh.trainer.data import pack
    from seqmesh.trainer.flops import device_name as dev_name, mfu, peak_flops, train_flops
    from seqmesh.trainer.microbatch import loss_sum_of

    cuda = device.type == "cuda"
    began = time.perf_counter()

    def progress(what: str) -> None:  # to stderr: what a trial cut by its time cap had reached (``_child``)
        print(f"[{time.perf_counter() - began:7.1f} s] {what}", file=sys.stderr, flush=True)

    cfg = run_config(shape, tokens, offload, resident, dtype, path, update, options, headroom)
    torch.manual_seed(0)
    # the run's own build: phase 1 transforms, on the host when the weights are offloaded
    # bf16 weights without masters are made in bf16 (an fp32 model of tens of billions would not fit the host)
    torch.set_default_dtype(torch.float32 if cfg.optim.master_weights else torch.bfloat16)
    try:
        model = build_model(cfg.model, shape["vocab_size"], torch.device("cpu") if offload else device)
    finally:
        torch.set_default_dtype(torch.float32)
    apply_weight_dtype(model, cfg.optim)
    nparams = sum(p.numel() for p in model.parameters())
    progress(f"built {nparams / 1e9:.2f}B parameters")
    cost_model = build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=1, state_dtype="fp8",
                                  params_offloaded=offload)
    plan = None
    if offload:  # measured rates, the plan, its report, the optimizer over both places, the transform: a run's start-up
        from seqmesh.trainer.param_offload import apply_param_offload

        opt, plan, _ = apply_param_offload(model, cfg, cost_model, device, _groups(model), _fp8_adamw)
        progress(plan.report())
    else:
        opt = _zero(model)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, shape["vocab_size"], (tokens,), generator=g)]
    packed = pack(docs)
    ids, labels = packed.input_ids.to(device), packed.labels.to(device)
    meta = make_sp_batch(packed.seqlens, "local", None, device=device)
    times, losses, phases = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def mark() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step() -> list[float]:
        t = [mark()]
        opt.overlap_next_backward()  # the step's only micro-batch is its last, as the step runner announces
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            hidden_states = model(ids, meta)
        loss = loss_sum_of(model, hidden_states, labels, loss_tile_tokens=cfg.model.loss_tile_tokens)
        (loss / tokens).backward()
        t.append(mark())
        opt.reduce_gradients()
        t.append(mark())
        opt.clip_grad_norm_(1.0)
        t.append(mark())
        opt.step()
        opt.zero_grad()
        t.append(mark())
        losses.append(loss.item() / tokens)
        return t

    # host time the step's forward waited for the update left running behind the step before: streamed layers'
    # fetches and host-state layers' forwards; and that update's own wall time
    waiters = [w for w in (get_param_offload(model), get_host_states(model)) if w is not None and
               getattr(w, "active", True)]
    waits, behind = [], []
    for i in range(1 + steps):
        waited = sum(w.update_wait_s for w in waiters)
        t = step()
        times.append(t[-1] - t[0])
        phases.append({name: b - a for name, a, b in zip(PHASES, t, t[1:])})
        waits.append(sum(w.update_wait_s for w in waiters) - waited)
        if i and plan:  # the update behind step i - 1, over by now (the next ``step`` waits for it)
            behind.append(opt.optimizer.behind_s)
        progress(f"step {i}: {times[-1]:.2f} s " + json.dumps({k: round(v, 3) for k, v in phases[-1].items()}))
    if plan:  # and the last step's
        opt.synchronize()
        behind.append(opt.optimizer.behind_s)
    if profile:
        _profiled(step, Path(profile), cuda)
    step_s = statistics.median(times[1:]) if steps else times[0]  # --steps 0: the first step only (cold)
    timed = phases[1:] or phases
    flops = train_flops(model.config, packed.seqlens)
    peak = peak_flops(dev_name(device)) if cuda else None
    return {"params_billion": nparams / 1e9, "layers": shape["num_layers"], "hidden": shape["hidden_size"],
            "tokens": tokens, "offload": offload, "timed_steps": steps or 1, "first_step_only": not steps,
            "step_s": step_s, "mfu": mfu(flops, step_s, peak),
            "gpu_peak_GB": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "host_GB": plan.host_bytes / 1e9 if plan else None, "disk_GB": plan.disk_bytes / 1e9 if plan else 0.0,
            "plan": plan.as_dict() if plan else None, "losses": losses,
            "phase_s": {name: statistics.median(p[name] for p in timed) for name in PHASES},
            "update_wait_s": statistics.median(waits[1:] or waits),
            "update_behind_s": statistics.median(behind[1:] or behind) if behind else 0.0}


def _profiled(step: Callable[[], list[float]], path: Path, cuda: bool) -> None:
    """One ``step`` under torch.profiler, its phase times and the operators' totals written to ``path``.

    Why: the phases say how long each part of a streamed step took, not what it waited for (a copy over
    the link, the host's additions of landed gradients, an event); the tables (by GPU time, by the
    host's own time, which includes each thread's waits) say which."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        t = step()
    averages = prof.key_averages()
    orders = ("self_cuda_time_total", "self_cpu_time_total") if cuda else ("self_cpu_time_total",)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([
        "phases (s, profiled): " + ", ".join(f"{n} {b - a:.3f}" for n, a, b in zip(PHASES, t, t[1:])),
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        *(averages.table(sort_by=order, row_limit=25) for order in orders)]))


def _child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """``trial`` in a fresh interpreter: its row, or ``{"error": ...}`` (OOM, time cap, crash)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", out]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0][:300]}
        # where the trial's time went: building, planning, each step (its ``progress`` lines)
        return {**json.loads(Path(out).read_text()), "progress": _progress_lines(proc.stderr)[-12:]}
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"error": f"over the {timeout_s:.0f} s trial cap", "reached": _progress_lines(err)[-3:]}
    finally:
        Path(out).unlink(missing_ok=True)


def _progress_lines(stderr: str) -> list[str]:
    return [line[:500] for line in (stderr or "").splitlines() if line.startswith("[")]


def stdlib_bytes(limit: int = 4 << 20) -> "torch.Tensor":
    """Up to ``limit`` bytes of the Python standard library's .py files in sorted path order (every machine has
    the same text for one Python version): a small, real, byte-level language-modelling corpus."""
    import sysconfig

    import torch

    out, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(out)[:limit]), dtype=torch.uint8).long()


def sr_gap(shape: dict[str, int], steps: int, seeds: int, tokens: int, device_name: str, batch: int = 4,
           lr: float = 3e-3) -> dict[str, Any]:
    """Loss gap (%) of bf16 weights with stochastic rounding against fp32 master weights, paired seeds.

    Per seed both runs start from the same initial weights (the fp32 ones, rounded to bf16 for the second),
    see the same byte windows of standard-library text in the same order and use the same rounding seed;
    FP8AdamW with fp8 moments in both. The figure per seed is the relative difference of the held-out loss
    (32 fixed windows from the last tenth of the corpus, never trained on) after the last step; the train
    loss gap (mean of the last 20 steps) is reported beside it."""
    import torch

    from seqmesh.parallel.sequence import make_sp_batch
    from seqmesh.trainer.data import pack
    from seqmesh.trainer.optim import FP8AdamW

    if shape["vocab_size"] < 256:
        raise ValueError(f"the SR comparison reads bytes: vocab_size must be >= 256, got {shape['vocab_size']}")
    device = torch.device(device_name)
    text = stdlib_bytes()
    split = len(text) * 9 // 10
    held = torch.Generator().manual_seed(12345)
    held_out = [text[o:o + tokens] for o in torch.randint(split, len(text) - tokens, (32,), generator=held).tolist()]

    def loss_of(model, docs):
        packed = pack(docs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(packed.input_ids.to(device), make_sp_batch(packed.seqlens, "local", None, device=device))
        return torch.nn.functional.cross_entropy(model.logits(hidden).float(), packed.labels.to(device),
                                                 ignore_index=-100)

    rows = []
    for seed in range(seeds):
        result = {}
        for dtype in ("fp32", "bf16"):
            model = _model(shape, "fp32", device_name, checkpointing=False, seed=seed)  # the same init for both
            if dtype == "bf16":
                model.to(torch.bfloat16)
            opt = FP8AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, state_dtype="fp8",
                           seed=seed)
            g = torch.Generator().manual_seed(1000 + seed)
            train = []
            for _ in range(steps):
                starts = torch.randint(0, split - tokens, (batch,), generator=g).tolist()
                loss = loss_of(model, [text[o:o + tokens] for o in starts])
                loss.backward()
                opt.step()
                opt.zero_grad()
                train.append(loss.item())
            with torch.no_grad():
                result[dtype] = (statistics.mean(train[-20:]), loss_of(model, held_out).item())
        rows.append({"seed": seed, "fp32_train": result["fp32"][0], "bf16_train": result["bf16"][0],
                     "fp32_heldout": result["fp32"][1], "bf16_heldout": result["bf16"][1],
                     "heldout_gap_pct": 100 * (result["bf16"][1] / result["fp32"][1] - 1),
                     "train_gap_pct": 100 * (result["bf16"][0] / result["fp32"][0] - 1)})
    gaps = [r["heldout_gap_pct"] for r in rows]
    sd = statistics.stdev(gaps) if len(gaps) > 1 else None
    return {"per_seed": rows, "gaps_pct": gaps, "mean_gap_pct": statistics.mean(gaps), "sd_gap_pct": sd,
            "mean_train_gap_pct": statistics.mean(r["train_gap_pct"] for r in rows)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    ap.add_argument("--sizes", default="13,20,30,34,40", help="model sizes to try, billions, ascending")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2,
                    help="timed steps after a warm-up step (0: the warm-up step alone is timed)")
    ap.add_argument("--overhead-layers", type=int, default=32)
    ap.add_argument("--no-host-rerun", action="store_true",
                    help="(b): skip the streamed run with the update on the host (only the plan's choice runs)")
    ap.add_argument("--overhead-tokens", default="8192,32768", help="(b)'s lengths: 8192 and/or 32768")
    ap.add_argument("--sr-steps", type=int, default=300)
    ap.add_argument("--sr-seeds", type=int, default=3)
    ap.add_argument("--parts", default=",".join(PARTS), help="which of max, overhead, sr to run")
    ap.add_argument("--merge", action="store_true", help="keep the other parts' rows of an earlier result file")
    ap.add_argument("--sr-only", action="store_true",
                    help="part (c) alone (any device, the CPU too): writes offload_params_sr_<device>.json")
    ap.add_argument("--sr-tokens", type=int, default=None, help="tokens per window in (c) (default 512; smoke 128)")
    ap.add_argument("--sr-hidden", type=int, default=SR_SHAPE["hidden_size"], help="width of (c)'s model")
    ap.add_argument("--sr-layers", type=int, default=SR_SHAPE["num_layers"], help="depth of (c)'s model")
    ap.add_argument("--trial-timeout-s", type=float, default=540)
    ap.add_argument("--recompute-all", action="store_true",
                    help="(a) with offload.keep_activations=false: every layer recomputed, none kept in the memory left")
    ap.add_argument("--no-host-states", action="store_true",
                    help="(a) with offload.host_states=false: every layer resident or streamed, none with its optimizer "
                         "states alone on the host")
    ap.add_argument("--compare-host-states", action="store_true",
                    help="(a): each size again with offload.host_states=false (a baseline row), and "
                         "host_states_speedup_at_max: its step over the step with them")
    ap.add_argument("--update", choices=("auto", "device", "host"), default="auto",
                    help="(a)'s offload.update: device skips measuring the host update (its compile takes about a "
                         "minute of a trial's start-up) where the staged update is known to be faster")
    ap.add_argument("--profile", action="store_true",
                    help="(b): one more step of each streamed trial under torch.profiler, its tables written to "
                         "offload_params_profile_<tokens>_<update>.txt")
    ap.add_argument("--headroom", type=float, default=None,
                    help="memory.headroom of part (a)'s trials (default: the run's, 0.1): the device memory left free")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        Path(args.child_out).write_text(json.dumps(trial(**spec)))
        return {}

    import torch

    from bench.common import RESULTS, device_tag, head_commit, write_result

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not (args.smoke or args.sr_only):
        raise SystemExit("bench/offload_params.py measures a GPU; on a CPU run it with --smoke or --sr-only")
    out_dir = Path(args.out) if args.out else None
    sr_shape = dict(SR_SHAPE, hidden_size=args.sr_hidden, num_layers=args.sr_layers,
                    intermediate_size=args.sr_hidden * 11 // 4 // 8 * 8, num_heads=max(1, args.sr_hidden // 32),
                    num_kv_heads=max(1, args.sr_hidden // 64))
    if args.sr_only:
        shape = sr_shape if not args.smoke else dict(TINY, num_layers=2)
        steps, seeds = (60, 2) if args.smoke else (args.sr_steps, args.sr_seeds)
        tokens = args.sr_tokens or (128 if args.smoke else 512)
        sr = sr_gap(shape, steps, seeds, tokens, device)
        summary = {"bf16_sr_loss_gap_pct": sr["mean_gap_pct"], "sd_gap_pct": sr["sd_gap_pct"], "seeds": seeds}
        write_result("offload_params_sr", {"sr_shape": shape, "sr_steps": steps, "sr_seeds": seeds,
                                           "sr_tokens": tokens, "smoke": args.smoke}, sr["per_seed"], summary,
                     out_dir=out_dir)
        return summary
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        raise SystemExit(f"--parts: choose among {','.join(PARTS)}, got {args.parts!r}")
    if args.smoke:
        sizes = [dict(TINY), dict(TINY, num_layers=6)]
        tokens, overhead_shape, overhead_tokens = 256, dict(TINY), (128, 256)
        sr_shape, sr_tokens = dict(TINY, num_layers=2), 128
    else:
        sizes = [llama_shape(float(b)) for b in args.sizes.split(",")]
        tokens, overhead_shape = args.tokens, dict(LLAMA_8B, num_layers=args.overhead_layers)
        overhead_tokens = tuple(int(t) for t in args.overhead_tokens.split(","))
        if not set(overhead_tokens) <= {8192, 32768}:
            raise SystemExit(f"--overhead-tokens: the summary keys are for 8192 and 32768, got {args.overhead_tokens}")
        sr_tokens = args.sr_tokens or 512
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    options = {"keep_activations": not args.recompute_all, "host_states": not args.no_host_states}
    if "max" in parts:  # (a): ascending sizes until one does not train, then the largest without offload
        best = None
        for shape in sizes:
            row = {"part": "max", "size": _billions(shape), **_child(
                dict(shape=shape, tokens=tokens, steps=args.steps, offload=True, resident=None, device_name=device,
                     update=args.update, options=options, headroom=args.headroom), args.trial_timeout_s)}
            rows.append(_shown(row))
            if "error" in row:
                break
            best = (shape, row)
            if args.compare_host_states:  # the same size without host-state layers, in the same command
                rows.append(_shown({"part": "max", "baseline": "no_host_states", "size": row["size"], **_child(
                    dict(shape=shape, tokens=tokens, steps=args.steps, offload=True, resident=None,
                         device_name=device, update=args.update, options={**options, "host_states": False},
                         headroom=args.headroom),
                    args.trial_timeout_s)}))
        if best is not None:
            rows.append(_shown({"part": "max", "without_offload": True, "size": best[1]["params_billion"], **_child(
                dict(shape=best[0], tokens=tokens, steps=args.steps, offload=False, resident=None,
                     device_name=device), args.trial_timeout_s)}))
        summary.update(max_summary(rows))
    if "overhead" in parts:  # (b)
        lengths = (128, 256) if args.smoke else (8192, 32768)  # the smoke's stand-ins for 8K and 32K
        keys = dict(zip(lengths, ("param_offload_overhead_pct_8b_8k", "param_offload_overhead_pct_8b_32k")))
        # the offloaded runs: the plan's choice of where the update runs, and (on a GPU) the host update
        updates = ("auto",) if args.smoke or args.no_host_rerun else ("auto", "host")
        for t in overhead_tokens:
            runs = {}
            for name, offload, update in [("resident", False, "auto"), *((u, True, u) for u in updates)]:
                profile = None
                if args.profile and offload:
                    profile = (out_dir or RESULTS) / f"offload_params_profile_{t}_{update}.txt"
                # every layer streamed (no layer keeps its weights on the device): what streaming itself costs
                r = _child(dict(shape=overhead_shape, tokens=t, steps=args.steps, offload=offload,
                                resident=0 if offload else None, device_name=device, update=update,
                                profile=str(profile) if profile else None, options={"host_states": False}),
                           args.trial_timeout_s)
                rows.append(_shown({"part": "overhead", "update": update if offload else None, **r}))
                runs[name] = r
            ok = all("error" not in runs[n] for n in ("resident", "auto"))
            summary[keys[t]] = 100 * (runs["auto"]["step_s"] / runs["resident"]["step_s"] - 1) if ok else None
            if "host" in runs and ok and "error" not in runs["host"]:
                summary[f"host_over_planned_update_step_{keys[t].rsplit('_', 1)[1]}"] = \
                    runs["host"]["step_s"] / runs["auto"]["step_s"]
    if "sr" in parts:  # (c)
        sr = sr_gap(sr_shape, 60 if args.smoke else args.sr_steps, 2 if args.smoke else args.sr_seeds, sr_tokens,
                    device)
        rows += [{"part": "sr", **r} for r in sr["per_seed"]]
        summary["bf16_sr_loss_gap_pct"] = sr["mean_gap_pct"]
    sequence, sources = sequence_summary(RESULTS, "cpu" if args.smoke else device_tag())
    summary.update(sequence)
    config = {"commit": head_commit(), "parts": sorted(parts), "sizes": args.sizes if not args.smoke else "tiny",
              "update": args.update, **options, "headroom": args.headroom, "loss_tile_tokens": LOSS_TILE_TOKENS,
              "tokens": tokens,
              "steps": args.steps, "overhead_shape": overhead_shape, "overhead_tokens": list(overhead_tokens),
              "sr_shape": sr_shape, "sr_steps": args.sr_steps, "sr_seeds": args.sr_seeds, "smoke": args.smoke,
              "sequence_from": sources}
    tag = "cpu" if args.smoke else None
    if args.merge:
        rows, summary, config = _merged(out_dir, tag, parts, rows, summary, config)
        summary.update(sequence)
    write_result("offload_params", config, rows, summary, device=tag, out_dir=out_dir)
    return summary


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """``row``, printed at once: a run that a time cap kills still leaves the rows it finished."""
    print(json.dumps(row), flush=True)
    return row


def _billions(shape: dict[str, int]) -> float:
    """Parameters of ``shape`` in billions (untied embeddings), what a trial reports as ``params_billion``."""
    h, kv = shape["hidden_size"], shape["num_kv_heads"] * (shape["hidden_size"] // shape["num_heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"] + 2 * h
    return (shape["num_layers"] * layer + 2 * shape["vocab_size"] * h + h) / 1e9


def max_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Part (a)'s summary keys from all its rows (several commands' worth): the largest size that trained with
    offload, its MFU, and whether the same size trained without offload (None: not tried); where that size also
    ran without host-state layers (``--compare-host-states``), the ratio of the two steps."""
    trained = [r for r in rows if r.get("part") == "max" and not r.get("without_offload") and not r.get("baseline")
               and "error" not in r]
    if not trained:
        return {"max_params_billion": None, "mfu_at_max": None, "fits_without_offload_at_max": None}
    best = max(trained, key=lambda r: r["params_billion"])
    without = [r for r in rows if r.get("without_offload") and r.get("size") == best["params_billion"]]
    out = {"max_params_billion": best["params_billion"], "mfu_at_max": best["mfu"],
           "fits_without_offload_at_max": ("error" not in without[-1]) if without else None}
    plain = [r for r in rows if r.get("baseline") == "no_host_states" and r.get("size") == best["size"]
             and "error" not in r]
    if plain:
        out["host_states_speedup_at_max"] = plain[-1]["step_s"] / best["step_s"]
    return out


def sequence_summary(results: Path, device: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Issue 20's single-sequence keys from ``bench/offload.py``'s results of ``device`` under ``results`` (runs
    of one whole sequence, ``--doc-tokens 0``): the longest sequence that trained in any of them, and the
    working set per token at 512K of the newest run that measured it (the code changes between runs, and the
    newest is what the code does now). Also the files they came from, with commits and dates."""
    runs = []
    for path in sorted(results.glob(f"offload_{device}*.json")):
        record = json.loads(path.read_text())
        kind = (record.get("benchmark"), record.get("device"), record["config"].get("doc_tokens"))
        if kind == ("offload", device, 0):
            runs.append((path.name, record))
    trained = [(n, r) for n, r in runs if r["summary"].get("single_sequence_tokens")]
    at_512k = [(n, r) for n, r in runs if r["summary"].get("working_set_kb_per_token_512k") is not None]
    longest = max(trained, key=lambda nr: nr[1]["summary"]["single_sequence_tokens"], default=None)
    newest = max(at_512k, key=lambda nr: nr[1]["date"], default=None)
    summary = {"single_sequence_tokens": longest[1]["summary"]["single_sequence_tokens"] if longest else None,
               "working_set_kb_per_token_512k":
                   newest[1]["summary"]["working_set_kb_per_token_512k"] if newest else None}
    picked = (("single_sequence_tokens", longest), ("working_set_kb_per_token_512k", newest))
    sources = [{"key": key, "file": run[0], "commit": run[1]["commit"], "date": run[1]["date"]}
               for key, run in picked if run]
    return summary, sources


def _merged(out_dir: Path | None, device: str | None, parts: set[str], rows: list[dict], summary: dict,
            config: dict) -> tuple[list[dict], dict, dict]:
    """This run's parts over an earlier result of the same device (each GPU command runs under 10 minutes, so
    the parts run one at a time): rows and summary keys of the other parts are kept, with their configs."""
    from bench.common import RESULTS, device_tag

    path = (out_dir or RESULTS) / f"offload_params_{device or device_tag()}.json"
    if not path.exists():
        return rows, summary, config
    old = json.loads(path.read_text())
    # (a)'s rows accumulate (one size per command, the largest that trained wins); (b)'s are replaced at the
    # lengths this run measured (one length per command); (c)'s are replaced
    measured = {r["tokens"] for r in rows if r.get("part") == "overhead"}
    kept = [r for r in old["rows"] if r.get("part") not in parts or r.get("part") == "max"
            or (r.get("part") == "overhead" and r.get("tokens") not in measured)]
    merged_summary = {**old["summary"], **summary}  # a part that ran replaces its keys, None included
    if "max" in parts:
        merged_summary.update(max_summary(kept + rows))
    runs = old["config"].get("runs", [{"commit": old["commit"], **old["config"]}])  # each run's commit
    return kept + rows, merged_summary, {**config, "runs": runs + [config],
                                         "parts": sorted(set(old["config"].get("parts", [])) | parts)}


if __name__ == "__main__":
    main()
