"""seqmesh: long-context training that re-plans sequence-parallel groups every step."""

__version__ = "0.1.0"
