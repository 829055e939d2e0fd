"""Building blocks shared by the MLLM, the resampler and AlignerNet.

They follow the torchscale "Magneto" layout the official model was trained with:
pre-LayerNorm blocks whose attention output and FFN hidden state get an extra
("sub") LayerNorm before their output projection. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (all with bias).

    ``sub_ln`` adds Magneto's LayerNorm on the attention output before ``out_proj``.
    ``mask`` follows SDPA: a boolean tensor broadcastable to (B, heads, Tq, Tk), True
    where a query may attend to a key.
    """

    def __init__(self, *, dim: int, num_heads: int, kv_dim: int | None = None,
                 sub_ln: bool = False, dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.sub_norm = nn.LayerNorm(dim, eps=eps) if sub_ln else None
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        B, Tq, C = x.shape
        Tk = context.shape[1]
        h = self.num_heads
        q = self.q_proj(x).view(B, Tq, h, C // h).transpose(1, 2)  # (B, h, Tq, d)
        k = self.k_proj(context).view(B, Tk, h, C // h).transpose(1, 2)  # (B, h, Tk, d)
        v = self.v_proj(context).view(B, Tk, h, C // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C)
        if self.sub_norm is not None:
            out = self.sub_norm(out)
        return self.out_proj(out)


class FeedForward(nn.Module):
    """fc1 -> GELU -> (sub-LN) -> fc2, as torchscale's FeedForwardNetwork."""

    def __init__(self, *, dim: int, hidden_dim: int, sub_ln: bool = True,
                 dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.sub_norm = nn.LayerNorm(hidden_dim, eps=eps) if sub_ln else None
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU in fp32 as the reference does: half-precision erf drifts on large inputs.
        x = F.gelu(self.fc1(x).float()).type_as(x)
        if self.sub_norm is not None:
            x = self.sub_norm(x)
        return self.dropout(self.fc2(x))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, FFN."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, cross_attention: bool = False,
                 dropout: float = 0.0, attention_dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, num_heads=num_heads, sub_ln=True,
                              dropout=attention_dropout, eps=eps)
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        # torchscale gives cross-attention no sub-LN (it is only built for self-attention).
        self.cross_attn = (Attention(dim=dim, num_heads=num_heads, sub_ln=False,
                                     dropout=attention_dropout, eps=eps)
                           if cross_attention else None)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim=dim, hidden_dim=ffn_dim, sub_ln=True, dropout=0.0, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), context=context, mask=context_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, Tk) 1/0 mask of real keys -> SDPA boolean mask (B, 1, 1, Tk)."""
    return attention_mask.bool()[:, None, None, :]


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of real tokens -> (B, 1, T, T): causal AND key is a real token.

    A padded query row keeps its own (diagonal) key so softmax never sees an all-masked
    row; padded positions' outputs are ignored downstream.
    """
    B, T = attention_mask.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int | None) -> torch.Tensor:
    """fairseq's sinusoidal table: [sin | cos] halves, row ``padding_idx`` zeroed.

    Frequencies are exp(-log(10000) * i / (half - 1)), i = 0..half-1, as in
    fairseq's ``SinusoidalPositionalEmbedding.get_embedding``.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx] = 0
    return table
