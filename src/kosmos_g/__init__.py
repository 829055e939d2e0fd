"""kosmos-g: Kosmos-G (Pan et al., 2023) on current PyTorch, transformers and diffusers.

Interleaved text + image prompts -> a multimodal LLM -> AlignerNet -> a 77x768
condition that any Stable-Diffusion-1.5-family diffusers pipeline accepts in place of
CLIP's text embedding.
"""

from .config import (AlignerConfig, KosmosGConfig, MLLMConfig, ResamplerConfig, VisionConfig,
                     get_preset, list_presets)
from .models import KosmosG, build_model
from .processing import KosmosGProcessor, load_image
from .tokenizer import FairseqTokenizer, HFTokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["AlignerConfig", "FairseqTokenizer", "HFTokenizer", "KosmosG", "KosmosGConfig",
           "KosmosGProcessor", "MLLMConfig", "ResamplerConfig", "VisionConfig", "build_model",
           "get_preset", "list_presets", "load_image", "load_tokenizer"]
