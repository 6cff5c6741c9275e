"""torch.compile with dit-accel: dynamo counters and speed of ``compile_repeated_blocks`` on a Wan2.1 transformer.

    python benchmarks/compile_check.py                                  # GPU: Wan2.1-1.3B 480p, bf16
    python benchmarks/compile_check.py --config tiny --device cpu --backend eager \\
        --out benchmarks/results/compile_check_cpu_tiny.json            # CPU: counters only (no speed claim)

A random-weight ``WanTransformer3DModel`` at the real size (``benchmarks/e2e_speed.py`` builds it: 30 layers,
12 heads of 128, latent 16 x 21 x 60 x 104 -> 32,760 tokens, one 512-token prompt) runs a short denoising
sequence of ``--steps`` forwards (timesteps from 999 down, as a bare transformer: a new generation starts
when the timestep rises) for each variant:

* ``stock``: the stock model;
* ``dense``: ``dit_accel.apply(model, attention="dense")``;
* ``balanced``: ``dit_accel.apply(model, preset="balanced")`` as shipped (sparse attention, feature cache and,
  on Wan, the forward token order: block hooks);
* ``balanced_attention``: the balanced preset's attention method alone (no cache, token order per call), so
  the attention op is measured apart from the block hooks.

each once eager and once after ``model.compile_repeated_blocks(fullgraph=True)`` (diffusers' regional
compilation: each block class compiled once for all its layers). When ``fullgraph=True`` fails, the error is
recorded and the variant is compiled again with ``fullgraph=False`` to count the graph breaks. Recorded per
compiled variant: dynamo's ``graph_break`` counter (total and reasons), unique graphs, recompiles (from
dynamo's recompile log), the first generation's time (compilation included) and the median forward time
of ``--rounds`` further generations. Derived: dense compiled / stock compiled, and the compile gain
(eager / compiled) of stock and of balanced. Speeds from a CPU run are not a claim; the CPU run is for the
counters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo
import torch._logging
from torch._dynamo.utils import counters

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

import dit_accel  # noqa: E402
from e2e_speed import CONFIGS, Timer, build  # noqa: E402

VARIANTS = ("stock", "dense", "balanced", "balanced_attention")
"""What runs on the model (see the module docstring)."""


class RecompileCounter(logging.Handler):
    """Counts dynamo's "Recompiling function ..." log records (enabled with ``torch._logging.set_logs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Recompiling function" in message:
            self.messages.append(" ".join(message.split())[:400])


def apply_variant(model: torch.nn.Module, variant: str) -> Any:
    """Install ``variant`` on ``model``; returns the dit-accel handle (``None`` for stock)."""
    if variant == "stock":
        return None
    if variant == "dense":
        return dit_accel.apply(model, attention="dense")
    if variant == "balanced":
        return dit_accel.apply(model, preset="balanced")
    if variant == "balanced_attention":
        from dit_accel.presets import get_preset

        preset = get_preset("balanced")
        return dit_accel.apply(model, attention=dit_accel.get_method(preset.attention, **preset.attention_config),
                               token_order="call")
    raise ValueError(f"unknown variant {variant!r}; variants: {VARIANTS}")


def generation(model: torch.nn.Module, inputs: dict, steps: int, timer: Timer) -> list[float]:
    """Forward times (ms) of one denoising sequence of ``steps`` timesteps from 999 down."""
    times = []
    for t in torch.linspace(999.0, 0.0, steps).tolist():
        step_inputs = dict(inputs, timestep=torch.tensor([t], device=inputs["timestep"].device))

        def forward() -> None:
            with torch.inference_mode():
                model(**step_inputs)

        times.append(timer(forward))
    return times


def run_variant(build_model: Callable[[], tuple], variant: str, compiled: bool, args, timer: Timer,
                recompiles: RecompileCounter) -> dict[str, Any]:
    """One variant on a fresh model, eager or compiled: timings, counters, dit-accel statistics."""
    model, inputs = build_model()
    handle = apply_variant(model, variant)
    out: dict[str, Any] = {"variant": variant, "compiled": compiled}
    torch._dynamo.reset()
    counters.clear()
    recompiles.messages.clear()
    if compiled:
        out["fullgraph"] = True
        model.compile_repeated_blocks(fullgraph=True, backend=args.backend)
    start = time.perf_counter()
    try:
        first = generation(model, inputs, args.steps, timer)
    except Exception as exc:  # noqa: BLE001 - fullgraph failures are a result here
        if not compiled:
            raise
        out["fullgraph"] = False
        out["fullgraph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"
        dit_accel.remove(model)
        del model
        model, inputs = build_model()
        handle = apply_variant(model, variant)
        torch._dynamo.reset()
        counters.clear()
        recompiles.messages.clear()
        model.compile_repeated_blocks(fullgraph=False, backend=args.backend)
        start = time.perf_counter()
        first = generation(model, inputs, args.steps, timer)
    out["first_generation_s"] = round(time.perf_counter() - start, 2)
    out["first_generation_ms_per_forward"] = round(statistics.median(first), 2)
    timed: list[float] = []
    for _ in range(args.rounds):
        timed.extend(generation(model, inputs, args.steps, timer))
    out["ms_per_forward"] = round(statistics.median(timed), 3)
    out["ms_per_forward_all"] = [round(t, 3) for t in timed]
    if compiled:
        breaks = dict(counters["graph_break"])
        out["graph_breaks"] = sum(breaks.values())
        out["graph_break_reasons"] = dict(sorted(breaks.items(), key=lambda kv: -kv[1])[:10])
        out["unique_graphs"] = counters["stats"]["unique_graphs"]
        out["recompiles"] = len(recompiles.messages)
        out["recompile_reasons"] = recompiles.messages[:10]
    if handle is not None:
        out["attention"] = handle.stats_summary()
        out["cache"] = handle.cache_summary()
        out["token_order"] = handle.token_orders
        dit_accel.remove(model)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every variant eager and compiled; write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="wan2.1-1.3b-480p", choices=[c for c in CONFIGS if c.startswith("wan2.1-1.3b") or c == "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager / aot_eager on CPU)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=10, help="forwards per generation")
    parser.add_argument("--rounds", type=int, default=2, help="timed generations after the first one")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "compile_check.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device)
    recompiles = RecompileCounter()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(recompiles)

    def build_model() -> tuple:
        model, inputs, _, _ = build(args.config, None, device, dtype)
        inputs.pop("return_dict", None)
        return model, dict(inputs, return_dict=False)

    results = []
    for variant in args.variants:
        for compiled in (False, True):
            print(f"[{variant}] {'compiled' if compiled else 'eager'} ...", flush=True)
            row = run_variant(build_model, variant, compiled, args, timer, recompiles)
            print({k: v for k, v in row.items() if k not in ("ms_per_forward_all", "attention", "cache")}, flush=True)
            results.append(row)

    def ms(variant: str, compiled: bool) -> float | None:
        return next((r["ms_per_forward"] for r in results if r["variant"] == variant and r["compiled"] == compiled), None)

    derived: dict[str, Any] = {}
    if ms("dense", True) and ms("stock", True):
        derived["dense_compiled_over_stock_compiled"] = round(ms("dense", True) / ms("stock", True), 4)
    for variant in ("stock", "balanced", "balanced_attention"):
        if ms(variant, False) and ms(variant, True):
            derived[f"{variant}_compile_gain"] = round(ms(variant, False) / ms(variant, True), 4)
    record = {
        "what": "compile_repeated_blocks(fullgraph=True) with dit-accel: dynamo counters and forward times",
        "note": None if device.type == "cuda" else "CPU run: counters are the result; times are not a speed claim",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__,
                     "triton": getattr(sys.modules.get("triton"), "__version__", None)},
        "config": args.config,
        "dtype": str(dtype),
        "backend": args.backend,
        "steps": args.steps,
        "rounds": args.rounds,
        "derived": derived,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(derived, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
