"""Stage 1: multimodal language modelling (as Kosmos-1).

Documents are ``<s> ... </s>`` sequences of text and images (each image ``<image>``, its
slots, ``</image>``) built from ``text``, ``caption`` and ``interleaved`` samples mixed by
weight. The loss is next-token cross-entropy on text targets only: a position whose
target is an image slot, ``<image>``, ``</image>``, ``<s>`` or padding does not count.
The MLLM and the resampler train, and the vision tower's last block + final LayerNorm
(the rest of CLIP stays frozen, as in Kosmos-1); AlignerNet is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shards import BadSample, decode_image, validate_sample
from ..processing import KosmosGProcessor, ProcessedPrompt, preprocess_image
from .base import Stage, keep_image_weights_in_graph
from .modeling import enable_gradient_checkpointing, load_kosmos_g, set_trainable


def encode_document(processor: KosmosGProcessor, segments: Sequence[Any], max_length: int) -> ProcessedPrompt:
    """``<s>`` + segments + ``</s>``, truncated to ``max_length`` positions.

    ``segments`` holds strings and zero-argument callables returning a PIL image (so an
    image past the cut is never decoded). Text is cut at a token; an image that does
    not fit whole is dropped with everything after it; at most ``processor.max_images``
    images are kept.
    """
    tok = processor.tokenizer
    q = processor.num_image_tokens
    room = max_length - 1  # keep one position for </s>
    ids, mask, pixels = [tok.bos_id], [False], []
    for seg in segments:
        if isinstance(seg, str):
            pieces = tok.encode(seg) if seg else []
            take = pieces[:max(0, room - len(ids))]
            ids += take
            mask += [False] * len(take)
            if len(take) < len(pieces):
                break
        else:
            if len(ids) + q + 2 > room or len(pixels) == processor.max_images:
                break
            pixels.append(preprocess_image(seg(), processor.image_size, processor.image_mean, processor.image_std))
            ids += [tok.boi_id] * (q + 1) + [tok.eoi_id]
            mask += [False] + [True] * q + [False]
    ids.append(tok.eos_id)
    mask.append(False)
    return ProcessedPrompt(ids, mask, pixels)


class Stage1Builder:
    """Raw sample -> a processed document (runs in DataLoader workers)."""

    def __init__(self, processor: KosmosGProcessor, *, max_length: int, image_first_prob: float) -> None:
        self.processor = processor
        self.max_length = max_length
        self.image_first_prob = image_first_prob

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator, source: str) -> ProcessedPrompt:
        meta = validate_sample(raw)
        kind = meta["kind"]
        if kind == "text":
            segments: list[Any] = [meta["text"]]
        elif kind == "caption":
            image = _lazy(raw, "")
            segments = [image, meta["caption"]] if rng.random() < self.image_first_prob else [meta["caption"], image]
        elif kind == "interleaved":
            segments = [seg["text"] if "text" in seg else _lazy(raw, str(seg["image"])) for seg in meta["segments"]]
        else:
            raise BadSample(f"stage 1 uses text, caption and interleaved samples, not {kind!r} "
                            f"({raw.get('__key__')!r}).")
        doc = encode_document(self.processor, segments, self.max_length)
        if len(doc.input_ids) < 3 and not doc.pixel_values:
            raise BadSample(f"sample {raw.get('__key__')!r} has no text.")
        return doc


def _lazy(raw: dict[str, Any], stem: str):
    return lambda: decode_image(raw, stem)


def lm_target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                   exclude_ids: Sequence[int]) -> torch.Tensor:
    """(B, T-1) bool: which next-token targets ``input_ids[:, 1:]`` count in the LM loss.

    Padding, image slots and the ids in ``exclude_ids`` (``<s>``, ``<image>``,
    ``</image>``) are excluded; ``</s>`` and text tokens count.
    """
    target = input_ids[:, 1:]
    keep = attention_mask[:, 1:].bool() & ~image_mask[:, 1:]
    for i in exclude_ids:
        keep &= target != i
    return keep


class LMModule(nn.Module):
    """Next-token loss over text targets; ``forward(batch) -> {"loss": (sum, tokens)}``."""

    def __init__(self, model, exclude_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.exclude_ids = tuple(int(i) for i in exclude_ids)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        image_mask, pixels = batch["image_mask"], batch["pixel_values"]
        hidden = self.model.hidden_states(ids, attn, pixels if pixels.shape[0] else None, image_mask)  # (B, T, C)
        hidden = keep_image_weights_in_graph(self.model, hidden, pixels)
        keep = lm_target_mask(ids, attn, image_mask, self.exclude_ids)  # (B, T-1)
        logits = self.model.mllm.logits(hidden[:, :-1][keep]).float()  # (N, V): only where it counts
        loss_sum = F.cross_entropy(logits, ids[:, 1:][keep], reduction="sum")
        return {"loss": (loss_sum, keep.sum())}


class Stage1(Stage):
    name = "stage1"
    module_prefix = "model."

    def __init__(self, recipe, accelerator) -> None:
        super().__init__(recipe, accelerator)
        spec = recipe.stage1
        self.model, self.processor = load_kosmos_g(recipe.model)
        self.trainable = set_trainable(self.model, mllm=True, resampler=True,
                                       vision_last_block=spec.train_vision_last_block)
        if recipe.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        tok = self.processor.tokenizer
        self.module = LMModule(self.model, exclude_ids=(tok.bos_id, tok.boi_id, tok.eoi_id))
        max_length = min(spec.max_length or self.processor.max_length, self.processor.max_length)
        self.builder = Stage1Builder(self.processor, max_length=max_length, image_first_prob=spec.image_first_prob)

    def collate(self, examples: Sequence[ProcessedPrompt]) -> dict[str, torch.Tensor]:
        return self.processor.collate(examples)
