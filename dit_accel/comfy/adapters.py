"""One small adapter per ComfyUI diffusion-model class: what differs between ComfyUI's model families.

An adapter answers, for one ComfyUI model class (``comfy.ldm.*``):

* which block-replace keys (``patches_replace["dit"]``) the model's forward looks up, in model order;
* the token grid and text length of a forward, from the inputs ComfyUI's ``apply_model`` receives;
* whether an attention call (seen by ``optimized_attention_override``, shapes only) is the visual
  self-attention dit-accel accelerates, and where its text tokens sit;
* how a block's argument dict maps to ``(hidden, text)`` streams and back (for the feature cache).

Checked against ComfyUI's sources at commit a125cd84 (0.3.64): Wan (``WanModel``: self-attention over
the video tokens, separate cross-attention), LTX-Video (``LTXVModel``: same), FLUX.1 (``Flux``: joint
attention, text first; single blocks hold ``cat(text, image)``), HunyuanVideo (``HunyuanVideo``: joint,
text last; single blocks hold ``cat(image, text)``), SD3/3.5 (``OpenAISignatureMMDITWrapper``: joint,
text first, plus SD3.5's image-only ``attn2``). ComfyUI has no CogVideoX, and its PixArt blocks call
attention without ``transformer_options`` and have no block-replace hook, so neither can be patched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

TextPosition = Literal["none", "first", "last"]
BlockKey = tuple[str, int]
Streams = tuple[torch.Tensor, "torch.Tensor | None"]


class UnsupportedModel(ValueError):
    """The ComfyUI model class has no dit-accel adapter."""


@dataclass(frozen=True)
class ForwardInfo:
    """What one diffusion-model forward looks like, read from ComfyUI's ``apply_model`` inputs."""

    batch: int
    """Batch rows of the forward (all guidance branches together)."""
    grid: tuple[int, int, int]
    """Latent token grid ``(F', H', W')`` of the visual tokens."""
    patch_size: tuple[int, int, int]
    """Extent of one token in latent units ``(p_t, p_h, p_w)``."""
    text_tokens: int
    """Joint-attention families: text tokens in the joint sequence; cross-attention families: 0."""
    cross_lengths: tuple[int, ...] = ()
    """Cross-attention families: key lengths of the cross-attention calls (text, image embeds)."""

    @property
    def visual_tokens(self) -> int:
        """``F' * H' * W'``."""
        return math.prod(self.grid)


def _grid(shape: torch.Size, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tokens per axis of a latent ``(B, C, [T,] H, W)`` after ComfyUI pads it to the patch size."""
    if len(shape) == 5:
        t, h, w = shape[2], shape[3], shape[4]
    elif len(shape) == 4:
        t, h, w = 1, shape[2], shape[3]
    else:
        raise ValueError(f"expected a (B, C, H, W) or (B, C, T, H, W) latent, got shape {tuple(shape)}")
    return (-(-t // patch[0]), -(-h // patch[1]), -(-w // patch[2]))


class Adapter:
    """Base class; one subclass per ComfyUI diffusion-model class."""

    name: ClassVar[str] = ""
    """dit-accel family name (used in logs and in the attention context)."""
    class_path: ClassVar[str] = ""
    """``module.QualName`` of the ComfyUI diffusion-model class (``type(model.diffusion_model)``)."""
    text_position: ClassVar[TextPosition] = "none"
    """Where the text tokens sit in the joint self-attention sequence (``"none"``: no joint attention)."""
    single_stream: ClassVar[str] = ""
    """Block name whose ``img`` argument is the concatenated ``text + image`` stream (``""``: none)."""

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """Token extent in latent units."""
        raise NotImplementedError

    def block_keys(self, model: torch.nn.Module) -> list[tuple[BlockKey, torch.nn.Module]]:
        """``(("double_block"|"single_block", i), block module)`` in the order the forward runs them."""
        raise NotImplementedError

    def text_length(self, model: torch.nn.Module, context: torch.Tensor | None, extra: dict[str, Any]) -> int:
        """Text tokens of the joint sequence (joint families); cross families return 0."""
        return 0

    def cross_lengths(self, context: torch.Tensor | None, extra: dict[str, Any]) -> tuple[int, ...]:
        """Key lengths of the cross-attention calls (cross families)."""
        return ()

    def read_forward(self, model: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None,
                     extra: dict[str, Any]) -> ForwardInfo:
        """The forward's layout from ``apply_model``'s latent ``x``, text ``context`` and extra conds."""
        patch = self.patch_size(model)
        return ForwardInfo(batch=x.shape[0], grid=_grid(x.shape, patch), patch_size=patch,
                           text_tokens=self.text_length(model, context, extra), cross_lengths=self.cross_lengths(context, extra))

    def self_attention(self, info: ForwardInfo, q_len: int, k_len: int) -> tuple[int, TextPosition] | None:
        """``(text tokens, text position)`` when a call with these query/key lengths is the visual
        self-attention, else ``None`` (the call is left to ComfyUI)."""
        raise NotImplementedError

    # --- streams of one block (feature cache) -----------------------------------------------------
    def streams(self, key: BlockKey, args: dict[str, Any], text_len: int) -> Streams:
        """``(hidden, text)`` entering block ``key``; ``text_len`` is the text length of a single stream."""
        if key[0] == self.single_stream:
            return self._split(args["img"], text_len)
        return args["img"], args.get("txt") if self.text_position != "none" else None

    def with_streams(self, key: BlockKey, args: dict[str, Any], hidden: torch.Tensor, text: torch.Tensor | None) -> dict[str, Any]:
        """``args`` with the block's streams replaced (what the original block is called with)."""
        return dict(args, **self.pack(key, hidden, text))

    def output_streams(self, key: BlockKey, out: dict[str, Any], text_len: int) -> Streams:
        """``(hidden, text)`` leaving block ``key`` from the dict the block returned."""
        if key[0] == self.single_stream:
            return self._split(out["img"], text_len)
        return out["img"], out.get("txt") if self.text_position != "none" else None

    def pack(self, key: BlockKey, hidden: torch.Tensor, text: torch.Tensor | None) -> dict[str, Any]:
        """The dict a block returns, from its streams."""
        if key[0] == self.single_stream:
            return {"img": self._join(hidden, text)}
        if self.text_position == "none":
            return {"img": hidden}
        return {"img": hidden, "txt": text}

    def _split(self, joint: torch.Tensor, text_len: int) -> Streams:
        if self.text_position == "first":
            return joint[:, text_len:], joint[:, :text_len]
        return joint[:, : joint.shape[1] - text_len], joint[:, joint.shape[1] - text_len:]

    def _join(self, hidden: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        if text is None:
            return hidden
        return torch.cat((text, hidden), 1) if self.text_position == "first" else torch.cat((hidden, text), 1)


class _CrossAttentionFamily(Adapter):
    """Self-attention over the video tokens only; text enters through separate cross-attention."""

    def self_attention(self, info: ForwardInfo, q_len: int, k_len: int) -> tuple[int, TextPosition] | None:
        """``(0, "none")`` for a square call of a length no cross-attention has, else ``None``."""
        if q_len != k_len or q_len in info.cross_lengths:
            # A cross-attention call whose key length equals the query length looks like self-attention;
            # every such call is left to ComfyUI rather than guessed.
            return None
        return (0, "none")

    def cross_lengths(self, context: torch.Tensor | None, extra: dict[str, Any]) -> tuple[int, ...]:
        """The text length, and the CLIP image-embedding length when ``extra`` holds ``clip_fea`` (Wan I2V)."""
        lengths = [] if context is None else [context.shape[1]]
        clip = extra.get("clip_fea")
        if isinstance(clip, torch.Tensor):
            lengths.append(clip.shape[-2])
        return tuple(lengths)


class WanAdapter(_CrossAttentionFamily):
    """ComfyUI's Wan 2.1/2.2 (T2V, I2V, FLF2V): ``comfy.ldm.wan.model.WanModel``."""

    name = "wan"
    class_path = "comfy.ldm.wan.model.WanModel"

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """``model.patch_size``, ``(p_t, p_h, p_w)``."""
        return tuple(int(p) for p in model.patch_size)  # type: ignore[return-value]

    def block_keys(self, model: torch.nn.Module) -> list[tuple[BlockKey, torch.nn.Module]]:
        """``("double_block", i)`` for each of ``model.blocks``."""
        return [(("double_block", i), b) for i, b in enumerate(model.blocks)]


class LTXVAdapter(_CrossAttentionFamily):
    """ComfyUI's LTX-Video: ``comfy.ldm.lightricks.model.LTXVModel`` (patch size 1 over the latent)."""

    name = "ltx_video"
    class_path = "comfy.ldm.lightricks.model.LTXVModel"

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """The patchifier's ``patch_size``, ``(p_t, p_h, p_w)``."""
        return tuple(int(p) for p in model.patchifier.patch_size)  # type: ignore[return-value]

    def block_keys(self, model: torch.nn.Module) -> list[tuple[BlockKey, torch.nn.Module]]:
        """``("double_block", i)`` for each of ``model.transformer_blocks``."""
        return [(("double_block", i), b) for i, b in enumerate(model.transformer_blocks)]


class _JointFamily(Adapter):
    """Joint attention over ``text + image`` tokens in one sequence."""

    def self_attention(self, info: ForwardInfo, q_len: int, k_len: int) -> tuple[int, TextPosition] | None:
        """``(0, "none")`` for an image-only call, ``(text tokens, text position)`` for the joint sequence, else
        ``None``."""
        if q_len != k_len or q_len < info.visual_tokens:
            return None
        if q_len == info.visual_tokens:
            return (0, "none")  # image-only self-attention (SD3.5's attn2)
        if q_len >= info.visual_tokens + info.text_tokens and info.text_tokens > 0:
            # Extra tokens beyond text + grid (reference latents) leave the grid unknown to the layout.
            return (info.text_tokens, self.text_position)
        return None

    def text_length(self, model: torch.nn.Module, context: torch.Tensor | None, extra: dict[str, Any]) -> int:
        """The length of ``context``."""
        return 0 if context is None else context.shape[1]


class FluxAdapter(_JointFamily):
    """ComfyUI's FLUX.1 (dev, schnell, Kontext): ``comfy.ldm.flux.model.Flux``."""

    name = "flux"
    class_path = "comfy.ldm.flux.model.Flux"
    text_position = "first"
    single_stream = "single_block"

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """``(1, p, p)``: an image model patches only the spatial axes."""
        return (1, int(model.patch_size), int(model.patch_size))

    def block_keys(self, model: torch.nn.Module) -> list[tuple[BlockKey, torch.nn.Module]]:
        """The ``double_blocks`` as ``("double_block", i)``, then the ``single_blocks`` as ``("single_block", i)``."""
        return ([(("double_block", i), b) for i, b in enumerate(model.double_blocks)]
                + [(("single_block", i), b) for i, b in enumerate(model.single_blocks)])


class HunyuanVideoAdapter(_JointFamily):
    """ComfyUI's HunyuanVideo: ``comfy.ldm.hunyuan_video.model.HunyuanVideo`` (text after the video)."""

    name = "hunyuan_video"
    class_path = "comfy.ldm.hunyuan_video.model.HunyuanVideo"
    text_position = "last"
    single_stream = "single_block"

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """``model.patch_size`` as ``(p_t, p_h, p_w)``; a two-value patch size is spatial only (``p_t = 1``)."""
        p = [int(v) for v in model.patch_size]
        return (1, p[0], p[1]) if len(p) == 2 else (p[0], p[1], p[2])

    def block_keys(self, model: torch.nn.Module) -> list[tuple[BlockKey, torch.nn.Module]]:
        """The ``double_blocks`` as ``("double_block", i)``, then the ``single_blocks`` as ``("single_block", i)``."""
        return ([(("double_block", i), b) for i, b in enumerate(model.double_blocks)]
                + [(("single_block", i), b) for i, b in enumerate(model.single_blocks)])

    def text_length(self, model: torch.nn.Module, context: torch.Tensor | None, extra: dict[str, Any]) -> int:
        """The length of ``context`` plus that of the ByT5 glyph tokens (``txt_byt5``) when given."""
        n = 0 if context is None else context.shape[1]
        byt5 = extra.get("txt_byt5")
        if isinstance(byt5, torch.Tensor):
            n += byt5.shape[1]
        return n


class SD3Adapter(_JointFamily):
    """ComfyUI's SD3/3.5 MMDiT: ``comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper``
    (joint attention with the text first)."""

    name = "sd3"
    class_path = "comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper"
    text_position = "first"

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """``(1, p, p)``: an image model patches only the spatial axes."""
        return (1, int(model.patch_size), int(model.patch_size))

    def block_keys(self, model: torch.nn.Module) -> list[tuple[BlockKey, torch.nn.Module]]:
        """``("double_block", i)`` for each of ``model.joint_blocks``."""
        return [(("double_block", i), b) for i, b in enumerate(model.joint_blocks)]

    def text_length(self, model: torch.nn.Module, context: torch.Tensor | None, extra: dict[str, Any]) -> int:
        """The length of ``context`` plus the model's learned register tokens."""
        # Learned register tokens are prepended to the text (0 in SD3 and SD3.5).
        return (0 if context is None else context.shape[1]) + int(getattr(model, "register_length", 0))


ADAPTERS: tuple[Adapter, ...] = (WanAdapter(), LTXVAdapter(), FluxAdapter(), HunyuanVideoAdapter(), SD3Adapter())
"""The supported ComfyUI model classes."""

UNSUPPORTED: dict[str, str] = {
    "comfy.ldm.pixart.pixartms.PixArtMS": (
        "ComfyUI's PixArt calls attention without transformer_options and its blocks have no block-replace "
        "hook, so neither dit-accel's attention nor its cache can be installed through ComfyUI's patching API"
    ),
}
"""ComfyUI model classes of families dit-accel supports on diffusers, with the reason they cannot be patched here."""


def class_path(model: torch.nn.Module) -> str:
    """``module.QualName`` of ``model``'s class."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def supported_classes() -> list[str]:
    """Class paths of the ComfyUI diffusion models with an adapter."""
    return [a.class_path for a in ADAPTERS]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter of ComfyUI diffusion model ``model``; :class:`UnsupportedModel` names the class and the
    supported ones otherwise (subclasses such as VACE or S2V Wan are not matched: their forwards differ)."""
    path = class_path(model)
    for adapter in ADAPTERS:
        if adapter.class_path == path:
            return adapter
    reason = UNSUPPORTED.get(path, "dit-accel has no adapter for this ComfyUI model class")
    raise UnsupportedModel(f"dit-accel: model {path} is not supported: {reason}; supported ComfyUI model classes: {supported_classes()}")


def adapter_named(name: str) -> Adapter:
    """The adapter of family ``name``."""
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise KeyError(f"no adapter named {name!r}; adapters: {[a.name for a in ADAPTERS]}")
