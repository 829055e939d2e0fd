"""Stage 1: multimodal language modelling (as Kosmos-1).

Documents are ``<s> ... </s>`` sequences of text and images (each image ``<image>``, its
slots, ``</image>``) built from ``text``, ``caption`` and ``interleaved`` samples mixed by
weight. The loss is next-token cross-entropy on text targets only: a position whose
target is an image slot, ``<image>``, ``</image>``, ``<s>`` or padding does not count.
The MLLM and the resampler train, and the vision tower's last block + final LayerNorm
(the rest of CLIP stays frozen, as in Kosmos-1); AlignerNet is not used. For an MLLM started
from a pretrained LM, ``stage1.freeze_lm_steps`` first trains only the resampler (and the
vision block) against the frozen LM, and ``model.lora`` trains LoRA adapters instead of the
whole LM.

``stage1.cell_label_weight`` (not in the paper; default 0, off) adds a per-cell attribute
loss on the resampler's output for caption samples that carry ``"cell_labels"``: a linear
head, trained with the stage and never exported, reads every grid cell's attributes from
all of an image's slots (:class:`CellLabelHead`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shards import BadSample, decode_image, validate_sample
from ..processing import KosmosGProcessor, ProcessedPrompt, preprocess_image
from .base import Stage, keep_image_weights_in_graph
from .modeling import add_lora, enable_gradient_checkpointing, load_kosmos_g, set_trainable

logger = logging.getLogger(__name__)


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


@dataclass
class LabelledDocument(ProcessedPrompt):
    """A document and, per image, each grid cell's attribute classes (-1: no label)."""

    cell_labels: list[list[list[int]]]
    """(images, cells, attributes), attributes in ``stage1.cell_classes`` order."""


def parse_cell_labels(value: Any, classes: Mapping[str, int], cells: int, key: Any = None) -> list[list[int]]:
    """A caption sample's ``cell_labels`` (``{attribute: [class or null per cell]}``) as (cells,
    attributes) class indices, -1 where a cell or an attribute has no label. Attributes not
    in ``classes`` are ignored; a list of the wrong length or a class out of range is a
    :class:`BadSample`.

    Example:
        >>> parse_cell_labels({"shape": [None, 2], "size": [0, 1]}, {"shape": 3, "color": 4}, 2)
        [[-1, -1], [2, -1]]
    """
    rows = [[-1] * len(classes) for _ in range(cells)]
    if value is None:
        return rows
    if not isinstance(value, dict):
        raise BadSample(f"sample {key!r}: cell_labels must map attributes to per-cell lists, got {value!r}.")
    for a, (name, n) in enumerate(classes.items()):
        labels = value.get(name)
        if labels is None:
            continue
        if not isinstance(labels, list) or len(labels) != cells:
            raise BadSample(f"sample {key!r}: cell_labels.{name} must list {cells} cells (stage1.cells), "
                            f"got {labels!r}.")
        for c, v in enumerate(labels):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise BadSample(f"sample {key!r}: cell_labels.{name}[{c}]={v!r} is not a class in [0, {n}) "
                                f"(stage1.cell_classes.{name}={n}).")
            rows[c][a] = v
    return rows


class Stage1Builder:
    """Raw sample -> a processed document (runs in DataLoader workers); with ``cell_classes``,
    a :class:`LabelledDocument` (only a caption sample's image has labels)."""

    def __init__(self, processor: KosmosGProcessor, *, max_length: int, image_first_prob: float,
                 cell_classes: Mapping[str, int] | None = None, cells: int = 9) -> None:
        self.processor = processor
        self.max_length = max_length
        self.image_first_prob = image_first_prob
        self.cell_classes = dict(cell_classes or {})
        self.cells = cells

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
        if not self.cell_classes:
            return doc
        unlabelled = parse_cell_labels(None, self.cell_classes, self.cells)
        labels = [unlabelled] * len(doc.pixel_values)
        if kind == "caption" and labels:
            labels[0] = parse_cell_labels(meta.get("cell_labels"), self.cell_classes, self.cells, raw.get("__key__"))
        return LabelledDocument(doc.input_ids, doc.image_mask, doc.pixel_values, labels)


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


class CellLabelHead(nn.Module):
    """A linear map from an image's resampler output (all Q slots of width C, each slot
    normalised without a learned scale, then flattened) to every grid cell's logits for
    every labelled attribute. The normalisation makes the head's step size independent of
    the slots' scale (the micro resampler's outputs have std ~0.1)."""

    def __init__(self, slots: int, width: int, classes: Sequence[int], cells: int) -> None:
        super().__init__()
        self.classes = tuple(int(n) for n in classes)
        self.cells = cells
        self.slots, self.width = slots, width
        self.proj = nn.Linear(slots * width, cells * sum(self.classes))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, Q, C) -> (N, cells, sum of classes)."""
        normed = F.layer_norm(features.float(), features.shape[-1:])
        return self.proj(normed.flatten(1)).view(features.shape[0], self.cells, -1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, Q, C) features, (N, cells, attributes) labels (-1: none) -> (cross-entropy summed
        over labelled entries, their number)."""
        logits = self.logits(features)
        total = 0.0 * logits.sum()  # keeps the head in the graph when nothing is labelled
        for a, chunk in enumerate(logits.split(self.classes, dim=-1)):
            total = total + F.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), labels[..., a].reshape(-1),
                                            ignore_index=-1, reduction="sum")
        return total, (labels >= 0).sum()

    def collate(self, per_example: Sequence[Sequence[list[list[int]]]]) -> torch.Tensor:
        """Examples' per-image label rows -> (images, cells, attributes), images in batch order."""
        rows = [r for labels in per_example for r in labels]
        return (torch.tensor(rows, dtype=torch.long) if rows else
                torch.zeros((0, self.cells, len(self.classes)), dtype=torch.long))

    def mean_loss(self, features: torch.Tensor | None, labels: torch.Tensor | None,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean cross-entropy, its sum, labelled entries)`` of a batch's images; a batch
        without images (``features`` None) gives 0 through a zero input, which keeps the
        head in the graph (every process must use every parameter)."""
        if features is None:
            features = torch.zeros(1, self.slots, self.width, device=device)
            labels = torch.full((1, self.cells, len(self.classes)), -1, device=device)
        ce_sum, labelled = self(features, labels)
        return ce_sum / labelled.clamp(min=1), ce_sum, labelled


class LMModule(nn.Module):
    """Next-token loss over text targets; ``forward(batch) -> {"loss": (sum, tokens)}``.

    With ``cell_head``: plus ``cell_weight`` x the head's mean cross-entropy over the batch's
    labelled (image, cell, attribute) entries, scaled by the token count so that the trainer's
    division leaves the LM mean + ``cell_weight`` x that mean; logged as ``cells``.
    """

    def __init__(self, model, exclude_ids: Sequence[int], cell_head: CellLabelHead | None = None,
                 cell_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.exclude_ids = tuple(int(i) for i in exclude_ids)
        self.cell_head = cell_head
        self.cell_weight = cell_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        image_mask, pixels = batch["image_mask"], batch["pixel_values"]
        has_images = pixels.shape[0] > 0
        feats = self.model.image_features(pixels) if self.cell_head is not None and has_images else None
        hidden = self.model.hidden_states(ids, attn, pixels if has_images else None, image_mask,
                                          features=feats)  # (B, T, C)
        hidden = keep_image_weights_in_graph(self.model, hidden, pixels)
        keep = lm_target_mask(ids, attn, image_mask, self.exclude_ids)  # (B, T-1)
        logits = self.model.mllm.logits(hidden[:, :-1][keep]).float()  # (N, V): only where it counts
        loss_sum = F.cross_entropy(logits, ids[:, 1:][keep], reduction="sum")
        tokens = keep.sum()
        out = {"loss": (loss_sum, tokens)}
        if self.cell_head is not None:
            mean, ce_sum, labelled = self.cell_head.mean_loss(feats, batch.get("cell_labels"), hidden.device)
            out["loss"] = (loss_sum + self.cell_weight * mean * tokens, tokens)
            out["cells"] = (ce_sum.detach(), labelled)
        return out


class Stage1(Stage):
    name = "stage1"
    module_prefix = "model."

    def __init__(self, recipe, accelerator) -> None:
        super().__init__(recipe, accelerator)
        spec = recipe.stage1
        self.model, self.processor = load_kosmos_g(recipe.model)
        lora = recipe.model.lora is not None
        if lora:
            add_lora(self.model, recipe.model.lora)
        # frozen for the whole run: the LM is left out of training (and of data-parallel wrappers) at once
        train_lm = spec.freeze_lm_steps < recipe.train.max_steps
        self.trainable = set_trainable(self.model, mllm=train_lm and not lora, lora=train_lm and lora,
                                       resampler=True, vision_last_block=spec.train_vision_last_block)
        self.freeze_lm_steps = spec.freeze_lm_steps
        self.lm_params = [p for p in self.model.mllm.parameters() if p.requires_grad]
        if recipe.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        tok = self.processor.tokenizer
        head = None
        if spec.cell_label_weight > 0:
            r = self.model.config.resampler
            head = CellLabelHead(r.num_queries, r.output_dim, spec.cell_classes.values(), spec.cells)
            self.metric_names = ("cells",)
        self.module = LMModule(self.model, exclude_ids=(tok.bos_id, tok.boi_id, tok.eoi_id), cell_head=head,
                               cell_weight=spec.cell_label_weight)
        max_length = min(spec.max_length or self.processor.max_length, self.processor.max_length)
        self.builder = Stage1Builder(self.processor, max_length=max_length, image_first_prob=spec.image_first_prob,
                                     cell_classes=spec.cell_classes if head is not None else None, cells=spec.cells)

    def before_step(self, step: int) -> None:
        """``stage1.freeze_lm_steps``: the MLLM's trained weights get no gradient before that step.
        They stay in the optimizer, which skips a weight without a gradient (no update, no weight
        decay), so the LM is bit-identical until it unfreezes."""
        if self.freeze_lm_steps and self.lm_params:
            train_lm = step >= self.freeze_lm_steps
            if train_lm != self.lm_params[0].requires_grad or step == 0:
                logger.info("step %d: the MLLM's %s trained weights %s", step,
                            f"{sum(p.numel() for p in self.lm_params):,}",
                            "train from here" if train_lm else f"stay frozen until step {self.freeze_lm_steps}")
            for p in self.lm_params:
                p.requires_grad_(train_lm)

    def collate(self, examples: Sequence[ProcessedPrompt]) -> dict[str, torch.Tensor]:
        batch = self.processor.collate(examples)
        if self.module.cell_head is not None:
            batch["cell_labels"] = self.module.cell_head.collate(
                [ex.cell_labels for ex in examples])  # type: ignore[attr-defined]
        return batch
