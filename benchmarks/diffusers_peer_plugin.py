"""pytest plugin for ``benchmarks/diffusers_peer_suite.py``: dit-accel on every transformer diffusers' tests build.

Loaded with ``-p diffusers_peer_plugin`` (this folder on ``PYTHONPATH``). When the environment variable
``DIT_ACCEL_PEER_METHOD`` names an attention method, the ``__init__`` of each supported transformer class
(``dit_accel.pipelines.families``) is wrapped so that every instance, however a test builds it (the
constructor, ``from_config``, ``from_pretrained``), leaves ``__init__`` with ``dit_accel.apply(model,
attention=<method>)`` applied (``min_seq_len=0``: every self-attention call the kernel can take goes through
the sparse path). Without the variable the plugin does nothing, so both runs load the same plugins.
"""

from __future__ import annotations

import functools
import os
from typing import Any

METHOD_ENV = "DIT_ACCEL_PEER_METHOD"
"""Environment variable naming the attention method to apply (empty or unset: stock run)."""

COUNT_ENV = "DIT_ACCEL_PEER_COUNT_FILE"
"""Environment variable naming a file each pytest process appends its number of patched models to."""

_patched = {"models": 0}


def _wrap_init(cls: type, method: str) -> None:
    import dit_accel

    original = cls.__init__

    @functools.wraps(original)  # keeps __wrapped__: diffusers reads the config signature through it
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if dit_accel.get_handle(self) is None:
            dit_accel.apply(self, attention=dit_accel.get_method(method, min_seq_len=0))
            _patched["models"] += 1

    cls.__init__ = __init__


def pytest_configure(config: Any) -> None:
    """Wrap the transformer classes before any test module imports them."""
    method = os.environ.get(METHOD_ENV, "")
    if not method:
        return
    import diffusers

    from dit_accel.pipelines.families import FAMILIES

    for family in FAMILIES.values():
        _wrap_init(getattr(diffusers, family.transformer_class), method)


def pytest_unconfigure(config: Any) -> None:
    """Report how many models this process patched (so the suite can tell that dit-accel really ran)."""
    path = os.environ.get(COUNT_ENV, "")
    if path and os.environ.get(METHOD_ENV, ""):
        with open(path, "a") as f:
            f.write(f"{_patched['models']}\n")
