"""seqmesh.launch"""
