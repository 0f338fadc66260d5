"""Compose the run configuration with Hydra, once, in the driver.

Workers never run Hydra: per-rank ``@hydra.main`` creates racing output directories and changes
the working directory under them (shared/NOTES.md). The driver composes, validates and hands the
workers a plain resolved dict.

``resume=true`` starts from the run's *saved* configuration (``RUN_DIR/config.yaml``) and applies
only the overrides typed now; overrides that would not fit the run's checkpoints (model shape,
vocabulary, tokenizer, the data that fixes the token stream) are refused here, before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seqmesh.trainer.config import MOVED_KEYS, ConfigError, RunConfig, config_from_dict, moved_key_error

# Keys that belong to one invocation, never inherited from a resumed run's saved configuration.
PER_INVOCATION = ("run_dir", "resume", "overwrite", "stop_at")
# Keys a resumed run cannot change: its checkpoints hold tensors of the model's shape over the
# tokenizer's vocabulary, and its sampler position indexes the documents these data settings make.
FIXED_ON_RESUME = (
    "model.name", "model.arch", "model.hidden_size", "model.intermediate_size", "model.num_layers",
    "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.vocab_size", "model.tie_embeddings",
    "model.hf_path",
    "data.source", "data.tokenizer", "data.vocab_size", "data.text_column", "data.skip_bad_documents",
    "data.max_docs", "data.max_bytes", "data.val_fraction", "data.seed", "data.max_seq_len",
    "data.long_doc_policy", "data.global_batch",
)


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


def schema_keys(cls: Any = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (``steps``, ``model.num_layers``, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys += schema_keys(hints[f.name], path + ".") if dataclasses.is_dataclass(hints[f.name]) else [path]
    return keys


def _groups() -> set[str]:
    """Config groups (``model``, ``data``, ...): top-level schema sections with a conf/ folder."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def suggest_key(key: str) -> str:
    """`` (did you mean steps?)`` for a mistyped ``key``, or a pointer to the list of keys."""
    known = schema_keys()
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a right leaf under a wrong or missing section: num_layers -> model.num_layers
        last = key.rsplit(".", 1)[-1]
        by_leaf: dict[str, list[str]] = {}
        for k in known:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        close = [k for leaf in difflib.get_close_matches(last, list(by_leaf), n=2, cutoff=0.75) for k in by_leaf[leaf]]
    if close:
        return f"did you mean {' or '.join(close[:2])}?"
    return "`seqmesh config` prints every key with its value"


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _check_override_keys(overrides: Sequence[str]) -> None:
    """Refuse ``stepz=3`` with the nearest known key, before Hydra's "use +stepz=3" hint misleads."""
    groups = _groups()
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} has no '=': write KEY=VALUE, e.g. steps=50 or model=tiny")
        key = _override_key(o)
        if key in MOVED_KEYS:
            raise moved_key_error(key)
        if key in groups or _schema_leaf(key) or key.startswith("hydra."):
            continue
        raise ConfigError(f"unknown key {key!r} in {o!r}; {suggest_key(key)}")


def _with_schema_keys(overrides: Sequence[str]) -> list[str]:
    """Let ``key=value`` set any schema key, also one a YAML file leaves at its default.

    Hydra refuses to override a key missing from the composed YAML (it wants ``+key=``); the
    schema, not the YAML, is what defines the keys, so such overrides become ``++key=value``.
    """
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        out.append(f"++{o}" if "=" in o and key[:1] not in "+~" and _schema_leaf(key) else o)
    return out


def compose_dict(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Resolved plain dict of ``conf/config.yaml`` with Hydra ``overrides`` applied."""
    _check_override_keys(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=_with_schema_keys(overrides))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override or config: {e}\n(overrides given: {' '.join(overrides) or 'none'}; "
                          f"groups live in {conf_dir()}: model/, parallel/, scheduler/, memory/, optim/, offload/, "
                          f"data/, launch/)") from e


def _get(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = copy.deepcopy(value)


_MISSING = object()


def _fill(base: dict[str, Any], saved: dict[str, Any], prefix: str = "") -> list[str]:
    """Copy ``saved``'s values over ``base`` where the schema still has the key; returns keys dropped."""
    dropped = []
    for key, value in saved.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            dropped += _fill(base[key], value, path + ".")
        elif key in base and not isinstance(base[key], dict):
            base[key] = copy.deepcopy(value)
        else:
            dropped.append(path)
    return dropped


def translate_moved_keys(saved: dict[str, Any]) -> list[str]:
    """Rename, in place, the keys of ``saved`` that have moved since it was written (``MOVED_KEYS``);
    returns ``old -> new`` for each one renamed. A value already under the new key wins."""
    renamed = []
    for old, new in MOVED_KEYS.items():
        value = _get(saved, old)
        if value is _MISSING:
            continue
        section, leaf = old.rsplit(".", 1)
        del _get(saved, section)[leaf]
        if _get(saved, new) is _MISSING:
            _set(saved, new, value)
        renamed.append(f"{old} -> {new}")
    return renamed


def saved_config_path(run_dir: str) -> Path:
    return Path(run_dir).expanduser() / "config.yaml"


def resume_dict(overrides: Sequence[str], now: dict[str, Any]) -> dict[str, Any]:
    """The saved configuration of ``now['run_dir']`` with the overrides typed now applied on top.

    ``now`` is the configuration composed from the defaults and the overrides; it supplies the
    values of the typed keys (a group choice such as ``optim=fp8`` supplies its whole section) and of
    keys the saved file predates. Raises ConfigError for overrides the run's checkpoints cannot take.
    """
    path = saved_config_path(now["run_dir"])
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"resume=true: cannot read the run's saved configuration {path} ({e}); restore it, or "
                          f"start a new run with another run_dir=...") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"resume=true: {path} is not a seqmesh configuration (not a mapping); restore it, or "
                          f"start a new run with another run_dir=...")
    renamed = translate_moved_keys(saved)
    if renamed:
        print(f"seqmesh: note: {path} was saved with keys that have since moved, read under their new names: "
              f"{', '.join(renamed)}", file=sys.stderr)
    merged = dataclasses.asdict(RunConfig())  # every schema key, also those no YAML file names
    _fill(merged, now)
    dropped = _fill(merged, saved)
    if dropped:
        print(f"seqmesh: note: {path} has keys this version no longer knows, ignored: {', '.join(dropped)}",
              file=sys.stderr)
    typed = {_override_key(o) for o in overrides if not o.startswith("~")} | set(PER_INVOCATION)
    for key in sorted(typed):
        value = _get(now, key)
        if value is not _MISSING:
            _set(merged, key, value)
    changed = [(k, _get(saved, k), _get(merged, k)) for k in FIXED_ON_RESUME
               if _get(saved, k) is not _MISSING and _get(saved, k) != _get(merged, k)]
    if changed:
        what = ", ".join(f"{k}={new!r} (the run has {old!r})" for k, old, new in changed)
        raise ConfigError(
            f"cannot resume {Path(now['run_dir']).expanduser().resolve()} with {what}: a run's checkpoints fit only "
            f"its own model shape, vocabulary, tokenizer and data settings, so those cannot change on resume. Drop "
            f"the override to continue the run as saved (resume=true takes every other setting from {path}), or "
            f"train a new model with another run_dir=... (or overwrite=true to replace this run). Nothing was "
            f"changed in the run directory.")
    return merged


def load_config(overrides: Sequence[str] = ()) -> RunConfig:
    """Compose and validate: the only way a run configuration is made.

    With ``resume=true`` and a saved ``RUN_DIR/config.yaml``, the saved configuration is the base and
    only the overrides typed now change it (see ``resume_dict``).
    """
    now = compose_dict(overrides)
    if now.get("resume") and saved_config_path(str(now.get("run_dir", ""))).is_file():
        return config_from_dict(resume_dict(overrides, now))
    return config_from_dict(now)
