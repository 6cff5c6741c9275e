"""Make a ComfyUI installation load the node pack of the installed ``dit-accel`` package.

ComfyUI imports every folder of its ``custom_nodes`` directory; :func:`write_shim` writes
``custom_nodes/dit_accel_nodes/__init__.py``, one import of :mod:`dit_accel.comfy`, so the nodes always
come from the dit-accel installed in ComfyUI's Python environment (upgrade it with pip, not by copying).

    python -m dit_accel.comfy.install --comfyui /path/to/ComfyUI
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

SHIM_DIR = "dit_accel_nodes"
"""Folder name of the shim inside ``custom_nodes``."""

SHIM = '''"""dit-accel ComfyUI nodes. The nodes live in the installed dit-accel package (pip install dit-accel);
this file only makes ComfyUI's custom_nodes loader import them (written by `python -m dit_accel.comfy.install`)."""

from dit_accel.comfy import *  # noqa: F401,F403 - comfy_entrypoint (V3), or NODE_CLASS_MAPPINGS on older ComfyUI
'''
"""Content of the shim's ``__init__.py``."""


def write_shim(comfyui: str | Path) -> Path:
    """Write the shim into ``comfyui/custom_nodes`` (or into ``comfyui`` itself when it is a
    ``custom_nodes`` folder) and return its path; an existing shim is replaced."""
    root = Path(comfyui).expanduser()
    custom_nodes = root if root.name == "custom_nodes" else root / "custom_nodes"
    if not custom_nodes.is_dir():
        raise FileNotFoundError(f"{custom_nodes} is not a directory; pass the ComfyUI folder (the one holding main.py and custom_nodes/)")
    path = custom_nodes / SHIM_DIR / "__init__.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SHIM)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--comfyui DIR``; exit code 2 with one ``error:`` line when DIR holds no ``custom_nodes/``."""
    parser = argparse.ArgumentParser(prog="python -m dit_accel.comfy.install", description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="the ComfyUI folder (holding custom_nodes/)")
    args = parser.parse_args(argv)
    try:
        path = write_shim(args.comfyui)
    except OSError as err:  # no custom_nodes/ (FileNotFoundError), or a folder that cannot be written
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; restart ComfyUI to load the dit-accel nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
