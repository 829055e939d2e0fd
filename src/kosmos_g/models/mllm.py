"""The multimodal language model: a causal decoder over tokens and image slots.

Two backbones share one interface (``embed`` -> splice images -> ``forward`` -> hidden
states, ``logits`` for the stage-1 LM loss):

- :class:`MagnetoDecoder`, the official architecture (torchscale ``Decoder`` with
  sub-LayerNorm, fairseq sinusoidal positions, embeddings scaled by sqrt(d), tied
  output projection);
- :class:`HFDecoder`, any transformers causal LM, so users can build on a modern LLM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MLLMConfig
from .layers import Block, causal_padding_mask, sinusoidal_table


class MagnetoDecoder(nn.Module):
    """Official Kosmos-G MLLM (``kosmosg_xl``: 24 layers, 2048 wide, 32 heads)."""

    def __init__(self, config: MLLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         padding_idx=config.pad_token_id)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        # fairseq numbers positions from padding_idx + 1, so the table needs that many
        # extra rows; it is a buffer, not a weight (sinusoidal, never trained).
        table = sinusoidal_table(config.max_positions + config.pad_token_id + 1,
                                 config.hidden_size, config.pad_token_id)
        self.register_buffer("positions", table, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            Block(dim=config.hidden_size, num_heads=config.num_heads, ffn_dim=config.ffn_dim,
                  dropout=config.dropout, attention_dropout=config.attention_dropout,
                  eps=config.layer_norm_eps)
            for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = config.gradient_checkpointing

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings before scaling: (B, T) -> (B, T, C). Image slots get overwritten."""
        return self.embed_tokens(input_ids)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """fairseq ``make_positions``: real tokens get pad+1, pad+2, ...; pads get pad."""
        mask = attention_mask.long()
        return torch.cumsum(mask, dim=1) * mask + self.config.pad_token_id

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) unscaled embeddings + (B, T) mask -> final-LayerNorm states (B, T, C)."""
        T = inputs_embeds.shape[1]
        if T > self.config.max_positions:
            raise ValueError(
                f"Sequence of {T} positions exceeds mllm.max_positions={self.config.max_positions}; "
                "shorten the prompt or use fewer images."
            )
        pos = self.positions[self.position_ids(attention_mask)].to(inputs_embeds.dtype)
        x = self.dropout(self.embed_scale * inputs_embeds + pos)  # (B, T, C)
        mask = causal_padding_mask(attention_mask)  # (B, 1, T, T)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask=mask)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection (the stage-1 LM head): (B, T, C) -> (B, T, V)."""
        return F.linear(hidden, self.embed_tokens.weight)


class HFDecoder(nn.Module):
    """Any transformers causal LM as the MLLM; its last hidden states are the output.

    Built from a config dict, so a Kosmos-G folder holds the LM weights itself; ``model``
    (an already loaded causal LM whose config ``config.hf_config`` describes) is used as it
    is instead. Spliced image features are passed as ``inputs_embeds`` unscaled and the
    positions are the LM's own: the LM applies its own embedding and position conventions
    (Gemma's sqrt(d) scaling, rotary positions), not Magneto's.
    """

    def __init__(self, config: MLLMConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = config
        if model is None:
            hf = dict(config.hf_config)
            model_type = hf.pop("model_type")
            hf_config = AutoConfig.for_model(model_type, **hf)
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        self.model = model
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) embeddings + (B, T) mask -> the LM's final-norm states (B, T, C).

        Runs the decoder without the LM head: logits over a 150k vocabulary at every
        position would cost more memory than the rest of the step (:meth:`logits` computes
        them where a loss needs them)."""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if decoder is None or decoder is self.model:
            out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                             output_hidden_states=True, use_cache=False)
            return out.hidden_states[-1]
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)


def build_mllm(config: MLLMConfig) -> MagnetoDecoder | HFDecoder:
    return MagnetoDecoder(config) if config.backbone == "magneto" else HFDecoder(config)
