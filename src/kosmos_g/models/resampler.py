"""The official "xconnector": 64 learned queries read the image tokens once.

Linear(1024 -> 2048) on the vision tokens, then ONE multi-head attention whose queries
are the learned latents and whose keys/values are concat(image tokens, latents). No
FFN and no LayerNorm: that is exactly what the released model has.
"""

from __future__ import annotations

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

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(N, 257, 1024) vision tokens -> (N, 64, 2048) image slots."""
        x = self.dense(image_tokens)  # (N, S, C)
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, Q, C)
        return self.attn(latents, context=torch.cat([x, latents], dim=1))
