"""The dit-accel testbed: a small text-to-video DiT trained on procedural video, shipped with the package.

Heavy imports (diffusers) happen on first use, so `dit_accel.testbed.captions` / `.data` stay light.

    from dit_accel.testbed import load_testbed_pipeline
    pipe = load_testbed_pipeline()                      # offline, from dit_accel/testbed/weights/
    video = pipe("a red circle moving left on a striped background", generator=torch.Generator().manual_seed(0)).frames[0]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .pipeline import TestbedPipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""The shipped pipeline folder (save_pretrained layout, plus `classifier/` for the attribute classifier)."""


def load_testbed_pipeline(
    device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None, folder: "str | Path | None" = None
) -> "TestbedPipeline":
    """Load the shipped testbed pipeline with no network access.

    Args:
        device: where to put the models.
        dtype: model dtype (default float32; bfloat16/float16 on GPUs).
        folder: another pipeline folder saved by `save_pretrained` (default: the shipped weights).
    """
    import torch

    from .pipeline import TestbedPipeline

    path = Path(folder) if folder is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no testbed pipeline at {path} (model_index.json missing)")
    pipe = TestbedPipeline.from_pretrained(str(path), dtype=dtype or torch.float32, local_files_only=True)
    return pipe.to(device)


def __getattr__(name: str) -> Any:
    if name in ("TestbedPipeline", "TestbedPipelineOutput", "build_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["WEIGHTS_DIR", "load_testbed_pipeline", "TestbedPipeline", "TestbedPipelineOutput", "build_pipeline"]
