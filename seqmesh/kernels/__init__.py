"""seqmesh.kernels"""
