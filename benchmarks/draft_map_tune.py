"""Search the draft kernels' launch parameters on the GPU (target: the combo refresh plan at Wan-1.3B 480p).

The refresh plan of combo/draft is map kernel + selection kernel + a little host work; the map was 0.38-0.40 ms
of a 0.51 ms plan on the H200 (``sparse_speed_presets_wan13b.json``). This script times the plan's estimate
(``method.stages.select.estimate(..., block_indices=True)``: :func:`~dit_accel.kernels.draft_map.draft_map_triton` then
:func:`~dit_accel.kernels.draft_map.select_blocks_triton` writing the BlockMask rows) over
:class:`~dit_accel.kernels.draft_map.MapLaunch` variants by coordinate descent (one field at a time, from the
shipped launch, ``--passes`` rounds, the fields of ``--only``), on the inputs and token order of ``sparse_speed``'s
combo-reuse/balanced breakdown row, and checks every variant against the shipped launch (the map up to float32
summation order, the BlockMask rows bit for bit). It then times the best launch and the shipped one at every
``--check-shapes`` shape in the same run, and writes one JSON.

Usage (GPU): ``python benchmarks/draft_map_tune.py [--shapes wan2.1-1.3b-480p] [--only select_warps] [--then-sparse-speed]``;
``--then-sparse-speed`` runs ``sparse_speed.py``'s planning-share rows once more in the same process with the
best launch installed (``MAP_LAUNCH``), so the plan's share of the sparse call is measured with it.
CPU smoke test: ``TRITON_INTERPRET=1 python benchmarks/draft_map_tune.py --tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_speed  # noqa: E402

from dit_accel.kernels import draft_map as draft_map_kernel  # noqa: E402
from dit_accel.kernels.draft_map import MapLaunch  # noqa: E402

CHOICES: dict[str, tuple[int, ...]] = {
    "map_rows": (32, 64, 128, 256),
    "key_chunk": (32, 64, 128),
    "stages": (1, 2, 3, 4),
    "map_warps": (4, 8, 16),
    "key_warps": (2, 4, 8),
    "select_warps": (1, 2, 4, 8),
}
"""Values tried per :class:`MapLaunch` field."""

TINY_CHOICES: dict[str, tuple[int, ...]] = {"map_rows": (32, 64), "key_chunk": (32, 64), "stages": (1, 2),
                                            "map_warps": (4,), "key_warps": (4,),
                                            "select_warps": (1, 4)}
"""A few values per field for the interpreter smoke test."""

LABEL = "combo-reuse/balanced"
"""The method whose refresh plan the target is about (its options and token order are used)."""


def map_inputs(shape: dict, device: torch.device, dtype: torch.dtype):
    """q, k and the zero-argument estimate of ``LABEL``'s refresh plan at ``shape`` (map + selection with rows)."""
    grid = shape["grid"]
    q, k, _ = sparse_speed.video_qkv(grid, shape["heads"], shape["head_dim"], device, dtype)
    _, name, options = next(m for m in sparse_speed.METHODS if m[0] == LABEL)
    method = sparse_speed.timed_method(name, options)
    _, call = sparse_speed.hand_call(grid, q.shape[-2], 1)
    order = method.order_of(q, k, call)
    return lambda: method.stages.select.estimate(q, k, order, None, block_indices=True)


def time_launch(launch: MapLaunch, estimate, device: torch.device, reps: int, reference) -> dict:
    """Median ms of the estimate with ``launch`` installed; its map's largest difference from ``reference``'s
    and whether its BlockMask rows equal them."""
    saved = draft_map_kernel.MAP_LAUNCH
    draft_map_kernel.MAP_LAUNCH = launch
    try:
        ms = sparse_speed.time_ms(estimate, device, reps)
        got = estimate()
    finally:
        draft_map_kernel.MAP_LAUNCH = saved
    row = {"launch": asdict(launch), "ms": ms}
    if reference is not None:
        row["max_abs_diff"] = float((got.probs - reference.probs).abs().max())
        row["finite"] = bool(torch.isfinite(got.probs).all())
        row["rows_equal"] = bool(torch.equal(got.kv_num_blocks, reference.kv_num_blocks)
                                 and torch.equal(got.kv_indices, reference.kv_indices))
    return row


def search(estimate, device: torch.device, reps: int, choices: dict[str, tuple[int, ...]], passes: int,
           rows: list[dict]) -> MapLaunch:
    """Coordinate descent from the shipped launch over the fields in ``choices``; every timed variant is appended
    to ``rows``. A variant whose map moves by more than 1e-3 or whose rows differ is not usable."""
    shipped = draft_map_kernel.MAP_LAUNCH
    reference = estimate()
    timed: dict[MapLaunch, float] = {}

    def measure(launch: MapLaunch) -> float:
        if launch not in timed:
            try:
                row = time_launch(launch, estimate, device, reps, reference)
            except Exception as exc:  # out of shared memory / registers: record and skip the variant
                row = {"launch": asdict(launch), "ms": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            ok = (row["ms"] is not None and row.get("finite", False) and row["max_abs_diff"] <= 1e-3
                  and row["rows_equal"])
            row["usable"] = ok
            rows.append(row)
            print(json.dumps(row), flush=True)
            timed[launch] = row["ms"] if ok else math.inf
        return timed[launch]

    best = shipped
    measure(best)
    for _ in range(passes):
        for name, values in choices.items():
            for value in values:
                cand = replace(best, **{name: value})
                if measure(cand) < measure(best):
                    best = cand
    return best


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="wan2.1-1.3b-480p", help="shape(s) searched, comma list")
    parser.add_argument("--check-shapes", default="wan2.1-1.3b-480p,wan2.1-14b-720p",
                        help="shapes where the best and the shipped launch are timed again")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape only, few values (CPU smoke test)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--only", default="", help=f"comma list of the fields searched (default: all of {list(CHOICES)})")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="draft_map_tune", help="basename of the JSON written into --out")
    parser.add_argument("--rounds", type=int, default=3, help="alternating shipped/best timings per check shape")
    parser.add_argument("--then-sparse-speed", action="store_true",
                        help="sparse_speed planning-share rows with the best launch installed (first searched shape)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.shapes = args.check_shapes = "tiny"
    unknown = [s for s in (args.shapes + "," + args.check_shapes).split(",") if s not in sparse_speed.SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(sparse_speed.SHAPES)}")
    choices = TINY_CHOICES if args.tiny else CHOICES
    if args.only:
        bad = [f for f in args.only.split(",") if f not in CHOICES]
        if bad:
            parser.error(f"unknown field(s) {bad} in --only; choose from {list(CHOICES)}")
        choices = {f: choices[f] for f in args.only.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"env": sparse_speed.environment(device), "argv": sys.argv[1:] if argv is None else argv,
                    "shipped": asdict(draft_map_kernel.MAP_LAUNCH), "search": {}, "check": [], "complete": False}
    path = args.out / f"{args.name}.json"

    def write() -> None:
        path.write_text(json.dumps(result, indent=1) + "\n")

    signal.signal(signal.SIGTERM, sparse_speed._on_sigterm)
    shipped = draft_map_kernel.MAP_LAUNCH
    best = shipped
    try:
        for name in args.shapes.split(","):
            estimate = map_inputs(sparse_speed.SHAPES[name], device, dtype)
            rows: list[dict] = []
            result["search"][name] = rows
            best = search(estimate, device, args.reps, choices, args.passes, rows)
            result["best"] = asdict(best)
            write()
            del estimate
        for name in args.check_shapes.split(","):
            estimate = map_inputs(sparse_speed.SHAPES[name], device, dtype)
            reference = estimate()
            # alternate the two launches so that clock drift hits both alike
            for rnd in range(args.rounds):
                for tag, launch in (("shipped", shipped), ("best", best)):
                    row = dict(time_launch(launch, estimate, device, args.reps, reference), shape=name, tag=tag,
                               round=rnd)
                    result["check"].append(row)
                    print(json.dumps(row), flush=True)
            write()
            del estimate, reference
        if args.then_sparse_speed:
            draft_map_kernel.MAP_LAUNCH = best
            first = args.shapes.split(",")[0]
            sparse_speed.main(["--shapes", first, "--labels", "draft/balanced," + LABEL, "--breakdown",
                               "--skip-calibrate", "--skip-fixed", "--out", str(args.out),
                               "--name", f"{args.name}_sparse_speed"] + (["--tiny"] if args.tiny else []))
            result["sparse_speed_json"] = f"{args.name}_sparse_speed.json"
        result["complete"] = True
    except sparse_speed.Interrupted as exc:
        result["interrupted"] = str(exc)
    write()
    print(f"wrote {path}; best {asdict(best)}")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
