"""moeflow.parallel: process groups, data and expert parallelism applied to a plain model."""

from .all_to_all import AllToAllDispatcher
from .capacity import CapacityDispatcher
from .dispatchers import DispatchOptions, build_dispatcher
from .expert_parallel import ExpertDataParallel, expert_shard, parallelize
from .layout import ParallelLayout, build_layout, check_layout

__all__ = [
    "AllToAllDispatcher",
    "CapacityDispatcher",
    "DispatchOptions",
    "build_dispatcher",
    "ExpertDataParallel",
    "ParallelLayout",
    "build_layout",
    "check_layout",
    "expert_shard",
    "parallelize",
]
