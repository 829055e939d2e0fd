"""kosmos-g: Kosmos-G (Pan et al., 2023) on current PyTorch, transformers and diffusers.

Interleaved text + image prompts -> a multimodal LLM -> AlignerNet -> a 77x768
condition that any Stable-Diffusion-1.5-family diffusers pipeline accepts in place of
CLIP's text embedding.

Example:
    >>> from kosmos_g import KosmosGPipeline
    >>> pipe = KosmosGPipeline.from_pretrained("ckpt/kosmos-g", "ckpt/sd-v1-5")  # doctest: +SKIP
    >>> pipe("<i> wearing <i>", prompt_images=["dog.png", "hat.png"]).images[0]  # doctest: +SKIP

Names are imported lazily, so ``kosmos-g --help`` does not pay for torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AlignerConfig": "config", "KosmosGConfig": "config", "MLLMConfig": "config",
    "ResamplerConfig": "config", "VisionConfig": "config", "get_preset": "config",
    "list_presets": "config",
    "KosmosG": "models", "build_model": "models",
    "KosmosGProcessor": "processing", "load_image": "processing",
    "KosmosGPipeline": "pipeline", "kosmos_g_prompt_embeds": "pipeline",
    "GenerationConfig": "generation_config",
    "FairseqTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kosmos_g' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
