"""Kosmos-G models: one file each (vision, resampler, mllm, aligner, kosmos_g)."""

from .aligner import AlignerNet
from .kosmos_g import KosmosG, build_model, init_from_causal_lm, resolve_dtype
from .mllm import HFDecoder, MagnetoDecoder, build_mllm
from .resampler import Resampler
from .vision import VisionTower

__all__ = ["AlignerNet", "HFDecoder", "KosmosG", "MagnetoDecoder", "Resampler", "VisionTower",
           "build_mllm", "build_model",
           "init_from_causal_lm", "resolve_dtype"]
