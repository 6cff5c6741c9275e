"""Loading pipelines by name: the shipped testbed, a local diffusers folder, or a hub id.

Shared by every command (`generate`, `calibrate`, `eval`) so they accept the same `--model`,
`--device` and `--dtype` values and fail with the same messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TESTBED_MODEL = "testbed"
"""The `--model` value that selects the shipped testbed pipeline (no network, no download)."""
DEVICES = ("auto", "cpu", "cuda")
"""Accepted `--device` values; `auto` is cuda when available, else cpu."""
DTYPES = ("auto", "float32", "float16", "bfloat16")
"""Accepted `--dtype` values; `auto` is bfloat16 on cuda and float32 on cpu."""


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Turn `--device` / `--dtype` choices (including `auto`) into torch objects; ValueError on bad values."""
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


def load_pipeline(model: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Any:
    """Load `model` onto `device`: `testbed`, a local diffusers pipeline folder, or a hub id.

    Hub ids go through the real `DiffusionPipeline.from_pretrained` (weights must be in the local
    cache or the network reachable). Raises ValueError with the reason when loading fails.
    """
    if isinstance(device, str) or isinstance(dtype, str):
        device, dtype = resolve_device_dtype(
            device if isinstance(device, str) else device.type,
            dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""),
        )
    if model == TESTBED_MODEL:
        from dit_accel.testbed import load_testbed_pipeline

        return load_testbed_pipeline(device=device, dtype=dtype)
    from diffusers import DiffusionPipeline

    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"model {model!r} is a folder without model_index.json: not a diffusers pipeline folder")
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except OSError as err:
        raise ValueError(
            f"could not load model {model!r}: {err}. Use 'testbed', a local diffusers folder, or a hub id "
            "whose weights are in the local cache."
        ) from err
    return pipe.to(device)
