"""The trainer prices its SP mode and its cluster's links: ``parallel.sp_mode`` and ``scheduler.cluster``."""

from pathlib import Path

import pytest
import torch

from seqmesh.trainer.build import build_cost_model
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.model import Transformer, tiny_config

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
