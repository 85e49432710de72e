"""moeflow.parallel: process groups, data and expert parallelism applied to a plain model from outside.

`parallelize.parallelize(model, mesh, options)` applies it and returns a `ParallelPlan` (the one record
of which tensors are shards); `mesh.build_mesh` makes the mesh.
"""

from .all_to_all import AllToAllDispatcher
from .capacity import CapacityDispatcher
from .dispatchers import DispatchOptions, build_dispatcher
from .plan import ParallelPlan, is_expert

__all__ = [
    "AllToAllDispatcher",
    "CapacityDispatcher",
    "DispatchOptions",
    "ParallelPlan",
    "build_dispatcher",
    "is_expert",
]
