"""Link classes between the ranks of a cluster, read from a cluster description file (Holmes).

Why: a cluster of mixed NICs (Holmes, "Towards Distributed Training across Clusters with
Heterogeneous NIC Environments") is not one intra-node and one inter-node bandwidth. Two nodes on
the same InfiniBand fabric talk at InfiniBand speed, an InfiniBand node and a RoCE node only over
the Ethernet between the fabrics; an SP group that spans that boundary runs all of its attention
traffic at the slowest link it crosses. So the cost model prices every group by the links *its*
ranks use (``block``), and the planner then keeps SP groups inside fast islands and leaves the
slow links to data parallelism (one gradient reduction per step).

**The file** (YAML; ``conf/clusters/`` has examples; ``load_cluster`` reads it)::

    format: seqmesh-cluster/1
    gpus_per_node: 8              # GPUs of one node (world ranks k*8 .. k*8+7 are node k)
    intra_node: nvlink            # class between GPUs of one node: nvlink or pcie (default nvlink)
    between_fabrics: ethernet     # class between nodes of different fabrics (default ethernet)
    bandwidth_GBps:               # per GPU and direction, what a collective reaches (measure it)
      nvlink: 111
      infiniband: 40
      roce: 20
      ethernet: 1.5
    nodes:                        # in world-rank order
      - {name: ib, nic: infiniband, count: 3}          # ib-0, ib-1, ib-2 (fabric "infiniband")
      - {name: roce, nic: roce, count: 5, fabric: B}
    links:                        # optional: the class of one node pair, overriding the rules
      - {nodes: [ib-2, roce-0], class: roce}

Two nodes of one fabric (``fabric``, by default the NIC class) talk over that NIC class; nodes of
different fabrics over ``between_fabrics``; every class used needs a ``bandwidth_GBps`` entry (no
figure is made up). A malformed file raises ``ClusterFileError`` naming the file, the line, the
key and the fix.

**The link model** (what ``Block`` derives). Every GPU has one port per link class (its NVLink to
the NVSwitch, its NIC), each with the class's bandwidth per direction, shared by all the peers it
reaches through that class; different classes run in parallel, egress and ingress independently.
That is how switched fabrics (NVSwitch, InfiniBand, RoCE, Ethernet) behave, and it is what decides
TokenRing against a K/V ring (``seqmesh.scheduler.sp_comm``): a GPU's query pack and block result
leave through the same port when their peers sit behind the same class.

The planner works on HDP ranks; with TP innermost, HDP rank ``h`` of the first pipeline stage is
world rank ``h * tp`` (later stages are assumed to see the same links).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

FORMAT = "seqmesh-cluster/1"
LINK_CLASSES = ("nvlink", "pcie", "infiniband", "roce", "ethernet")
INTRA_CLASSES = ("nvlink", "pcie")
_TOP_KEYS = ("format", "gpus_per_node", "intra_node", "between_fabrics", "bandwidth_GBps", "nodes", "links")
_NODE_KEYS = ("name", "nic", "fabric", "count")


class ClusterFileError(ValueError):
    """A cluster description that cannot be read: the message names the file, line, key and fix."""


@dataclass(frozen=True)
class Block:
    """What a group of ranks sees of the cluster: the inputs of its collectives' times.

    ``a2a_GBps``: all-to-all rate of a rank's whole buffer (bytes over time: each rank sends ``1/d``
    of it to every peer, its time set by its busiest port). ``hop_GBps``: the slowest link of the
    ring ``r -> r + 1`` (wrapping). ``classes``: the rank -> rank class matrix (indices into
    ``LINK_CLASSES``), which TokenRing's pricing reads per step; ``bandwidth``: GB/s per class index.
    """

    first: int
    size: int
    a2a_GBps: float
    hop_GBps: float
    classes: np.ndarray = field(repr=False, compare=False)
    bandwidth: np.ndarray = field(repr=False, compare=False)
    spans: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple:
        """Blocks with equal keys communicate alike (same link pattern): their times are computed once."""
        return (self.size, self.classes.tobytes())


@dataclass(frozen=True)
class ClusterLinks:
    """The link class of every pair of nodes, and what each class delivers."""

    gpus_per_node: int
    nodes: tuple[str, ...]
    node_class: np.ndarray = field(repr=False, compare=False)   # [nodes, nodes] class index
    bandwidth_GBps: dict[str, float] = field(default_factory=dict)
    source: str = ""
    _bw: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bw", np.array([self.bandwidth_GBps.get(c, np.nan) for c in LINK_CLASSES]))

    @property
    def world(self) -> int:
        return self.gpus_per_node * len(self.nodes)

    def hdp_nodes(self, hdp: int, tp: int = 1) -> np.ndarray:
        """Node of every HDP rank (first pipeline stage; TP innermost, so HDP rank h is world rank h * tp)."""
        if hdp * tp > self.world:
            raise ValueError(f"{self.source or 'the cluster file'} describes {len(self.nodes)} nodes x "
                             f"{self.gpus_per_node} GPUs = {self.world} GPUs, but the plan needs {hdp} HDP ranks x "
                             f"tp {tp} = {hdp * tp}; list every node of the job in the cluster file")
        return (np.arange(hdp) * tp) // self.gpus_per_node

    def block(self, rank_nodes: np.ndarray, first: int, size: int) -> Block:
        """The links a group of HDP ranks ``[first, first + size)`` uses (``rank_nodes`` from ``hdp_nodes``)."""
        nodes = rank_nodes[first:first + size]
        classes = self.node_class[np.ix_(nodes, nodes)]
        bw = self._bw
        # all-to-all: rank r sends 1/size of its buffer to each peer; per port (class) the bytes add up
        peers = np.zeros((size, len(LINK_CLASSES)))
        for c in np.unique(classes):
            peers[:, c] = (classes == c).sum(axis=1)
        peers[np.arange(size), classes[np.arange(size), np.arange(size)]] -= 1  # not itself
        with np.errstate(invalid="ignore"):
            busiest = np.nanmax(np.where(peers > 0, peers / size / bw, 0.0))
        hops = classes[np.arange(size), (np.arange(size) + 1) % size]
        spans = frozenset(LINK_CLASSES[c] for c in np.unique(classes))
        return Block(first, size, float(1.0 / busiest) if busiest > 0 else math.inf, float(bw[hops].min()),
                     classes, bw, spans)


# ---- reading the file ---------------------------------------------------------------------------

class _Reader:
    """Turns the YAML node tree into values, remembering each key's line for the error messages."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, node: yaml.Node | None, key: str, problem: str, fix: str) -> ClusterFileError:
        line = f", line {node.start_mark.line + 1}" if node is not None else ""
        return ClusterFileError(f"{self.where}{line}: key '{key}': {problem}; {fix}")

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, "expected a mapping (key: value lines)", f"write it as {{{', '.join(allowed)}}}")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            name = str(k.value)
            if name not in allowed:
                close = min(allowed, key=lambda a: _distance(a, name))
                raise self.fail(k, f"{key}.{name}" if key else name, "unknown key",
                                f"the keys here are {', '.join(allowed)} (did you mean '{close}'?)")
            if name in out:
                raise self.fail(k, f"{key}.{name}" if key else name, "given twice", "keep one")
            out[name] = v
        return out

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, "expected a single value", "write one value after the colon")
        return yaml.safe_load(yaml.serialize(node))

    def choice(self, node: yaml.Node, key: str, choices: tuple[str, ...]) -> str:
        value = self.scalar(node, key)
        if value not in choices:
            raise self.fail(node, key, f"{value!r} is not one of the link classes it takes",
                            f"choose one of {', '.join(choices)}")
        return value

    def integer(self, node: yaml.Node, key: str, least: int = 1) -> int:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise self.fail(node, key, f"{value!r} is not an integer >= {least}", f"give a whole number >= {least}")
        return value

    def seq(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, key, "expected a non-empty list", "write one '- ...' line per entry")
        return list(node.value)


def _distance(a: str, b: str) -> int:
    """Edit distance, for 'did you mean' hints."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def parse_cluster(text: str, where: str = "cluster file") -> ClusterLinks:
    """A ``ClusterLinks`` from the text of a cluster description (module docstring)."""
    r = _Reader(where)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ClusterFileError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax "
                               "(see conf/clusters/ for examples)") from None
    if root is None:
        raise ClusterFileError(f"{where}: the file is empty; start from an example in conf/clusters/")
    top = r.mapping(root, "", _TOP_KEYS)
    for key in ("format", "gpus_per_node", "bandwidth_GBps", "nodes"):
        if key not in top:
            raise r.fail(root, key, "missing", f"a cluster file needs {', '.join(('format', 'gpus_per_node', 'bandwidth_GBps', 'nodes'))} (see conf/clusters/)")
    fmt = r.scalar(top["format"], "format")
    if fmt != FORMAT:
        raise r.fail(top["format"], "format", f"{fmt!r} is not a format this seqmesh reads", f"write {FORMAT}")
    gpus_per_node = r.integer(top["gpus_per_node"], "gpus_per_node")
    intra = r.choice(top["intra_node"], "intra_node", INTRA_CLASSES) if "intra_node" in top else "nvlink"
    between = r.choice(top["between_fabrics"], "between_fabrics", LINK_CLASSES) \
        if "between_fabrics" in top else "ethernet"

    bandwidth: dict[str, float] = {}
    for cls, node in r.mapping(top["bandwidth_GBps"], "bandwidth_GBps", LINK_CLASSES).items():
        value = r.scalar(node, f"bandwidth_GBps.{cls}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise r.fail(node, f"bandwidth_GBps.{cls}", f"{value!r} is not a bandwidth",
                         "give GB/s per GPU and direction as a number > 0")
        bandwidth[cls] = float(value)

    names: list[str] = []
    nic: list[str] = []
    fabric: list[str] = []
    fabric_nic: dict[str, tuple[str, yaml.Node]] = {}
    for k, entry in enumerate(r.seq(top["nodes"], "nodes")):
        key = f"nodes[{k}]"
        fields = r.mapping(entry, key, _NODE_KEYS)
        for need in ("name", "nic"):
            if need not in fields:
                raise r.fail(entry, f"{key}.{need}", "missing", "every node entry needs a name and a nic")
        name = str(r.scalar(fields["name"], f"{key}.name"))
        card = r.choice(fields["nic"], f"{key}.nic", tuple(c for c in LINK_CLASSES if c not in INTRA_CLASSES))
        fab = str(r.scalar(fields["fabric"], f"{key}.fabric")) if "fabric" in fields else card
        if fab in fabric_nic and fabric_nic[fab][0] != card:
            raise r.fail(fields.get("fabric", fields["nic"]), f"{key}.nic",
                         f"fabric {fab!r} already has nic {fabric_nic[fab][0]} (line "
                         f"{fabric_nic[fab][1].start_mark.line + 1}), this node {card}",
                         "nodes of one fabric share one NIC class: give this node its own 'fabric'")
        fabric_nic.setdefault(fab, (card, entry))
        count = r.integer(fields["count"], f"{key}.count") if "count" in fields else None
        new = [name] if count is None else [f"{name}-{i}" for i in range(count)]
        for n in new:
            if n in names:
                raise r.fail(fields["name"], f"{key}.name", f"node {n!r} is listed twice", "give every node its own name")
        names += new
        nic += [card] * len(new)
        fabric += [fab] * len(new)

    index = {n: i for i, n in enumerate(names)}
    cls_index = {c: i for i, c in enumerate(LINK_CLASSES)}
    fab = np.array(fabric)
    same = fab[:, None] == fab[None, :]
    nic_idx = np.array([cls_index[c] for c in nic])
    node_class = np.where(same, nic_idx[:, None], cls_index[between]).astype(np.int8)
    np.fill_diagonal(node_class, cls_index[intra])
    for k, entry in enumerate(r.seq(top["links"], "links") if "links" in top else []):
        key = f"links[{k}]"
        fields = r.mapping(entry, key, ("nodes", "class"))
        if set(fields) != {"nodes", "class"}:
            raise r.fail(entry, key, "needs both 'nodes' and 'class'", "write {nodes: [A, B], class: CLASS}")
        pair = [str(r.scalar(n, f"{key}.nodes")) for n in r.seq(fields["nodes"], f"{key}.nodes")]
        if len(pair) != 2 or pair[0] == pair[1]:
            raise r.fail(fields["nodes"], f"{key}.nodes", f"{pair} is not two different nodes", "name two nodes")
        for n in pair:
            if n not in index:
                raise r.fail(fields["nodes"], f"{key}.nodes", f"no node is named {n!r}",
                             f"use a name from 'nodes' ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        cls = r.choice(fields["class"], f"{key}.class", tuple(c for c in LINK_CLASSES if c not in INTRA_CLASSES))
        a, b = index[pair[0]], index[pair[1]]
        node_class[a, b] = node_class[b, a] = cls_index[cls]
    off_diagonal = node_class[~np.eye(len(names), dtype=bool)]
    used = {LINK_CLASSES[c] for c in np.unique(off_diagonal)} | ({intra} if gpus_per_node > 1 else set())
    missing = sorted(used - set(bandwidth), key=LINK_CLASSES.index)
    if missing:
        raise r.fail(top["bandwidth_GBps"], "bandwidth_GBps",
                     f"no bandwidth for {', '.join(missing)}, which the nodes use",
                     f"add '{missing[0]}: GB/s' (per GPU and direction; measure it, e.g. with nccl-tests)")
    return ClusterLinks(gpus_per_node, tuple(names), node_class, bandwidth, source=where)


def load_cluster(path: str | os.PathLike) -> ClusterLinks:
    """Read a cluster description file (module docstring); errors name the line, the key and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ClusterFileError(f"cluster file {str(p)!r} not found; start from conf/clusters/two_nic.yaml")
    return parse_cluster(p.read_text(), where=f"cluster file {str(p)!r}")
