"""Tensor and expert parallelism over torch.distributed, applied to a built model from outside.

`init_mesh` (torchrun env -> groups), `apply_tp` / `apply_ep` (shard a model in place, add the
collectives), `load_sharded` (each rank reads only its slices), `parallel_model_from_args` and
`parallel_stream` (the commands under torchrun). See docs/distributed.md.
"""

from .comm import CommStats
from .expert_parallel import ExpertParallel, apply_ep
from .launch import (
    ParallelContext,
    follow,
    lead_or_follow,
    parallel_generate,
    parallel_model_from_args,
    parallel_stream,
)
from .load import load_sharded
from .mesh import Mesh, init_mesh, run_or_exit
from .tensor_parallel import apply_tp

__all__ = [
    "CommStats",
    "ExpertParallel",
    "Mesh",
    "ParallelContext",
    "apply_ep",
    "apply_tp",
    "follow",
    "init_mesh",
    "lead_or_follow",
    "load_sharded",
    "parallel_generate",
    "parallel_model_from_args",
    "parallel_stream",
    "run_or_exit",
]
