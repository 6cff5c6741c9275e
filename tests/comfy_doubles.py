"""Test doubles of the ComfyUI interfaces the dit-accel nodes use (ComfyUI is not installed in CI).

Each double follows ComfyUI's code at commit a125cd84 (0.3.64), trimmed to what the nodes touch:

* :class:`ModelPatcher`: ``clone`` (deep copy of ``model_options``, copy of the wrapper registry),
  ``add_wrapper_with_key`` / ``get_wrappers``, ``set_model_patch_replace`` (``comfy/model_patcher.py``);
* :class:`WrapperExecutor`: ``comfy/patcher_extension.py``;
* :func:`attention`: ``comfy.ldm.modules.attention.wrap_attn`` around ``attention_pytorch``;
* :class:`TinyWan` / :class:`TinyFlux`: the forwards of ``comfy.ldm.wan.model.WanModel`` (self-attention
  over the video tokens, separate cross-attention, ``("double_block", i)`` patches) and
  ``comfy.ldm.flux.model.Flux`` (joint attention, text first; double then single blocks), with the class
  paths ComfyUI's classes have;
* :func:`sample`: ``CFGGuider.sample`` / ``outer_sample`` / ``calc_cond_batch`` / ``apply_model`` (the
  ``OUTER_SAMPLE`` and ``APPLY_MODEL`` wrappers, ``sample_sigmas``, ``sigmas``, ``cond_or_uncond``)
  with an Euler sampler on a flow-matching schedule.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

# --- comfy/patcher_extension.py ------------------------------------------------------------------


class WrapperExecutor:
    """Calls the wrappers around ``original`` in order (same as ComfyUI's)."""

    def __init__(self, original: Callable, class_obj: Any, wrappers: list[Callable], idx: int) -> None:
        self.original = original
        self.class_obj = class_obj
        self.wrappers = wrappers.copy()
        self.idx = idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def copy_nested_dicts(d: dict) -> dict:
    out = d.copy()
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = copy_nested_dicts(v)
        elif isinstance(v, list):
            out[k] = v.copy()
    return out


def merge_nested_dicts(dict1: dict, dict2: dict, copy_dict1: bool = True) -> dict:
    merged = copy_nested_dicts(dict1) if copy_dict1 else dict1
    for key, value in dict2.items():
        if isinstance(value, dict):
            cur = merged.setdefault(key, {})
            merged[key] = merge_nested_dicts(value, cur)
        elif isinstance(value, list):
            merged.setdefault(key, []).extend(value)
        else:
            merged[key] = value
    return merged


def all_wrappers(wrapper_type: str, transformer_options: dict) -> list[Callable]:
    out: list[Callable] = []
    for w in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        out.extend(w)
    return out


# --- comfy/model_patcher.py ------------------------------------------------------------------------


class BaseModel(torch.nn.Module):
    """``comfy.model_base.BaseModel``: holds ``diffusion_model``; ``apply_model`` runs the APPLY_MODEL wrappers."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return WrapperExecutor(self._apply_model, self, all_wrappers("apply_model", transformer_options), 0).execute(
            x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs)


class ModelPatcher:
    """``comfy.model_patcher.ModelPatcher``, the parts the nodes use."""

    def __init__(self, model: BaseModel) -> None:
        self.model = model
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.wrappers: dict[str, dict[Any, list[Callable]]] = {}

    def clone(self) -> "ModelPatcher":
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        return n

    def add_wrapper_with_key(self, wrapper_type: str, key: str, wrapper: Callable) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def get_wrappers(self, wrapper_type: str, key: str) -> list[Callable]:
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None) -> None:
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = to.get("patches_replace", {}).copy()
        to["patches_replace"][name] = to["patches_replace"].get(name, {}).copy()
        to["patches_replace"][name][(block_name, number)] = patch
        self.model_options["transformer_options"] = to

    def get_model_object(self, name: str) -> Any:
        return functools.reduce(getattr, name.split("."), self.model)


# --- comfy.ldm.modules.attention -----------------------------------------------------------------

ATTENTION_CALLS: list[tuple[int, int]] = []
"""(query length, key length) of every attention call that reached ComfyUI's own function."""


def wrap_attn(func):
    """ComfyUI's ``wrap_attn``: an ``optimized_attention_override`` in ``transformer_options`` replaces the call."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        remove = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                transformer_options = kwargs.get("transformer_options", None)
                remove = True
                kwargs["_inside_attn_wrapper"] = True
                if transformer_options is not None and "optimized_attention_override" in transformer_options:
                    return transformer_options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


@wrap_attn
def attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """``attention_pytorch``."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    ATTENTION_CALLS.append((q.shape[2], k.shape[2]))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


# --- tiny models with ComfyUI's class paths and forward structure -----------------------------------


def _linear(i: int, o: int, g: torch.Generator) -> torch.nn.Linear:
    lin = torch.nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g) / math.sqrt(i))
        lin.bias.copy_(torch.randn(o, generator=g) * 0.02)
    return lin


class _WanBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int, g: torch.Generator) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = _linear(dim, 3 * dim, g)
        self.o = _linear(dim, dim, g)
        self.cq = _linear(dim, dim, g)
        self.ckv = _linear(dim, 2 * dim, g)
        self.co = _linear(dim, dim, g)
        self.mod = _linear(dim, dim, g)

    def forward(self, x, e, context, transformer_options={}):
        q, k, v = self.qkv(F.layer_norm(x, x.shape[-1:])).chunk(3, dim=-1)
        x = x + self.o(attention(q, k, v, heads=self.heads, transformer_options=transformer_options)) * (1 + self.mod(e))
        ck, cv = self.ckv(context).chunk(2, dim=-1)
        return x + self.co(attention(self.cq(x), ck, cv, heads=self.heads, transformer_options=transformer_options))


class TinyWan(torch.nn.Module):
    """ComfyUI's Wan forward: patchify ``(B, C, T, H, W)`` by (1, 2, 2), blocks with ``("double_block", i)`` patches."""

    def __init__(self, channels: int = 4, dim: int = 128, heads: int = 2, layers: int = 3, text_dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch_size = (1, 2, 2)
        self.channels = channels
        self.embed = _linear(channels * 4, dim, g)
        self.text = _linear(text_dim, dim, g)
        self.time = _linear(1, dim, g)
        self.blocks = torch.nn.ModuleList(_WanBlock(dim, heads, text_dim, g) for _ in range(layers))
        self.head = _linear(dim, channels * 4, g)

    def forward(self, x, timestep, context=None, transformer_options={}, **kwargs):
        b, c, t, h, w = x.shape
        tokens = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // 2) * (w // 2), c * 4)
        x = self.embed(tokens)
        e = self.time(timestep.reshape(b, 1, 1).to(x.dtype))
        context = self.text(context)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"], args["txt"], transformer_options=args["transformer_options"])}

                x = blocks_replace[("double_block", i)]({"img": x, "txt": context, "vec": e, "pe": None,
                                                         "transformer_options": transformer_options},
                                                        {"original_block": block_wrap})["img"]
            else:
                x = block(x, e, context, transformer_options=transformer_options)
        out = self.head(x).reshape(b, t, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h, w)
        return out


TinyWan.__module__ = "comfy.ldm.wan.model"
TinyWan.__qualname__ = "WanModel"


class _FluxDouble(torch.nn.Module):
    def __init__(self, dim: int, heads: int, g: torch.Generator) -> None:
        super().__init__()
        self.heads = heads
        self.img_qkv = _linear(dim, 3 * dim, g)
        self.txt_qkv = _linear(dim, 3 * dim, g)
        self.img_o = _linear(dim, dim, g)
        self.txt_o = _linear(dim, dim, g)

    def forward(self, img, txt, vec, transformer_options={}):
        b = img.shape[0]
        split = lambda t: t.view(b, t.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # noqa: E731
        iq, ik, iv = split(self.img_qkv(F.layer_norm(img, img.shape[-1:])))
        tq, tk, tv = split(self.txt_qkv(F.layer_norm(txt, txt.shape[-1:])))
        out = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), self.heads,
                        skip_reshape=True, transformer_options=transformer_options)  # (B, S, H * D), as comfy.ldm.flux.math
        n = txt.shape[1]
        return img + self.img_o(out[:, n:]) + vec, txt + self.txt_o(out[:, :n])


class _FluxSingle(torch.nn.Module):
    def __init__(self, dim: int, heads: int, g: torch.Generator) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = _linear(dim, 3 * dim, g)
        self.o = _linear(dim, dim, g)

    def forward(self, x, vec, transformer_options={}):
        b = x.shape[0]
        q, k, v = self.qkv(F.layer_norm(x, x.shape[-1:])).view(b, x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.heads, skip_reshape=True, transformer_options=transformer_options)
        return x + self.o(out) + vec


class TinyFlux(torch.nn.Module):
    """ComfyUI's Flux forward: 2x2 patches, double blocks on (img, txt), then single blocks on ``cat(txt, img)``."""

    def __init__(self, channels: int = 4, dim: int = 128, heads: int = 2, double: int = 2, single: int = 2,
                 text_dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch_size = 2
        self.img_in = _linear(channels * 4, dim, g)
        self.txt_in = _linear(text_dim, dim, g)
        self.time = _linear(1, dim, g)
        self.double_blocks = torch.nn.ModuleList(_FluxDouble(dim, heads, g) for _ in range(double))
        self.single_blocks = torch.nn.ModuleList(_FluxSingle(dim, heads, g) for _ in range(single))
        self.out = _linear(dim, channels * 4, g)

    def forward(self, x, timestep, context=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        img = self.img_in(x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4))
        txt = self.txt_in(context)
        vec = self.time(timestep.reshape(b, 1, 1).to(img.dtype)) * 0.01
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(args["img"], args["txt"], args["vec"], transformer_options=args["transformer_options"])
                    return out

                out = blocks_replace[("double_block", i)]({"img": img, "txt": txt, "vec": vec, "pe": None,
                                                           "transformer_options": transformer_options}, {"original_block": block_wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, vec, transformer_options=transformer_options)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"], transformer_options=args["transformer_options"])}

                img = blocks_replace[("single_block", i)]({"img": img, "vec": vec, "pe": None,
                                                           "transformer_options": transformer_options}, {"original_block": block_wrap})["img"]
            else:
                img = block(img, vec, transformer_options=transformer_options)
        img = img[:, txt.shape[1]:]
        return self.out(img).reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


TinyFlux.__module__ = "comfy.ldm.flux.model"
TinyFlux.__qualname__ = "Flux"


class TinyPixArt(torch.nn.Module):
    """A model with the class path of ComfyUI's PixArt (which dit-accel cannot patch)."""


TinyPixArt.__module__ = "comfy.ldm.pixart.pixartms"
TinyPixArt.__qualname__ = "PixArtMS"


def patcher(diffusion_model: torch.nn.Module) -> ModelPatcher:
    """A ModelPatcher over ``diffusion_model`` (what UNETLoader returns)."""
    return ModelPatcher(BaseModel(diffusion_model))


# --- comfy/samplers.py: CFGGuider + calc_cond_batch + an Euler sampler --------------------------------


class Guider:
    """``CFGGuider``: ``sample`` clones the model options, merges the patcher's wrappers into them and
    runs the ``OUTER_SAMPLE`` wrappers around ``outer_sample``."""

    def __init__(self, model_patcher: ModelPatcher, positive: torch.Tensor, negative: torch.Tensor | None, cfg: float) -> None:
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.positive, self.negative, self.cfg = positive, negative, cfg

    def sample(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        orig = self.model_options
        self.model_options = copy_nested_dicts(self.model_options)
        try:
            merge_nested_dicts(self.model_options["transformer_options"].setdefault("wrappers", {}),
                               self.model_patcher.wrappers, copy_dict1=False)
            return WrapperExecutor(self.outer_sample, self, all_wrappers("outer_sample", self.model_options["transformer_options"]), 0
                                   ).execute(noise, sigmas)
        finally:
            self.model_options = orig

    def outer_sample(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        options = copy_nested_dicts(self.model_options)
        options["transformer_options"]["sample_sigmas"] = sigmas
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i].reshape(1)
            denoised = self.predict(x, sigma, options)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> torch.Tensor:
        conds = [self.positive] + ([self.negative] if self.cfg != 1.0 and self.negative is not None else [])
        cond_or_uncond = list(range(len(conds)))
        to = copy_nested_dicts(model_options["transformer_options"])
        to["cond_or_uncond"] = cond_or_uncond[:]
        to["sigmas"] = sigma
        batch = len(conds)
        out = self.model_patcher.model.apply_model(torch.cat([x] * batch), torch.cat([sigma] * batch), None,
                                                   torch.cat(conds), None, to)
        v = out.chunk(batch)
        pred = v[0] if batch == 1 else v[1] + self.cfg * (v[0] - v[1])
        return x - pred * sigma.reshape(-1, *([1] * (x.dim() - 1)))


def sample(model: ModelPatcher, shape: tuple[int, ...], steps: int = 6, cfg: float = 1.0, seed: int = 0,
           text_tokens: int = 8, text_dim: int = 32) -> torch.Tensor:
    """KSampler with an Euler sampler on the flow-matching schedule ``sigma_i = 1 - i / steps``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    positive = torch.randn(1, text_tokens, text_dim, generator=g)
    negative = torch.randn(1, text_tokens, text_dim, generator=g)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        return Guider(model, positive, negative, cfg).sample(noise, sigmas)
