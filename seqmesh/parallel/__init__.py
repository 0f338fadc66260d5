"""seqmesh.parallel"""
