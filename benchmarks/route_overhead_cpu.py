"""Host overhead of dit-accel's attention route against the stock processors, on CPU with tiny shapes.

A CPU host-overhead figure, not a GPU speed: the shapes are so small (2 heads x 64 dims, 32 tokens) that the
attention itself costs a few microseconds, so what is timed is the Python work around each call: the processor,
the dispatcher backend, ``attend`` (layout, call context, statistics record) and the dense backend selection.
On a GPU the same host work is what starves a small model (the testbed's dense route ran at 0.85x of stock).

Variants, each a whole forward of a tiny Wan transformer (``--layers`` blocks: one self- and one
cross-attention call each):

* ``stock``: the transformer as built (diffusers' processors, native SDPA dispatch);
* ``dense``: ``dit_accel.apply(model, preset="dense")`` (context hook, our processors, dense route);
* ``dense_nostats``: the same with ``handle.stats_enabled = False``;
* ``sparse_dense_route``: ``draft`` with ``dense_above=0.0`` at ``min_seq_len=0``: every call is planned and
  routed dense by break-even (the planning is part of the figure);

plus micro-timings of single pieces (``sdpa``: the bare SDPA call; ``attend_dense``: ``route.attend`` of a
dense-method binding on the same tensors; ``sdpa_kernel_enter``: entering and leaving torch's
``sdpa_kernel`` context manager, which the CUDA dense path does per call).

Timing: ``time.perf_counter`` around ``--repeats`` x ``--calls`` forwards, the variants interleaved per
repeat; one intra-op thread. The shared CPU machine is noisy, so both the median and the minimum per call are
kept (the minimum is the closer estimate of the host work itself). Per-call overhead = (variant - stock) /
attention calls per forward.

Each run is stored under ``--label`` in ``--out`` (other labels in the file are kept), so the code before and
after a change is compared in one file: run once per tree, alternating, e.g.::

    git archive <before> | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python benchmarks/route_overhead_cpu.py --label before --out OUT.json
    PYTHONPATH=$PWD python benchmarks/route_overhead_cpu.py --label after --out OUT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


def _model(layers: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanTransformer3DModel.from_config(cfg).eval()


def _inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, 16, generator=g), return_dict=False)


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200, help="forwards per timing")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="run", help="key of this run in --out (e.g. before / after)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import diffusers

    import dit_accel
    from dit_accel.attention.exact import DenseMethod
    from dit_accel.attention.route import ModuleBinding, attend
    from dit_accel.context import StepClock, TransformerContext

    model, inputs = _model(args.layers), _inputs()
    variants: dict[str, Callable[[], None]] = {}

    def configure(name: str) -> None:
        dit_accel.remove(model)
        if name == "dense":
            dit_accel.apply(model, preset="dense")
        elif name == "dense_nostats":
            dit_accel.apply(model, preset="dense").stats_enabled = False
        elif name == "sparse_dense_route":
            dit_accel.apply(model, attention=dit_accel.get_method(
                "draft", min_seq_len=0, dense_above=0.0, dense_warmup=0.0, dense_first_layers=0,
                dense_last_step=False)).stats_enabled = False

    names = ["stock", "dense", "dense_nostats", "sparse_dense_route"]
    try:
        dit_accel.get_method("draft", dense_above=0.0)
    except ValueError:  # code from before break-even routing
        names.remove("sparse_dense_route")
    attention_calls = 2 * args.layers
    tokens = 2 * 4 * 4
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, tokens, 64, generator=g) for _ in range(3))
    ctx = TransformerContext(model, "wan", "transformer", StepClock(), "sequential")
    ctx.branches = ("cond",)
    ctx.stats_enabled = False
    binding = ModuleBinding(ctx, DenseMethod(), 0, "blocks.0.attn1", "self", 0)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def enter_sdpa_kernel() -> None:
        with sdpa_kernel([SDPBackend.MATH], set_priority=True):
            pass

    micro = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
             "attend_dense": lambda: attend(binding, q, k, v),
             "sdpa_kernel_enter": enter_sdpa_kernel}
    forward_us: dict[str, list[float]] = {n: [] for n in names}
    micro_us: dict[str, list[float]] = {n: [] for n in micro}
    with torch.inference_mode():
        for name in names:  # warm-up
            configure(name)
            for _ in range(5):
                model(**inputs)
        for _ in range(args.repeats):
            for name in names:
                configure(name)
                forward_us[name].append(_per_call_us(lambda: model(**inputs), args.calls))
            for name, fn in micro.items():
                micro_us[name].append(_per_call_us(fn, args.calls * attention_calls))
    dit_accel.remove(model)
    median = {n: statistics.median(v) for n, v in forward_us.items()}
    low = {n: min(v) for n, v in forward_us.items()}
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dit_accel": dit_accel.__file__,
        "forward_us_median": median,
        "forward_us_min": low,
        "forward_us": forward_us,
        "overhead_us_per_attention_call_median": {n: (median[n] - median["stock"]) / attention_calls for n in names},
        "overhead_us_per_attention_call_min": {n: (low[n] - low["stock"]) / attention_calls for n in names},
        "micro_us_median": {n: statistics.median(v) for n, v in micro_us.items()},
        "micro_us_min": {n: min(v) for n, v in micro_us.items()},
    }
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({
        "benchmark": "route_overhead_cpu",
        "what": "CPU host overhead per attention call (tiny shapes, 1 thread); not a GPU speed",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "settings": {"layers": args.layers, "attention_calls_per_forward": attention_calls, "tokens": tokens,
                     "heads": 2, "head_dim": 64, "calls": args.calls, "repeats": args.repeats},
    })
    result.setdefault("runs", {})[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in run.items() if k.startswith(("overhead", "micro"))}, indent=1))


if __name__ == "__main__":
    main()
