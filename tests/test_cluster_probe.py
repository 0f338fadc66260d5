"""``seqmesh profile --cluster-out``: the ranks describe their nodes and links, and the file they write
reads back as the cluster they are."""

from __future__ import annotations

import pytest
import torch

from seqmesh.scheduler.links import parse_cluster
from seqmesh.trainer.cluster_probe import nic_class, nodes_of, probe_cluster
from tests.distributed import run_distributed


def _probe(rank: int, world: int) -> str:
    # 4 ranks as 2 nodes of 2: node h0 on InfiniBand, h1 on RoCE (so the fabrics meet over Ethernet)
    return probe_cluster(torch.device("cpu"), nbytes=1 << 20, repeats=2, host=lambda: f"h{rank // 2}",
                         nic=lambda: "infiniband" if rank < 2 else "roce")


def test_probed_file_describes_the_ranks_and_reads_back():
    texts = run_distributed(_probe, 4)
    assert len(set(texts)) == 1  # every rank gets the same file
    links = parse_cluster(texts[0])
    assert links.nodes == ("h0", "h1") and links.gpus_per_node == 2
    assert set(links.bandwidth_GBps) == {"pcie", "ethernet"}  # inside a node; between the two fabrics
    assert all(bw > 0 for bw in links.bandwidth_GBps.values())


def test_nic_class_reads_the_rdma_link_layers(tmp_path):
    assert nic_class(str(tmp_path / "none")) == "ethernet"
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "link_layer").write_text("Ethernet\n")
    assert nic_class(str(tmp_path)) == "roce"
    port2 = tmp_path / "mlx5_1" / "ports" / "1"
    port2.mkdir(parents=True)
    (port2 / "link_layer").write_text("InfiniBand\n")
    assert nic_class(str(tmp_path)) == "infiniband"


def test_nodes_must_be_blocks_of_equal_size():
    assert nodes_of([("a", "roce"), ("a", "roce"), ("b", "roce"), ("b", "roce")]) == ([("a", "roce"), ("b", "roce")], 2)
    with pytest.raises(ValueError, match="host 'a' holds ranks that are not consecutive"):
        nodes_of([("a", "roce"), ("b", "roce"), ("a", "roce")])
    with pytest.raises(ValueError, match="different numbers of ranks"):
        nodes_of([("a", "roce"), ("a", "roce"), ("b", "roce")])


def test_cluster_out_without_torchrun_says_how_to_run_it(tmp_path, capsys, monkeypatch):
    from seqmesh.trainer.profile import profile_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert profile_main(["--out", str(tmp_path / "cm.json"), "--cluster-out", str(tmp_path / "c.yaml"),
                         "--device", "cpu"]) == 2
    assert "--cluster-out measures links between ranks: run under torchrun" in capsys.readouterr().err
