"""seqmesh.trainer"""
