"""The official "xconnector": 64 learned queries read the image tokens once.

Linear(1024 -> 2048) on the vision tokens, then ONE multi-head attention whose queries
are the learned latents and whose keys/values are concat(image tokens, latents). No
FFN and no LayerNorm: that is exactly what the released model has.

``local_queries`` (not in the paper, off for the released model) gives each query one
tile of the patch grid to read instead of the whole image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ResamplerConfig
from .layers import Attention


class Resampler(nn.Module):
    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.input_dim, config.output_dim)
        self.latents = nn.Parameter(torch.randn(config.num_queries, config.output_dim))
        self.attn = Attention(dim=config.output_dim, num_heads=config.num_heads)
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(N, 257, 1024) vision tokens -> (N, 64, 2048) image slots."""
        x = self.dense(image_tokens)  # (N, S, C)
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, Q, C)
        mask = self.tile_mask(x.shape[1], x.device) if self.config.local_queries else None
        return self.attn(latents, context=torch.cat([x, latents], dim=1), mask=mask)

    def tile_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(Q, num_tokens + Q) bool, True where a query may read: the class token, its own
        tile of the row-major patch grid, and every latent."""
        key = (num_tokens, device)
        if key not in self._masks:
            queries = self.config.num_queries
            grid, side = math.isqrt(num_tokens - 1), math.isqrt(queries)
            if grid * grid != num_tokens - 1 or grid % side:
                raise ValueError(
                    f"local_queries needs 1 + g^2 image tokens with g divisible by "
                    f"{side}; got {num_tokens} tokens."
                )
            tile = grid // side
            rows = torch.arange(grid).repeat_interleave(grid) // tile  # (g^2,) tile row per patch
            cols = torch.arange(grid).repeat(grid) // tile
            owner = rows * side + cols  # (g^2,) which query's tile each patch is in
            patches = owner[None, :] == torch.arange(queries)[:, None]  # (Q, g^2)
            ones = torch.ones(queries, 1, dtype=torch.bool)
            mask = torch.cat([ones, patches, ones.expand(queries, queries)], dim=1)
            self._masks[key] = mask.to(device)
        return self._masks[key]
