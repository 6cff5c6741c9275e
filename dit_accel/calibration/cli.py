"""``dit-accel calibrate``: its arguments and the run. Two modes, one of them per run:

* ``--target-psnr DB``: the fastest sparse-attention and cache configuration that keeps DB against dense on the
  prompts, written as a preset file (:mod:`dit_accel.calibration.target`; ``generate --preset FILE`` loads it);
* ``--budget B``: a cache schedule spending a share B of the block evaluations, written as a schedule file
  (:mod:`dit_accel.calibration.schedule_search`; the cache half of the target search).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dit_accel.argtypes import int_at_least, positive_int

MIN_STEPS = 3
"""Fewest ``--steps``, checked by argparse so that the message names the option. The target search's settings
need 3; the schedule search alone would take 2, but with the default 2 warm-up steps such a schedule reuses
nothing, so both modes share the one bound."""


def captions_for_testbed(count: int, offset: int = 0) -> list[str]:
    """``count`` deterministic captions in the testbed grammar (varied shape, colour, motion, background)."""
    from dit_accel.testbed.captions import ATTRIBUTES

    shapes, colors = ATTRIBUTES["shape"], ATTRIBUTES["color"]
    motions, backgrounds = ATTRIBUTES["motion"], ATTRIBUTES["background"]
    out = []
    for i in range(offset, offset + count):
        motion = motions[(3 * i + 1) % len(motions)]
        phrase = motion if motion in ("bouncing", "pulsing") else f"moving {motion}"
        color = colors[(5 * i + 2) % len(colors)]
        article = "an" if color[0] in "aeiou" else "a"
        out.append(f"{article} {color} {shapes[i % len(shapes)]} {phrase} on a {backgrounds[(7 * i) % len(backgrounds)]} background")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dit-accel calibrate``."""
    parser.add_argument("--model", default="testbed", help='"testbed" (shipped) or a diffusers folder / hub id')
    parser.add_argument("--steps", type=int_at_least(MIN_STEPS), required=True,
                        help=f"denoising steps of the runs (and of the schedule), >= {MIN_STEPS}")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--target-psnr", type=float, default=None,
                      help="PSNR in dB against dense to keep: search sparse attention and cache together, write a "
                           "preset file")
    mode.add_argument("--budget", type=float, default=None,
                      help="fraction of block evaluations, in (0, 1]: search a cache schedule, write a schedule file")
    parser.add_argument("--out", type=Path, required=True, help="preset (--target-psnr) or schedule (--budget) JSON")
    parser.add_argument("--prompt", action="append", default=None, help="a calibration prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, default=None, help="file with one prompt per line")
    parser.add_argument("--num-prompts", type=positive_int, default=4, help="testbed captions to use when no prompt is given")
    parser.add_argument("--height", type=positive_int, default=None, help="pixels of the calibration runs (default: the pipeline's)")
    parser.add_argument("--width", type=positive_int, default=None, help="pixels of the calibration runs (default: the pipeline's)")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames of the calibration runs (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses SEED + i (default 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps always computed (default 2)")
    parser.add_argument("--final-steps", type=int, default=1, help="last steps always computed (default 1)")
    parser.add_argument("--max-consecutive-reuse", type=int, default=3, help="most steps reused in a row (default 3)")
    parser.add_argument("--head-blocks", type=int, default=0, help="first blocks computed at every step, outside the cached span (default 0)")
    parser.add_argument("--tail-blocks", type=int, default=0, help="last blocks computed at every step, outside the cached span (default 0)")
    parser.add_argument("--selective-blocks", type=int, default=1, help="deep blocks a selective step recomputes (default 1)")
    parser.add_argument("--selective-share", type=float, default=0.0, help="share of the budget for selective steps")
    parser.add_argument("--selective-tokens", type=float, default=0.0,
                        help="share of the tokens a selective step recomputes through the span (0: deep blocks only)")
    parser.add_argument("--forecast-order", default="auto", choices=("0", "1", "auto"),
                        help="0 reuse, 1 linear forecast, auto: the better of the two on the calibration runs")
    parser.add_argument("--target", default="span", choices=("span", "output"), help="what reused steps take from the cache")
    parser.add_argument("--refine", type=int, default=0, help="candidate schedules evaluated by real runs after the DP")
    parser.add_argument("--token-stride", type=int, default=1, help="measure every N-th token only, to save memory (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    target = parser.add_argument_group("--target-psnr search")
    target.add_argument("--time-budget", type=float, default=None, help="seconds after which no new evaluation starts")
    target.add_argument("--max-evals", type=int, default=12, help="most candidate evaluations (a run of every prompt each)")
    target.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    target.add_argument("--layer-groups", type=int, default=2, help="layer groups whose top_p is searched apart")
    target.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="sparse kernel precision")
    target.add_argument("--timing-prompts", type=int, default=2,
                        help="prompts timed (dense and chosen, after a warm-up) for the measured speed-up; 0: none")
    target.add_argument("--name", default=None, help="preset name recorded in the file")


def run(args: argparse.Namespace) -> int:
    """Run ``dit-accel calibrate``; returns the exit code."""
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file is not None:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        if args.model != "testbed":
            raise ValueError("give calibration prompts with --prompt or --prompts-file")
        prompts = captions_for_testbed(args.num_prompts)
    from dit_accel.calibration.schedule_search import calibrate
    from dit_accel.loading import load_pipeline

    call_kwargs: dict[str, Any] = {}
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames), ("guidance_scale", args.guidance)):
        if value is not None:
            call_kwargs[key] = value
    if args.target_psnr is not None:
        from dit_accel.calibration.target import TargetSettings
        from dit_accel.calibration.target import calibrate as calibrate_preset

        TargetSettings(target_psnr=args.target_psnr)  # a bad target fails before the model loads
        pipe = load_pipeline(args.model, args.device, args.dtype)
        data = calibrate_preset(
            pipe, prompts, target_psnr=args.target_psnr, out=args.out, model_id=args.model, name=args.name,
            call_kwargs=call_kwargs, num_steps=args.steps, seed=args.seed, time_budget_s=args.time_budget,
            max_evals=args.max_evals, batch_size=args.batch_size, layer_groups=args.layer_groups,
            precision=args.precision, timing_prompts=args.timing_prompts, warmup_steps=args.warmup_steps,
            final_steps=args.final_steps, max_consecutive_reuse=args.max_consecutive_reuse,
        )
        m, t = data["measured"], data["timing"]
        speed = f", measured speed-up {t['speedup']:.2f}x" if t.get("speedup") else ""
        print(f"wrote {args.out}: {m.get('candidate', 'dense')} at {m['psnr'] if m['psnr'] is None else round(m['psnr'], 2)} dB "
              f"(target {args.target_psnr:g}), modelled cost {m['modelled_cost']:.3f}{speed}"
              + (f"; search stopped early: {data['search']['interrupted']}" if data["search"]["interrupted"] else ""))
        return 0
    pipe = load_pipeline(args.model, args.device, args.dtype)
    data = calibrate(
        pipe, prompts, out=args.out, model_id=args.model, call_kwargs=call_kwargs,
        num_steps=args.steps, budget=args.budget, warmup_steps=args.warmup_steps, final_steps=args.final_steps,
        max_consecutive_reuse=args.max_consecutive_reuse, head_blocks=args.head_blocks, tail_blocks=args.tail_blocks,
        selective_blocks=args.selective_blocks, selective_share=args.selective_share,
        selective_tokens=args.selective_tokens,
        forecast_order=args.forecast_order if args.forecast_order == "auto" else int(args.forecast_order),
        target=args.target, refine=args.refine, token_stride=args.token_stride, seed=args.seed,
    )
    print(f"wrote {args.out}: schedule {''.join(map(str, data['schedule']))} compute_fraction {data['compute_fraction']:.3f}")
    return 0
