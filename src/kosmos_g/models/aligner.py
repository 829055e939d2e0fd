"""AlignerNet: from MLLM hidden states to the diffusion model's text-condition space.

M (always built) is an encoder-decoder: project the MLLM states 2048 -> 768, add
learned positions, run a bidirectional encoder, then 77 learned queries read it with a
non-causal decoder (self-attention + cross-attention). Its 77 x 768 output replaces
CLIP's text embedding, so the frozen U-Net never changes.

N (stage 2 only) reconstructs the MLLM states from M's output: source-length queries
read M's output with a decoder, an encoder refines them and a Linear maps back to
2048. The reconstruction loss keeps M's output informative beyond what CLIP's text
encoder can express (the paper's "AlignerNet").

Layer layout is torchscale's (pre-LN, sub-LN), as in the official release; positions
follow torchscale's ``PositionalEmbedding``, which numbers them from 2 (fairseq style),
so the first two rows of each table are never used.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlignerConfig
from .layers import Block, key_padding_mask

POSITION_OFFSET = 2  # torchscale PositionalEmbedding numbers positions from 2


class AlignerNet(nn.Module):
    def __init__(self, config: AlignerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        block = dict(dim=c.hidden_size, num_heads=c.num_heads, ffn_dim=c.ffn_dim,
                     dropout=c.dropout, attention_dropout=c.dropout)
        # --- M
        self.in_proj = nn.Linear(c.input_dim, c.hidden_size)
        self.in_positions = nn.Parameter(torch.randn(c.max_positions, c.hidden_size) * 0.02)
        self.encoder = nn.ModuleList(Block(**block) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.hidden_size)
        self.queries = nn.Parameter(torch.randn(c.num_queries, c.hidden_size))
        self.decoder = nn.ModuleList(Block(**block, cross_attention=True) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.output_dim) if c.output_dim != c.hidden_size else None
        # --- N (reconstruction), stage 2 only
        if c.reconstruction:
            if c.output_dim != c.hidden_size:
                raise ValueError("aligner.reconstruction needs output_dim == hidden_size "
                                 "(N reads M's output directly, as in the paper).")
            self.recon_queries = nn.Parameter(torch.randn(c.max_positions, c.hidden_size))
            self.recon_decoder = nn.ModuleList(
                Block(**block, cross_attention=True) for _ in range(c.recon_decoder_layers))
            self.recon_decoder_norm = nn.LayerNorm(c.hidden_size)
            self.recon_positions = nn.Parameter(torch.randn(c.max_positions, c.hidden_size) * 0.02)
            self.recon_encoder = nn.ModuleList(Block(**block) for _ in range(c.recon_encoder_layers))
            self.recon_encoder_norm = nn.LayerNorm(c.hidden_size)
            self.recon_proj = nn.Linear(c.hidden_size, c.input_dim)

    def _positions(self, table: torch.Tensor, length: int) -> torch.Tensor:
        if length + POSITION_OFFSET > table.shape[0]:
            raise ValueError(
                f"AlignerNet got {length} MLLM states; its position table allows "
                f"{table.shape[0] - POSITION_OFFSET}. Shorten the prompt."
            )
        return table[POSITION_OFFSET:POSITION_OFFSET + length]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """M: (B, T, 2048) MLLM states + (B, T) mask -> (B, 77, 768) condition."""
        B, T, _ = hidden.shape
        keys = key_padding_mask(attention_mask)  # (B, 1, 1, T)
        x = self.in_proj(hidden) + self._positions(self.in_positions, T).to(hidden.dtype)
        x = x * attention_mask[..., None].to(x.dtype)  # torchscale zeroes padded inputs
        for layer in self.encoder:
            x = layer(x, mask=keys)
        memory = self.encoder_norm(x)  # (B, T, D)
        q = self.queries.to(hidden.dtype).expand(B, -1, -1)  # (B, 77, D)
        for layer in self.decoder:
            q = layer(q, context=memory, context_mask=keys)
        q = self.decoder_norm(q)
        return self.out_proj(q) if self.out_proj is not None else q

    def reconstruct(self, condition: torch.Tensor, length: int) -> torch.Tensor:
        """N: (B, 77, D) condition -> (B, length, 2048) estimate of the MLLM states."""
        if not self.config.reconstruction:
            raise ValueError("This AlignerNet has no N; build it with aligner.reconstruction=True.")
        B = condition.shape[0]
        if length > self.recon_queries.shape[0]:
            raise ValueError(f"Cannot reconstruct {length} states; at most {self.recon_queries.shape[0]}.")
        x = self.recon_queries[:length].to(condition.dtype).expand(B, -1, -1)  # (B, T, D)
        for layer in self.recon_decoder:
            x = layer(x, context=condition)
        x = self.recon_decoder_norm(x)
        x = x + self._positions(self.recon_positions, length).to(x.dtype)
        for layer in self.recon_encoder:
            x = layer(x)
        return self.recon_proj(self.recon_encoder_norm(x))
