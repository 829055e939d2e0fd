"""Typed configuration for every Kosmos-G component, and named presets.

Every size of the model is a plain dataclass, validated in ``__post_init__``. A preset
is a function returning a :class:`KosmosGConfig`; ``get_preset("kosmos-g")`` gives the
paper's / official release's sizes, ``get_preset("tiny")`` a model small enough for unit
tests. Later presets (``micro``) register themselves with :func:`register_preset`.

Example:
    >>> from kosmos_g.config import get_preset
    >>> cfg = get_preset("tiny")
    >>> cfg.aligner.num_queries, cfg.aligner.output_dim
    (77, 32)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

# CLIP's pixel statistics (OpenAI), used by the official image transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}.")


def _divisible(owner: str, width_name: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(
            f"{owner}.{width_name}={width} is not divisible by num_heads={heads}; "
            "pick a head count that divides the width."
        )


@dataclass
class VisionConfig:
    """CLIP ViT image encoder (transformers' ``CLIPVisionModel``)."""

    image_size: int = 224
    """Input resolution; images are resized and center-cropped to it."""
    patch_size: int = 14
    """ViT patch size; (image_size / patch_size)^2 + 1 tokens come out."""
    hidden_size: int = 1024
    """Token width (1024 for ViT-L/14)."""
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"
    """OpenAI's CLIP weights were trained with QuickGELU; the official code forces it."""
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _positive("vision", image_size=self.image_size, patch_size=self.patch_size,
                  hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} must be a multiple of "
                f"vision.patch_size={self.patch_size}."
            )
        _divisible("vision", "hidden_size", self.hidden_size, self.num_heads)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: one per patch plus the class token (257 for ViT-L/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class ResamplerConfig:
    """The official "xconnector": one attention from learned queries to image tokens."""

    input_dim: int = 1024
    """Width of the vision tokens."""
    output_dim: int = 2048
    """Width of the MLLM."""
    num_queries: int = 64
    """Image slots per image in the token sequence."""
    num_heads: int = 32
    local_queries: bool = False
    """False (the released model): every query reads every image token. True (not in the
    paper): the queries form a k x k grid (num_queries = k^2) and each reads only its own
    tile of the patch grid, plus the class token and the latents. Learned global queries
    average a multi-object scene and lose each object's shape; local ones cannot
    (docs/micro-world.md)."""

    def __post_init__(self) -> None:
        _positive("resampler", input_dim=self.input_dim, output_dim=self.output_dim,
                  num_queries=self.num_queries, num_heads=self.num_heads)
        _divisible("resampler", "output_dim", self.output_dim, self.num_heads)
        if self.local_queries and math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ValueError(
                f"resampler.local_queries needs a square num_queries (k x k tiles), got "
                f"{self.num_queries}; use e.g. {math.isqrt(self.num_queries) ** 2} or "
                f"{(math.isqrt(self.num_queries) + 1) ** 2}."
            )


@dataclass
class MLLMConfig:
    """The causal multimodal language model.

    ``backbone="magneto"`` is the official sub-LayerNorm decoder; ``backbone="hf"`` wraps
    any transformers causal LM whose config is given in ``hf_config`` (a dict as written by
    ``PretrainedConfig.to_dict()``).
    """

    backbone: Literal["magneto", "hf"] = "magneto"
    vocab_size: int = 64007
    """Embedding rows. The official dictionary has 64,007 symbols: ``<s> <pad> </s> <unk>``,
    the 63,997 lines of ``dict.txt``, ``<mask>`` and five Kosmos specials (``<image>`` = 64003)."""
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    ffn_dim: int = 8192
    max_positions: int = 2048
    """Longest sequence (tokens plus image slots) the model accepts."""
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = True
    """Multiply token (and spliced image) embeddings by sqrt(hidden_size), as fairseq does."""
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    gradient_checkpointing: bool = False
    hf_config: dict[str, Any] | None = None
    """For ``backbone="hf"``: the transformers config dict of the causal LM."""
    init_from: str | None = None
    """For an MLLM started from a pretrained causal LM: the folder its weights and tokenizer
    came from. A record only: loading a saved Kosmos-G folder never reads it."""

    def __post_init__(self) -> None:
        if self.backbone not in ("magneto", "hf"):
            raise ValueError(f"mllm.backbone must be 'magneto' or 'hf', got {self.backbone!r}.")
        if self.backbone == "hf" and not self.hf_config:
            raise ValueError("mllm.backbone='hf' needs mllm.hf_config (a transformers config dict).")
        _positive("mllm", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  num_layers=self.num_layers, num_heads=self.num_heads, ffn_dim=self.ffn_dim,
                  max_positions=self.max_positions)
        _divisible("mllm", "hidden_size", self.hidden_size, self.num_heads)
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"mllm.{name} must be in [0, 1), got {value!r}.")
        if self.backbone == "magneto" and self.hidden_size % 2:
            raise ValueError("mllm.hidden_size must be even for sinusoidal positions.")


@dataclass
class AlignerConfig:
    """AlignerNet: M maps MLLM states to the diffusion condition; N reconstructs them."""

    input_dim: int = 2048
    """Width of the MLLM hidden states."""
    hidden_size: int = 768
    num_heads: int = 12
    ffn_dim: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 12
    num_queries: int = 77
    """Condition length (77 = CLIP's text length)."""
    output_dim: int = 768
    """Condition width: 768 for SD1.x, 1024 for SD2.x (a final projection is added when
    it differs from ``hidden_size``)."""
    max_positions: int = 32768
    """Learned positions of the MLLM states (the official table has 32,768 rows)."""
    reconstruction: bool = False
    """Also build N (stage-2 training only)."""
    recon_encoder_layers: int = 12
    recon_decoder_layers: int = 12
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive("aligner", input_dim=self.input_dim, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, ffn_dim=self.ffn_dim, num_queries=self.num_queries,
                  output_dim=self.output_dim, max_positions=self.max_positions)
        _divisible("aligner", "hidden_size", self.hidden_size, self.num_heads)
        for name in ("encoder_layers", "decoder_layers", "recon_encoder_layers", "recon_decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"aligner.{name} must be >= 0, got {getattr(self, name)}.")


@dataclass
class KosmosGConfig:
    """The whole encoder: vision tower + resampler + MLLM + AlignerNet."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    max_images: int = 10
    """Most images one prompt may hold (the official demo allows 10)."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name, cls in (("vision", VisionConfig), ("resampler", ResamplerConfig),
                          ("mllm", MLLMConfig), ("aligner", AlignerConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        if self.resampler.input_dim != self.vision.hidden_size:
            raise ValueError(
                f"resampler.input_dim={self.resampler.input_dim} must equal "
                f"vision.hidden_size={self.vision.hidden_size}."
            )
        grid = self.vision.image_size // self.vision.patch_size
        side = math.isqrt(self.resampler.num_queries)
        if self.resampler.local_queries and grid % side:
            raise ValueError(
                f"resampler.local_queries: the {grid} x {grid} patch grid does not split into "
                f"{side} x {side} tiles (num_queries={self.resampler.num_queries}); pick "
                f"num_queries = k^2 with k dividing {grid}."
            )
        if self.resampler.output_dim != self.mllm.hidden_size:
            raise ValueError(
                f"resampler.output_dim={self.resampler.output_dim} must equal "
                f"mllm.hidden_size={self.mllm.hidden_size}."
            )
        if self.aligner.input_dim != self.mllm.hidden_size:
            raise ValueError(
                f"aligner.input_dim={self.aligner.input_dim} must equal "
                f"mllm.hidden_size={self.mllm.hidden_size}."
            )
        _positive("config", max_images=self.max_images)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (R, G, B).")

    @property
    def num_image_tokens(self) -> int:
        """Slots one image occupies in the sequence (the resampler's query count)."""
        return self.resampler.num_queries

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["mllm"]["init_from"] is None:  # provenance only; a model not started from an LM says nothing
            del data["mllm"]["init_from"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KosmosGConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown KosmosGConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KosmosGConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------- presets

_PRESETS: dict[str, Callable[[], KosmosGConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], KosmosGConfig]], Callable[[], KosmosGConfig]]:
    """Decorator adding a named preset."""

    def wrap(fn: Callable[[], KosmosGConfig]) -> Callable[[], KosmosGConfig]:
        _PRESETS[name] = fn
        return fn

    return wrap


@register_preset("kosmos-g")
def kosmos_g_preset() -> KosmosGConfig:
    """The paper's "Kosmos-G-1.9B" (official ``kosmosg_xl`` + ViT-L/14 + AlignerNet)."""
    return KosmosGConfig()


@register_preset("tiny")
def tiny_preset() -> KosmosGConfig:
    """A model of a few hundred thousand parameters, for tests (CPU, milliseconds)."""
    return KosmosGConfig(
        vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, num_layers=2,
                            num_heads=4, intermediate_size=64),
        resampler=ResamplerConfig(input_dim=32, output_dim=64, num_queries=4, num_heads=4),
        mllm=MLLMConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, ffn_dim=128,
                        max_positions=256, dropout=0.0, attention_dropout=0.0),
        aligner=AlignerConfig(input_dim=64, hidden_size=32, num_heads=4, ffn_dim=64,
                              encoder_layers=2, decoder_layers=2, num_queries=77, output_dim=32,
                              max_positions=512, recon_encoder_layers=2, recon_decoder_layers=2),
        max_images=4,
    )


@register_preset("micro")
def micro_preset() -> KosmosGConfig:
    """The micro Kosmos-G of the synthetic world (:mod:`kosmos_g.micro`, ~1M parameters).

    Its vision tower is micro-CLIP's (64 px, 8 px patches: 65 tokens); AlignerNet writes
    40 x 64 conditions, the shape of micro-CLIP's text encoder output that micro-SD's
    U-Net reads; the MLLM's vocabulary is the world's SentencePiece + fairseq dictionary.
    """
    return KosmosGConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=4,
                            num_heads=4, intermediate_size=256),
        resampler=ResamplerConfig(input_dim=64, output_dim=128, num_queries=16, num_heads=4),
        mllm=MLLMConfig(vocab_size=209, hidden_size=128, num_layers=4, num_heads=4, ffn_dim=512,
                        max_positions=256, dropout=0.0, attention_dropout=0.0),
        aligner=AlignerConfig(input_dim=128, hidden_size=64, num_heads=4, ffn_dim=256,
                              encoder_layers=2, decoder_layers=2, num_queries=40, output_dim=64,
                              max_positions=256, recon_encoder_layers=2, recon_decoder_layers=2),
        max_images=4,
    )


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return sorted(_PRESETS)


def get_preset(name: str) -> KosmosGConfig:
    """A fresh config for a named preset.

    Example:
        >>> get_preset("kosmos-g").mllm.num_layers
        24
    """
    if name not in _PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(_PRESETS)}.")
    return _PRESETS[name]()
