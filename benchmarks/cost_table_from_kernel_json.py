"""Build a cost-model table (dit_accel/kernels/cost_model.py format) from a bf16 kernel benchmark JSON.

    python benchmarks/cost_table_from_kernel_json.py benchmarks/results/attention_kernel.json \
        --out dit_accel/kernels/cost_table.json

For when no ``attention_kernel_fp8.py --cost`` run exists for a device: takes the ``full`` rows of
``benchmarks/attention_kernel.py`` (our kernel and cuDNN dense, same run), per head dim and token count the
kernel-over-cuDNN time at each nominal density, geometric mean over the head counts measured. For D=128
below the TMA threshold it takes the pointer-path rows (``ours-ptr``), the kernel's current default there.
The result has bf16 curves only: fp8 lookups fall back to them (conservative where fp8 is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.kernels.block_sparse_triton import TMA_MIN_KV_LEN  # noqa: E402
from dit_accel.kernels.cost_model import KERNEL_VERSION, CostCurve, CostTable  # noqa: E402


def table_from_kernel_json(data: dict) -> CostTable:
    """The bf16 cost table of one ``attention_kernel.py`` result."""
    rows = [r for r in data["full"] if "backend" in r]
    cudnn = {(r["D"], r["H"], r["S"]): r["ms"] for r in rows if r["backend"] == "cudnn"}
    ratios: dict[tuple[int, int, float], list[float]] = {}
    for r in rows:
        D, S = r["D"], r["S"]
        want = "ours-ptr" if (D == 128 and S < TMA_MIN_KV_LEN) else "ours"
        if r["backend"] != want or (D, r["H"], S) not in cudnn:
            continue
        ratios.setdefault((D, S, float(r["nominal_density"])), []).append(r["ms"] / cudnn[(D, r["H"], S)])
    curves = {}
    for D in sorted({k[0] for k in ratios}):
        seq_lens = tuple(sorted({k[1] for k in ratios if k[0] == D}))
        densities = tuple(sorted({k[2] for k in ratios if k[0] == D}))
        grid = tuple(tuple(math.exp(sum(map(math.log, ratios[(D, S, d)])) / len(ratios[(D, S, d)]))
                           for d in densities) for S in seq_lens)
        curves[("bf16", D)] = CostCurve(seq_lens, densities, grid)
    meta = data["meta"]
    return CostTable(
        meta["device"], meta["torch"], meta["triton"], KERNEL_VERSION, "shipped", curves,
        dict(date=meta["date"], derived_from="benchmarks/attention_kernel.py --full (bf16 kernel vs cuDNN, same run)",
             heads_averaged=sorted({r["H"] for r in rows}), batch=1, dtype="bfloat16",
             mask="random top-k key blocks per query block", fp8="no curve: fp8 lookups use the bf16 curve"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, default=Path("dit_accel/kernels/cost_table.json"))
    a = p.parse_args()
    table = table_from_kernel_json(json.loads(a.source.read_text()))
    a.out.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    for (prec, D), c in sorted(table.curves.items()):
        for S, r in zip(c.seq_lens, c.ratios):
            print(f"{prec} D={D} S={S}: " + " ".join(f"{d:g}:{x:.3f}" for d, x in zip(c.densities, r))
                  + f"  break-even {c.break_even(S):.3f}")


if __name__ == "__main__":
    main()
