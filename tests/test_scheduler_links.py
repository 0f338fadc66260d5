"""Link classes (Holmes): the cluster file, per-group link pricing, and link-aware placement."""

from pathlib import Path

import numpy as np
import pytest

from seqmesh.scheduler import Plan, plan_step, simulate
from seqmesh.scheduler.cli import plan_main
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.links import ClusterFileError, load_cluster, parse_cluster

ROOT = Path(__file__).resolve().parents[1]

# 16 ranks, 2 per node: nodes 0-2 on InfiniBand, 3-7 on RoCE, the fabrics joined by slow Ethernet.
# Aligned blocks of 4: [0,4) InfiniBand, [4,8) spans the Ethernet, [8,12) and [12,16) RoCE.
TWO_NIC = """\
format: seqmesh-cluster/1
gpus_per_node: 2
bandwidth_GBps:
  nvlink: 100
  infiniband: 40
  roce: 20
  ethernet: 1
nodes:
  - {name: ib, nic: infiniband, count: 3}
  - {name: roce, nic: roce, count: 5}
"""


def small_model() -> CostModel:
    """A model whose memory forces sequences over 6,000 tokens onto groups of 4 or more ranks."""
    return CostModel(alpha1_ms_per_tok2=1e-6, alpha2_ms_per_tok=0.02, beta_ms=2.0, a2a_GBps={},
                     comm_bytes_per_token=4e5, mem_bytes_per_token=1e6, mem_static_bytes=1e9,
                     mem_limit_bytes=4e9)


def test_example_file_reads_and_classes_follow_the_fabrics():
    links = load_cluster(ROOT / "conf" / "clusters" / "two_nic.yaml")
    assert links.nodes[:4] == ("ib-0", "ib-1", "ib-2", "roce-0") and links.world == 64
    cm = small_model().with_links(links)
    assert cm.block(0, 8).spans == frozenset({"nvlink"})
    assert cm.block(0, 16).spans == frozenset({"nvlink", "infiniband"})
    assert cm.block(16, 16).spans == frozenset({"nvlink", "ethernet"})  # ib-2 and roce-0
    assert "ethernet" in cm.block(0, 64).spans


def test_block_rates_follow_the_port_model():
    cm = small_model().with_links(parse_cluster(TWO_NIC))
    # inside a node: one peer over NVLink, 1/2 of the buffer -> the buffer moves at 2 x 100 GB/s
    assert cm.block(0, 2).a2a_GBps == pytest.approx(200.0)
    # 4 ranks on two InfiniBand nodes: 1/4 to the node peer (NVLink), 2/4 through the NIC
    assert cm.block(0, 4).a2a_GBps == pytest.approx(1 / max(1 / 4 / 100, 2 / 4 / 40))
    assert cm.block(4, 4).a2a_GBps == pytest.approx(1 / (2 / 4 / 1))  # across the Ethernet
    assert cm.block(4, 4).hop_GBps == 1.0 and cm.block(8, 4).hop_GBps == 20.0
    # Ulysses' time of a group is its own block's
    s = 8000
    assert cm.seq_ms(s, 4, first=4) - cm.seq_ms(s, 4, first=0) == pytest.approx(
        s * 4e5 / 4 / 1e6 * (1 / cm.block(4, 4).a2a_GBps - 1 / cm.block(0, 4).a2a_GBps))
    # without a block, the fastest aligned one (so bounds stay bounds)
    assert cm.seq_ms(s, 4) == pytest.approx(cm.seq_ms(s, 4, first=0))


def spans_slow_link(cm: CostModel, first: int, count: int) -> bool:
    return "ethernet" in cm.block(first, count).spans


@pytest.mark.parametrize("seed", range(6))
def test_planner_keeps_sp_groups_inside_fast_islands(seed):
    links = parse_cluster(TWO_NIC)
    cm = small_model().with_links(links)
    rng = np.random.default_rng(seed)
    long = rng.integers(6001, 11000, int(rng.integers(1, 6))).tolist()
    lengths = long + rng.integers(200, 3000, int(rng.integers(2, 40))).tolist()
    plan = plan_step(lengths, 16, cm)
    for mb in plan.microbatches:
        for g in mb.groups:
            if g.count > 1 and spans_slow_link(cm, g.first, g.count):
                islands = [b for b in cm.aligned_blocks(g.count, 16) if "ethernet" not in b.spans]
                assert not islands, f"group {g} crosses the Ethernet though {len(islands)} island blocks hold it"


def test_link_aware_placement_beats_link_oblivious_in_the_simulator():
    """The oblivious planner believes every inter-node link is InfiniBand (one inter-node figure, as
    before link classes); both plans are priced on the real two-NIC cluster."""
    links = parse_cluster(TWO_NIC)
    oblivious = small_model().with_links(parse_cluster(TWO_NIC.replace("nic: roce", "nic: infiniband")))
    aware = small_model().with_links(links)
    rng = np.random.default_rng(7)
    wins = []
    for _ in range(4):
        lengths = rng.integers(6001, 11000, 4).tolist() + rng.integers(200, 3000, 24).tolist()
        real_aware = simulate(plan_step(lengths, 16, aware), lengths, aware)
        real_oblivious = simulate(plan_step(lengths, 16, oblivious), lengths, aware)
        assert real_aware <= real_oblivious * (1 + 1e-9)
        wins.append(real_oblivious / real_aware)
    assert max(wins) > 1.5  # crossing a 1 GB/s link with a 4-rank all-to-all costs that much


@pytest.mark.parametrize("text, where", [
    (TWO_NIC.replace("infiniband, count: 3", "infinband, count: 3"), r"line 9: key 'nodes\[0\].nic': 'infinband' "
     r"is not one of .*; choose one of infiniband, roce, ethernet"),
    (TWO_NIC.replace("  ethernet: 1\n", ""), r"line 4: key 'bandwidth_GBps': no bandwidth for ethernet, which the "
     r"nodes use; add 'ethernet: GB/s'"),
    (TWO_NIC.replace("gpus_per_node: 2", "gpu_per_node: 2"), r"line 2: key 'gpu_per_node': unknown key; .*did you "
     r"mean 'gpus_per_node'"),
    (TWO_NIC.replace("roce: 20", "roce: -20"), r"line 6: key 'bandwidth_GBps.roce': -20 is not a bandwidth; give "
     "GB/s"),
    (TWO_NIC.replace("{name: roce,", "{name: ib,"), r"line 10: key 'nodes\[1\].name': node 'ib-0' is listed twice"),
    (TWO_NIC.replace("nic: roce, count: 5}", "nic: roce, count: 5, fabric: infiniband}"),
     r"line 10: key 'nodes\[1\].nic': fabric 'infiniband' already has nic infiniband \(line 9\).*own 'fabric'"),
    (TWO_NIC + "links:\n  - {nodes: [ib-0, gpu-9], class: roce}\n", r"line 12: key 'links\[0\].nodes': no node "
     r"is named 'gpu-9'"),
    (TWO_NIC.replace("format: seqmesh-cluster/1", "format: 2"), r"line 1: key 'format': 2 is not a format .*write "
     "seqmesh-cluster/1"),
    (TWO_NIC.replace("  - {name: roce", "  - {name: roce,,"), r"line 10: not valid YAML"),
    (TWO_NIC.replace("format: seqmesh-cluster/1\n", ""), r"key 'format': missing"),
])
def test_malformed_cluster_files_name_line_key_and_fix(text, where):
    with pytest.raises(ClusterFileError, match=where):
        parse_cluster(text, where="cluster file 'x.yaml'")


def test_explicit_links_override_the_rules_and_missing_file_is_named():
    links = parse_cluster(TWO_NIC + "links:\n  - {nodes: [ib-2, roce-0], class: roce}\n")
    cm = small_model().with_links(links)
    assert cm.block(4, 4).spans == frozenset({"nvlink", "roce"})
    with pytest.raises(ClusterFileError, match="not found; start from conf/clusters/two_nic.yaml"):
        load_cluster(ROOT / "no_such_cluster.yaml")
    with pytest.raises(ValueError, match="describes 8 nodes x 2 GPUs = 16 GPUs, but the plan needs 32 HDP ranks"):
        plan_step([100] * 4, 32, cm)


def test_plan_cli_takes_a_cluster_file(tmp_path, capsys):
    (tmp_path / "lengths.txt").write_text("\n".join(str(n) for n in [9000, 8000, 7000] + [500] * 29) + "\n")
    (tmp_path / "cost.json").write_text(small_model().to_json())
    (tmp_path / "c.yaml").write_text(TWO_NIC)
    base = ["--lengths", str(tmp_path / "lengths.txt"), "--gpus", "16", "--global-batch", "32",
            "--cost-model", str(tmp_path / "cost.json"), "--out", str(tmp_path / "p.jsonl")]
    assert plan_main(base + ["--cluster", str(tmp_path / "c.yaml")]) == 0
    cm = small_model().with_links(parse_cluster(TWO_NIC))
    plan = Plan.from_json((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert all("ethernet" not in cm.block(g.first, g.count).spans for mb in plan.microbatches for g in mb.groups)
    (tmp_path / "c.yaml").write_text(TWO_NIC.replace("roce: 20", "roce: fast"))
    capsys.readouterr()
    assert plan_main(base + ["--cluster", str(tmp_path / "c.yaml")]) == 2
    assert "line 6: key 'bandwidth_GBps.roce': 'fast' is not a bandwidth" in capsys.readouterr().err
