"""Context parallelism with dit-accel: what it needs under diffusers' ``enable_parallelism``.

* :mod:`dit_accel.parallel.context_parallel` -- what dit-accel needs under
  ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``: the supported mode
  check (Ulysses; ring refused), the transformer's context-parallel process group (the ranks whose cache
  decisions must agree) and keeping diffusers' split/gather hooks outside ours whatever the order of
  ``dit_accel.apply`` and ``enable_parallelism``.

It launches no process and communicates by itself: launching is accelerate's or torchrun's, communication
torch.distributed's (through diffusers' hooks, or one ``all_reduce`` per probe decision). Prompts spread over
processes (``generate --prompts-file``) live in :mod:`dit_accel.prompts_file`.
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
