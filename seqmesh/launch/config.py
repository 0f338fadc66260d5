"""Compose the run configuration with Hydra, once, in the driver.

Workers never run Hydra: per-rank ``@hydra.main`` creates racing output directories and changes
the working directory under them (shared/NOTES.md). The driver composes, validates and hands the
workers a plain resolved dict.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seqmesh.trainer.config import ConfigError, RunConfig, config_from_dict


def conf_dir() -> Path:
    """The ``conf/`` folder beside the package (editable install), or ``$SEQMESH_CONF_DIR``."""
    path = Path(os.environ.get("SEQMESH_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; install seqmesh from its repository (pip install -e .) "
                          f"or set SEQMESH_CONF_DIR to the conf/ folder")
    return path


def _schema_leaf(path: str) -> bool:
    """Whether ``path`` (e.g. ``model.vocab_size``) names a value in the RunConfig schema."""
    cls: Any = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        hint = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(hint):
            cls = hint
        else:
            return i == len(parts) - 1
    return False


def _with_schema_keys(overrides: Sequence[str]) -> list[str]:
    """Let ``key=value`` set any schema key, also one a YAML file leaves at its default.

    Hydra refuses to override a key missing from the composed YAML (it wants ``+key=``); the
    schema, not the YAML, is what defines the keys, so such overrides become ``++key=value``.
    Unknown keys are left alone: Hydra and then the schema reject them with their names.
    """
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        out.append(f"++{o}" if "=" in o and key[:1] not in "+~" and _schema_leaf(key) else o)
    return out


def compose_dict(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Resolved plain dict of ``conf/config.yaml`` with Hydra ``overrides`` applied."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=_with_schema_keys(overrides))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override or config: {e}\n(overrides given: {' '.join(overrides) or 'none'}; "
                          f"groups live in {conf_dir()}: model/, parallel/, scheduler/, optim/, offload/, data/, "
                          f"launch/)") from e


def load_config(overrides: Sequence[str] = ()) -> RunConfig:
    """Compose and validate: the only way a run configuration is made."""
    return config_from_dict(compose_dict(overrides))
