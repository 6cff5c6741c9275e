"""Real-ComfyUI check of the dit-accel node pack (run by hand, on CPU; writes JSON, a log and a screenshot).

Setup, outside the repository (ComfyUI's code is never committed):

    git clone <ComfyUI snapshot> /work/comfyui                      # the commit is recorded in the JSON
    python -m venv /work/comfy-venv && . /work/comfy-venv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1                    # x86_64: runs on CPU; torchaudio not needed
    pip install -r /work/comfyui/requirements.txt (without torch*), torchsde
    pip install -e . --no-deps && pip install diffusers==0.42.1 accelerate triton imageio imageio-ffmpeg torchmetrics
    pip install playwright && apt-get install chromium               # the screenshot (Debian's chromium)

Run:  /work/comfy-venv/bin/python benchmarks/comfy_check.py --comfyui /work/comfyui

What it does: builds tiny random-weight Wan 2.1, FLUX.1, HunyuanVideo, SD3, LTX-Video and PixArt diffusion models
with ComfyUI's own classes and saves their state dicts as ComfyUI checkpoints (ComfyUI's model detection builds
them from the keys; where it fixes the width, as for FLUX and LTX-Video, only the block count is small);
starts ComfyUI headless on CPU (``--base-directory`` a temporary folder whose ``custom_nodes`` holds the
shim written by ``python -m dit_accel.comfy.install`` and a check-only helper node pack); confirms the
dit-accel nodes in ``/object_info``; turns each example workflow of ``dit_accel/comfy/examples`` into a
check variant and queues it through ``/prompt`` once per configuration; compares the sampled latents
(``SaveLatent``). The check variant keeps the example's model chain (UNETLoader, the dit-accel nodes,
ModelSamplingSD3, FluxGuidance, KSampler, the Empty*Latent node) and replaces what needs real weights:
the text encoders (CLIPLoader/DualCLIPLoader + CLIPTextEncode) by a helper node returning random
conditioning of the encoder's width, and the VAE (VAELoader, VAEDecode, Save*) by SaveLatent. Families
without an example of their own (HunyuanVideo, SD3, LTX-Video, PixArt) run the Wan example's graph with
their own Empty*Latent node. Every sequence has >= 1024 tokens, so the sparse path runs at the default
``min_seq_len`` (1024).

Checks per family: the dense preset equals the model without the node bit for bit; the original model
run again after the patched runs equals its first output bit for bit (nothing was left on the model);
``full`` (the sparse kernel path at density 1) stays within 1e-4 relative L2 of the dense output;
sparse attention (with ``dense_above: null``, so break-even routing does not send these tiny models' broad
heads dense) runs sparse calls, the feature cache reuses steps, the balanced preset plans its calls (each
runs sparse or is routed dense by break-even) and reuses steps, and all stay within the stated relative-L2
tolerances of the dense output (TOL_SPARSE, TOL_CACHE). PixArt, which
ComfyUI's patching API cannot reach, must be refused by the node with a message saying so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "dit_accel" / "comfy" / "examples"
NODE_IDS = ("DitAccelApply", "DitAccelSparseAttention", "DitAccelFeatureCache")

TOL_FULL = 1e-4
"""Relative L2 of ``full`` (block-sparse kernel at density 1, torch reference on CPU) vs dense: float rounding only."""
TOL_SPARSE = 0.05
"""Relative L2 bound of sparse attention (combo, balanced) vs dense on the tiny random models."""
TOL_CACHE = 0.5
"""Relative L2 bound of the feature-cache and balanced-preset runs vs dense. A bound on the plumbing, not a
quality figure: a random-weight model's block residual changes a lot between steps, so reusing it on half
of 4-12 steps moves the latent by 0.06-0.4 (measured values are in the JSON); quality is measured on the
trained testbed (benchmarks/results/caching_compare.json)."""

HELPER_NODES = '''"""Check-only helper nodes for benchmarks/comfy_check.py (written into a temporary custom_nodes)."""
import torch


class DitAccelCheckConditioning:
    """Random text conditioning in place of a text encoder: (1, tokens, dim) plus an optional pooled vector."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
            "dim": ("INT", {"default": 4096, "min": 1, "max": 16384}),
            "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 16384}),
            "text_mask": ("BOOLEAN", {"default": False}),
            "tag": ("STRING", {"default": ""}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "dit-accel check"

    def run(self, seed, tokens, dim, pooled_dim, text_mask, tag):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, dim, generator=g)
        extra = {}
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        if text_mask:  # LTX-Video's conditioning carries the text encoder's attention mask
            extra["attention_mask"] = torch.ones(1, tokens)
        return ([[cond, extra]],)


NODE_CLASS_MAPPINGS = {"DitAccelCheckConditioning": DitAccelCheckConditioning}
'''

FAMILIES: dict[str, dict[str, Any]] = {
    "wan": {
        "example": "wan_t2v_dit_accel_api.json",
        "checkpoint": "tiny_wan.safetensors",
        "text": {"tokens": 16, "dim": 4096, "pooled_dim": 0, "text_mask": False},
        "latent": {"width": 256, "height": 256, "length": 13},   # (1, 16, 4, 32, 32): 4 x 16 x 16 = 1024 tokens
        "sampler": {"steps": 12, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple"},
    },
    "flux": {
        "example": "flux_dit_accel_api.json",
        "checkpoint": "tiny_flux.safetensors",
        "text": {"tokens": 16, "dim": 4096, "pooled_dim": 768, "text_mask": False},
        "latent": {"width": 512, "height": 512},                  # (1, 16, 64, 64): 32 x 32 = 1024 tokens + 16 text
        "sampler": {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
    },
    # Families without an example of their own run the Wan example's graph with their latent node.
    "hunyuan_video": {
        "example": "wan_t2v_dit_accel_api.json",
        "checkpoint": "tiny_hunyuan_video.safetensors",
        "text": {"tokens": 16, "dim": 4096, "pooled_dim": 768, "text_mask": False},
        "latent_node": "EmptyHunyuanLatentVideo",
        "latent": {"width": 256, "height": 256, "length": 13, "batch_size": 1},   # 4 x 16 x 16 = 1024 tokens + 16 text
        "sampler": {"steps": 12, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple"},
    },
    "sd3": {
        "example": "wan_t2v_dit_accel_api.json",
        "checkpoint": "tiny_sd3.safetensors",
        "text": {"tokens": 16, "dim": 4096, "pooled_dim": 2048, "text_mask": False},
        "latent_node": "EmptySD3LatentImage",
        "latent": {"width": 512, "height": 512, "batch_size": 1},                 # 32 x 32 = 1024 tokens + 16 text
        "sampler": {"steps": 12, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple"},
    },
    "ltx_video": {
        "example": "wan_t2v_dit_accel_api.json",
        "checkpoint": "tiny_ltxv.safetensors",
        "text": {"tokens": 16, "dim": 4096, "pooled_dim": 0, "text_mask": True},
        "latent_node": "EmptyLTXVLatentVideo",
        "latent": {"width": 1024, "height": 512, "length": 9, "batch_size": 1},   # (2, 16, 32) = 1024 tokens
        "sampler": {"steps": 6, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
    },
    # ComfyUI's PixArt cannot be patched (adapters.UNSUPPORTED): the node must fail with that reason.
    "pixart": {
        "example": "wan_t2v_dit_accel_api.json",
        "checkpoint": "tiny_pixart.safetensors",
        "text": {"tokens": 16, "dim": 4096, "pooled_dim": 0, "text_mask": False},
        "latent_node": "EmptyLatentImage",
        "latent": {"width": 256, "height": 256, "batch_size": 1},
        "sampler": {"steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
        "unsupported": True,
    },
}
"""Per family: the example it checks, the tiny checkpoint, the stand-in conditioning and the sampling."""

RUNS: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = [
    ("no_node", []),
    ("dense", [("DitAccelApply", {"preset": "dense", "preset_file": "", "overrides": ""})]),
    ("full", [("DitAccelSparseAttention", {"method": "full", "quality": "balanced", "precision": "bf16", "min_seq_len": 1024, "options": ""})]),
    # break-even routing would run these tiny models' broad heads dense: the check forces the sparse route
    ("sparse", [("DitAccelSparseAttention", {"method": "combo", "quality": "balanced", "precision": "bf16", "min_seq_len": 1024,
                                             "options": '{"dense_above": null}'})]),
    ("cache", [("DitAccelFeatureCache", {"scheduler": "procache", "budget": 0.5, "schedule_file": "", "warmup_steps": 2, "options": ""})]),
    ("balanced", [("DitAccelApply", {"preset": "balanced", "preset_file": "", "overrides": ""})]),
    ("no_node_again", []),
]
"""The configurations, in the order they run (the original model first and last)."""


# --- tiny checkpoints, built with ComfyUI's own classes ---------------------------------------------
def _init_(model: Any, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and (name.endswith(".scale") or "norm" in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def build_checkpoint(family: str, comfyui: Path, path: Path) -> dict[str, Any]:
    """Save a tiny random-weight model of ``family`` as a ComfyUI diffusion-model checkpoint."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # before comfy.model_management is imported: no CUDA probe
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    if family == "wan":
        from comfy.ldm.wan.model import WanModel

        # ComfyUI derives dim, ffn_dim, layers and heads (dim // 128) from the weights: 2 heads of 128.
        config = dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=16, out_dim=16, text_dim=4096)
        model = WanModel(**config, operations=ops)
    elif family == "flux":
        from comfy.ldm.flux.model import Flux

        # ComfyUI's Flux detection fixes the width (3072, 24 heads of 128); only the block counts are free.
        config = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                      mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                      patch_size=2, qkv_bias=True, guidance_embed=True)
        model = Flux(**config, operations=ops)
    elif family == "hunyuan_video":
        from comfy.ldm.hunyuan_video.model import HunyuanVideo

        # Width from the weights: 256 = 2 heads of 128.
        config = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                      hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                      theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False)
        model = HunyuanVideo(**config, operations=ops)
    elif family == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

        # depth 2 -> width 128 = 2 heads of 64 (ComfyUI derives depth = width // 64).
        config = dict(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=2048,
                      context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                      pos_embed_max_size=32, num_patches=1024, pos_embed_scaling_factor=None)
        model = OpenAISignatureMMDITWrapper(**config, operations=ops)
    elif family == "ltx_video":
        from comfy.ldm.lightricks.model import LTXVModel

        # ComfyUI fixes 32 heads and reads the head dim from the weights: 32 x 64 = 2048 wide.
        config = dict(in_channels=128, cross_attention_dim=2048, attention_head_dim=64, num_attention_heads=32,
                      caption_channels=4096, num_layers=2)
        model = LTXVModel(**config, operations=ops)
    elif family == "pixart":
        from comfy.ldm.pixart.pixartms import PixArtMS

        config = dict(input_size=64, patch_size=2, in_channels=4, hidden_size=1152, depth=1, num_heads=16,
                      caption_channels=4096, pe_interpolation=1, micro_condition=False, model_max_length=300)
        model = PixArtMS(**config, operations=ops)
    else:
        raise ValueError(f"no checkpoint recipe for {family!r}")
    _init_(model, seed=0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name == "pos_embed":  # SD3's learned position table is a buffer
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    sd = {k: v.detach().to(torch.bfloat16 if family == "flux" else torch.float32).contiguous() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in sd.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    del model, sd
    gc.collect()
    return {"config": config, "parameters": params, "dtype": "bfloat16" if family == "flux" else "float32"}


# --- workflows ---------------------------------------------------------------------------------------
def check_variant(example: dict[str, Any], family: str, chain: list[tuple[str, dict[str, Any]]], run: str, tag: str) -> dict[str, Any]:
    """The example with its dit-accel nodes replaced by ``chain``, and its text encoders and VAE replaced
    by the helper conditioning node and SaveLatent (see the module doc)."""
    spec = FAMILIES[family]
    wf = copy.deepcopy(example)
    accel = {nid for nid, node in wf.items() if node["class_type"] in NODE_IDS}

    def source(ref: list) -> list:
        while ref[0] in accel:
            ref = wf[ref[0]]["inputs"]["model"]
        return ref

    consumers = [(nid, node) for nid, node in wf.items() if nid not in accel and isinstance(node["inputs"].get("model"), list)
                 and node["inputs"]["model"][0] in accel]
    base = None
    for nid, node in consumers:
        base = source(node["inputs"]["model"])
    for nid in accel:
        del wf[nid]
    last = base
    for i, (class_type, inputs) in enumerate(chain):
        nid = f"accel{i}"
        wf[nid] = {"class_type": class_type, "inputs": {"model": last, **inputs}}
        last = [nid, 0]
    for nid, node in consumers:
        node["inputs"]["model"] = last

    seeds = iter(range(1, 100))
    for nid, node in list(wf.items()):
        ct = node["class_type"]
        if ct == "UNETLoader":
            node["inputs"]["unet_name"] = spec["checkpoint"]
        elif ct in ("CLIPLoader", "DualCLIPLoader", "VAELoader", "VAEDecode") or ct.startswith("Save"):
            del wf[nid]
        elif ct == "CLIPTextEncode":
            wf[nid] = {"class_type": "DitAccelCheckConditioning", "inputs": {"seed": next(seeds), **spec["text"], "tag": tag}}
        elif ct.startswith("Empty") and "Latent" in ct:
            if "latent_node" in spec:
                wf[nid] = {"class_type": spec["latent_node"], "inputs": dict(spec["latent"])}
            else:
                node["inputs"].update(spec["latent"])
        elif ct == "KSampler":
            node["inputs"].update(spec["sampler"])
            wf["save"] = {"class_type": "SaveLatent", "inputs": {"samples": [nid, 0], "filename_prefix": f"check/{family}_{run}"}}
    return wf


def validate_example(example: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """Problems of an API-format workflow against ``/object_info``: unknown node types or input names,
    combo values not offered (file names of models excepted), links to missing nodes."""
    problems = []
    for nid, node in example.items():
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"node {nid}: unknown class_type {node['class_type']!r}")
            continue
        known = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            if name not in known:
                problems.append(f"node {nid} ({node['class_type']}): unknown input {name!r}")
            elif isinstance(value, list):
                if value[0] not in example:
                    problems.append(f"node {nid}: input {name!r} links to missing node {value[0]!r}")
            elif isinstance(known[name][0], list) and known[name][0] and value not in known[name][0] and not str(value).endswith(".safetensors"):
                problems.append(f"node {nid}: {name}={value!r} not among {known[name][0][:8]}")
        required = set(info["input"].get("required", {}))
        missing = required - set(node["inputs"])
        if missing:
            problems.append(f"node {nid} ({node['class_type']}): missing inputs {sorted(missing)}")
    return problems


# --- the server ----------------------------------------------------------------------------------------
class Server:
    """ComfyUI started headless on CPU with ``--base-directory`` ``base``."""

    def __init__(self, python: str, comfyui: Path, base: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "w")
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--base-directory", str(base)]
        self.proc = subprocess.Popen(cmd, cwd=comfyui, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {log}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        raise TimeoutError("ComfyUI did not start within 300 s")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict[str, Any]) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path}: {exc.code} {exc.read().decode()[:2000]}") from exc
        return json.loads(body) if body else None

    def run(self, workflow: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Queue ``workflow`` and wait for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": workflow, "client_id": "dit-accel-check"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_file.close()


def _log_summary(log: Path, start: int) -> tuple[dict[str, Any] | None, int]:
    """The last ``dit-accel run:`` summary written to the server log after offset ``start``."""
    text = log.read_text(errors="replace")
    found = None
    for m in re.finditer(r"dit-accel run: (\{.*\})", text[start:]):
        found = json.loads(m.group(1))
    return found, len(text)


def _rel_l2(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def screenshot(url: str, workflow: dict[str, Any], out: Path) -> str:
    """Load ``workflow`` into ComfyUI's page in headless Chromium and save a PNG; returns a status line."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(url, wait_until="networkidle", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        page.evaluate("async (wf) => { await window.app.loadApiJson(wf, 'dit-accel example'); }", workflow)
        page.wait_for_timeout(2000)
        page.keyboard.press("Escape")  # a first-start dialog, if any
        page.wait_for_timeout(500)
        page.evaluate("() => { const c = window.app.canvas; if (c && c.ds) { c.ds.scale = 0.6; c.ds.offset = [10, 40]; c.setDirty(true, true); } }")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out))
        nodes = page.evaluate("() => (window.app.graph.nodes || window.app.graph._nodes).map(n => n.type)")
        browser.close()
    return f"{len(nodes)} nodes in the page graph: {sorted(set(nodes))}"


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI source checkout (not in this repository)")
    parser.add_argument("--python", default=sys.executable, help="Python of ComfyUI's environment (default: this one)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per queued workflow")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "comfy_check.json")
    parser.add_argument("--no-screenshot", action="store_true")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in FAMILIES:
            parser.error(f"unknown family {f!r}; known: {sorted(FAMILIES)}")

    comfyui = args.comfyui.resolve()
    commit = subprocess.run(["git", "-C", str(comfyui), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    version = (comfyui / "comfyui_version.py").read_text().split('"')[1] if (comfyui / "comfyui_version.py").exists() else None
    out_json = args.out
    out_log = out_json.with_suffix(".log")
    out_png = out_json.with_suffix(".png")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="dit_accel_comfy_check_"))
    for sub in ("custom_nodes", "models/diffusion_models", "output", "input", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    from dit_accel.comfy.install import write_shim

    write_shim(base)
    (base / "custom_nodes" / "dit_accel_check").mkdir()
    (base / "custom_nodes" / "dit_accel_check" / "__init__.py").write_text(HELPER_NODES)

    import torch
    from safetensors.torch import load_file

    result: dict[str, Any] = {
        "comfyui_commit": commit,
        "comfyui_version": version,
        "dit_accel_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tolerances": {"full_vs_dense_rel_l2": TOL_FULL, "sparse_vs_dense_rel_l2": TOL_SPARSE, "cache_and_preset_vs_dense_rel_l2": TOL_CACHE},
        "bypassed": ("text encoders (CLIPLoader/DualCLIPLoader + CLIPTextEncode) -> DitAccelCheckConditioning (random "
                     "conditioning of the encoder width, fixed seeds); VAE (VAELoader/VAEDecode/Save*) -> SaveLatent; "
                     "latents compared directly"),
        "families": {},
    }
    for family in families:
        t0 = time.time()
        info = build_checkpoint(family, comfyui, base / "models" / "diffusion_models" / FAMILIES[family]["checkpoint"])
        result["families"][family] = {"checkpoint": info, "checkpoint_build_s": round(time.time() - t0, 1)}
        print(f"[{family}] checkpoint: {info['parameters'] / 1e6:.1f} M parameters", flush=True)

    server = Server(args.python, comfyui, base, args.port, out_log)
    failures: list[str] = []
    try:
        object_info = server.get("/object_info")
        listed = {n: n in object_info for n in NODE_IDS}
        result["nodes_listed"] = listed
        result["node_inputs"] = {n: sorted(object_info[n]["input"]["required"]) for n in NODE_IDS if n in object_info}
        result["node_python_module"] = {n: object_info[n].get("python_module") for n in NODE_IDS if n in object_info}
        if not all(listed.values()):
            failures.append(f"nodes missing from /object_info: {[n for n, ok in listed.items() if not ok]}")
        log_pos = 0
        for family in families:
            spec = FAMILIES[family]
            example = json.loads((EXAMPLES / spec["example"]).read_text())
            fam = result["families"][family]
            fam["example"] = f"dit_accel/comfy/examples/{spec['example']}"
            fam["example_problems"] = validate_example(example, object_info)
            failures += [f"{family} example: {p}" for p in fam["example_problems"]]
            fam["runs"] = {}
            latents: dict[str, Any] = {}
            if spec.get("unsupported"):
                hist = server.run(check_variant(example, family, RUNS[1][1], "dense", "first"), args.timeout)
                msgs = [m for m in hist.get("status", {}).get("messages", []) if m[0] == "execution_error"]
                message = msgs[-1][1].get("exception_message", "") if msgs else ""
                fam["checks"] = {"node_error": message.strip(), "passed": {"node says the model is not supported": "is not supported" in message}}
                if "is not supported" not in message:
                    failures.append(f"{family}: the node did not refuse the model clearly: {message!r}")
                print(f"[{family}] unsupported: {message.strip()[:160]}", flush=True)
                continue
            for run, chain in RUNS:
                tag = "again" if run == "no_node_again" else "first"
                wf = check_variant(example, family, chain, run, tag)
                t0 = time.time()
                hist = server.run(wf, args.timeout)
                seconds = time.time() - t0
                status = hist.get("status", {})
                entry: dict[str, Any] = {"status": status.get("status_str"), "seconds": round(seconds, 1)}
                summary, log_pos = _log_summary(out_log, log_pos)
                if chain:
                    entry["dit_accel"] = summary
                if status.get("status_str") != "success":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    entry["error"] = msgs[-1][1].get("exception_message") if msgs else status
                    failures.append(f"{family}/{run}: {entry['error']}")
                else:
                    files = sorted((base / "output" / "check").glob(f"{family}_{run}_*.latent"))
                    latents[run] = load_file(str(files[-1]))["latent_tensor"]
                    entry["latent_shape"] = list(latents[run].shape)
                fam["runs"][run] = entry
                print(f"[{family}] {run}: {entry['status']} in {seconds:.1f} s", flush=True)
            ref = latents.get("no_node")
            checks: dict[str, Any] = {}
            if ref is not None:
                def rel(name: str) -> float | None:
                    return _rel_l2(latents[name], ref) if name in latents else None

                checks["dense_identical_to_no_node"] = "dense" in latents and bool(torch.equal(latents["dense"], ref))
                checks["original_identical_after_patched_runs"] = "no_node_again" in latents and bool(torch.equal(latents["no_node_again"], ref))
                for name in ("full", "sparse", "cache", "balanced"):
                    checks[f"{name}_rel_l2_vs_dense"] = rel(name)
                    checks[f"{name}_finite"] = name in latents and bool(torch.isfinite(latents[name]).all())
                runs = fam["runs"]

                def stat(name: str, *keys: str) -> Any:
                    value = runs.get(name, {}).get("dit_accel") or {}
                    for k in keys:
                        value = value.get(k) if isinstance(value, dict) else None
                    return value

                checks["full_sparse_calls"] = stat("full", "sparse_calls")
                checks["sparse_sparse_calls"] = stat("sparse", "sparse_calls")
                checks["sparse_mean_density"] = stat("sparse", "mean_density")
                checks["cache_reused_calls"] = stat("cache", "cache", "reused")
                checks["cache_compute_fraction"] = stat("cache", "cache", "compute_fraction")
                checks["balanced_sparse_calls"] = stat("balanced", "sparse_calls")
                # the preset's method planned every call it reached: each ran sparse or was routed dense by break-even
                checks["balanced_planned_calls"] = (stat("balanced", "sparse_calls") or 0) + (
                    stat("balanced", "dense_reasons", "break_even") or 0)
                checks["balanced_reused_calls"] = stat("balanced", "cache", "reused")
                ok = {
                    "dense == no node (bitwise)": checks["dense_identical_to_no_node"],
                    "original again == original (bitwise)": checks["original_identical_after_patched_runs"],
                    f"full within {TOL_FULL}": (checks["full_rel_l2_vs_dense"] or 1.0) <= TOL_FULL and (checks["full_sparse_calls"] or 0) > 0,
                    f"sparse within {TOL_SPARSE}": (checks["sparse_rel_l2_vs_dense"] or 1.0) <= TOL_SPARSE and (checks["sparse_sparse_calls"] or 0) > 0,
                    f"cache within {TOL_CACHE}": (checks["cache_rel_l2_vs_dense"] or 1.0) <= TOL_CACHE and (checks["cache_reused_calls"] or 0) > 0,
                    f"balanced within {TOL_CACHE}": (checks["balanced_rel_l2_vs_dense"] or 1.0) <= TOL_CACHE
                    and checks["balanced_planned_calls"] > 0 and (checks["balanced_reused_calls"] or 0) > 0,
                }
                checks["passed"] = ok
                failures += [f"{family}: {name}" for name, good in ok.items() if not good]
            fam["checks"] = checks
        if not args.no_screenshot:
            example = json.loads((EXAMPLES / FAMILIES[families[0]]["example"]).read_text())
            try:
                server.post("/settings/Comfy.TutorialCompleted", True)  # no template dialog over the graph
                result["screenshot"] = {"file": out_png.name, "workflow": FAMILIES[families[0]]["example"],
                                        "page": screenshot(server.url, example, out_png)}
            except Exception as exc:  # noqa: BLE001 - the screenshot is a record, not a check
                result["screenshot"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        server.stop()
    result["failures"] = failures
    result["passed"] = not failures
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"passed": result["passed"], "failures": failures}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
