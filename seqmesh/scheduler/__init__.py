"""seqmesh.scheduler"""
