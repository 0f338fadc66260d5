import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.trainer.model import Transformer, model_dims, tiny_config

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _hidden(model: Transformer, ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    return model(ids, make_sp_batch(seqlens, "local", None))


def test_packed_stream_equals_each_document_alone():
    torch.manual_seed(0)
    model = Transformer(tiny_config(**SMALL, tie_word_embeddings=False)).eval()
    seqlens = [7, 1, 13, 4, 20]
    ids = torch.randint(0, SMALL["vocab_size"], (sum(seqlens),))
    with torch.no_grad():
        packed = _hidden(model, ids, seqlens)
        alone = torch.cat([_hidden(model, doc, [len(doc)]) for doc in ids.split(seqlens)])
    assert packed.shape == (sum(seqlens), SMALL["hidden_size"])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_document_boundary_blocks_attention_and_restarts_positions():
    """Changing a document changes nothing in its neighbours; a document's output does not depend on where it sits."""
    torch.manual_seed(1)
    model = Transformer(tiny_config(**SMALL)).eval()
    first, second = torch.randint(0, 97, (9,)), torch.randint(0, 97, (6,))
    other_first = torch.randint(0, 97, (9,))
    with torch.no_grad():
        a = _hidden(model, torch.cat([first, second]), [9, 6])
        b = _hidden(model, torch.cat([other_first, second]), [9, 6])
        c = _hidden(model, torch.cat([second, first]), [6, 9])
    assert (a[:9] - b[:9]).abs().max() > 1e-3
    torch.testing.assert_close(a[9:], b[9:], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[9:], c[:6], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    model = Transformer(tiny_config(**SMALL, attention_bias=True, mlp_bias=True))
    ids = torch.randint(0, 97, (12,))
    model.logits(_hidden(model, ids, [5, 7])).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_match_transformers(rope):
    config = tiny_config(**SMALL, rope_parameters=dict(rope))
    ours = Transformer(config).model.rotary_emb
    theirs = LlamaRotaryEmbedding(config)
    torch.testing.assert_close(ours.inv_freq, theirs.inv_freq.float(), atol=0, rtol=0)
    assert ours.attention_scaling == pytest.approx(theirs.attention_scaling)


def test_dtype_cast_keeps_rope_frequencies_fp32():
    model = Transformer(tiny_config(**SMALL))
    before = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, before, atol=0, rtol=0)


def test_meta_construction_then_materialise():
    config = tiny_config(**SMALL)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    reference = Transformer(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert model.model.layers[0].input_layernorm.weight.eq(1).all()
    assert 0.015 < model.model.layers[1].mlp.up_proj.weight.std() < 0.025


def test_parameter_counts_match_transformers():
    for tied in (True, False):
        config = tiny_config(**SMALL, tie_word_embeddings=tied)
        hf = transformers.LlamaForCausalLM(config)
        model = Transformer(config)
        assert model.num_params() == sum(p.numel() for p in hf.parameters())
        embedding = SMALL["vocab_size"] * SMALL["hidden_size"]
        assert model.num_params(exclude_embeddings=True) == model.num_params() - (0 if tied else embedding)
        assert set(model.state_dict()) == set(hf.state_dict())


def test_tiny_config_defaults_and_typos():
    model = Transformer(tiny_config())
    assert 5e6 <= model.num_params() <= 30e6
    dims = model.dims
    assert (dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (6, 8, 4, 32)
    assert tiny_config(vocab_size=500).vocab_size == 500
    with pytest.raises(ValueError, match="unknown LlamaConfig field.*hiden_size"):
        tiny_config(hiden_size=128)


def test_from_config_dict_builds_the_same_model():
    config = tiny_config(**SMALL)
    model = Transformer.from_config_dict(config.to_dict())
    assert model.dims == model_dims(config)
    with pytest.raises(ValueError, match="model.model_type must be one of"):
        Transformer.from_config_dict({"hidden_size": 64})


def _broken(change: dict) -> transformers.PretrainedConfig:
    config = tiny_config(**SMALL)
    for key, value in change.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"head_dim": None, "num_attention_heads": 5}, "hidden_size=64 is not divisible by num_attention_heads=5"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"head_dim": 15}, "head_dim must be a positive even number"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
    ],
)
def test_bad_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        Transformer(_broken(change))


def test_unsupported_architectures_are_named():
    with pytest.raises(ValueError, match="got 'gpt2'"):
        Transformer(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4))
    qwen = transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window attention is not supported"):
        Transformer(qwen)


def test_input_must_be_one_packed_stream():
    model = Transformer(tiny_config(**SMALL))
    with pytest.raises(ValueError, match="one packed stream of shape \\[T\\]"):
        model(torch.zeros(2, 4, dtype=torch.long), make_sp_batch([8], "local", None))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["autocast", "bf16-weights"])
def test_bf16_on_gpu_matches_fp32_reference(precision):
    """On CUDA the packed varlen flash path runs in bf16 (autocast or bf16 weights) and stays close to fp32."""
    torch.manual_seed(4)
    config = tiny_config(**{**SMALL, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512})
    reference = Transformer(config).cuda()
    seqlens = [100, 3, 257, 64]
    ids = torch.randint(0, SMALL["vocab_size"], (sum(seqlens),), device="cuda")
    meta = make_sp_batch(seqlens, "local", None, device="cuda")
    with torch.no_grad():
        expected = reference.logits(reference(ids, meta))
        if precision == "autocast":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = reference.logits(reference(ids, meta))
        else:
            model = Transformer(config).cuda()
            model.load_state_dict(reference.state_dict())
            model.to(torch.bfloat16)
            got = model.logits(model(ids, meta))
            alone = torch.cat([model.logits(model(doc, make_sp_batch([len(doc)], "local", None, device="cuda")))
                               for doc in ids.split(seqlens)])
            torch.testing.assert_close(got, alone, atol=2e-2, rtol=0)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_and_swiglu_match_eager_on_cuda(dtype):
    """The Inductor-compiled RoPE and SwiGLU equal the eager math, forward and backward, for two
    token counts (one dynamic-shape graph) and the GQA head counts of q and k."""
    from seqmesh.trainer.model import _rotary, _swiglu, apply_rotary, swiglu

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for tokens, heads in ((37, 8), (130, 2)):
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, heads, 64, device="cuda", dtype=dtype, generator=g)
        angles = torch.randn(tokens, 64, device="cuda", generator=g)
        gate, up = (torch.randn(tokens, 96, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        for fused, eager, args in ((apply_rotary, _rotary, (x, angles.cos(), angles.sin())),
                                   (swiglu, _swiglu, (gate, up))):
            leaves = [[a.clone().requires_grad_(a.dtype == dtype) for a in args] for _ in range(2)]
            outs = [fn(*ls) for fn, ls in zip((fused, eager), leaves)]
            torch.testing.assert_close(outs[0], outs[1], **tol)
            dout = torch.randn_like(outs[0])
            grads = [torch.autograd.grad(o, [a for a in ls if a.requires_grad], dout) for o, ls in zip(outs, leaves)]
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, **tol)
