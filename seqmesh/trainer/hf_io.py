"""Hugging Face weights in and out.

`Transformer` names its parameters exactly as transformers' `LlamaForCausalLM` /
`Qwen2ForCausalLM` do, so both directions are a plain state-dict copy; what this module adds
is the HF directory layout (config.json + safetensors, sharded with an index when large, via
huggingface_hub), tied embeddings (HF stores the shared matrix once, as `model.embed_tokens`),
and errors that name the missing or unexpected tensors instead of a half-loaded model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import huggingface_hub
import torch
import transformers

from seqmesh.trainer.model import SUPPORTED_MODEL_TYPES, Transformer

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Checkpoint layouts written by save_pretrained, in the order transformers prefers them.
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# Old Llama checkpoints stored RoPE frequencies as tensors; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TIED_HEAD = "lm_head.weight"
_EMBEDDING = "model.embed_tokens.weight"


def save_hf(model: Transformer, path: str | Path) -> Path:
    """Write `model` as a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.

    The model must hold full tensors: gather tensor/data-parallel shards before calling.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [_ARCHITECTURES[model.dims.model_type]]
    config.tie_word_embeddings = model.dims.tie_embeddings
    dtype = next(model.parameters()).dtype
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    state = {
        name: tensor.detach().cpu()
        for name, tensor in model.state_dict().items()
        if not (model.dims.tie_embeddings and name == _TIED_HEAD)
    }
    huggingface_hub.save_torch_state_dict(state, path)
    config.save_pretrained(path)
    return path


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a `Transformer` from an HF model directory (safetensors or pytorch_model.bin, sharded or not).

    Parameters are held in `dtype` (fp32 by default: training keeps master weights in fp32).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a directory written by save_pretrained or save_hf")
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {config.model_type!r} (architectures={getattr(config, 'architectures', None)}) "
            f"is not supported; seqmesh loads {SUPPORTED_MODEL_TYPES}"
        )
    state = _read_state_dict(path)
    # Build without initialising: every parameter is about to be overwritten.
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.model.rotary_emb.reset_parameters()
    model.load_state_dict(_match_keys(model, state, path), strict=True)
    return model.to(dtype)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise FileNotFoundError(f"{path} holds no weights; expected one of {_WEIGHT_FILES}")
    if name.endswith(".index.json"):
        files = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
    else:
        files = [name]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        # Pickled .bin files go through torch's weights-only unpickler, which runs no code from the file.
        safe = file.endswith(".safetensors")
        state.update(
            huggingface_hub.load_state_dict_from_file(path / file, map_location="cpu", weights_only=True, safe=safe)
        )
    return state


def _match_keys(model: Transformer, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Map checkpoint tensors onto the model's names, failing with the full list of what is missing or extra."""
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if model.dims.tie_embeddings:
        # HF ties by taking the embedding; a stored head copy (some exporters write one) is redundant.
        state.pop(_TIED_HEAD, None)
        if _EMBEDDING in state:
            state[_TIED_HEAD] = state[_EMBEDDING]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"{path}: checkpoint does not match its config ({model.dims.model_type}, {model.dims.num_layers} layers, "
            f"tie_word_embeddings={model.dims.tie_embeddings}); missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f" ({len(missing)} in all), unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
            f" ({len(unexpected)} in all). Was it saved from a *ForCausalLM model?"
        )
    return state


__all__ = ["load_hf", "save_hf"]
