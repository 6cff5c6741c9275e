"""The ``dit-accel`` command line: options, errors and dispatch to the subcommands.

``dit-accel generate`` runs :func:`dit_accel.generate.run_generate` (``--prompts-file``: over the launched
processes, :mod:`dit_accel.prompts_file`); ``presets`` lists the shipped presets, ``info`` reports the
environment; ``calibrate``, ``eval`` and ``bench`` live in their packages.

Importing this module is cheap (no torch, no diffusers): each subcommand imports what it needs when
it runs, and only the chosen subcommand's options are built, so ``--help`` and ``presets`` answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from dit_accel.argtypes import non_negative_float, non_negative_int, positive_int
from dit_accel.generate import (
    CLIError,
    GenerateArgs,
    check_png_output,
    compare_summary,
    cpu_sparse_note,
    run_generate,
    versions,
)
from dit_accel.loading import DEVICES, DTYPES, TESTBED_MODEL

logger = logging.getLogger("dit_accel")

TOKEN_ORDER_CHOICES = ("auto", "forward", "call")
"""``--token-order`` values; the same tuple as ``dit_accel.attention.token_order.TOKEN_ORDERS`` (a test keeps
them equal), spelled here so that building the parser imports no torch."""

class _UsageError(Exception):
    """Raised by :class:`_Parser` instead of exiting, so that :func:`main` can list every unknown word."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument(
        "--model",
        default=TESTBED_MODEL,
        help="'testbed' (the shipped model, default), a local diffusers pipeline folder, or a hub id "
        "(loaded with DiffusionPipeline.from_pretrained; needs the weights locally or network access)",
    )
    gen.add_argument("--prompt", default=None,
                     help="text prompt (this or --prompts-file is required; for the testbed: a caption of its grammar)")
    gen.add_argument("--prompts-file", type=Path, default=None,
                     help="one prompt per line; prompt i is written to OUTPUT with _{i:04d} before the suffix, with "
                          "seed SEED+i; under `accelerate launch` or `torchrun` each process generates its share")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt, if the pipeline takes one")
    gen.add_argument("--height", type=positive_int, default=None, help="pixels; default: the model's CPU/GPU default")
    gen.add_argument("--width", type=positive_int, default=None, help="pixels; default: the model's CPU/GPU default")
    gen.add_argument("--frames", type=positive_int, default=None, help="number of frames (video models only)")
    gen.add_argument("--steps", type=positive_int, default=None, help="denoising steps")
    gen.add_argument("--guidance", type=non_negative_float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--preset", default=None, help="speed preset: a shipped name (see `dit-accel presets`; default dense) or a preset .json file "
                          "written by `dit-accel calibrate --target-psnr`")
    gen.add_argument("--attention", default=None, help="attention method name; overrides the preset's")
    gen.add_argument("--cache", default=None, help="feature-cache scheduler name; overrides the preset's")
    gen.add_argument("--token-order", choices=TOKEN_ORDER_CHOICES, default="auto",
                     help="where the 3D-tile token permutation runs: once per transformer forward (Wan family), "
                          "in every attention call, or auto (default: forward where supported)")
    gen.add_argument("--precision", choices=("bf16", "fp8"), default=None,
                     help="block-sparse kernel precision (default: the preset's or method's; fp8 falls back to bf16 "
                          "where the device has no 8-bit kernel, and the run log says why)")
    gen.add_argument("--compare", action="store_true",
                     help="also generate with the stock pipeline (nothing applied) from the same seed; OUTPUT shows "
                          "dense | accelerated side by side, and the speed-up and PSNR vs dense are printed")
    gen.add_argument("--warmup-steps", type=non_negative_int, default=2,
                     help="with --compare: steps of one untimed warm-up generation per side before the timed one "
                          "(default 2; 0 for none; on a GPU give the full step count so Triton compiles before timing)")
    gen.add_argument("--output", "-o", type=Path, default=Path("outputs/out.mp4"), help="output .mp4 (video) or .png (image)")
    gen.add_argument("--fps", type=positive_int, default=8, help="frames per second of the mp4 (default 8)")
    gen.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bfloat16 on cuda, float32 on cpu")
    gen.add_argument("--log", type=Path, default=None, help="JSONL run log to append to (default: OUTPUT with .jsonl)")
    gen.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def _add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the presets as JSON (name, version, settings)")


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device to report on (default: cuda if available, else cpu)")


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from dit_accel.calibration import cli as calibrate_cmd

    calibrate_cmd.add_arguments(parser)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from dit_accel.eval import cli as eval_cmd

    eval_cmd.add_arguments(parser)


@dataclass(frozen=True)
class Subcommand:
    """One ``dit-accel`` subcommand: its help line, how to add its options, how to run it."""

    name: str
    """What users type after ``dit-accel``."""
    help: str
    """One line for ``dit-accel --help``."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the options; may import the subcommand's module (only the chosen subcommand's run)."""
    run: Callable[[argparse.Namespace], int]
    """Runs it on the parsed options; returns the exit code; raises :class:`CLIError` on user errors."""


def _run_generate(ns: argparse.Namespace) -> int:
    args = _to_generate_args(ns)
    if args.prompts_file is not None:
        from dit_accel.prompts_file import run_prompts_file

        return run_prompts_file(args)
    record = run_generate(args)
    if args.compare:
        print(compare_summary(record))
    else:
        acc = record["acceleration"]
        print(
            f"wrote {record['output']} ({record['frames_shape'][0]} frames, {record['generate_s']:.1f} s, "
            f"preset {acc['preset']}, attention {acc['attention']}, cache {acc['cache']}); log: {args.log}"
        )
    note = cpu_sparse_note(record)
    if note:
        print(note)
    return 0


def _run_presets(ns: argparse.Namespace) -> int:
    from dit_accel.presets import get_preset, preset_names

    presets = [get_preset(name) for name in preset_names()]
    if ns.json:
        rows = [
            {"name": p.name, "version": p.version, "tag": p.tag, "attention": p.attention,
             "attention_config": dict(p.attention_config), "cache": p.cache, "cache_config": dict(p.cache_config),
             "description": p.description}
            for p in presets
        ]
        print(json.dumps(rows, indent=1))
        return 0
    for p in presets:
        print(f"{p.tag:<12} attention={p.attention} cache={p.cache}  {p.description}")
    return 0


def _run_info(ns: argparse.Namespace) -> int:
    report = info_report(ns.device)
    print(json.dumps(report, indent=1) if ns.json else format_info(report))
    return 0


def _run_calibrate(ns: argparse.Namespace) -> int:
    from dit_accel.calibration import cli as calibrate_cmd

    try:
        return calibrate_cmd.run(ns)
    except ValueError as err:
        raise CLIError(str(err)) from err


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from dit_accel.bench import cli as bench_cmd

    parser.description = bench_cmd.DESCRIPTION
    bench_cmd.add_arguments(parser)


def _run_bench(ns: argparse.Namespace) -> int:
    from dit_accel.bench import cli as bench_cmd

    return bench_cmd.run(ns)


def _run_eval(ns: argparse.Namespace) -> int:
    from dit_accel.eval import cli as eval_cmd

    return eval_cmd.run(ns)


SUBCOMMANDS: dict[str, Subcommand] = {
    s.name: s
    for s in (
        Subcommand("generate", "generate a video or image with acceleration (--compare: side by side with dense)",
                   _add_generate_arguments, _run_generate),
        Subcommand("presets", "list the shipped speed presets", _add_presets_arguments, _run_presets),
        Subcommand("info", "versions, device, dense backend, whether the Triton kernel and fp8 are usable",
                   _add_info_arguments, _run_info),
        Subcommand("calibrate", "--target-psnr: search sparse attention and cache together for a preset file; "
                   "--budget: search a feature-cache schedule",
                   _add_calibrate_arguments, _run_calibrate),
        Subcommand("eval", "quality and speed of configurations vs dense over a prompt set, with a report",
                   _add_eval_arguments, _run_eval),
        Subcommand("bench", "time every model family at real size: stock, presets, their parts and the peers",
                   _add_bench_arguments, _run_bench),
    )
}
"""The subcommands in ``--help`` order; a new subcommand is one entry here."""


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argparse parser of ``dit-accel``; only the options of ``commands`` are built (all when ``None``).

    Every subcommand is listed either way; building one's options may import its module.
    """
    parser = _Parser(
        prog="dit-accel",
        description="Training-free acceleration for diffusion transformers (diffusers).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (backend choices, timings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    for name, command in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.help, description=command.help)
        if commands is None or name in commands:
            command.add_arguments(sub_parser)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option of ``dit-accel`` itself)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _subparsers(child)
    return found


def _unknown_words(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Words of ``argv`` no parser knows, found by parsing with every option optional (so a missing
    required option does not hide a misspelt one); empty when that parse fails too."""
    actions = [a for p in _subparsers(parser) for a in p._actions if a.required and a.option_strings]
    for action in actions:
        action.required = False
    try:
        _, extras = parser.parse_known_args(argv)
    except _UsageError:
        extras = []
    finally:
        for action in actions:
            action.required = True
    return extras


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (``parser`` itself when there is none of that name)."""
    return next((p for p in _subparsers(parser)[1:] if command and p.prog.split()[-1] == command), parser)


def _unknown_message(parser: argparse.ArgumentParser, command: str | None, words: list[str]) -> tuple[argparse.ArgumentParser, str]:
    target = _subparser(parser, command)
    known = [s for a in target._actions for s in a.option_strings]
    hints = []
    for word in words:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close:
                hints.append(f"{word} -> {close[0]}?")
    message = f"unrecognized arguments: {' '.join(words)}"
    if hints:
        message += f" (did you mean: {', '.join(hints)})"
    return target, message


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; on a usage error print usage and one message naming every unknown word, exit 2."""
    command = _command_of(argv)
    parser = build_parser([command] if command in SUBCOMMANDS else [])
    try:
        ns, extras = parser.parse_known_args(argv)
    except _UsageError as err:
        extras = _unknown_words(parser, argv)
        if not extras:
            argparse.ArgumentParser.error(err.parser, err.message)
    if extras:
        target, message = _unknown_message(parser, command, extras)
        argparse.ArgumentParser.error(target, message)
    if ns.command == "generate" and (ns.prompt is None) == (ns.prompts_file is None):
        # Checked here, not by argparse, so that a misspelt option is reported as unknown first.
        message = ("the following arguments are required: --prompt (or --prompts-file)" if ns.prompt is None
                   else "argument --prompts-file: not allowed with argument --prompt")
        argparse.ArgumentParser.error(_subparser(parser, "generate"), message)
    return ns


def _to_generate_args(ns: argparse.Namespace) -> GenerateArgs:
    output: Path = ns.output
    if output.suffix.lower() not in (".mp4", ".png"):
        raise CLIError(f"--output must end in .mp4 (video) or .png (image), got {str(output)!r}")
    check_png_output(output, ns.frames, "--frames")  # before loading; the pipeline's default is checked once loaded
    if ns.prompts_file is not None and ns.compare:
        raise CLIError("--compare takes one --prompt, not --prompts-file")
    if output.exists() and not ns.overwrite and ns.prompts_file is None:
        # Refuse before generating, so no minutes of work are lost to a name clash (a prompts file writes
        # numbered outputs, which dit_accel.prompts_file checks).
        raise CLIError(f"{str(output)!r} exists; pass --overwrite to replace it or choose another --output")
    if ns.preset is None and ns.attention is None and ns.cache is None:
        ns.preset = "dense"
    return GenerateArgs(
        model=ns.model,
        prompt=ns.prompt or "",
        negative_prompt=ns.negative_prompt,
        height=ns.height,
        width=ns.width,
        frames=ns.frames,
        steps=ns.steps,
        guidance=ns.guidance,
        seed=ns.seed,
        preset=ns.preset,
        attention=ns.attention,
        cache=ns.cache,
        token_order=ns.token_order,
        precision=ns.precision,
        output=output,
        fps=ns.fps,
        device=ns.device,
        dtype=ns.dtype,
        log=ns.log if ns.log is not None else output.with_suffix(".jsonl"),
        overwrite=ns.overwrite,
        compare=ns.compare,
        warmup_steps=ns.warmup_steps,
        prompts_file=ns.prompts_file,
    )


def info_report(device: str = "auto") -> dict[str, Any]:
    """Versions, device, the dense attention backend and why, whether the Triton kernel and fp8 are usable."""
    import os

    import torch

    from dit_accel.loading import resolve_device_dtype

    dev, _ = resolve_device_dtype(device, "auto")
    report: dict[str, Any] = {"versions": versions()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        capability = torch.cuda.get_device_capability(dev)
        report["device"] = {"type": "cuda", "name": props.name, "capability": f"{capability[0]}.{capability[1]}",
                            "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        capability = None
        report["device"] = {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}

    from dit_accel.attention.dense import dense_backend_name, dense_probe_report

    backend = dense_backend_name(dev)
    probe = dense_probe_report(dev)
    if dev.type == "cpu":
        why = "on CPU torch's scaled_dot_product_attention runs unchanged"
    else:
        rejected = {name: outcome for name, outcome in probe.items() if outcome != "ok"}
        why = ("first in the order cudnn > flash > xformers > efficient > math that passed the probe"
               + (f"; rejected: {rejected}" if rejected else ""))
    report["dense_backend"] = {"name": backend, "why": why, "probe": probe}

    triton_version = report["versions"]["triton"]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if triton_version == "not installed":
        kernel = (False, "triton is not installed (pip install triton; Linux): block-sparse attention runs its torch reference")
    elif dev.type == "cpu":
        kernel = (interpret, "TRITON_INTERPRET=1: the kernel runs in Triton's interpreter on CPU (for tests; very slow)"
                  if interpret else "no CUDA device: block-sparse attention runs its torch reference on CPU (correct, "
                  "slower than dense); TRITON_INTERPRET=1 runs the kernel in Triton's interpreter, for tests")
    elif capability is not None and capability[0] < 8:
        kernel = (False, f"compute capability {capability[0]}.{capability[1]}: the kernel is built for 8.0 or newer "
                  "(bf16 tensor cores); untested here")
    else:
        kernel = (True, f"CUDA compute capability {capability[0]}.{capability[1]}"
                  + (" (TMA loads on 9.0 and newer)" if capability[0] >= 9 else " (no TMA below 9.0: pointer loads)"))
    report["triton_kernel"] = {"usable": kernel[0], "why": kernel[1]}

    from dit_accel.kernels import fp8_supported

    usable, why = fp8_supported(torch.empty(0, device=dev))
    report["fp8"] = {"usable": usable, "why": why}
    return report


def format_info(report: dict[str, Any]) -> str:
    """``dit-accel info`` as readable lines."""
    v = report["versions"]
    d = report["device"]
    device = (f"cuda: {d['name']} (compute capability {d['capability']}, {d['memory_gib']} GiB)" if d["type"] == "cuda"
              else f"cpu: {d['name']} ({d['threads']} torch threads)")
    usable = {True: "usable", False: "not usable", None: "unknown"}
    lines = [
        f"dit-accel {v['dit_accel']}",
        f"python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, triton {v['triton']}",
        f"device: {device}",
        f"dense attention: {report['dense_backend']['name']} ({report['dense_backend']['why']})",
        f"Triton block-sparse kernel: {usable[report['triton_kernel']['usable']]} ({report['triton_kernel']['why']})",
        f"fp8 attention: {usable[report['fp8']['usable']]} ({report['fp8']['why']})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dit-accel`` console script; returns the process exit code."""
    ns = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return SUBCOMMANDS[ns.command].run(ns)
    except CLIError as err:
        print(f"dit-accel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
