"""Multi-process runs: diffusers' context parallelism with dit-accel, and prompts spread over processes.

* :mod:`dit_accel.parallel.context_parallel` -- what dit-accel needs under
  ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``: the supported mode
  check (Ulysses; ring refused), the transformer's context-parallel process group (the ranks whose cache
  decisions must agree) and keeping diffusers' split/gather hooks outside ours whatever the order of
  ``dit_accel.apply`` and ``enable_parallelism``.
* :mod:`dit_accel.parallel.prompts` -- ``dit-accel generate --prompts-file``: each process of an
  ``accelerate launch`` / ``torchrun`` run generates its share of the prompts; rank 0 writes the run log.

Neither module launches processes or communicates by itself: launching is accelerate's or torchrun's,
communication is torch.distributed's (through diffusers' hooks, or one ``all_reduce`` per probe decision).
"""

from dit_accel.parallel.context_parallel import (
    SUPPORTED_MODE,
    check_context_parallel,
    context_parallel_group,
    follow_context_parallel,
    parallel_config_of,
)

__all__ = [
    "SUPPORTED_MODE",
    "check_context_parallel",
    "context_parallel_group",
    "follow_context_parallel",
    "parallel_config_of",
]
