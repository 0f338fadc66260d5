"""Sequence tiling: the tiled loss, TiledMLP and tiled decoder layers equal the untiled computation, and hold less."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from seqmesh.parallel.checkpointing import apply_activation_checkpointing
from seqmesh.parallel.offload import get_offloader
from seqmesh.trainer.build import apply_offload
from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import MLP, Transformer, model_dims, tiny_config
from seqmesh.trainer.tiled import TiledMLP, apply_tiled_mlp, lm_loss_sum, tiled_token_loss_sum
from seqmesh.trainer.tiled_layer import TiledDecoderLayer, apply_tiled_layers, tile_blocks
from seqmesh.trainer.working_set import track_working_set
from tests.conftest import cost_model_of, merged, tiny_overrides, tiny_run_config
from tests.distributed import run_distributed
from tests.tolerances import loss_rel

T, H, V = 50, 32, 97


class _LargestTensor(TorchDispatchMode):
    """The most elements any op produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, H, generator=g) * 0.1
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[3, 17, 49]] = -100  # ignored targets, as at document ends
    return hidden, weight, labels


@pytest.mark.parametrize("tile", [7, 16, 50, 64])
def test_tiled_loss_equals_untiled_with_gradients(tile: int) -> None:
    hidden, weight, labels = _inputs()
    results = []
    for tiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = tiled_token_loss_sum(h, w, labels, tile) if tiled else token_loss_sum(h @ w.T, labels)
        (loss / 13.0).backward()  # the loop divides by the global token count: gradients must scale with it
        results.append((loss.detach(), h.grad, w.grad))
    (loss0, dh0, dw0), (loss1, dh1, dw1) = results
    torch.testing.assert_close(loss1, loss0, rtol=loss_rel(T, V), atol=0)  # tiles sum in other orders
    torch.testing.assert_close(dh1, dh0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-7)


def test_tiled_loss_never_materialises_the_logits() -> None:
    hidden, weight, labels = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestTensor() as probe:
        tiled_token_loss_sum(h, w, labels, 8).backward()
    assert probe.largest <= max(8 * V, V * H)  # one tile of logits, or the weight gradient
    with _LargestTensor() as probe:
        token_loss_sum(h @ w.T, labels).backward()
    assert probe.largest == T * V
    with pytest.raises(ValueError, match="tile_tokens must be >= 1"):
        tiled_token_loss_sum(h, w, labels, 0)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(model_dims(tiny_config(vocab_size=V, hidden_size=H, intermediate_size=80, num_attention_heads=4,
                                      num_key_value_heads=2)))


@pytest.mark.parametrize("tile", [8, 13])
def test_tiled_mlp_equals_mlp_with_gradients(tile: int) -> None:
    mlp = _mlp()
    tiled = TiledMLP(copy.deepcopy(mlp), tile)
    assert tiled.state_dict().keys() == mlp.state_dict().keys()
    x = torch.randn(T, H)
    grad = torch.randn(T, H)
    outs = []
    for module in (mlp, tiled):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
    with _LargestTensor() as probe:
        tiled(x.clone().requires_grad_()).backward(grad)
    assert probe.largest <= max(T * H, 80 * H)  # never [T, intermediate]
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), y0, rtol=1e-6, atol=1e-6)
    short = x[:tile]
    assert torch.equal(tiled(short), mlp(short))  # a stream within one tile runs the MLP as is


def test_model_with_tiling_checkpointing_and_offload_through_the_loop(tmp_path: Path) -> None:
    from seqmesh.trainer.loop import run_group

    torch.manual_seed(0)
    base = Transformer(tiny_config(vocab_size=V, hidden_size=H, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (40, 9, 23)]
    plain = config_from_dict({"parallel": {"attn_backend": "math"}, "launch": {"num_workers": 1}})
    tiled = config_from_dict({
        "parallel": {"attn_backend": "math"}, "launch": {"num_workers": 1},
        "model": {"activation_checkpointing": True, "mlp_tile_tokens": 16, "loss_tile_tokens": 10},
        "offload": {"target": "nvme", "ratio": "1.0", "path": str(tmp_path), "engine": "threads",
                    "host_mem_gb": 0.01},
    })
    device = torch.device("cpu")
    results = []
    for cfg in (plain, tiled):
        model = copy.deepcopy(base)
        if cfg.model.activation_checkpointing:
            apply_activation_checkpointing(model.model.layers)
        apply_offload(model, cfg.model, cfg.offload, cost_model_of(cfg, model, device), device)
        off = get_offloader(model)
        if off is not None:
            off.min_bytes = 0  # the tiny model's activations are below the default threshold
        loss = run_group(model, docs, None, cfg.model, cfg.parallel, device, denominator=69)
        results.append((loss, {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in
                               model.named_parameters()}, off))
    (loss0, g0, _), (loss1, g1, off) = results
    torch.testing.assert_close(loss1, loss0, rtol=loss_rel(sum(len(d) for d in docs), V), atol=0)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)
    assert off.stats.offloaded_tensors > 0 and off.files.files() == []
    assert isinstance(model.model.layers[0]._checkpoint_wrapped_module.mlp, TiledMLP)
    apply_tiled_mlp(model.model.layers, 4)  # idempotent: an already tiled MLP stays as it is
    assert model.model.layers[0]._checkpoint_wrapped_module.mlp.tile_tokens == 16
    hidden = torch.randn(5, H)
    assert torch.equal(lm_loss_sum(base, hidden, torch.zeros(5, dtype=torch.long), 10),
                       token_loss_sum(base.logits(hidden), torch.zeros(5, dtype=torch.long)))


@pytest.mark.gpu
def test_gpu_tiled_loss_peak_memory() -> None:
    """On CUDA: the tiled loss's peak is a tile of logits, not the whole [T, vocab] fp32 tensor."""
    tokens, hidden, vocab = 16384, 1024, 32000
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    peaks = []
    for tile in (0, 1024):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tiled_token_loss_sum(h, w, labels, tile) if tile else token_loss_sum(h @ w.T, labels)
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        h.grad = w.grad = None
    assert peaks[1] < peaks[0] / 4


# --------------------------------------------------------------------------- tiled decoder layers

LAYER_DIMS = dict(vocab_size=V, hidden_size=H, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2)
DOCS = (23, 9, 18)  # packed documents: positions restart at each, attention stays inside each


def _layer_and_inputs(seed: int = 0) -> tuple[nn.ModuleList, torch.Tensor, torch.Tensor, torch.Tensor, object]:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(num_hidden_layers=1, **LAYER_DIMS))
    meta = make_sp_batch(DOCS, "local", None, backend="math")
    cos, sin = model.model.rotary_emb(meta.position_ids)
    return model.model.layers, torch.randn(sum(DOCS), H), cos, sin, meta


def _run_layer(layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: object,
               grad: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    layers.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layers[0](xi, cos, sin, meta)
    y.backward(grad)
    return y.detach().float(), xi.grad, {n: p.grad for n, p in layers.named_parameters()}


def _pairs(a: tuple, b: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    (ya, dxa, ga), (yb, dxb, gb) = a, b
    return [("output", ya, yb), ("input grad", dxa, dxb)] + [(n, ga[n], gb[n]) for n in ga]


@pytest.mark.parametrize("tile", [7, 16, 25, 49])
def test_tiled_layer_equals_layer_in_fp32(tile: int) -> None:
    """fp32: tiling only reorders sums, so the gap stays within the rounding of the longest reduction in the
    layer (n terms: tokens for weight gradients, the MLP width for the down projection), n * eps * max|value|."""
    layers, x, cos, sin, meta = _layer_and_inputs()
    tiled = copy.deepcopy(layers)
    apply_tiled_layers(tiled, tile)
    assert isinstance(tiled[0], TiledDecoderLayer) and tiled.state_dict().keys() == layers.state_dict().keys()
    grad = torch.randn_like(x)
    n = max(sum(DOCS), LAYER_DIMS["intermediate_size"], H)
    eps = torch.finfo(torch.float32).eps
    for name, ref, got in _pairs(_run_layer(layers, x, cos, sin, meta, grad, False),
                                 _run_layer(tiled, x, cos, sin, meta, grad, False)):
        torch.testing.assert_close(got, ref, rtol=0, atol=n * eps * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("tile", [7, 16])
def test_tiled_layer_in_bf16_is_as_close_to_fp32_as_the_layer(tile: int) -> None:
    """bf16 autocast: both the plain and the tiled layer round to bf16 where they differ only by tile boundaries;
    measured against the fp32 layer, the tiled one's error stays within twice the plain one's plus one bf16
    rounding of the largest value."""
    layers, x, cos, sin, meta = _layer_and_inputs()
    tiled = copy.deepcopy(layers)
    apply_tiled_layers(tiled, tile)
    grad = torch.randn_like(x)
    reference = _run_layer(layers, x, cos, sin, meta, grad, False)
    plain = _run_layer(layers, x, cos, sin, meta, grad, True)
    got = _run_layer(tiled, x, cos, sin, meta, grad, True)
    eps = torch.finfo(torch.bfloat16).eps
    for (name, ref, base), (_, _, out) in zip(_pairs(reference, plain), _pairs(reference, got)):
        bound = 2 * (base - ref).abs().max().item() + eps * ref.abs().max().item()
        assert (out - ref).abs().max().item() <= bound, name


def test_tiled_layer_composes_with_checkpointing_and_tiled_mlp() -> None:
    layers, x, cos, sin, meta = _layer_and_inputs()
    tiled = copy.deepcopy(layers)
    apply_activation_checkpointing(tiled)
    apply_tiled_mlp(tiled, 5)
    apply_tiled_layers(tiled, 11)
    apply_tiled_layers(tiled, 3)  # idempotent: an already tiled layer keeps its tiles
    inner = tiled[0]._checkpoint_wrapped_module
    assert isinstance(inner, TiledDecoderLayer) and inner.tile_tokens == 11 and isinstance(inner.mlp, TiledMLP)
    grad = torch.randn_like(x)
    n, eps = max(sum(DOCS), LAYER_DIMS["intermediate_size"], H), torch.finfo(torch.float32).eps
    ref, got = _run_layer(layers, x, cos, sin, meta, grad, False), _run_layer(tiled, x, cos, sin, meta, grad, False)
    got = (got[0], got[1], {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in got[2].items()})
    for name, a, b in _pairs(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=n * eps * a.abs().max().item(), msg=name)
    with torch.no_grad():  # a stream no longer than a tile: the plain layer's forward (its MLP still tiled by 5
        # rows, whose GEMMs may round otherwise than the 9-row one's on some CPUs: the same bound)
        short = x[:9]
        want = layers[0](short, cos[:9], sin[:9], make_sp_batch((9,), "local", None, backend="math"))
        got = tiled[0](short, cos[:9], sin[:9], make_sp_batch((9,), "local", None, backend="math"))
        torch.testing.assert_close(got, want, rtol=0, atol=n * eps * want.abs().max().item())
    with pytest.raises(ValueError, match="not seqmesh's DecoderLayer"):
        apply_tiled_layers(nn.ModuleList([nn.Linear(2, 2)]), 4)


def test_tile_blocks_split_a_query_tile_into_its_own_documents_and_one_prefix() -> None:
    """Queries [16, 32) of documents at 0, 23, 32: the tile against itself (documents cut at 23, causal) and
    the first document's rows of the tile against that document's keys before the tile."""
    diag, prefix = tile_blocks([0, 23, 32, 50], 16, 32, torch.device("cpu"))
    assert (diag.q, diag.k, diag.causal, diag.cu_q.tolist(), diag.max_q) == (slice(16, 32), slice(16, 32), True,
                                                                             [0, 7, 16], 9)
    assert (prefix.q, prefix.k, prefix.causal, prefix.cu_q.tolist(), prefix.cu_k.tolist()) == (
        slice(16, 23), slice(0, 16), False, [0, 7], [0, 16])
    assert len(tile_blocks([0, 16, 50], 16, 32, torch.device("cpu"))) == 1  # a document starts with the tile
    # a longer prefix: a tile of keys a call, the last one shorter
    assert [blk.k for blk in tile_blocks([0, 2, 50], 40, 48, torch.device("cpu"))[1:]] == [
        slice(2, 10), slice(10, 18), slice(18, 26), slice(26, 34), slice(34, 40)]


@pytest.mark.parametrize("docs,tile", [((50,), 16), ((50,), 7), ((23, 9, 18), 16), ((5, 40, 5), 8)])
def test_query_tiled_attention_matches_the_layer_on_the_cpu_kernel(monkeypatch: pytest.MonkeyPatch,
                                                                  docs: tuple[int, ...], tile: int) -> None:
    """The local-attention path on the CPU flash kernel: no attention call sees more queries than a tile, and
    the output and every gradient equal the plain layer's within fp32 rounding of the longest sum (the merge
    of a tile's two blocks is one more rounded combination per query row)."""
    import seqmesh.trainer.tiled_layer as tiled_layer

    layers, x, _, _, _ = _layer_and_inputs()
    meta = make_sp_batch(docs, "local", None, backend="cpu_flash")
    cos, sin = Transformer(tiny_config(num_hidden_layers=1, **LAYER_DIMS)).model.rotary_emb(meta.position_ids)
    x = x[:sum(docs)]
    tiled = copy.deepcopy(layers)
    apply_tiled_layers(tiled, tile)
    rows = []
    for name, q_arg in (("attention_forward", 0), ("attention_backward", 1)):
        kernel = getattr(tiled_layer, name)
        monkeypatch.setattr(tiled_layer, name,
                            lambda *a, _k=kernel, _i=q_arg, **kw: (rows.append(a[_i].shape[0]), _k(*a, **kw))[1])
    grad = torch.randn_like(x)
    n, eps = max(sum(docs), LAYER_DIMS["intermediate_size"], H), torch.finfo(torch.float32).eps
    for name, ref, got in _pairs(_run_layer(layers, x, cos, sin, meta, grad, False),
                                 _run_layer(tiled, x, cos, sin, meta, grad, False)):
        torch.testing.assert_close(got, ref, rtol=0, atol=n * eps * ref.abs().max().item(), msg=name)
    assert rows and max(rows) <= tile, rows


def test_working_set_counts_live_storages_not_views() -> None:
    with track_working_set(torch.device("cpu")) as ws:
        a = torch.empty(1000)  # 4000 bytes
        b = a[:10].view(2, 5)  # a view allocates nothing
        c = torch.empty(500)  # 2000 bytes: 6000 held at once
        del a, b
        d = torch.empty(100)  # after a's release: 2400
        del c, d
    assert ws.peak_bytes == 6000 and ws.kb_per_token(6) == 1.0


def test_tiled_layers_shrink_the_backward_working_set() -> None:
    """The counted peak of a checkpointed step (recompute and backward of one layer at a time) per token: tiling
    keeps whole-length only the layer's input, Q, K, V, attention output and gradients."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_hidden_layers=2, vocab_size=V, hidden_size=64, intermediate_size=176,
                                    num_attention_heads=4, num_key_value_heads=2))
    apply_activation_checkpointing(model.model.layers)
    tokens = 1024
    ids = torch.randint(0, V, (tokens,))
    meta = make_sp_batch((tokens,), "local", None, backend="cpu_flash")
    per_token = []
    for tile in (0, 64):
        m = copy.deepcopy(model)
        if tile:
            apply_tiled_layers(m.model.layers, tile)
        with track_working_set(torch.device("cpu")) as ws:
            m(ids, meta).square().mean().backward()
        per_token.append(ws.kb_per_token(tokens))
    assert per_token[1] < 0.6 * per_token[0], per_token


def test_query_tiled_attention_holds_less_than_whole_length_attention() -> None:
    """Per token of context (slope of the counted peak between two lengths, so constants drop out), a
    checkpointed step whose tiled layers tile attention too holds at least two whole-length query-sized tensors
    fewer than the same layers around one whole-length attention call (Q, dQ and the output's gradient are
    a tile's; it adds fp32 sums of dK and dV, here half a query's size together)."""
    from seqmesh.kernels.attention import VarlenCausalAttention

    class WholeAttention(VarlenCausalAttention):  # not the local core by type: the three-op path
        pass

    torch.manual_seed(0)
    model = Transformer(tiny_config(num_hidden_layers=2, vocab_size=V, hidden_size=64, intermediate_size=176,
                                    num_attention_heads=4, num_key_value_heads=2))
    apply_activation_checkpointing(model.model.layers)
    apply_tiled_layers(model.model.layers, 64)
    peaks: dict[str, list[int]] = {"query": [], "whole": []}
    lengths = (1024, 2048)
    for tokens in lengths:
        ids = torch.randint(0, V, (tokens,))
        meta = make_sp_batch((tokens,), "local", None, backend="cpu_flash")
        for name in peaks:
            m = copy.deepcopy(model)
            if name == "whole":
                for layer in m.model.layers:
                    layer._checkpoint_wrapped_module.self_attn.core = WholeAttention()
            with track_working_set(torch.device("cpu")) as ws:
                m(ids, meta).square().mean().backward()
            peaks[name].append(ws.peak_bytes)
    slope = {name: (p[1] - p[0]) / (lengths[1] - lengths[0]) for name, p in peaks.items()}
    query_bytes = 64 * 4  # hidden 64 in fp32
    assert slope["query"] <= slope["whole"] - 2 * query_bytes, slope


@pytest.mark.parametrize("overrides,match", [
    ({"parallel": {"tp": 2}, "launch": {"num_workers": 2}}, "parallel.tp=1"),
    ({"parallel": {"zero_stage": 3}, "launch": {"num_workers": 2}, "model": {"activation_checkpointing": False}},
     "parallel.zero_stage to 0-2"),
    ({"parallel": {"zero_stage": 1}, "offload": {"params": "cpu"}}, "offload.params=none"),
    ({"offload": {"target": "cpu"}, "model": {"activation_checkpointing": False}},
     "model.activation_checkpointing=true"),
])
def test_layer_tiling_refuses_what_it_does_not_support(overrides: dict, match: str) -> None:
    base = {"model": {"layer_tile_tokens": 16, "activation_checkpointing": True}}
    with pytest.raises(ConfigError, match=match):
        tiny_run_config(**merged(base, **overrides))
    assert tiny_run_config(**merged(base, offload={"target": "cpu"})).model.layer_tile_tokens == 16
    with pytest.raises(ConfigError, match="model.layer_tile_tokens"):
        tiny_run_config(model={"layer_tile_tokens": -1})


def _train_losses(rank: int, world: int, overrides: dict, run_dir: str) -> list[float]:
    from seqmesh.trainer.loop import train

    train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    if rank:  # rank 0 writes the metrics and may still be writing them when another rank returns
        return []
    return [json.loads(line)["loss"] for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_train_steps_with_tiled_layers_match_untiled(tmp_path: Path, corpus: Path) -> None:
    """The step loop on two CPU workers (documents up to 96 tokens, some over an SP group of 2) with
    model.layer_tile_tokens: the same losses as without it, up to rounding."""
    losses = []
    for tile in (0, 16):
        overrides = tiny_overrides(
            model={"activation_checkpointing": True, "layer_tile_tokens": tile},
            data={"source": str(corpus), "tokenizer": "byte", "max_seq_len": 96, "global_batch": 6,
                  "cache_dir": str(tmp_path / "cache")},
            launch={"num_workers": 2}, steps=3, ckpt_every=0, eval_every=0, scheduler={"lookahead": 0})
        losses.append(run_distributed(_train_losses, 2, overrides, str(tmp_path / f"run{tile}"))[0])
    assert len(losses[1]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_gpu_tiled_layers_working_set_and_gradients() -> None:
    """On CUDA (bf16 weights, the torch flash kernel, compiled RoPE and SwiGLU): a checkpointed step's allocator
    peak per token shrinks with tiled layers, and the tiled gradients are as close to exact as the plain ones.

    Why against an fp32 reference and not tiled against plain directly: the compiled element-wise kernels
    round once to bf16 where eager rounds after each op, and tiling recomputes them in other groupings, so
    the two bf16 runs differ by their own rounding noise; with a mean-square loss over millions of outputs the
    gradients' sums cancel and that noise reaches several % of a gradient's largest entry (measured on a CPU
    with the kernels compiled: 2-6%, the same distance from fp32 for tiled and plain). Tiling reorders and
    regroups the same operations, so its distance from the fp32 result must be of the plain run's size:
    at most twice it (two rounding patterns of the same size), plus one bf16 unit of the largest entry."""
    torch.manual_seed(0)
    base = Transformer(tiny_config(num_hidden_layers=2, vocab_size=1024, hidden_size=1024, intermediate_size=3584,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=65536))
    apply_activation_checkpointing(base.model.layers)

    def step(dtype: torch.dtype, tile: int, tokens: int) -> tuple[float, dict[str, torch.Tensor]]:
        """One forward and backward: the working set per token and the gradients."""
        ids = torch.randint(0, 1024, (tokens,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        meta = make_sp_batch((tokens,), "local", None, backend="auto", device="cuda")
        m = copy.deepcopy(base).to(device="cuda", dtype=dtype)
        if tile:
            apply_tiled_layers(m.model.layers, tile)
        with track_working_set(torch.device("cuda")) as ws:
            m(ids, meta).float().square().mean().backward()
        return ws.kb_per_token(tokens), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.float()
                                         for n, p in m.named_parameters()}

    plain_kb, _ = step(torch.bfloat16, 0, 32768)
    tiled_kb, _ = step(torch.bfloat16, 4096, 32768)
    assert tiled_kb < 0.7 * plain_kb, (tiled_kb, plain_kb)
    # fp32 attention runs the math kernel, whose score matrix at 32K tokens is 32 GiB: the gradients at 8K
    exact, plain, tiled = (step(dtype, tile, 8192)[1] for dtype, tile in
                           ((torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 1024)))
    eps = torch.finfo(torch.bfloat16).eps
    for name, ref in exact.items():
        scale = ref.abs().max().item()
        err_plain = (plain[name] - ref).abs().max().item()
        err_tiled = (tiled[name] - ref).abs().max().item()
        assert err_tiled <= 2 * err_plain + eps * scale, (name, err_tiled, err_plain, scale)
