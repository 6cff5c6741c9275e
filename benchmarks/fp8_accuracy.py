"""Accuracy of the 8-bit attention path against float32 attention, on random inputs and on q/k/v captured from
the testbed during a real generation.

    python benchmarks/fp8_accuracy.py --device cpu  --out benchmarks/results/fp8_accuracy_cpu.json
    python benchmarks/fp8_accuracy.py --device cuda --out benchmarks/results/fp8_accuracy.json   # + Triton kernel

Every recipe (Q.K fp8 or int8 x P.V fp8 or 16-bit; ``precision="fp8"`` is int8/fp8) and the bf16 path run on
bfloat16 inputs; the reference is float32 block-sparse attention on the same (bf16-valued) inputs and the same
block mask, so the error is the path's own arithmetic. Masks: dense (density 1.0), random top-k blocks per
query block (like the kernel benchmark) and the top-k blocks of mean-pooled q.k scores (what a simple sparse
method plans), at ``--densities``.

Per row: source, shape, mask, density, recipe and, for the torch reference of the path
(:mod:`dit_accel.kernels.fp8_reference`, the kernel's arithmetic), relative L2 error, cosine similarity, max
absolute error, max LSE error and ``meets_target`` (relative L2 <= 0.03); the worst head's relative L2 too.
With ``--device cuda`` the row also holds the same numbers for the Triton kernel
(:func:`~dit_accel.kernels.block_sparse_fp8_triton.block_sparse_attention_fp8_triton`; the bf16 kernel for
the bf16 row) and its distance to the reference.

Sources:

- ``random``: standard normal q, k, v at ``--shapes`` (defaults CPU-sized: 12 heads, a few thousand tokens).
- ``testbed``: the shipped testbed pipeline generates one video; the self-attention q, k, v (after norms and
  RoPE, batch element 0 of the conditional branch) of ``--layers`` at ``--steps`` are captured by wrapping
  diffusers' ``dispatch_attention_fn`` in the Wan transformer module; the generation stops after the last
  captured step.

For long sequences only ``--query-blocks`` (testbed) or ``--random-query-blocks`` (random inputs) randomly
chosen whole query blocks are evaluated against all keys: the 8-bit arithmetic of a query row depends only on
its own query block and on all keys (K's mean, K's per-block and V's per-channel scales), so the rows of the
chosen blocks are exactly those of the full call.

The reference is computed one head at a time to bound memory (every quantisation scale is per head). Writes
the JSON after every source; Ctrl-C or SIGTERM writes what it has.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.kernels import block_mask_from_bool, block_sparse_attention_reference  # noqa: E402
from dit_accel.kernels.block_sparse_common import check_inputs  # noqa: E402
from dit_accel.kernels.fp8_common import QuantRecipe  # noqa: E402
from dit_accel.kernels.fp8_reference import block_sparse_attention_fp8_reference  # noqa: E402

TARGET_REL_L2 = 0.03
"""Issue 17's accuracy target (SageAttention's class): relative L2 error at most this."""

BLOCK = 128
"""Block size of the masks (the kernel's default)."""

RECIPES: dict[str, QuantRecipe | None] = {
    "bf16": None,
    "fp8/fp8": QuantRecipe("fp8", "fp8"),
    "fp8/16bit": QuantRecipe("fp8", "16bit"),
    "int8/fp8": QuantRecipe("int8", "fp8"),
    "int8/16bit": QuantRecipe("int8", "16bit"),
}
"""Paths measured, named ``qk/pv``; ``int8/fp8`` is what ``precision="fp8"`` runs. None is the 16-bit path on the
bf16 inputs: its torch reference computes in float32 and only rounds the output to bf16 (a floor); the bf16
Triton kernel also rounds P to bf16 for ``P @ V``."""


# ------------------------------------------------------------------------------------------------ masks


def topk_block_bool(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool ``(B, H, QB, KB)``: the ``round(density * KB)`` (at least 1) highest-scoring key blocks per query block."""
    kb = scores.shape[-1]
    if density >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    top = torch.topk(scores, max(1, round(density * kb)), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def block_masks(q: torch.Tensor, k: torch.Tensor, q_blocks: torch.Tensor, densities: list[float],
                seed: int) -> list[tuple[str, float, torch.Tensor]]:
    """(kind, requested density, bool block matrix ``(1, H, len(q_blocks), KB)``) of every mask studied.

    ``q_blocks``: global numbers of the query blocks whose rows ``q`` holds (ascending). Kinds: ``dense``;
    ``random`` (uniform random scores, top-k); ``pooled`` (top-k of mean-pooled q . k block scores plus the
    diagonal block where it exists).
    """
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    kb = math.ceil(S_kv / BLOCK)
    masks = []
    for density in densities:
        if density >= 1.0:
            masks.append(("dense", 1.0, torch.ones(1, H, len(q_blocks), kb, dtype=torch.bool)))
            continue
        g = torch.Generator().manual_seed(seed + int(1000 * density))
        masks.append(("random", density, topk_block_bool(torch.rand(1, H, len(q_blocks), kb, generator=g), density)))
        qp = _pool(q[:1].float())
        kp = _pool(k[:1].float())
        scores = (qp @ kp.transpose(-1, -2)).cpu()
        keep = topk_block_bool(scores, density)
        diag = q_blocks[q_blocks < kb]
        keep[:, :, (q_blocks < kb).nonzero().flatten(), diag] = True
        masks.append(("pooled", density, keep))
    return masks


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over each block of ``BLOCK`` rows (the last block may be partial)."""
    B, H, S, D = x.shape
    n = math.ceil(S / BLOCK)
    pad = n * BLOCK - S
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, n, BLOCK, D).sum(3)
    counts = torch.full((n,), float(BLOCK), device=x.device)
    counts[-1] = BLOCK - pad
    return xs / counts[:, None]


# ------------------------------------------------------------------------------------------------ metrics


def _errors(out: torch.Tensor, lse: torch.Tensor, ref: torch.Tensor, ref_lse: torch.Tensor) -> dict[str, float]:
    """Sums for the metrics of one head (combined over heads by :func:`_finish`)."""
    o, r = out.double(), ref.double()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse.double() - ref_lse.double())[finite].abs()
    return {"err2": float(((o - r) ** 2).sum()), "ref2": float((r ** 2).sum()), "out2": float((o ** 2).sum()),
            "dot": float((o * r).sum()), "max_abs": float((o - r).abs().max()),
            "lse_max": float(lse_err.max()) if lse_err.numel() else 0.0,
            "lse_inf_mismatch": bool((torch.isinf(lse) != torch.isinf(ref_lse)).any())}


def _finish(parts: list[dict[str, float]]) -> dict[str, Any]:
    """Relative L2 error, cosine, max abs / LSE error over all heads; the worst head's relative L2."""
    err2, ref2, out2, dot = (sum(p[f] for p in parts) for f in ("err2", "ref2", "out2", "dot"))
    rel = math.sqrt(err2 / max(ref2, 1e-300))
    return {"rel_l2": rel, "rel_l2_worst_head": max(math.sqrt(p["err2"] / max(p["ref2"], 1e-300)) for p in parts),
            "cosine": dot / max(math.sqrt(out2 * ref2), 1e-300), "max_abs_err": max(p["max_abs"] for p in parts),
            "lse_max_abs_err": max(p["lse_max"] for p in parts),
            "lse_inf_mismatch": any(p["lse_inf_mismatch"] for p in parts), "meets_target": rel <= TARGET_REL_L2}


# ------------------------------------------------------------------------------------------------ core


def accuracy_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, info: dict[str, Any],
                  densities: list[float], recipes: dict[str, QuantRecipe | None] = RECIPES,
                  q_blocks: torch.Tensor | None = None, seed: int = 0, kernel: bool = False) -> list[dict[str, Any]]:
    """One row per (mask, recipe): errors of the path against float32 attention on the same bf16 inputs.

    Args:
        q: ``(1, H, S_q, D)`` rows of the query blocks ``q_blocks`` (default: all rows, blocks 0..); k, v:
            ``(1, H, S_kv, D)``. Cast to bfloat16 (the path's inputs); the reference uses their float32 values.
        info: fields copied into every row (source, layer, step...).
        densities: mask densities; 1.0 is the dense mask, others give a ``random`` and a ``pooled`` mask.
        recipes: name -> recipe (None: the bf16 path).
        q_blocks: global query block numbers of ``q``'s rows (see the module docstring), ascending.
        seed: seed of the random masks.
        kernel: also run the Triton kernels and record their errors under ``kernel`` (CUDA inputs, or CPU inputs
            under ``TRITON_INTERPRET=1``, where only the fp8 P.V recipes compute correctly: the interpreter's
            16-bit ``tl.dot`` is wrong).
    """
    if q.shape[0] != 1:
        raise ValueError(f"q must have batch size 1, got shape {tuple(q.shape)}")
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    H, S_q, D = q.shape[1:]
    S_kv = k.shape[2]
    if q_blocks is None:
        q_blocks = torch.arange(math.ceil(S_q / BLOCK))
    rows = []
    for kind, density, keep in block_masks(q, k, q_blocks, densities, seed):
        refs = []
        for h in range(H):
            mask_h = block_mask_from_bool(keep[:, h:h + 1].to(q.device), S_q, S_kv, BLOCK)
            qh, kh, vh = (t[:, h:h + 1] for t in (q, k, v))
            refs.append((mask_h, block_sparse_attention_reference(qh.float(), kh.float(), vh.float(), mask_h,
                                                                   return_lse=True)))
        mask_all = block_mask_from_bool(keep.to(q.device), S_q, S_kv, BLOCK) if kernel else None
        for name, recipe in recipes.items():
            t0 = time.perf_counter()
            parts = []
            for h, (mask_h, ref) in enumerate(refs):
                qh, kh, vh = (t[:, h:h + 1] for t in (q, k, v))
                if recipe is None:
                    got = block_sparse_attention_reference(qh, kh, vh, mask_h, return_lse=True)
                else:
                    got = block_sparse_attention_fp8_reference(qh, kh, vh, mask_h, recipe=recipe, return_lse=True)
                parts.append(_errors(got.out, got.lse, ref.out, ref.lse))
            row = dict(info, heads=H, query_rows=S_q, tokens=S_kv, head_dim=D, dtype="bfloat16", mask=kind,
                       density_requested=density, density=float(keep.float().mean()), recipe=name,
                       impl="torch reference", **_finish(parts))
            if kernel:
                row["kernel"] = _kernel_errors(q, k, v, mask_all, recipe, refs)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    return rows


def _kernel_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, recipe: QuantRecipe | None,
                   refs: list) -> dict[str, Any]:
    """The Triton kernel's errors (all heads in one call) against the float32 reference, and its relative L2
    distance to the torch reference of its own arithmetic (per head, to bound memory)."""
    from dit_accel.kernels import block_sparse_attention
    from dit_accel.kernels.block_sparse_fp8_triton import block_sparse_attention_fp8_triton

    if recipe is None:
        got = block_sparse_attention(q, k, v, mask, return_lse=True)
    else:
        got = block_sparse_attention_fp8_triton(q, k, v, check_inputs(q, k, v, mask, None), recipe=recipe,
                                                return_lse=True)
    if q.is_cuda:
        torch.cuda.synchronize()
    parts, same = [], []
    for h, (mask_h, ref) in enumerate(refs):
        qh, kh, vh = (t[:, h:h + 1] for t in (q, k, v))
        out_h, lse_h = got.out[:, h:h + 1], got.lse[:, h:h + 1]
        parts.append(_errors(out_h, lse_h, ref.out, ref.lse))
        if recipe is None:
            path = block_sparse_attention_reference(qh, kh, vh, mask_h, return_lse=True)
        else:
            path = block_sparse_attention_fp8_reference(qh, kh, vh, mask_h, recipe=recipe, return_lse=True)
        same.append(_errors(out_h, lse_h, path.out, path.lse))
    result = _finish(parts)
    result["rel_l2_vs_torch_reference"] = _finish(same)["rel_l2"]
    result["nan"] = bool(got.out.isnan().any())
    return result


# ------------------------------------------------------------------------------------------------ sources


def random_inputs(heads: int, tokens: int, head_dim: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Standard normal q, k, v ``(1, heads, tokens, head_dim)`` in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, tokens, head_dim, generator=g).to(device, torch.bfloat16) for _ in range(3))


class _StopGeneration(Exception):
    """Raised from the capture wrapper once every wanted (step, layer) is captured."""


def capture_testbed_qkv(*, height: int, width: int, frames: int, num_steps: int, steps: list[int],
                        layers: list[int], guidance: float, seed: int, prompt: str,
                        device: str) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    """Self-attention q, k, v ``(1, H, S, D)`` (bf16, on CPU) of the shipped testbed at ``(step, layer)``.

    Wraps ``dispatch_attention_fn`` in diffusers' Wan transformer module for one generation (restored after):
    a call whose keys have as many tokens as its queries is self-attention; calls are counted per transformer
    forward to give the layer, and forwards per step (two with classifier-free guidance, conditional first).
    """
    import diffusers.models.transformers.transformer_wan as wan

    from dit_accel.testbed import load_testbed_pipeline

    pipe = load_testbed_pipeline(device=device)
    cfg = guidance > 1.0
    wanted = {(s, layer) for s in steps for layer in layers}
    captured: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    counter = {"forward": -1, "self_attn": 0}
    original = wan.dispatch_attention_fn

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        counter["forward"] += 1
        counter["self_attn"] = 0

    def dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if query.shape[1] == key.shape[1]:
            layer = counter["self_attn"]
            counter["self_attn"] += 1
            f = counter["forward"]
            step, branch = (f // 2, f % 2) if cfg else (f, 0)
            if branch == 0 and (step, layer) in wanted:
                captured[(step, layer)] = tuple(t[:1].transpose(1, 2).to("cpu", torch.bfloat16).contiguous()
                                                for t in (query, key, value))
                print(f"  captured step {step} layer {layer}: q {tuple(captured[(step, layer)][0].shape)}", flush=True)
        out = original(query, key, value, *args, **kwargs)
        if wanted <= set(captured):
            raise _StopGeneration
        return out

    handle = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    wan.dispatch_attention_fn = dispatch
    try:
        pipe(prompt, num_frames=frames, height=height, width=width, num_inference_steps=num_steps,
             guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(seed))
    except _StopGeneration:
        pass
    finally:
        wan.dispatch_attention_fn = original
        handle.remove()
    missing = wanted - set(captured)
    if missing:
        raise ValueError(f"not captured (step, layer): {sorted(missing)}; the model has "
                         f"{pipe.transformer.config.num_layers} layers and the run {num_steps} steps")
    return captured


def sample_query_blocks(tokens: int, count: int | None, seed: int) -> torch.Tensor:
    """Ascending global numbers of ``count`` random query blocks (all blocks when count is None or too large)."""
    n = math.ceil(tokens / BLOCK)
    if count is None or count >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:count].sort().values


def query_rows(q: torch.Tensor, q_blocks: torch.Tensor) -> torch.Tensor:
    """The rows of ``q`` ``(B, H, S, D)`` in the query blocks ``q_blocks``, in order."""
    S = q.shape[2]
    idx = (q_blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    return q[:, :, idx[idx < S].to(q.device)]


# ------------------------------------------------------------------------------------------------ main


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (source, recipe, mask): worst relative L2 over shapes/captures, lowest cosine, and whether every row
    meets the target."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["recipe"], r["mask"], r["density_requested"]), []).append(r)
    return [{"source": s, "recipe": rc, "mask": m, "density": d, "rows": len(g),
             "rel_l2_max": max(r["rel_l2"] for r in g), "rel_l2_mean": sum(r["rel_l2"] for r in g) / len(g),
             "cosine_min": min(r["cosine"] for r in g), "all_meet_target": all(r["meets_target"] for r in g)}
            for (s, rc, m, d), g in groups.items()]


def _versions() -> dict[str, str]:
    import diffusers

    v = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    """Run the study and write its JSON (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda also runs the Triton kernels")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_accuracy_cpu.json"))
    p.add_argument("--sources", default="random,testbed", help="comma list of random, testbed")
    p.add_argument("--shapes", default="12x4096x64,12x4096x128",
                   help="random inputs: comma list of HEADSxTOKENSxHEAD_DIM")
    p.add_argument("--densities", default="1.0,0.25", help="comma list; <1 gives a random and a pooled mask each")
    p.add_argument("--size", default="256x256x16", help="testbed HEIGHTxWIDTHxFRAMES")
    p.add_argument("--num-steps", type=int, default=10, help="testbed denoising steps of the generation")
    p.add_argument("--steps", default="0,4,9", help="testbed steps captured (stops after the last)")
    p.add_argument("--layers", default="0,3,5", help="testbed self-attention layers captured")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--prompt", default="a small red circle moving left on a striped background")
    p.add_argument("--query-blocks", type=int, default=16,
                   help="testbed: evaluate this many random whole query blocks against all keys (0: all)")
    p.add_argument("--random-query-blocks", type=int, default=0,
                   help="random inputs: evaluate this many random whole query blocks against all keys (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    densities = [float(x) for x in args.densities.split(",")]
    kernel = args.device == "cuda"
    height, width, frames = _ints(args.size.replace("x", ","))
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if kernel else f"cpu ({torch.get_num_threads()} threads)",
        "versions": _versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv, "target_rel_l2": TARGET_REL_L2,
        "settings": {"sources": args.sources.split(","), "shapes": args.shapes.split(","), "densities": densities,
                     "random_query_blocks": args.random_query_blocks or None, "block": BLOCK,
                     "input_dtype": "bfloat16", "reference": "float32 block-sparse attention",
                     "testbed": {"height": height, "width": width, "frames": frames, "num_steps": args.num_steps,
                                 "steps": _ints(args.steps), "layers": _ints(args.layers), "guidance": args.guidance,
                                 "prompt": args.prompt, "query_blocks": args.query_blocks or None,
                                 "branch": "conditional, batch element 0"},
                     "seed": args.seed, "kernel": "Triton" if kernel else "not run (CPU: torch reference only)"},
        "rows": [], "complete": False,
    }

    def write() -> None:
        result["summary"] = summarize(result["rows"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out} ({len(result['rows'])} rows)", flush=True)

    def add(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            print(f"  {r['source']} {r.get('step', '')}/{r.get('layer', '')} H{r['heads']} S{r['tokens']} "
                  f"D{r['head_dim']} {r['mask']}@{r['density']:.2f} {r['recipe']:>10}: rel_l2 {r['rel_l2']:.4f} "
                  f"cos {r['cosine']:.6f} max {r['max_abs_err']:.4f} lse {r['lse_max_abs_err']:.4f}"
                  + (f" | kernel {r['kernel']['rel_l2']:.4f}" if "kernel" in r else ""), flush=True)
        result["rows"] += rows

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)  # gpu_run.sh's timeout: keep the rows so far
    try:
        if "random" in args.sources:
            for i, shape in enumerate(args.shapes.split(",")):
                H, S, D = _ints(shape.replace("x", ","))
                print(f"random {shape}", flush=True)
                q, k, v = random_inputs(H, S, D, args.seed + i, args.device)
                blocks = sample_query_blocks(S, args.random_query_blocks or None, args.seed + i)
                add(accuracy_rows(query_rows(q, blocks), k, v, info={"source": "random"}, densities=densities,
                                  q_blocks=blocks, seed=args.seed, kernel=kernel))
            write()
        if "testbed" in args.sources:
            print(f"testbed {args.size}, {args.num_steps} steps: capturing steps {args.steps} layers {args.layers}",
                  flush=True)
            t0 = time.perf_counter()
            captured = capture_testbed_qkv(height=height, width=width, frames=frames, num_steps=args.num_steps,
                                           steps=_ints(args.steps), layers=_ints(args.layers), guidance=args.guidance,
                                           seed=args.seed, prompt=args.prompt, device=args.device)
            result["settings"]["testbed"]["capture_seconds"] = time.perf_counter() - t0
            for (step, layer), (q, k, v) in sorted(captured.items()):
                blocks = sample_query_blocks(q.shape[2], args.query_blocks or None, args.seed + 100 * step + layer)
                print(f"testbed step {step} layer {layer}: {len(blocks)} query blocks", flush=True)
                dev = [t.to(args.device) for t in (query_rows(q, blocks), k, v)]
                add(accuracy_rows(*dev, info={"source": "testbed", "step": step, "layer": layer},
                                  densities=densities, q_blocks=blocks, seed=args.seed + step, kernel=kernel))
                write()
        result["complete"] = True
    except KeyboardInterrupt:
        print("interrupted: writing the rows so far", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
