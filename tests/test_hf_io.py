import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from seqmesh.parallel.sequence import make_sp_batch
from seqmesh.trainer.hf_io import load_hf, save_hf
from seqmesh.trainer.model import Transformer, tiny_config

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

CONFIGS = {
    "llama-tied": lambda: tiny_config(**SMALL, tie_word_embeddings=True),
    "llama-untied-gqa-bias": lambda: tiny_config(**SMALL, tie_word_embeddings=False, attention_bias=True,
                                                 mlp_bias=True, rms_norm_eps=1e-6),
    "llama-mha-llama3-rope": lambda: tiny_config(**{**SMALL, "num_key_value_heads": 4}, rope_parameters=LLAMA3_ROPE),
    "llama-explicit-head-dim": lambda: tiny_config(**SMALL, head_dim=24),
    "qwen2-untied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False, rope_theta=1e6),
    "qwen2-tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
}


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (HF initialises biases to 0 and norms to 1, which would hide a mix-up)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)


def _our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids, make_sp_batch([len(ids)], "local", None)))


def _hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_seqmesh_model_loads_in_transformers_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name]()).eval()
    _randomise(model)
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model.dims.model_type]
    ids = torch.randint(0, SMALL["vocab_size"], (48,))
    torch.testing.assert_close(_our_logits(model, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_model_loads_in_seqmesh_with_same_logits(name, tmp_path):
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    assert model.dims.tie_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    ids = torch.randint(0, SMALL["vocab_size"], (48,))
    torch.testing.assert_close(_our_logits(model, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_round_trip_is_exact_and_tied_matrix_stored_once(tmp_path):
    model = Transformer(tiny_config(**SMALL, tie_word_embeddings=True))
    _randomise(model)
    save_hf(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_hf(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_model_saves_as_bf16_and_loads_in_requested_dtype(tmp_path):
    model = Transformer(tiny_config(**SMALL)).to(torch.bfloat16)
    save_hf(model, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert next(load_hf(tmp_path).parameters()).dtype == torch.float32
    loaded = load_hf(tmp_path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


def test_sharded_and_pickled_checkpoints_load(tmp_path):
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(tiny_config(**SMALL, tie_word_embeddings=False)).eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    pickled = tmp_path / "pickled"
    hf.config.save_pretrained(pickled)
    state = {**hf.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    torch.save(state, pickled / "pytorch_model.bin")
    ids = torch.randint(0, SMALL["vocab_size"], (20,))
    for directory in (tmp_path / "sharded", pickled):
        torch.testing.assert_close(_our_logits(load_hf(directory), ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_hf(Transformer(tiny_config(**SMALL)), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*"
                                       r"unexpected \['model.layers.1.mlp.extra.weight'\]"):
        load_hf(tmp_path)


def test_wrong_shape_is_an_error(tmp_path):
    save_hf(Transformer(tiny_config(**SMALL)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.mlp.gate_proj.weight"):
        load_hf(tmp_path)


def test_unsupported_or_incomplete_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf(tmp_path)
    transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'.*is not supported"):
        load_hf(tmp_path / "gpt2")
    tiny_config(**SMALL).save_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_hf(tmp_path / "empty")
