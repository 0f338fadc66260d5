"""Compose the run configuration with Hydra, once, in the driver.

Workers never run Hydra: per-rank ``@hydra.main`` creates racing output directories and changes
the working directory under them (shared/NOTES.md). The driver composes, validates and hands the
workers a plain resolved dict.
"""

from __future__ import annotations

import os
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


def compose_dict(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Resolved plain dict of ``conf/config.yaml`` with Hydra ``overrides`` applied."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override or config: {e}\n(overrides given: {' '.join(overrides) or 'none'}; "
                          f"groups live in {conf_dir()}: model/, parallel/, scheduler/, optim/, offload/, data/, launch/)") from e


def load_config(overrides: Sequence[str] = ()) -> RunConfig:
    """Compose and validate: the only way a run configuration is made."""
    return config_from_dict(compose_dict(overrides))
