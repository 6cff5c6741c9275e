"""Loading pipelines by name: the shipped testbed, a local diffusers folder, or a hub id.

Shared by every command (`generate`, `calibrate`, `eval`) so they accept the same `--model`,
`--device` and `--dtype` values and fail with the same messages. torch and diffusers are imported
inside the functions, so the command line can import the constants below cheaply.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TESTBED_MODEL = "testbed"
"""The `--model` value that selects the shipped testbed pipeline (no network, no download)."""
DEVICES = ("auto", "cpu", "cuda")
"""Accepted `--device` values; `auto` is cuda when available, else cpu."""
DTYPES = ("auto", "float32", "float16", "bfloat16")
"""Accepted `--dtype` values; `auto` is bfloat16 on cuda and float32 on cpu."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""A Hugging Face repository id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`)."""


def resolve_device_dtype(device: str, dtype: str) -> tuple["torch.device", "torch.dtype"]:
    """Turn `--device` / `--dtype` choices (including `auto`) into torch objects; ValueError on bad values."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {list(DEVICES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use 'cpu'")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def _looks_like_path(model: str) -> bool:
    """A folder on disk, or a string that can only be meant as one (hub ids hold at most one '/')."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _hub_failure(model: str, err: Exception) -> str:
    """One line saying why a hub id did not load and what to do, without the library's stack-trace hints."""
    names = {cls.__name__ for cls in type(err).__mro__}
    text = str(err)
    if "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        reason = "no such public repository on the Hugging Face Hub (check the id; private or gated repos need `huggingface-cli login`)"
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or "not fully cached" in text or "offline" in text.lower():
        reason = ("its files are not in the local Hugging Face cache and the Hub cannot be reached "
                  "(HF_HUB_OFFLINE is set or there is no network)")
    else:
        first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0] if text.strip() else type(err).__name__
        reason = re.sub(r"\s*Please check out the root cause in the stacktrace above\.?", "", first).rstrip(".")
    return (f"could not load model {model!r} as a Hugging Face hub id: {reason}. "
            f"Use 'testbed', a local diffusers pipeline folder (with model_index.json), or download the model "
            f"first (`huggingface-cli download {model}`) with network access.")


def _drop_hub_retry_notes(record: logging.LogRecord) -> bool:
    """Hide diffusers' "Couldn't connect to the Hub ... Will try to load from local cache" notes: when the
    cache misses too, the error below says both in one line; when it hits, the notes are noise."""
    message = record.getMessage()
    return not message.startswith(("Couldn't connect to the Hub", "Will try to load from local cache"))


def load_pipeline(model: str, device: "str | torch.device" = "auto", dtype: "str | torch.dtype" = "auto") -> Any:
    """Load `model` onto `device`: `testbed`, a local diffusers pipeline folder, or a hub id.

    Hub ids go through the real `DiffusionPipeline.from_pretrained` (weights must be in the local
    cache or the network reachable). Raises ValueError with one line saying what was tried and what
    to do when loading fails.
    """
    if isinstance(device, str) or isinstance(dtype, str):
        device, dtype = resolve_device_dtype(
            device if isinstance(device, str) else device.type,
            dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""),
        )
    if model == TESTBED_MODEL:
        from dit_accel.testbed import load_testbed_pipeline

        return load_testbed_pipeline(device=device, dtype=dtype)
    path = Path(model).expanduser()
    if _looks_like_path(model):
        if not path.exists():
            raise ValueError(f"model folder {model!r} does not exist; give 'testbed', an existing diffusers pipeline "
                             "folder (with model_index.json), or a hub id such as 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model folder {model!r} has no model_index.json, so it is not a diffusers pipeline folder; "
                             "point --model at the folder `save_pretrained` wrote (the one holding model_index.json)")
    elif not _HUB_ID.match(model):
        raise ValueError(f"model {model!r} is neither 'testbed', an existing folder, nor a valid hub id "
                         "('owner/name', letters, digits, '-', '_', '.')")
    from diffusers import DiffusionPipeline

    hub_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    hub_logger.addFilter(_drop_hub_retry_notes)
    try:
        # diffusers 0.42 takes `dtype=`; its older `torch_dtype=` spelling warns.
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, dtype=dtype)
    except (OSError, ValueError) as err:
        if path.exists():
            raise ValueError(f"could not load the diffusers pipeline folder {model!r}: {str(err).splitlines()[0]}") from err
        raise ValueError(_hub_failure(model, err)) from err
    finally:
        hub_logger.removeFilter(_drop_hub_retry_notes)
    return pipe.to(device)
