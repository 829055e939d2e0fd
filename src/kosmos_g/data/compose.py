"""The paper's compositional data: caption -> entities -> masks -> crops -> shards.

Three model steps, each a class that loads its model once and maps a batch of records
(dicts) to the same records, so the local engine and the Ray engine
(:mod:`kosmos_g.data.ray_engine`) run the very same code:

1. :class:`Captioner`: BLIP-2 (or any transformers image-to-text model) writes a caption,
   greedy, as the release does; ``caption_from_source`` keeps the source's caption instead.
2. :class:`EntityExtractor`: a causal instruct LM answers the release's instruction
   (:data:`kosmos_g.data.entities.INSTRUCTION`); sampling uses a generator seeded from the
   sample's key, one per row, so the answer does not depend on the batch it ran in;
   :func:`kosmos_g.data.entities.parse_entities` keeps the entities found in the caption.
3. :class:`ClipSegSegmenter` (the paper) or :class:`GroundedSamSegmenter` (Grounding-DINO box
   refined by SAM): one mask per entity, post-processed as in :mod:`kosmos_g.data.masks`, then
   the two crops per entity.

Each image is centre-cropped to a square and resized to ``size`` (512) before any step;
masks are computed at that size, where the release computed them at the source resolution
and resized the crops after (the same crops up to rounding, at a fraction of the memory).
A record that fails a step carries ``error`` (a reason) and passes through the later steps.

Example:
    >>> cfg = ComposeConfig(captioner="models/blip2", lm="models/mpt-7b-instruct",  # doctest: +SKIP
    ...                     segmenter_path="models/clipseg-rd64-refined")
    >>> compose("photos/", "shards/compositional", cfg)                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .entities import INSTRUCTION, PROMPT_TEMPLATE, build_prompt, clean_caption, parse_entities
from .masks import THRESHOLD, center_square, dilation_size, entity_crops, postprocess_mask
from .runner import InputItem, decode_bytes, list_images, parse_shard_spec, run_chunks, sample_seed

SEGMENTERS = ("clipseg", "grounded-sam")
DTYPES = ("auto", "fp32", "fp16", "bf16")
IMAGE_FORMATS = ("jpg", "png")

# Failure reasons, in pipeline order.
UNREADABLE, NO_CAPTION, EMPTY_ANSWER, NO_ENTITY, EMPTY_MASK = (
    "unreadable_image", "empty_caption", "empty_answer", "no_entity_in_caption", "empty_mask")


@dataclass
class ComposeConfig:
    """Everything a compose run needs; model paths are local transformers folders."""

    lm: str
    """Causal instruct LM folder (the release: MPT-7B-Instruct)."""
    segmenter_path: str | None = None
    """CLIPSeg folder (``segmenter="clipseg"``; the release: ``rd64-refined``)."""
    captioner: str | None = None
    """Image-to-text folder (the release: BLIP-2 OPT); unused with ``caption_from_source``."""
    caption_from_source: bool = False
    """Keep the source's caption (``NAME.txt`` beside an image, a list file's caption, a tar's ``txt``)."""
    segmenter: str = "clipseg"
    """``clipseg`` (the paper) or ``grounded-sam`` (a Grounding-DINO box per entity refined by SAM)."""
    grounding_dino: str | None = None
    """Grounding-DINO folder (``segmenter="grounded-sam"``)."""
    sam: str | None = None
    """SAM folder (``segmenter="grounded-sam"``)."""
    size: int = 512
    """Side of the target and of every crop (the release: 512)."""
    threshold: float = THRESHOLD
    """Mask threshold on sigmoid(CLIPSeg logits) (the release: 0.3)."""
    box_threshold: float = 0.3
    """Grounding-DINO box score threshold."""
    max_entities: int | None = None
    """Keep at most this many entities per image (None: all the LM names and the caption holds)."""
    max_new_tokens: int = 10
    """LM answer budget (the release: 10)."""
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.95
    do_sample: bool = True
    """Sample the LM answer (the release) or take it greedily."""
    instruction: str = INSTRUCTION
    prompt_template: str = PROMPT_TEMPLATE
    caption_max_new_tokens: int = 30
    caption_batch_size: int = 16
    lm_batch_size: int = 16
    mask_batch_size: int = 32
    """(image, entity) pairs per segmenter call."""
    dtype: str = "auto"
    """``auto``: fp16 on CUDA, fp32 on CPU."""
    device: str | None = None
    """``cuda``, ``cpu``, ``cuda:1``...; None: CUDA when there is one."""
    seed: int = 0
    """Run seed; each sample's seed is derived from it and the sample's key."""
    image_format: str = "jpg"
    workers: int = 2
    """DataLoader workers decoding images (0: in the main process)."""

    def __post_init__(self) -> None:
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter {self.segmenter!r} is unknown; choose one of {', '.join(SEGMENTERS)}.")
        if self.segmenter == "clipseg" and not self.segmenter_path:
            raise ValueError("The clipseg segmenter needs its model folder (--clipseg DIR).")
        if self.segmenter == "grounded-sam" and not (self.grounding_dino and self.sam):
            raise ValueError("The grounded-sam segmenter needs --grounding-dino DIR and --sam DIR.")
        if not self.caption_from_source and not self.captioner:
            raise ValueError("Give a captioning model (--captioner DIR) or keep the sources' captions "
                             "(--caption-from-source).")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}.")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format {self.image_format!r}: choose jpg or png.")
        for name in ("size", "max_new_tokens", "caption_max_new_tokens", "caption_batch_size", "lm_batch_size",
                     "mask_batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}.")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ValueError(f"top_p must be in (0, 1] and temperature > 0, got {self.top_p} and {self.temperature}.")
        if self.max_entities is not None and self.max_entities < 1:
            raise ValueError(f"max_entities must be >= 1 or None, got {self.max_entities}.")
        for name in ("lm", "segmenter_path", "captioner", "grounding_dino", "sam"):
            path = getattr(self, name)
            if path and not (name == "captioner" and self.caption_from_source) and not Path(path).is_dir():
                raise FileNotFoundError(f"Model folder {path} ({name}) does not exist; give a local transformers "
                                        "folder (save_pretrained layout).")

    def fingerprint(self) -> dict:
        """The settings that decide the samples (what a resumed run must share)."""
        skip = {"caption_batch_size", "lm_batch_size", "mask_batch_size", "device", "workers"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ----------------------------------------------------------------------------- models

def _device_dtype(config: ComposeConfig):
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = config.dtype if config.dtype != "auto" else ("fp16" if str(device).startswith("cuda") else "fp32")
    return torch.device(device), {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _batches(seq: Sequence, n: int) -> Iterator[Sequence]:
    for s in range(0, len(seq), n):
        yield seq[s:s + n]


def _pil(record: dict):
    from PIL import Image

    return Image.fromarray(record["image"])


class Captioner:
    """Batched image-to-text captions (BLIP-2 or any ``AutoModelForImageTextToText`` model), greedy."""

    def __init__(self, config: ComposeConfig) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        self.device, self.dtype = _device_dtype(config)
        self.processor = AutoProcessor.from_pretrained(config.captioner)
        self.model = AutoModelForImageTextToText.from_pretrained(config.captioner, dtype=self.dtype)
        self.model.to(self.device).eval()
        self._torch = torch

    def __call__(self, records: list[dict]) -> list[dict]:
        todo = [r for r in records if r["error"] is None]
        for batch in _batches(todo, self.config.caption_batch_size):
            inputs = self.processor(images=[_pil(r) for r in batch], return_tensors="pt").to(self.device)
            inputs = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
            with self._torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.config.caption_max_new_tokens,
                                          do_sample=False, num_beams=1)
            start = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
            for r, text in zip(batch, self.processor.batch_decode(out[:, start:], skip_special_tokens=True)):
                r["caption"] = clean_caption(text)
                if not r["caption"]:
                    r["error"] = NO_CAPTION
        return records


class _RowSampler:
    """A logits processor that samples each row with its own generator (temperature, top-k, top-p as
    transformers' warpers) and leaves only the drawn token: greedy ``generate`` then takes it. A row's
    draws depend on its seed and its logits alone, never on the other rows of the batch."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.float().cpu() / self.temperature  # (B, V)
        k = min(self.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= (1 - self.top_p)
            remove[:, -1] = False
            logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        probs = logits.double().softmax(-1)
        out = torch.full_like(scores, float("-inf"))
        for row, gen in enumerate(self.generators):
            token = torch.multinomial(probs[row], 1, generator=gen)
            out[row, token.to(out.device)] = 0.0
        return out


class EntityExtractor:
    """Entities from a causal instruct LM, batched, each row sampled with its sample's seed."""

    def __init__(self, config: ComposeConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device, self.dtype = _device_dtype(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.lm)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(config.lm, dtype=self.dtype)
        self.model.to(self.device).eval()
        self._torch = torch

    def answers(self, captions: Sequence[str], seeds: Sequence[int]) -> list[str]:
        """The LM's raw answers for ``captions`` (one call; rows sampled with ``seeds``)."""
        from transformers import GenerationConfig, LogitsProcessorList

        cfg = self.config
        prompts = [build_prompt(c, cfg.instruction, cfg.prompt_template) for c in captions]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        processors = LogitsProcessorList(
            [_RowSampler(seeds, cfg.temperature, cfg.top_k, cfg.top_p)] if cfg.do_sample else [])
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=gen, logits_processor=processors)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, records: list[dict]) -> list[dict]:
        todo = [r for r in records if r["error"] is None]
        for batch in _batches(todo, self.config.lm_batch_size):
            for r, answer in zip(batch, self.answers([r["caption"] for r in batch], [r["seed"] for r in batch])):
                r["answer"] = answer
                if not answer.strip():
                    r["error"] = EMPTY_ANSWER
                    continue
                r["entities"] = parse_entities(answer, r["caption"], max_entities=self.config.max_entities)
                if not r["entities"]:
                    r["error"] = NO_ENTITY
        return records


def _keep_masks(records: list[dict], masks: dict[tuple[int, int], np.ndarray]) -> None:
    """Attach each entity's post-processed mask; drop entities whose mask is empty, and records left
    with none."""
    for i, r in enumerate(records):
        if r["error"] is not None:
            continue
        kept_entities, kept_masks = [], []
        for e, ent in enumerate(r["entities"]):
            m = postprocess_mask(masks[i, e], dilation=dilation_size(r["image"].shape[0]))
            if m.any():
                kept_entities.append(ent)
                kept_masks.append(m)
        r["entities"], r["masks"] = kept_entities, kept_masks
        if not kept_entities:
            r["error"] = EMPTY_MASK


class ClipSegSegmenter:
    """One CLIPSeg query per entity: logits upsampled bilinearly to the image, sigmoid, threshold."""

    def __init__(self, config: ComposeConfig) -> None:
        import torch
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.config = config
        self.device, self.dtype = _device_dtype(config)
        self.processor = CLIPSegProcessor.from_pretrained(config.segmenter_path)
        self.model = CLIPSegForImageSegmentation.from_pretrained(config.segmenter_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self._torch = torch

    def __call__(self, records: list[dict]) -> list[dict]:
        import torch.nn.functional as F

        pairs = [(i, e) for i, r in enumerate(records) if r["error"] is None for e in range(len(r["entities"]))]
        masks: dict[tuple[int, int], np.ndarray] = {}
        for batch in _batches(pairs, self.config.mask_batch_size):
            texts = [records[i]["entities"][e].text for i, e in batch]
            images = [_pil(records[i]) for i, _ in batch]
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with self._torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            logits = logits.reshape(len(batch), 1, *logits.shape[-2:])  # one query gives (H, W): no query axis
            for (i, e), lg in zip(batch, logits):
                side = records[i]["image"].shape[0]
                up = F.interpolate(lg[None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
                masks[i, e] = (up.sigmoid() > self.config.threshold).cpu().numpy()
        _keep_masks(records, masks)
        return records


class GroundedSamSegmenter:
    """Beyond the paper: the best Grounding-DINO box for each entity, refined to a mask by SAM.

    SAM's masks follow object edges, where CLIPSeg's are a thresholded 352x352 heat map; the same
    post-processing follows (dilation and largest component), so crops are made the same way.
    Grounding-DINO images go in batches of ``mask_batch_size``; SAM takes all of an image's boxes in
    one call. Both run in fp32 (``dtype`` applies to the other models).
    """

    def __init__(self, config: ComposeConfig) -> None:
        import torch
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor

        self.config = config
        self.device, self.dtype = _device_dtype(config)
        self.dino_processor = AutoProcessor.from_pretrained(config.grounding_dino)
        self.dino = GroundingDinoForObjectDetection.from_pretrained(config.grounding_dino).to(self.device).eval()
        self.sam_processor = SamProcessor.from_pretrained(config.sam)
        self.sam = SamModel.from_pretrained(config.sam).to(self.device).eval()
        self._torch = torch

    def boxes(self, images: Sequence, texts: Sequence[Sequence[str]]) -> list[list[list[float] | None]]:
        """For each image, the highest-scoring box (x0, y0, x1, y1) of each of its texts, or None where no
        box passes the threshold; one batched Grounding-DINO call."""
        prompts = [". ".join(t.lower() for t in ts) + "." for ts in texts]
        inputs = self.dino_processor(images=list(images), text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        with self._torch.inference_mode():
            out = self.dino(**inputs)
        results = self.dino_processor.post_process_grounded_object_detection(
            out, inputs["input_ids"], threshold=self.config.box_threshold, text_threshold=self.config.box_threshold,
            target_sizes=[im.size[::-1] for im in images])
        return [_best_boxes(res, ts) for res, ts in zip(results, texts)]

    def __call__(self, records: list[dict]) -> list[dict]:
        masks: dict[tuple[int, int], np.ndarray] = {}
        todo = [i for i, r in enumerate(records) if r["error"] is None]
        for batch in _batches(todo, self.config.mask_batch_size):
            images = [_pil(records[i]) for i in batch]
            found = self.boxes(images, [[e.text for e in records[i]["entities"]] for i in batch])
            for i, image, boxes in zip(batch, images, found):
                masks.update(self._masks(i, image, boxes))
        _keep_masks(records, masks)
        return records

    def _masks(self, i: int, image, boxes: list[list[float] | None]) -> dict[tuple[int, int], np.ndarray]:
        """SAM masks of one image's boxes (one call for all of them); an entity without a box gets an empty mask."""
        out = {(i, e): np.zeros(image.size[::-1], bool) for e in range(len(boxes))}
        found = [(e, b) for e, b in enumerate(boxes) if b is not None]
        if not found:
            return out
        inputs = self.sam_processor(images=image, input_boxes=[[b for _, b in found]], return_tensors="pt")
        inputs = inputs.to(self.device)
        with self._torch.inference_mode():
            pred = self.sam(**inputs, multimask_output=False).pred_masks.cpu()
        pred = self.sam_processor.post_process_masks(pred, inputs["original_sizes"].cpu(),
                                                     inputs["reshaped_input_sizes"].cpu())[0]  # (n, 1, H, W)
        for (e, _), m in zip(found, pred):
            out[i, e] = m[0].numpy().astype(bool)
        return out


def _best_boxes(result: dict, texts: Sequence[str]) -> list[list[float] | None]:
    """The best box per text from one image's post-processed detections (labels matched without case;
    a label Grounding-DINO cut or merged matches a text it is part of, or that is part of it)."""
    best: dict[str, tuple[float, list[float]]] = {}
    for score, label, box in zip(result["scores"].tolist(), result["text_labels"], result["boxes"].tolist()):
        label = label.strip().lower()
        if label and (label not in best or score > best[label][0]):
            best[label] = (score, box)
    out: list[list[float] | None] = []
    for t in texts:
        hit = best.get(t.lower())
        if hit is None:
            cands = [v for k, v in best.items() if k in t.lower() or t.lower() in k]
            hit = max(cands) if cands else None
        out.append(hit[1] if hit else None)
    return out


# ----------------------------------------------------------------------------- records and samples

def decode_record(item: InputItem, *, size: int, seed: int) -> dict:
    """Read and decode one input to a record: the centre square resized to ``size``, or an error."""
    from PIL import Image

    record: dict[str, Any] = {"key": item.key, "source": item.source, "seed": sample_seed(seed, item.key),
                              "image": None, "caption": clean_caption(item.caption) if item.caption else None,
                              "entities": [], "masks": [], "error": None, "detail": None}
    try:
        image = decode_bytes(item.read_bytes())
    except (ValueError, OSError) as e:
        record["error"], record["detail"] = UNREADABLE, " ".join(str(e).split())[:300]
        return record
    image = image.crop(center_square(*image.size)).resize((size, size), Image.BICUBIC)
    record["image"] = np.asarray(image, np.uint8)
    return record


def to_sample(record: dict, image_format: str = "jpg") -> dict:
    """A kept record -> a ``compositional`` sample for :class:`ShardWriter` (``docs/data-format.md``)."""
    from PIL import Image

    side = record["image"].shape[0]
    meta = {"kind": "compositional", "caption": record["caption"],
            "entities": [e.to_json() for e in record["entities"]], "source": record["source"]}
    sample: dict[str, Any] = {"__key__": record["key"], "json": meta, f"tgt.{image_format}": record["image"]}
    boxes = []
    for i, mask in enumerate(record["masks"]):
        crop, white, box = entity_crops(record["image"], mask)
        boxes.append(list(box))
        for name, arr in (("square", crop), ("white", white)):
            sample[f"e{i}_{name}.{image_format}"] = Image.fromarray(arr).resize((side, side), Image.BICUBIC)
    meta["boxes"] = boxes  # (top, left, bottom, right) of each crop in the target: provenance
    return sample


def failure(record: dict) -> dict:
    """A failed record -> its failure-log row."""
    row = {"key": record["key"], "source": record["source"], "reason": record["error"]}
    if record.get("detail"):
        row["detail"] = record["detail"]
    if record.get("caption") is not None:
        row["caption"] = record["caption"]
    if record.get("answer") is not None:
        row["answer"] = record["answer"]
    return row


def build_steps(config: ComposeConfig) -> list[Callable[[list[dict]], list[dict]]]:
    """The model steps in order, each with its model loaded (once)."""
    steps: list[Callable[[list[dict]], list[dict]]] = []
    if not config.caption_from_source:
        steps.append(Captioner(config))
    else:
        steps.append(_require_source_caption)
    steps.append(EntityExtractor(config))
    steps.append(ClipSegSegmenter(config) if config.segmenter == "clipseg" else GroundedSamSegmenter(config))
    return steps


def _require_source_caption(records: list[dict]) -> list[dict]:
    for r in records:
        if r["error"] is None and not r["caption"]:
            r["error"] = NO_CAPTION
    return records


class _Decoded:
    """A map-style dataset of records, so that a DataLoader decodes images in its workers."""

    def __init__(self, items: Sequence[InputItem], size: int, seed: int) -> None:
        self.items, self.size, self.seed = list(items), size, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return decode_record(self.items[i], size=self.size, seed=self.seed)


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def local_chunk_fn(config: ComposeConfig, steps: Sequence[Callable[[list[dict]], list[dict]]] | None = None):
    """The local engine's ``chunk_fn`` for :func:`kosmos_g.data.runner.run_chunks`: decode in DataLoader
    workers, then run the steps wave by wave (a wave is one captioning/LM batch)."""
    from torch.utils.data import DataLoader

    loaded = list(steps) if steps is not None else []
    wave = max(config.caption_batch_size, config.lm_batch_size)

    def chunk_fn(chunk: list[InputItem], update) -> tuple[Iterator[dict], list[dict]]:
        if not loaded:  # models load at the first chunk to do: a finished run loads none
            loaded.extend(build_steps(config))
        steps = loaded
        failures: list[dict] = []

        def samples() -> Iterator[dict]:
            loader = DataLoader(_Decoded(chunk, config.size, config.seed), batch_size=wave,
                                num_workers=min(config.workers, len(chunk)), collate_fn=_as_list)
            for records in loader:
                for step in steps:
                    records = step(records)
                for r in records:
                    if r["error"] is not None:
                        failures.append(failure(r))
                        update(1, reasons=[r["error"]])
                    else:
                        yield to_sample(r, config.image_format)
                        update(1, kept=1)

        return samples(), failures

    return chunk_fn


def compose(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            config: ComposeConfig, *, chunk_size: int = 1000, shard: str | tuple[int, int] | None = None,
            engine: str = "local", progress: bool = True, ray_address: str | None = None, ray_actors: int = 1) -> dict:
    """Build compositional shards from images; resumable (see :mod:`kosmos_g.data.runner`). Returns the manifest.

    Example:
        >>> m = compose("photos/", "shards/comp", cfg, shard="0/4")  # doctest: +SKIP
        >>> m["samples"], m["failures"]                              # doctest: +SKIP
        (731, {'no_entity_in_caption': 212, 'unreadable_image': 3, ...})
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine {engine!r} is unknown; choose local or ray.")
    parse_shard_spec(shard)
    items = list_images(inputs)
    if not items:
        raise ValueError(f"No images found in {inputs}.")
    run_info = {"command": "compose", "config": config.fingerprint()}
    if engine == "ray":
        from .ray_engine import compose_ray

        return compose_ray(items, out_dir, config, chunk_size=chunk_size, shard=shard, progress=progress,
                           run_info=run_info, address=ray_address, actors=ray_actors)
    return run_chunks(items, out_dir, local_chunk_fn(config), chunk_size=chunk_size, prefix="compositional",
                      shard=shard, progress=progress, run_info=run_info, desc="compose")


__all__ = ["Captioner", "ClipSegSegmenter", "ComposeConfig", "EntityExtractor", "GroundedSamSegmenter", "compose",
           "decode_record", "to_sample"]
