"""The relation distance (VideoREPA's TRD loss): op, reference, torch and Triton backends."""

from stss_kernels.ops.relation_distance.op import RelationDistance, relation_distance
from stss_kernels.ops.relation_distance.reference import relation_distance_reference
from stss_kernels.ops.relation_distance.torch_backend import relation_distance_torch

__all__ = ["RelationDistance", "relation_distance", "relation_distance_reference", "relation_distance_torch"]
