"""Compile the block-sparse kernel for Hopper (sm_90) without a GPU and report what the compiler made of it.

    python benchmarks/attention_kernel_compile.py                 # D=128 bf16, the default variants
    python benchmarks/attention_kernel_compile.py --stages 3 5    # pipeline depths to compare

For each variant (load path, q_index, kv_index, tile stats, num_stages) it prints the shared memory, the
K/V buffers the pipeliner allocated, the async copies (cp.async / cp.async.bulk), wgmma and bar.sync counts
in the PTX, and registers/spills from cuobjdump (shipped with Triton). This is how the indexed path's
pipeline depth (``indexed_num_stages``) was found: with 3 stages the kv-index load takes one level of the
pipeline and K/V get 2 buffers instead of 3.

Divisibility attributes (multiple of 16) are passed for the pointers and the q/k/v/o strides, as Triton
specialises them at run time; without them the loads are not vectorised or pipelined and the report misleads.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dit_accel.kernels import block_sparse_triton as bst  # noqa: E402

_PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "TS": "*fp32", "KV_NUM": "*i32",
         "KV_IDX": "*i32", "FULL_NUM": "*i32", "FULL_IDX": "*i32", "QIDX": "*i32", "KVIDX": "*i32", "HIDX": "*i32"}


def compile_variant(use_tma: bool, q_index: bool, kv_index: bool, tile_stats: bool, num_stages: int,
                    block_n: int = 128, num_warps: int = 8, even_kv: bool = False):
    """``triton.compile`` of ``_block_sparse_fwd`` (D=128, bf16, 128-blocks) for sm_90."""
    fn = bst._block_sparse_fwd
    names = fn.arg_names
    consts = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=128, BLOCK_N=block_n, KV_BLOCK=128, HAS_FULL=False,
                  EVEN_KV=even_kv, RETURN_LSE=False, TILE_STATS=tile_stats, USE_TMA=use_tma, HAS_QIDX=q_index,
                  HAS_KVIDX=kv_index, HAS_HIDX=False)
    sig: dict = {}
    const: dict = {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            const[(i,)] = consts[n]
        elif n in _PTRS:
            sig[n] = _PTRS[n]
        elif n in ("desc_k", "desc_v"):
            if use_tma:
                sig[n] = f"tensordesc<bf16[{block_n}, 128]>"
            else:
                sig[n] = "constexpr"
                const[(i,)] = None
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    aligned = [i for i, n in enumerate(names) if n in _PTRS or (
        n.startswith(("stride_q", "stride_k", "stride_v", "stride_o")) and not n.startswith(("stride_qi", "stride_ki")))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(cubin: bytes) -> str:
    """``REG:.. STACK:.. LOCAL:..`` from Triton's bundled cuobjdump (empty if it is missing)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)} local {m.group(3)}" if m else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[3, 5])
    a = p.parse_args()
    variants = [  # (name, use_tma, q_index, kv_index)
        ("tma", True, False, False),
        ("ptr", False, False, False),
        ("tma+q_index", True, True, False),
        ("ptr+q_index+kv_index", False, True, True),
    ]
    for stages in a.stages:
        for name, tma, qi, ki in variants:
            for ts in (False, True):
                try:
                    k = compile_variant(tma, qi, ki, ts, stages)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"stages={stages} {name:22s} stats={ts:d} FAILED {e!r}"[:300])
                    continue
                ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
                kv_bufs = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x128x128xbf16", ttgir)
                print(f"stages={stages} {name:22s} stats={ts:d} shared {k.metadata.shared:6d} B  K/V buffers {kv_bufs}  "
                      f"cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca'):3d}  "
                      f"bulk {ptx.count('cp.async.bulk.tensor'):2d}  wgmma {ptx.count('wgmma.mma_async'):2d}  "
                      f"bar.sync {ptx.count('bar.sync'):2d}  {resources(k.asm['cubin'])}", flush=True)


if __name__ == "__main__":
    main()
