"""The trainer prices its SP mode and its cluster's links: ``parallel.sp_mode`` and ``scheduler.cluster``."""

import json
from pathlib import Path

import pytest
import torch

from seqmesh.trainer.build import build_cost_model
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.model import Transformer, tiny_config
from tests.conftest import tiny_overrides, write_corpus
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = str(ROOT / "conf" / "clusters" / "two_nic.yaml")


def _cost_model(overrides: dict):
    cfg = config_from_dict(overrides)
    model = Transformer(tiny_config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    return build_cost_model(model, torch.device("cpu"), cfg.model, cfg.parallel, cfg.memory, hdp=4,
                            cluster=cfg.scheduler.cluster)


def test_sp_mode_and_cluster_reach_the_cost_model():
    cm = _cost_model({"parallel": {"sp_mode": "tokenring"}, "scheduler": {"cluster": CLUSTER},
                      "launch": {"num_workers": 4}})
    assert (cm.attention.mode, cm.attention.q_heads, cm.attention.kv_heads, cm.attention.head_dim,
            cm.attention.layers) == ("tokenring", 4, 2, 16, 2)
    assert cm.attention.p2p_GBps == cm.a2a_GBps          # the profile's all-to-all figure, for want of p2p
    assert cm.links is not None and cm.block(0, 4).spans == frozenset({"nvlink"})
    plain = _cost_model({"launch": {"num_workers": 4}})
    assert plain.attention.mode == "ulysses" and plain.links is None
    assert plain.seq_ms(300, 2) == pytest.approx(_cost_model({"parallel": {"sp_mode": "hybrid"},
                                                               "launch": {"num_workers": 4}}).seq_ms(300, 2))


def test_a_bad_cluster_file_fails_in_the_driver_naming_key_line_and_fix(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(Path(CLUSTER).read_text().replace("nic: roce", "nic: rocee"))
    with pytest.raises(ConfigError, match=r"scheduler.cluster: cluster file .*c.yaml', line \d+: key 'nodes\[1\].nic': "
                                          r"'rocee' .*choose one of infiniband, roce, ethernet"):
        config_from_dict({"scheduler": {"cluster": str(bad)}})
    with pytest.raises(ConfigError, match="scheduler.cluster: cluster file .* not found"):
        config_from_dict({"scheduler": {"cluster": str(tmp_path / "none.yaml")}})


def _train_auto(rank: int, world: int, overrides: dict, run_dir: str) -> list[dict]:
    from seqmesh.trainer.loop import train

    train(config_from_dict(overrides), run_dir, torch.device("cpu"))
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()] if rank == 0 else []


def test_sp_mode_auto_trains_with_the_modes_its_plans_name(tmp_path):
    """Groups of 2 forced (scheduler.group_sizes), sp_mode=auto: every SP group must get its mode from
    the plan (the layout refuses a group without one), through the plan-ahead broadcast."""
    src = write_corpus(tmp_path, [300 + 41 * i for i in range(16)])
    overrides = tiny_overrides(
        data={"source": str(src), "tokenizer": "byte", "max_seq_len": 128, "global_batch": 4,
              "cache_dir": str(tmp_path / "cache")},
        launch={"num_workers": 2}, parallel={"sp_mode": "auto"}, steps=3, ckpt_every=0, eval_every=0,
        scheduler={"policy": "adaptive", "group_sizes": [2], "lookahead": 1})
    records = run_distributed(_train_auto, 2, overrides, str(tmp_path / "run"))[0]
    assert len(records) == 3 and all(r["plan_max_group"] == 2 for r in records)
    assert all(r["loss"] == r["loss"] for r in records)  # finite numbers, not NaN
