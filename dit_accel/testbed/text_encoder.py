"""The testbed's own text encoder: word embeddings + a few small transformer layers.

It knows exactly the words of the caption grammar (`captions.VOCAB`), stored in its config so a
checkpoint keeps working when the grammar gains words: token ids from `captions.tokenize` are
remapped by word to the encoder's own table, and a word the checkpoint never learned is a clear
error. A learned begin token is always present at position 0, so the empty caption (the
unconditional branch of classifier-free guidance) is a valid, non-empty sequence, like T5's lone
end token in Wan. Padding positions of the output are zero, as WanPipeline pads T5 embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class _EncoderLayer(nn.Module):
    """Pre-norm transformer layer with a key-padding mask (SDPA)."""

    def __init__(self, width: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # keep: (B, N) bool, True = real token; broadcast over heads and queries.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.ffn(self.norm2(x))


class TestbedTextEncoder(ModelMixin, ConfigMixin):
    """Encodes caption token ids to (B, 1 + max_length, width) embeddings for Wan's cross-attention.

    Args (config):
        vocab: the words this encoder learned, "<pad>" first (a copy of `captions.VOCAB` at training time).
        max_length: caption tokens kept (longer captions are an error in `captions.tokenize`).
        width: embedding width (= the transformer's `text_dim`).
        num_layers, num_heads, ffn_dim: transformer layer shape.
    """

    @register_to_config
    def __init__(
        self,
        vocab: Sequence[str] = ("<pad>",),
        max_length: int = 32,
        width: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 512,
    ) -> None:
        super().__init__()
        if len(vocab) == 0 or vocab[0] != "<pad>":
            raise ValueError(f"vocab must start with '<pad>', got {list(vocab)[:3]}")
        if width % num_heads:
            raise ValueError(f"width ({width}) must be a multiple of num_heads ({num_heads})")
        self.token_embedding = nn.Embedding(len(vocab), width)
        self.begin_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1 + max_length, width) * 0.02)
        self.layers = nn.ModuleList([_EncoderLayer(width, num_heads, ffn_dim) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(width)
        self._remap_cache: tuple[tuple[str, ...], torch.Tensor] | None = None

    def remap_ids(self, input_ids: torch.Tensor, source_vocab: Sequence[str]) -> torch.Tensor:
        """Map ids of `source_vocab` (the grammar's VOCAB) to this encoder's ids, by word.

        Raises ValueError naming any word of the input that this checkpoint never learned.
        """
        source = tuple(source_vocab)
        if self._remap_cache is None or self._remap_cache[0] != source:
            own = {w: i for i, w in enumerate(self.config.vocab)}
            table = torch.tensor([own.get(w, -1) for w in source], dtype=torch.long)
            self._remap_cache = (source, table)
        table = self._remap_cache[1].to(input_ids.device)
        mapped = table[input_ids]
        if (mapped < 0).any():
            missing = sorted({source[i] for i in input_ids[mapped < 0].tolist()})
            raise ValueError(
                f"words {missing} are not in this text encoder's vocabulary (the weights were trained on "
                f"{len(self.config.vocab) - 1} words): {list(self.config.vocab[1:])}"
            )
        return mapped

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed (B, L) ids with (B, L) bool mask -> (B, 1 + max_length, width), zeros at padding."""
        b, n = input_ids.shape
        if n > self.config.max_length:
            raise ValueError(f"captions have {n} tokens, more than max_length={self.config.max_length}")
        mask = attention_mask.bool()
        x = self.token_embedding(input_ids)
        x = torch.cat([self.begin_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = x + self.position_embedding[: n + 1].to(x.dtype)
        keep = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        for layer in self.layers:
            x = layer(x, keep)
        x = self.norm_out(x) * keep[..., None].to(x.dtype)
        # Pad to a fixed length so every caption gives the same sequence shape (cross-attention keys).
        return F.pad(x, (0, 0, 0, self.config.max_length - n))
