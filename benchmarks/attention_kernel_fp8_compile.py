"""Compile the 8-bit block-sparse kernel for Hopper (sm_90) without a GPU and report what the compiler made.

    python benchmarks/attention_kernel_fp8_compile.py

For each variant (recipe, head dim, launch) it prints shared memory, registers and spills (cuobjdump
shipped with Triton), the wgmma shapes and types in the PTX, the matrix instructions in the SASS (QGMMA =
fp8, IGMMA = int8, HGMMA = 16-bit), TMA copies and the ``wgmma.wait_group`` depths. It answers offline
whether the fp8 products really run on fp8 wgmma, whether V needs a transposition in shared memory, and
whether a launch fits two programs per SM.
"""

from __future__ import annotations

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

from dit_accel.kernels import block_sparse_fp8_triton as k8  # noqa: E402
from dit_accel.kernels.block_sparse_fp8_triton import Launch8bit  # noqa: E402


def compile_variant(d: int = 128, launch: Launch8bit = Launch8bit(128, 128, 8, 3, True), qk_int8: bool = False,
                    v_fp8: bool = True, precise: bool = False, stats: bool = False):
    """``triton.compile`` of ``_block_sparse_fwd_8bit`` (128-blocks, ragged keys, no index) for sm_90."""
    fn = k8._block_sparse_fwd_8bit
    qdt = "i8" if qk_int8 else "fp8e4nv"
    vdt = "fp8e4nv" if v_fp8 else "bf16"
    ptrs = {"Q8": f"*{qdt}", "K8": f"*{qdt}", "V8": f"*{vdt}", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32",
            "RB": "*fp32", "O": "*bf16", "LSE": "*fp32", "TS": "*fp32", "KV_NUM": "*i32", "KV_IDX": "*i32",
            "FULL_NUM": "*i32", "FULL_IDX": "*i32", "QIDX": "*i32", "HIDX": "*i32"}
    consts = dict(HEAD_DIM=d, D_PAD=d, Q_BLOCK=128, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, KV_BLOCK=128,
                  HAS_FULL=False, EVEN_KV=False, RETURN_LSE=stats, TILE_STATS=stats, USE_TMA=launch.use_tma,
                  HAS_QIDX=False, QK_INT8=qk_int8, V_FP8=v_fp8, PV_PRECISE=precise, SOFT_FP8=False, HAS_HIDX=False)
    sig: dict = {}
    const: dict = {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n], const[(i,)] = "constexpr", consts[n]
        elif n in ptrs:
            sig[n] = ptrs[n]
        elif n in ("desc_k", "desc_v"):
            if not launch.use_tma:
                sig[n], const[(i,)] = "constexpr", None
            elif n == "desc_k":
                sig[n] = f"tensordesc<{qdt}[{launch.block_n}, {d}]>"
            else:
                sig[n] = f"tensordesc<{vdt}[{d}, {launch.block_n}]>" if v_fp8 else \
                    f"tensordesc<{vdt}[{launch.block_n}, {d}]>"
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    # Pointers and the padded lengths are multiples of 16 at run time, and Triton specialises on that.
    aligned = [i for i, n in enumerate(fn.arg_names) if n in ptrs or n in ("S_Q_PAD", "S_KV_PAD", "stride_om")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def _cuobjdump(cubin: bytes, *args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(tool), *args, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def main() -> None:
    split = Launch8bit(64, 128, 4, 3, True)
    variants = [
        ("fp8 D128 default", dict()),
        ("fp8 D128 pointer loads", dict(launch=Launch8bit(128, 128, 8, 3, False))),
        ("fp8 D128 + LSE/tile stats", dict(stats=True)),
        ("fp8 D128 pv_precise", dict(precise=True)),
        ("fp8 D128 64-row programs", dict(launch=split)),
        ("fp8 D64 default", dict(d=64)),
        ("fp8 D64 64-row programs", dict(d=64, launch=split)),
        ("fp8 Q.K, 16-bit P.V", dict(v_fp8=False)),
        ("int8 Q.K, fp8 P.V", dict(qk_int8=True)),
        ("int8 Q.K, 16-bit P.V", dict(qk_int8=True, v_fp8=False)),
    ]
    for name, kw in variants:
        try:
            k = compile_variant(**kw)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:28s} FAILED {e!r}"[:400])
            continue
        ptx = k.asm["ptx"]
        res = _cuobjdump(k.asm["cubin"], "--dump-resource-usage")
        sass = _cuobjdump(k.asm["cubin"], "-sass")
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
        regs = f"regs {m.group(1)} stack {m.group(2)} local {m.group(3)}" if m else ""
        shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+?)\s", ptx)))
        waits = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)))
        print(f"{name:28s} shared {k.metadata.shared:6d} B  {regs}  wgmma {shapes}  SASS QGMMA {sass.count('QGMMA')} "
              f"IGMMA {sass.count('IGMMA')} HGMMA {sass.count('HGMMA')}  TMA {ptx.count('cp.async.bulk.tensor')}  "
              f"waits {waits}", flush=True)


if __name__ == "__main__":
    main()
