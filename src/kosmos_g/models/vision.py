"""The image encoder: a CLIP ViT whose every output token is kept.

Kosmos-G feeds the MLLM all (image_size / patch)^2 + 1 tokens of the vision tower
(257 for ViT-L/14 at 224 px), taken after CLIP's final LayerNorm (open_clip's
``ln_post``, transformers' ``post_layernorm``) and L2-normalised per token. Only the
last block and that LayerNorm train in stage 3 (the official ``no_freeze_layer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..config import VisionConfig


def hf_vision_config(config: VisionConfig) -> CLIPVisionConfig:
    """Our vision config as a transformers ``CLIPVisionConfig``."""
    return CLIPVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        image_size=config.image_size, patch_size=config.patch_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
    )


class VisionTower(nn.Module):
    """CLIP ViT -> (N, tokens, width) L2-normalised features."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.clip = CLIPVisionModel(hf_vision_config(config))
        self.clip.config._attn_implementation = "sdpa"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 257, 1024) for ViT-L/14."""
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state  # before post-LN
        hidden = self.clip.post_layernorm(hidden)
        return F.normalize(hidden, dim=-1)

    def lock(self) -> None:
        """Freeze every weight (stage 1 and 2 keep CLIP frozen)."""
        for p in self.parameters():
            p.requires_grad_(False)

    def unlock_last_block(self) -> None:
        """Train the last encoder block and the final LayerNorm, as the official stage 3."""
        self.lock()
        for module in (self.clip.encoder.layers[-1], self.clip.post_layernorm):
            for p in module.parameters():
                p.requires_grad_(True)
