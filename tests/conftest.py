"""Shared test helpers and fixtures.

Plain functions (importable as ``from tests.conftest import ...``, also inside the worker processes
of ``tests.distributed.run_distributed``, which cannot take fixtures) and the fixtures that wrap them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cost_model_of(cfg, model: torch.nn.Module, device: torch.device):
    """The cost model a run of ``cfg`` builds for ``model`` (``build.build_parallel_model``'s call)."""
    from seqmesh.trainer.build import build_cost_model

    return build_cost_model(model, device, cfg.model, cfg.parallel, cfg.memory, hdp=cfg.hdp,
                            profile=cfg.scheduler.cost_model, state_dtype=cfg.optim.state_dtype)


# A model small enough for multi-process CPU tests (the ``model`` section of a run config).
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def merged(base: dict, **sections) -> dict:
    """``base`` with ``sections`` merged in: a dict value updates that section, anything else replaces it."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in sections.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_overrides(**sections) -> dict:
    """A run config dict for ``config_from_dict`` with ``TINY_MODEL`` and ``sections`` merged in."""
    return merged({"model": TINY_MODEL}, **sections)


def tiny_run_config(**sections):
    """The validated ``RunConfig`` of ``tiny_overrides(**sections)``."""
    from seqmesh.trainer.config import config_from_dict

    return config_from_dict(tiny_overrides(**sections))


def write_corpus(tmp: Path, sizes: list[int]) -> Path:
    """``tmp/corpus``: one text document per entry of ``sizes``, ``docNN.txt`` of that many characters of
    torch's ``functional.py`` (document i from offset 997 * i): real text of chosen lengths."""
    src = tmp / "corpus"
    src.mkdir()
    text = Path(torch.__file__).parent.joinpath("functional.py").read_text()
    for i, n in enumerate(sizes):
        (src / f"doc{i:02d}.txt").write_text(text[i * 997:i * 997 + n])
    return src


# The step-loop tests' corpus: 40 documents of 200 to 2267 characters.
CORPUS_SIZES = [200 + 53 * i for i in range(40)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """``write_corpus(tmp_path, CORPUS_SIZES)``."""
    return write_corpus(tmp_path, CORPUS_SIZES)


@pytest.fixture(name="tiny_run_config")
def tiny_run_config_fixture():
    """The ``tiny_run_config(**sections)`` factory."""
    return tiny_run_config
