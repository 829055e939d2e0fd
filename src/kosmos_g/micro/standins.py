"""Stand-ins for the frozen pretrained parts of Kosmos-G, trained in the micro world.

The paper freezes two pretrained models: CLIP ViT-L/14 (the MLLM's image encoder) and
Stable Diffusion 1.5 (whose CLIP text encoder the condition replaces). Nothing can be
downloaded here, so this module trains micro versions of both, in the same classes and
folder layouts, so that the project's loaders read them unchanged:

* micro-CLIP (:func:`train_micro_clip`): a transformers ``CLIPModel`` trained with CLIP's
  symmetric InfoNCE loss and learnable temperature on (rendered scene, caption) pairs,
  plus NegCLIP-style hard negatives (the caption of the scene with ONE attribute changed
  or two objects' attributes swapped) that force attribute binding. Saved as ``clip/``
  (CLIPModel), ``text_encoder/`` (CLIPTextModel), ``vision/`` (CLIPVisionModel) and
  ``tokenizer/`` (the word-level CLIPTokenizer of :mod:`.tokenizers`).
* micro-SD (:func:`train_micro_sd`): a diffusers ``UNet2DConditionModel`` conditioned on
  the FROZEN micro-CLIP text encoder's ``last_hidden_state`` (as SD is), trained
  text-to-image on full captions with caption dropout, in PIXEL space at 32x32 (no VAE:
  measured cheaper than training one, see ``docs/micro-notes.md``). Saved in the SD1.5
  folder layout minus ``vae/``; :func:`generate_micro_sd` samples it.

:func:`read_scene` reads a scene back from an image by analysis-by-synthesis against the
renderer (exact on renders, brittle on drawings); :func:`evaluate_micro_sd` measures
caption-following with the learned reader of :mod:`.reader` instead.

Example:
    >>> import tempfile
    >>> from transformers import CLIPTextModel
    >>> with tempfile.TemporaryDirectory() as d:
    ...     clip_dir = train_micro_clip(f"{d}/clip", smoke=True, progress=False)
    ...     CLIPTextModel.from_pretrained(clip_dir / "text_encoder").config.hidden_size
    32
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..kernels import resolve_precision, use_matmul_attention_if_small
from ..config import CLIP_MEAN, CLIP_STD
from . import world
from .reader import read_background
from .tokenizers import CLIP_MAX_LENGTH, atomic_dir, build_clip_tokenizer
from .world import ObjectSpec, Scene

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
"""The world's resolution, and micro-CLIP's vision input (8x8 patches of 8 px + class token)."""
EVAL_SEED = 10_000_019
"""Seed of the evaluation scenes; training seeds are small integers, so they never meet."""


# ============================================================================ shared helpers


def _lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to ``floor`` times the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def images_to_clip_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 at micro-CLIP's resolution -> (B, 3, H, W) float, normalised with
    CLIP's mean/std exactly as :class:`kosmos_g.processing.KosmosGProcessor` does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _caption_pair(rng: np.random.Generator, a: Scene, b: Scene) -> tuple[str, list[tuple[int, int]], str]:
    """Captions of ``a`` (with its entity spans) and ``b`` in the same grammar variant, so
    they differ only where the scenes do."""
    seed = int(rng.integers(1 << 31))
    caption, spans = a.caption_with_spans(np.random.default_rng(seed))
    return caption, spans, b.caption(np.random.default_rng(seed))


BIND_CLASSES = (len(world.SHAPES), len(world.COLORS), len(world.PATTERNS), len(world.SIZES))
"""Classes of the binding targets, in the order of :func:`binding_targets`' labels."""


def binding_targets(scene: Scene, caption: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, ...]]:
    """Per object of ``scene``: ``(token index, shape, colour, pattern, size)``, where the token
    is the last word of the object's position phrase in ``caption`` (``"left"`` of ``"... circle
    on the top left"``; index 0 is the start token) and the rest are class indices.

    The text tower is causal, so an attribute word's state cannot know the cell named after
    it; the position word's state has read the whole object phrase and is the one place a
    state can say "the object in THIS cell is a small red striped circle" (the binding
    micro-SD needs to draw two subjects without mixing their attributes). The micro
    tokenizer gives every world word and ``","`` one token, so a word's index is the number
    of words before it plus one.

    Example:
        >>> s = Scene("gray", (ObjectSpec("circle", "red", "striped", "small", "left"),))
        >>> caption, spans = s.caption_with_spans()
        >>> caption.replace(",", " ,").split()[binding_targets(s, caption, spans)[0][0] - 1]
        'left'
    """
    out = []
    for obj, (_, end) in zip(scene.objects, spans):
        phrase_end = end + 1 + len(world.POSITION_PHRASES[obj.position])
        # words through the position word = that word's index (the start token is index 0)
        index = len(caption[:phrase_end].replace(",", " ,").split())
        out.append((index, world.SHAPES.index(obj.shape), list(world.COLORS).index(obj.color),
                    world.PATTERNS.index(obj.pattern), list(world.SIZES).index(obj.size)))
    return out


PERTURBATIONS = ("color", "pattern", "shape", "size", "position", "background",
                 "swap_color", "swap_pattern", "swap_position")
"""Ways :func:`perturb_scene` changes a scene: one attribute of one object (or the
background), or one attribute swapped between two objects (the binding test)."""


def perturb_scene(rng: np.random.Generator, scene: Scene, kind: str | None = None) -> tuple[Scene, str]:
    """``scene`` with exactly one change of ``kind`` (one of :data:`PERTURBATIONS`; default:
    a random kind that applies), for hard-negative captions and binding tests.

    Example:
        >>> s = Scene("gray", (ObjectSpec("circle", "red", "solid", "small", "left"),
        ...                    ObjectSpec("star", "blue", "dotted", "large", "top")))
        >>> t, kind = perturb_scene(np.random.default_rng(0), s, "swap_color")
        >>> [o.color for o in t.objects], kind
        (['blue', 'red'], 'swap_color')
    """
    objs = list(scene.objects)
    n = len(objs)
    free = [p for p in world.POSITIONS if p not in {o.position for o in objs}]

    def differing_pairs(attr: str) -> list[tuple[int, int]]:
        return [(i, j) for i in range(n) for j in range(i + 1, n)
                if getattr(objs[i], attr) != getattr(objs[j], attr)]

    applies = {
        "color": n > 0, "pattern": n > 0, "size": n > 0, "position": n > 0 and bool(free),
        "shape": n > 0 and n < len(world.SHAPES), "background": True,
        "swap_color": bool(differing_pairs("color")), "swap_pattern": bool(differing_pairs("pattern")),
        "swap_position": n > 1,
    }
    if kind is None:
        kind = _pick(rng, [k for k in PERTURBATIONS if applies[k]])
    if kind not in PERTURBATIONS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {list(PERTURBATIONS)}")
    if not applies[kind]:
        raise ValueError(f"kind={kind!r} does not apply to {scene}; pick another kind")
    if kind == "background":
        others = [b for b in world.BACKGROUNDS if b != scene.background]
        return replace(scene, background=_pick(rng, others)), kind
    if kind.startswith("swap_"):
        attr = kind[5:]
        i, j = _pick(rng, differing_pairs(attr) if attr != "position" else
                           [(i, j) for i in range(n) for j in range(i + 1, n)])
        a, b = getattr(objs[i], attr), getattr(objs[j], attr)
        objs[i], objs[j] = replace(objs[i], **{attr: b}), replace(objs[j], **{attr: a})
        return replace(scene, objects=tuple(objs)), kind
    i = int(rng.integers(n))
    if kind == "shape":
        taken = {o.shape for o in objs}
        values: Sequence[str] = [s for s in world.SHAPES if s not in taken]
    elif kind == "position":
        values = free
    else:
        table = {"color": tuple(world.COLORS), "pattern": world.PATTERNS, "size": tuple(world.SIZES)}[kind]
        values = [v for v in table if v != getattr(objs[i], kind)]
    objs[i] = replace(objs[i], **{kind: _pick(rng, values)})
    return replace(scene, objects=tuple(objs)), kind


# ============================================================================ micro-CLIP


@dataclass
class MicroClipSizes:
    """Sizes of micro-CLIP. The text width is the U-Net's ``cross_attention_dim`` and the
    micro Kosmos-G AlignerNet's output width; the vision width is the resampler's input."""

    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    vision_width: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    patch_size: int = 8
    """64 px / 8 = 8x8 patches: 65 tokens per image go to the MLLM's resampler."""
    projection_dim: int = 64


SMOKE_CLIP = MicroClipSizes(text_width=32, text_layers=1, text_heads=2, vision_width=32, vision_layers=1,
                            vision_heads=2, patch_size=16, projection_dim=32)


def micro_clip_config(vocab_size: int, sizes: MicroClipSizes | None = None, *, bos_token_id: int,
                      eos_token_id: int, max_length: int = CLIP_MAX_LENGTH):
    """A transformers ``CLIPConfig`` for micro-CLIP (QuickGELU, like OpenAI's CLIP)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    s = sizes or MicroClipSizes()
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=s.text_width, intermediate_size=4 * s.text_width,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, max_position_embeddings=max_length,
        projection_dim=s.projection_dim, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id, hidden_act="quick_gelu",
    )
    vision = CLIPVisionConfig(
        hidden_size=s.vision_width, intermediate_size=4 * s.vision_width, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, image_size=IMAGE_SIZE, patch_size=s.patch_size,
        projection_dim=s.projection_dim, hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=s.projection_dim)


def entity_caption(obj: ObjectSpec) -> str:
    """The text paired with an entity crop in micro-CLIP training, e.g. ``"a red striped circle"``."""
    return f"a {obj.entity_text()}"


def clip_batch(rng: np.random.Generator, batch_size: int, *, crop_fraction: float = 0.0,
               hard_negatives: bool = True, bindings: bool = False,
               patch_size: int | None = None) -> tuple[Any, ...]:
    """One micro-CLIP training batch: ``(images (B, 64, 64, 3) uint8, captions, negatives)``.

    A ``crop_fraction`` of the pairs are an entity crop (square or background-whitened,
    like a Kosmos-G subject image) with its entity caption; the rest are whole scenes
    with full captions. ``negatives[i]`` is the caption of item ``i``'s perturbed scene
    (:func:`perturb_scene`); empty when ``hard_negatives`` is False. ``bindings=True`` adds a
    fourth element: per item its :func:`binding_targets` (``[]`` for a crop); a ``patch_size``
    adds one more: per item its :func:`patch_labels` (None for a crop). Neither draws random
    numbers: the batch is the same either way.
    """
    images, captions, negatives, binds, patches = [], [], [], [], []
    for _ in range(batch_size):
        scene = world.sample_scene(rng)
        result = world.render(scene, IMAGE_SIZE)
        if rng.random() < crop_fraction:
            i = int(rng.integers(len(scene.objects)))
            square, white = world.entity_crops(result, i)
            images.append(white if rng.random() < 0.5 else square)
            obj = scene.objects[i]
            captions.append(entity_caption(obj))
            binds.append([])
            patches.append(None)
            if hard_negatives:
                kind = _pick(rng, ("color", "pattern", "shape"))
                bad, _ = perturb_scene(rng, Scene("gray", (obj,)), kind)
                negatives.append(entity_caption(bad.objects[0]))
            continue
        images.append(result.image)
        if hard_negatives:
            bad, _ = perturb_scene(rng, scene)
            caption, spans, negative = _caption_pair(rng, scene, bad)
            negatives.append(negative)
        else:
            caption, spans = scene.caption_with_spans(rng)
        captions.append(caption)
        binds.append(binding_targets(scene, caption, spans))
        patches.append(patch_labels(result.masks, scene, patch_size) if patch_size else None)
    return (np.stack(images), captions, negatives, *([binds] if bindings else []),
            *([patches] if patch_size else []))


def _features(obj: Any) -> torch.Tensor:
    # transformers 5 returns a model output (projected features in pooler_output); 4.x a tensor.
    return obj if isinstance(obj, torch.Tensor) else obj.pooler_output


def clip_loss(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
              negative_ids: torch.Tensor | None = None, *,
              token_weight: float = 0.0, bind_weight: float = 0.0, bind_head: torch.nn.Module | None = None,
              bindings: Sequence[Sequence[tuple[int, ...]]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CLIP's symmetric InfoNCE with the learnable temperature; hard-negative captions (if
    given) join the image->text softmax only, as in NegCLIP.

    ``token_weight`` > 0 adds a token-identity loss: each token's ``last_hidden_state`` (up
    to the first end token) must name its own word through the tied token embedding
    (cross-entropy over the vocabulary). InfoNCE only supervises the pooled end token, and
    without this term the per-token states the U-Net reads barely tell "left" from
    "right" (see docs/micro-notes.md, session 7).

    ``bind_weight`` > 0 adds a binding loss: ``bind_head`` (a linear map from the text width
    to ``sum(BIND_CLASSES)`` logits) reads, from the state of each object's position word
    (``bindings[i]``, from :func:`binding_targets`), that object's shape, colour, pattern and
    size (the mean of the four cross-entropies over every labelled object of the batch).
    Without it the state of "left" says which cell but not what is in it, and micro-SD
    mixes up the attributes of two subjects (docs/micro-notes.md, session 15).
    """
    image = F.normalize(_features(model.get_image_features(pixel_values=pixel_values)), dim=-1)  # (B, D)
    ids = input_ids if negative_ids is None else torch.cat([input_ids, negative_ids])
    out = model.text_model(input_ids=ids)
    text = F.normalize(model.text_projection(out.pooler_output), dim=-1)  # (B or 2B, D)
    scale = model.logit_scale.exp().clamp(max=100.0)
    logits = scale * image @ text.t()  # (B, B[+B])
    b = image.shape[0]
    target = torch.arange(b)
    loss_i = F.cross_entropy(logits, target)
    loss_t = F.cross_entropy(logits[:, :b].t(), target)
    acc = (logits.argmax(dim=1) == target).float().mean().item()
    loss, stats = (loss_i + loss_t) / 2, {"acc": acc, "scale": scale.item()}
    if token_weight > 0:
        is_end = (ids == model.config.text_config.eos_token_id).long()
        keep = (is_end.cumsum(1) - is_end) == 0  # (N, L): every token up to the first end token
        words = out.last_hidden_state[keep] @ model.text_model.embeddings.token_embedding.weight.t()
        token = F.cross_entropy(words, ids[keep])
        loss = loss + token_weight * token
        stats["token_loss"] = token.item()
    if bind_weight > 0:
        if bind_head is None or bindings is None:
            raise ValueError("bind_weight > 0 needs bind_head and bindings (clip_batch(..., bindings=True))")
        rows = [(i, *t) for i, per in enumerate(bindings) for t in per]
        if rows:
            index = torch.tensor(rows)  # (N, 6): row, token, shape, colour, pattern, size
            logits = bind_head(out.last_hidden_state[index[:, 0], index[:, 1]]).split(BIND_CLASSES, dim=-1)
            bind = sum(F.cross_entropy(lg, index[:, 2 + k]) for k, lg in enumerate(logits)) / len(logits)
            loss = loss + bind_weight * bind
            stats["bind_loss"] = bind.item()
    return loss, stats


def _clip_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float, warmup: int,
                    steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """micro-CLIP's AdamW (CLIP's betas and eps; no decay on biases, norms and embeddings) and
    its warm-up + cosine schedule."""
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps))


def train_micro_clip(
    out_dir: str | os.PathLike,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
    crop_fraction: float = 0.25,
    hard_negatives: bool = True,
    token_weight: float = 1.0,
    bind_weight: float = 0.0,
    sizes: MicroClipSizes | None = None,
    seed: int = 0,
    smoke: bool = False,
    progress: bool = True,
    log_every: int = 50,
) -> Path:
    """Train micro-CLIP from scratch and save ``out_dir/{clip,text_encoder,vision,tokenizer}``
    plus ``train_log.json``. Deterministic for a seed (on a fixed thread count).

    ``token_weight`` weighs the token-identity loss (:func:`clip_loss`) beside InfoNCE. It is
    what makes the text encoder usable as micro-SD's condition: trained on InfoNCE alone,
    the per-token states of "... on the left, ..." and "... on the right, ..." differed by
    3.5 (L2 over the 40 x 64 states) against 42 for a colour swap, and micro-SD put objects
    in the named cell at chance; with it the word's own state moves by ~18 for every
    attribute. ``bind_weight`` weighs the binding loss (:func:`clip_loss`; a linear head
    trained beside the model and not saved): each object's position word must say what the
    object is. Off by default (the shipped micro-CLIP was trained without it).
    ``smoke=True`` trains a tiny model for 4 steps of batch 8 (for tests).

    Example:
        >>> import tempfile
        >>> from transformers import CLIPVisionModel
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = train_micro_clip(f"{d}/clip", smoke=True, progress=False)
        ...     sorted(x.name for x in p.iterdir())
        ['clip', 'text_encoder', 'tokenizer', 'train_log.json', 'vision']
    """
    from transformers import CLIPModel, CLIPTokenizer

    if smoke:
        steps, batch_size, sizes, warmup = min(steps, 4), min(batch_size, 8), sizes or SMOKE_CLIP, 1
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1 and >= 2")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer(tmp / "tokenizer"))
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        config = micro_clip_config(len(tok), sizes, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
        model = CLIPModel(config)
        model.set_attn_implementation("eager")  # 65 tokens x 64 wide: plain matmuls beat SDPA on a CPU (13%)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("micro-CLIP: training all %d parameters", n_params)
        named = list(model.named_parameters())
        bind_head = None
        if bind_weight > 0:  # created after the model, so the model's initial weights do not change
            bind_head = torch.nn.Linear(config.text_config.hidden_size, sum(BIND_CLASSES))
            named += [("bind_head." + n, p) for n, p in bind_head.named_parameters()]
        opt, sched = _clip_optimizer(named, lr, weight_decay, warmup, steps)
        log: list[dict[str, float]] = []
        bar = tqdm(range(steps), desc="micro-CLIP", disable=not progress)
        t0 = time.time()
        for step in bar:
            images, captions, negatives, binds = clip_batch(rng, batch_size, crop_fraction=crop_fraction,
                                                            hard_negatives=hard_negatives, bindings=True)
            # Pad to the longest caption only: the text tower is causal and pools at the first
            # end token, so the padding after it changes nothing but the cost.
            ids = tok(captions + negatives, padding="longest", truncation=True, return_tensors="pt").input_ids
            neg = ids[batch_size:] if negatives else None
            loss, stats = clip_loss(model, images_to_clip_pixels(images), ids[:batch_size], neg,
                                    token_weight=token_weight, bind_weight=bind_weight, bind_head=bind_head,
                                    bindings=binds)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps - 1:
                log.append({"step": step, "loss": loss.item(), "time_s": time.time() - t0, **stats})
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['acc']:.2f}")
        model.eval()
        save_micro_clip_towers(model, tmp)
        recipe = dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      crop_fraction=crop_fraction, hard_negatives=hard_negatives, token_weight=token_weight,
                      bind_weight=bind_weight, seed=seed, sizes=asdict(sizes or MicroClipSizes()), parameters=n_params)
        (tmp / "train_log.json").write_text(json.dumps({"recipe": recipe, "log": log}, indent=1))
    return out_dir


PATCH_CLASSES = tuple(len(v) + 1 for v in world.CELL_ATTRIBUTES.values())
"""Classes of :func:`patch_labels` per attribute (shape, colour, pattern): the world's, then "none"."""


def patch_labels(masks: Sequence[np.ndarray], scene: Scene, patch: int) -> np.ndarray:
    """Per ``patch`` x ``patch`` tile of a rendered scene (row-major, as a ViT's patch tokens), the
    shape, colour and pattern class of the object covering most of the tile, or each
    attribute's "none" class (its last) where objects cover under a quarter of it:
    ``(tiles, 3)`` int64, the targets of micro-CLIP's dense loss (:func:`refine_micro_clip_vision`).

    Example:
        >>> s = Scene("gray", (world.ObjectSpec("star", "red", "solid", "large", "center"),))
        >>> labels = patch_labels(world.render(s, 64).masks, s, 8)
        >>> labels.shape, labels[0].tolist(), labels[4 * 8 + 4].tolist()[0] == world.SHAPES.index("star")
        ((64, 3), [8, 8, 4], True)
    """
    none = [n - 1 for n in PATCH_CLASSES]
    size = masks[0].shape[0] if masks else IMAGE_SIZE
    grid = size // patch
    if not masks:
        return np.tile(np.array(none, dtype=np.int64), (grid * grid, 1))
    cover = np.stack(masks).reshape(len(masks), grid, patch, grid, patch).sum(axis=(2, 4)).reshape(len(masks), -1)
    best = cover.argmax(0)  # (tiles,)
    rows = [[classes.index(getattr(obj, name)) for name, classes in world.CELL_ATTRIBUTES.items()]
            for obj in scene.objects]
    labels = np.array(rows, dtype=np.int64)[best]
    labels[cover.max(0) * 4 < patch * patch] = none
    return labels


def refine_micro_clip_vision(
    clip_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    warmup: int = 50,
    dense_weight: float = 1.0,
    crop_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 50,
) -> Path:
    """Continue a micro-CLIP's vision tower with its text tower frozen, and save the result
    like :func:`train_micro_clip` (``out_dir/{clip,text_encoder,vision,tokenizer}``, the text
    encoder unchanged value for value, so a micro-SD trained on it still fits).

    The loss is CLIP's InfoNCE against the frozen text tower (with hard negatives, as before)
    plus ``dense_weight`` times a dense attribute loss: a linear head (trained beside the tower,
    not saved) reads, from every patch token of the features the MLLM gets (after the final
    LayerNorm), the shape, colour and pattern of the object under that patch
    (:func:`patch_labels`; entity crops are not labelled). InfoNCE supervises only the pooled
    class token, so in a scene of two or three objects the patch tokens carried an object's
    colour but rarely its shape (docs/micro-notes.md, sessions 18-19 and 28). The lr warms up
    over ``warmup`` steps and decays on a cosine, as in :func:`train_micro_clip`.
    """
    from transformers import CLIPModel, CLIPTokenizer

    if steps < 1 or batch_size < 2 or dense_weight < 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, dense_weight={dense_weight}: "
                         "need steps >= 1, batch_size >= 2 and dense_weight >= 0")
    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    if not (clip_dir / "clip").is_dir():
        raise FileNotFoundError(f"{clip_dir / 'clip'} not found; give a micro-CLIP folder (train_micro_clip's output)")
    with atomic_dir(out_dir) as tmp:
        tok = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
        tok.save_pretrained(str(tmp / "tokenizer"))
        model = CLIPModel.from_pretrained(clip_dir / "clip", dtype=torch.float32)
        model.set_attn_implementation("eager")
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        vcfg = model.config.vision_config
        head = torch.nn.Linear(vcfg.hidden_size, sum(PATCH_CLASSES))
        for p in model.parameters():
            p.requires_grad_(False)
        trained = [(n, p) for n, p in model.named_parameters() if n.startswith(("vision_model.", "visual_projection."))]
        named = trained + [("head." + n, p) for n, p in head.named_parameters()]
        for _, p in named:
            p.requires_grad_(True)
        opt, sched = _clip_optimizer(named, lr, weight_decay, warmup, steps)
        model.text_model.eval()
        model.vision_model.train()
        log: list[dict[str, float]] = []
        bar = tqdm(range(steps), desc="micro-CLIP vision", disable=not progress)
        t0 = time.time()
        for step in bar:
            images, captions, negatives, labels = clip_batch(rng, batch_size, crop_fraction=crop_fraction,
                                                             patch_size=vcfg.patch_size)
            ids = tok(captions + negatives, padding="longest", truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                text = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
            out = model.vision_model(pixel_values=images_to_clip_pixels(images))
            image = F.normalize(model.visual_projection(out.pooler_output), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100.0) * image @ text.t()
            target = torch.arange(batch_size)
            clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch_size].t(), target)) / 2
            stats = {"acc": (logits.argmax(1) == target).float().mean().item()}
            loss = clip
            rows = [i for i, lab in enumerate(labels) if lab is not None]
            if dense_weight > 0 and rows:
                tokens = model.vision_model.post_layernorm(out.last_hidden_state[rows, 1:])
                pred = head(F.layer_norm(tokens, tokens.shape[-1:])).split(PATCH_CLASSES, dim=-1)
                y = torch.from_numpy(np.stack([labels[i] for i in rows]))  # (N, tiles, 3)
                dense = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), y[..., k].reshape(-1))
                            for k, p in enumerate(pred)) / len(pred)
                on = y[..., 0] != PATCH_CLASSES[0] - 1  # tiles with an object
                stats["dense_loss"] = dense.item()
                stats["patch_shape_acc"] = (pred[0].argmax(-1) == y[..., 0])[on].float().mean().item()
                loss = loss + dense_weight * dense
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps - 1:
                log.append({"step": step, "loss": loss.item(), "clip_loss": clip.item(),
                            "time_s": time.time() - t0, **stats})
                bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{stats.get('patch_shape_acc', 0):.2f}")
        model.eval()
        save_micro_clip_towers(model, tmp)
        recipe = dict(init=str(clip_dir), steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup=warmup, dense_weight=dense_weight, crop_fraction=crop_fraction, seed=seed)
        (tmp / "train_log.json").write_text(json.dumps({"recipe": recipe, "log": log}, indent=1))
    return out_dir


def micro_clip_text_tower(model):
    """A ``CLIPModel``'s text tower as a standalone ``CLIPTextModel`` (micro-SD's text encoder)."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(model.config.text_config)
    getattr(text, "text_model", text).load_state_dict(model.text_model.state_dict())  # 4.x nests it
    return text


def save_micro_clip_towers(model, dest: Path) -> None:
    """Save a micro-CLIP ``CLIPModel`` as ``dest/clip``, its text tower as ``dest/text_encoder``
    and its vision tower as ``dest/vision`` (what stage 1's ``model.vision_init`` loads)."""
    from transformers import CLIPVisionModel

    model.save_pretrained(dest / "clip")
    micro_clip_text_tower(model).save_pretrained(dest / "text_encoder")
    vision = CLIPVisionModel(model.config.vision_config)
    getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(dest / "vision")


@torch.no_grad()
def evaluate_micro_clip(clip_dir: str | os.PathLike, *, n: int = 512, seed: int = EVAL_SEED,
                        batch_size: int = 128) -> dict[str, float]:
    """Zero-shot quality of a micro-CLIP folder on ``n`` fresh scenes (with their full captions).

    Returns ``i2t``/``t2i`` (top-1 retrieval among the ``n`` captions / images),
    ``crop_i2t`` (entity crop -> entity caption among ``n``), and ``bind_<kind>`` for each
    of :data:`PERTURBATIONS`: how often the image scores its own caption above the
    caption of the scene with that one change (0.5 = chance; ``swap_*`` is attribute binding).

    Example:
        >>> r = evaluate_micro_clip("micro/clip", n=64)  # doctest: +SKIP
        >>> sorted(r)[:3]  # doctest: +SKIP
        ['bind_background', 'bind_color', 'bind_pattern']
    """
    from transformers import CLIPModel, CLIPTokenizer

    clip_dir = Path(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir / "clip").eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]

    def embed_text(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = tok(texts[i:i + batch_size], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            out.append(F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1))
        return torch.cat(out)

    def embed_images(images: list[np.ndarray]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            pix = images_to_clip_pixels(np.stack(images[i:i + batch_size]))
            out.append(F.normalize(_features(model.get_image_features(pixel_values=pix)), dim=-1))
        return torch.cat(out)

    renders = [world.render(s, IMAGE_SIZE) for s in scenes]
    img = embed_images([r.image for r in renders])
    txt = embed_text([s.caption(rng) for s in scenes])
    sim = img @ txt.t()  # (n, n)
    target = torch.arange(n)
    metrics = {"i2t": (sim.argmax(1) == target).float().mean().item(),
               "t2i": (sim.argmax(0) == target).float().mean().item()}
    objs = [s.objects[0] for s in scenes if s.objects]
    crops = [world.entity_crops(r, 0)[1] for r, s in zip(renders, scenes) if s.objects]
    csim = embed_images(crops) @ embed_text([entity_caption(o) for o in objs]).t()
    metrics["crop_i2t"] = (csim.argmax(1) == torch.arange(len(objs))).float().mean().item()
    for kind in PERTURBATIONS:
        pairs = []
        for i, s in enumerate(scenes):
            try:
                bad, _ = perturb_scene(rng, s, kind)
            except ValueError:  # the kind does not apply (e.g. a swap in a one-object scene)
                continue
            good, _, negative = _caption_pair(rng, s, bad)
            pairs.append((i, good, negative))
        if not pairs:
            continue
        idx = torch.tensor([p[0] for p in pairs])
        good, bad = embed_text([p[1] for p in pairs]), embed_text([p[2] for p in pairs])
        metrics[f"bind_{kind}"] = ((img[idx] * good).sum(1) > (img[idx] * bad).sum(1)).float().mean().item()
    return metrics


# ============================================================================ reading scenes back


def _cell_slices(position: str, size: int) -> tuple[slice, slice]:
    """The pixels of ``position``'s grid cell; every object lies inside its cell (radius < half a cell)."""
    row, col = divmod(world.POSITIONS.index(position), 3)
    return slice(row * size // 3, (row + 1) * size // 3), slice(col * size // 3, (col + 1) * size // 3)


_CANDIDATES = [(shape, color, pattern, size) for shape in world.SHAPES for color in world.COLORS
               for pattern in world.PATTERNS for size in world.SIZES]


@lru_cache(maxsize=128)
def _cell_templates(background: str, position: str, size: int) -> np.ndarray:
    """(1 + 512, h, w, 3) float32: the cell empty, then with each (shape, color, pattern, size)."""
    rows, cols = _cell_slices(position, size)
    out = [world.render_background(background, size)[rows, cols]]
    for shape, color, pattern, size_name in _CANDIDATES:
        scene = Scene(background, (ObjectSpec(shape, color, pattern, size_name, position),))
        out.append(world.render(scene, size).image[rows, cols])
    return np.stack(out).astype(np.float32)


def read_scene(image: np.ndarray) -> Scene:
    """The scene an image shows, read back by analysis-by-synthesis: the background whose
    render is closest (median pixel distance, so objects do not count), then per grid cell
    the nearest render among "empty" and all 512 (shape, color, pattern, size) objects.

    Exact on renders, but brittle on generated images (an object drawn one pixel off its
    cell centre no longer matches its own template): micro DreamBench and
    :func:`evaluate_micro_sd` read with the learned :mod:`.reader` instead.

    Example:
        >>> scene = world.sample_scene(np.random.default_rng(3))
        >>> read_scene(world.render(scene, 32).image) == replace(scene, objects=tuple(
        ...     sorted(scene.objects, key=lambda o: world.POSITIONS.index(o.position))))
        True
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be (S, S, 3), got shape {image.shape}")
    size = image.shape[0]
    x = image.astype(np.float32)
    background = read_background(image)
    objects = []
    for position in world.POSITIONS:
        rows, cols = _cell_slices(position, size)
        templates = _cell_templates(background, position, size)  # (513, h, w, 3)
        k = int(((templates - x[rows, cols]) ** 2).sum(axis=(1, 2, 3)).argmin())
        if k:
            objects.append(ObjectSpec(*_CANDIDATES[k - 1], position=position))
    return Scene(background, tuple(objects))


def match_scene(target: Scene, seen: Scene) -> dict[str, float]:
    """Per-attribute agreement of a read-back scene with the scene a caption described.

    Each target object is matched to the unused ``seen`` object agreeing on the most of
    (shape, color, pattern, size, position); an unmatched target object gets every
    attribute wrong. Returns the mean over target objects of ``shape``, ``color``,
    ``pattern``, ``size``, ``position`` and ``subject`` (shape, color and pattern all
    right), plus ``background`` and ``count`` (same number of objects) as 0/1.

    Example:
        >>> a = Scene("gray", (ObjectSpec("circle", "red", "solid", "small", "left"),))
        >>> match_scene(a, replace(a, background="pink"))["background"]
        0.0
    """
    attrs = ("shape", "color", "pattern", "size", "position")
    free = list(seen.objects)
    totals = dict.fromkeys((*attrs, "subject"), 0.0)
    for obj in target.objects:
        if not free:
            continue
        best = max(free, key=lambda o: sum(getattr(o, a) == getattr(obj, a) for a in attrs))
        free.remove(best)
        for a in attrs:
            totals[a] += float(getattr(best, a) == getattr(obj, a))
        totals["subject"] += float(best.subject == obj.subject)
    n = max(1, len(target.objects))
    out = {k: v / n for k, v in totals.items()}
    out["background"] = float(seen.background == target.background)
    out["count"] = float(len(seen.objects) == len(target.objects))
    return out


# ============================================================================ micro-SD


SD_SIZE = 32
"""micro-SD's resolution. It diffuses in PIXEL space (no VAE): at 32 px a U-Net step costs
about what a 64 px latent (f=4) one costs plus the VAE encode, and a micro-VAE good enough
to keep patterns took longer to train than the whole U-Net (see docs/micro-notes.md)."""


def images_to_sd_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]: micro-SD's "latents" are pixels."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sd_pixels_to_images(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`images_to_sd_pixels` (clamped and rounded to uint8)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _scenes_and_images(
    rng: np.random.Generator, n: int, size: int
) -> tuple[list[Scene], np.ndarray, np.ndarray]:
    """``n`` random scenes, their (n, S, S, 3) uint8 renders and (n, S, S) bool object masks."""
    scenes = [world.sample_scene(rng) for _ in range(n)]
    results = [world.render(s, size) for s in scenes]
    masks = [world.foreground(r) > 0 for r in results]
    return scenes, np.stack([r.image for r in results]), np.stack(masks)


def _mean_match(scenes: Sequence[Scene], images: np.ndarray, reader: Any = None) -> dict[str, float]:
    """Mean :func:`match_scene` of ``images`` read back (by ``reader``: a folder, a loaded
    :class:`.reader.AttributeReader`, or None for the shipped one) against ``scenes``, plus ``exact``."""
    from .reader import as_reader, read_scenes

    rows = []
    for scene, seen in zip(scenes, read_scenes(as_reader(reader), images)):
        row = match_scene(scene, seen)
        row["exact"] = float(set(seen.objects) == set(scene.objects) and seen.background == scene.background)
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@dataclass
class MicroUNetSizes:
    """The micro U-Net on 32x32 RGB. Attention (self + cross) only at the 8x8 level: on CPU a
    transformer block at 16x16 cost 2.8x the whole rest of the U-Net (measured), and an 8x8
    map already resolves the 3x3 layout grid; convolutions draw the details above it."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[int, ...] = (2,)
    layers_per_block: int = 1
    attention_head_dim: int = 4
    """diffusers' name for the number of attention heads: 4 heads of 32 channels at 128 wide
    (until session 26: 32 heads of 4 channels, ~15-20% slower per training step on 2 cores)."""


def unet_sizes(unet) -> MicroUNetSizes:
    """The :class:`MicroUNetSizes` a micro U-Net was built with, read from its config (what a
    continued run's ``train_log.json`` records: its U-Net is the saved one, not a new one)."""
    cfg = unet.config
    return MicroUNetSizes(block_out_channels=tuple(cfg.block_out_channels),
                          attention_levels=tuple(i for i, kind in enumerate(cfg.down_block_types)
                                                 if kind.startswith("CrossAttn")),
                          layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_head_dim)


SMOKE_UNET = MicroUNetSizes(block_out_channels=(8, 16, 16), attention_levels=(2,), attention_head_dim=8)


def micro_unet(sizes: MicroUNetSizes | None = None, *, cross_attention_dim: int, in_channels: int = 3,
               sample_size: int = SD_SIZE):
    """A fresh diffusers ``UNet2DConditionModel`` at micro size."""
    from diffusers import UNet2DConditionModel

    s = sizes or MicroUNetSizes()
    n = len(s.block_out_channels)
    down = tuple("CrossAttnDownBlock2D" if i in s.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if n - 1 - i in s.attention_levels else "UpBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(s.block_out_channels), down_block_types=down, up_block_types=up,
        layers_per_block=s.layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=s.attention_head_dim, norm_num_groups=min(32, min(s.block_out_channels) // 2),
    )


NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
"""The cosine schedule (improved DDPM): at 32 px SD's scaled_linear schedule leaves too much
signal at t=T (the image's layout survives the noise); the cosine one leaves almost none."""


def micro_scheduler(prediction_type: str = "v_prediction"):
    """The sampler saved in ``scheduler/``: DPM-Solver++(2M), SD1.5's default in our pipeline,
    on the training schedule. ``lambda_min_clipped`` is required with the cosine schedule:
    without it the last steps divide by ~0 signal and samples come out as noise."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type,
                                       algorithm_type="dpmsolver++", solver_order=2,
                                       lambda_min_clipped=-5.1, timestep_spacing="linspace", steps_offset=1)


def encode_captions(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L, D) ``last_hidden_state`` of captions padded to the tokenizer's max length:
    exactly what SD pipelines pass the U-Net (``""`` gives the unconditional embedding)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


def train_micro_sd(
    out_dir: str | os.PathLike,
    clip_dir: str | os.PathLike,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    caption_dropout: float = 0.1,
    prediction_type: str = "v_prediction",
    snr_gamma: float | None = None,
    object_weight: float = 5.0,
    ema_decay: float = 0.995,
    sizes: MicroUNetSizes | None = None,
    seed: int = 0,
    smoke: bool = False,
    progress: bool = True,
    log_every: int = 50,
    resume_unet: str | os.PathLike | None = None,
    resolution: int = SD_SIZE,
    checkpoint_every: int = 250,
    precision: str = "fp32",
    step_callback: Callable[[int], None] | None = None,
) -> Path:
    """Train micro-SD text-to-image in pixel space at ``resolution`` (default
    :data:`SD_SIZE`): a U-Net conditioned on
    the FROZEN micro-CLIP text encoder's ``last_hidden_state`` (as SD is), on full captions,
    with ``caption_dropout`` of them empty (the unconditional prompt of classifier-free
    guidance). Pixels of objects weigh ``object_weight`` times background pixels in the
    loss (the renderer's exact masks; the caption fixes the image, so the optimum is
    unchanged, but objects, a few percent of the pixels, are learned several times
    sooner). ``snr_gamma`` enables Min-SNR weighting (off: for v-prediction it nearly
    zeroes the high-noise steps, where layout and colour are decided). An EMA of the U-Net
    is what is saved. Deterministic for a seed on a fixed thread count.

    Saves a diffusers folder ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and
    ``model_index.json`` (``vae`` null: the U-Net's samples are the images, in [-1, 1]), and
    ``train_log.json``. ``resume_unet`` starts from a saved ``unet/`` folder instead of
    random weights (e.g. to continue a run). ``smoke=True``: a tiny U-Net, 4 steps of batch 4.

    Every ``checkpoint_every`` steps the whole training state (weights, EMA, optimizer,
    schedule, both random generators) is written atomically to ``.<out_dir name>.partial.pt``
    beside ``out_dir``; a call with the same arguments resumes from it (to the same weights
    as an uninterrupted run on the same thread count) and deletes it when done. 0: never.

    ``precision="bf16"`` runs the U-Net's forward pass under bfloat16 autocast (weights, EMA,
    optimizer and loss stay float32); on CPUs with native bfloat16 (AVX512-BF16, AMX) a step
    takes about half the time of ``"fp32"`` (``benchmarks/micro_train.py``), elsewhere longer.
    ``"auto"`` picks bf16 on such CPUs (:func:`kosmos_g.kernels.resolve_precision`); the
    precision used is recorded in ``train_log.json``. Either way the U-Net attends with plain
    matmuls (:func:`kosmos_g.kernels.use_matmul_attention_if_small`).

    ``step_callback(step)``, if given, is called before each step (``train-all`` uses it to
    give a run more threads once the jobs beside it are done).

    Example:
        >>> import tempfile
        >>> from diffusers import UNet2DConditionModel
        >>> with tempfile.TemporaryDirectory() as d:
        ...     clip = train_micro_clip(f"{d}/clip", smoke=True, progress=False)
        ...     sd = train_micro_sd(f"{d}/sd", clip, smoke=True, progress=False)
        ...     UNet2DConditionModel.from_pretrained(sd / "unet").config.sample_size
        32
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r} is unknown; use 'epsilon' or 'v_prediction'")
    if smoke:
        steps, batch_size, sizes, warmup = min(steps, 4), min(batch_size, 4), sizes or SMOKE_UNET, 1
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    precision = resolve_precision(precision)
    levels = len((sizes or MicroUNetSizes()).block_out_channels)
    if resolution < 16 or resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution={resolution} must be >= 16 and divisible by {2 ** (levels - 1)} "
                         f"(the U-Net halves it {levels - 1} times); e.g. 32 or 64")
    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    for p in (clip_dir / "text_encoder", clip_dir / "tokenizer"):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} not found; train micro-CLIP first (train_micro_clip)")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder").eval().requires_grad_(False)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type)
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)  # (T,)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if resume_unet is not None:
        unet = UNet2DConditionModel.from_pretrained(resume_unet)
        if unet.config.sample_size != resolution:
            raise ValueError(f"resume_unet={resume_unet} was trained at {unet.config.sample_size} px, "
                             f"not resolution={resolution}; pass resolution={unet.config.sample_size}")
    else:
        unet = micro_unet(sizes, cross_attention_dim=text_encoder.config.hidden_size, sample_size=resolution)
    unet.train()
    use_matmul_attention_if_small(unet)
    logger.info("micro-SD: training %d U-Net parameters; text encoder frozen",
                sum(p.numel() for p in unet.parameters()))
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps))
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, caption_dropout=caption_dropout,
                  prediction_type=prediction_type, snr_gamma=snr_gamma, object_weight=object_weight,
                  ema_decay=ema_decay, seed=seed, warmup=warmup,
                  resumed_from=None if resume_unet is None else str(resume_unet),
                  resolution=resolution, sizes=asdict(unet_sizes(unet)), precision=precision,
                  parameters=sum(p.numel() for p in unet.parameters()))
    partial = out_dir.parent / f".{out_dir.name}.partial.pt"
    log: list[dict[str, float]] = []
    start, elapsed = 0, 0.0
    if partial.is_file():
        start, elapsed, log = _load_sd_partial(partial, recipe, unet=unet, ema=ema, opt=opt, sched=sched, rng=rng)
        logger.info("micro-SD: resuming %s at step %d of %d", partial, start, steps)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="micro-SD", disable=not progress)
    t0 = time.time() - elapsed
    for step in bar:
        if step_callback is not None:
            step_callback(step)
        scenes, images, masks = _scenes_and_images(rng, batch_size, resolution)
        weight = 1.0 + (object_weight - 1.0) * torch.from_numpy(masks).float()[:, None]  # (B, 1, S, S)
        weight = weight / weight.mean(dim=(1, 2, 3), keepdim=True)
        captions = ["" if rng.random() < caption_dropout else s.caption(rng) for s in scenes]
        with torch.no_grad():
            cond = encode_captions(text_encoder, tokenizer, captions)  # (B, L, D)
        x0 = images_to_sd_pixels(images)  # (B, 3, S, S)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,))
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise if prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet(noisy, t, cond).sample
        per_sample = (F.mse_loss(pred.float(), target, reduction="none") * weight).mean(dim=(1, 2, 3))  # (B,)
        if snr_gamma is not None:  # Min-SNR-gamma (Hang et al. 2023), epsilon and v forms
            clipped = snr[t].clamp(max=snr_gamma)
            per_sample = per_sample * (clipped / snr[t] if prediction_type == "epsilon"
                                       else clipped / (snr[t] + 1))
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # short warm-up of the EMA
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "time_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_sd_partial(partial, recipe, step + 1, time.time() - t0, log,
                             unet=unet, ema=ema, opt=opt, sched=sched, rng=rng)
    unet.load_state_dict(ema)
    unet.eval()
    with atomic_dir(out_dir) as tmp:
        save_micro_sd(tmp, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler=micro_scheduler(prediction_type))
        recipe["threads"] = torch.get_num_threads()  # results are exact for a seed and thread count
        (tmp / "train_log.json").write_text(json.dumps({"recipe": recipe, "log": log}, indent=1))
    partial.unlink(missing_ok=True)
    return out_dir


def _save_sd_partial(path: Path, recipe: dict[str, Any], step: int, elapsed: float, log: list[dict[str, float]],
                     *, unet, ema, opt, sched, rng: np.random.Generator) -> None:
    """Write micro-SD's whole training state after ``step`` steps (atomically: a crash while
    writing keeps the previous one)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"recipe": recipe, "step": step, "elapsed": elapsed, "log": log, "unet": unet.state_dict(),
                "ema": ema, "opt": opt.state_dict(), "sched": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}, tmp)
    os.replace(tmp, path)


REMOVED_SD_ARGS = {"cond_noise": 0.0, "position_word_mix": 0.0}
"""Arguments :func:`train_micro_sd` once had (experiments of sessions 24-25, off by default,
removed in session 27), at their "off" value: a partial run saved with them so still resumes."""


def without_removed(settings: dict[str, Any], removed: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a saved recipe or budget) less the options in ``removed`` that hold the value
    that left them off: what the record means to today's code. An option that was on stays, so the
    caller's comparison refuses the record by its name.

    Example:
        >>> without_removed({"steps": 3, "cond_noise": 0.0}, REMOVED_SD_ARGS)
        {'steps': 3}
    """
    return {k: v for k, v in settings.items() if not (k in removed and v == removed[k])}


def _load_sd_partial(path: Path, recipe: dict[str, Any], *, unet, ema, opt, sched,
                     rng: np.random.Generator) -> tuple[int, float, list[dict[str, float]]]:
    """Restore what :func:`_save_sd_partial` wrote into the fresh objects; returns
    ``(step, elapsed seconds, log)``. A state from other arguments is refused, not mixed in."""
    state = torch.load(path, weights_only=True)
    saved = without_removed(state["recipe"], REMOVED_SD_ARGS)
    if saved != recipe:
        diff = sorted(k for k in recipe.keys() | saved.keys() if recipe.get(k) != saved.get(k))
        raise ValueError(f"{path} holds a partial micro-SD run with other arguments (differing: {diff}); "
                         f"call again with the arguments it was started with to resume it, or delete it "
                         f"to start over.")
    unet.load_state_dict(state["unet"])
    for k, v in state["ema"].items():
        ema[k].copy_(v)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    return state["step"], state["elapsed"], state["log"]


def save_micro_sd(path: str | os.PathLike, *, unet, text_encoder, tokenizer, scheduler) -> Path:
    """Write the SD1.5 folder layout without ``vae/`` (``model_index.json`` says ``vae: null``)."""
    path = Path(path)
    unet.save_pretrained(path / "unet")
    config = json.loads((path / "unet" / "config.json").read_text())
    if config.pop("_name_or_path", None) is not None:  # where it was loaded from: a local path, not for shipping
        (path / "unet" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(str(path / "tokenizer"))
    scheduler.save_pretrained(path / "scheduler")
    import diffusers

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", type(scheduler).__name__],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": [None, None]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


@dataclass
class MicroSD:
    """The parts of a micro-SD folder (see :func:`load_micro_sd`)."""

    unet: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any


def load_micro_sd(sd_dir: str | os.PathLike) -> MicroSD:
    """Load a micro-SD folder with the diffusers / transformers loaders (CPU, fp32, eval)."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sd_dir = Path(sd_dir)
    if not (sd_dir / "unet").is_dir():
        raise FileNotFoundError(f"{sd_dir / 'unet'} not found; is {sd_dir} a micro-SD folder "
                                "(see train_micro_sd)?")
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet", torch_dtype=torch.float32).eval()
    use_matmul_attention_if_small(unet)
    return MicroSD(
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(sd_dir / "scheduler"),
        # the shipped weights are fp16: without a dtype, transformers keeps the stored one
        text_encoder=CLIPTextModel.from_pretrained(sd_dir / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(sd_dir / "tokenizer"),
    )


@torch.no_grad()
def generate_micro_sd(sd: MicroSD | str | os.PathLike, captions: list[str], *, num_inference_steps: int = 20,
                      guidance_scale: float = 4.0, seed: int = 0) -> np.ndarray:
    """Text-to-image with micro-SD: ``(B, 32, 32, 3)`` uint8, one image per caption.

    The steps of diffusers' SD pipeline minus the VAE: encode the prompts (and ``""``),
    start from noise, denoise with classifier-free guidance, map [-1, 1] to pixels.

    Example:
        >>> generate_micro_sd("micro/sd", ["a large red solid star in the center, "  # doctest: +SKIP
        ...                                "on a gray background"]).shape
        (1, 32, 32, 3)
    """
    sd = load_micro_sd(sd) if isinstance(sd, (str, os.PathLike)) else sd
    # 1. prompts -> condition (B, L, D); "" is the unconditional one (caption dropout)
    cond = encode_captions(sd.text_encoder, sd.tokenizer, list(captions))
    uncond = encode_captions(sd.text_encoder, sd.tokenizer, [""]).expand_as(cond)
    # 2. initial noise, seeded
    cfg = sd.unet.config
    x = torch.randn((len(captions), cfg.in_channels, cfg.sample_size, cfg.sample_size),
                    generator=torch.Generator().manual_seed(seed))
    sched = sd.scheduler
    sched.set_timesteps(num_inference_steps)
    x = x * sched.init_noise_sigma
    # 3. denoise
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        pred_uncond, pred_cond = sd.unet(inp, t, torch.cat([uncond, cond])).sample.chunk(2)
        x = sched.step(pred_uncond + guidance_scale * (pred_cond - pred_uncond), t, x).prev_sample
    # 4. the samples are the images
    return sd_pixels_to_images(x)


def evaluate_micro_sd(sd: MicroSD | str | os.PathLike, *, n: int = 48, n_objects: int | None = 1,
                      num_inference_steps: int = 20, guidance_scale: float = 4.0, seed: int = EVAL_SEED,
                      batch_size: int = 16, reader: Any = None) -> dict[str, float]:
    """Caption-following of micro-SD: one image for each of ``n`` fresh captions (scenes of
    ``n_objects`` objects; None: 1-3), read back with the attribute reader (``reader``: a
    folder or a loaded one; default: the shipped :mod:`.reader`), averaged
    :func:`match_scene` (``subject``: shape, colour and pattern all right; ``exact``: the
    whole scene). ``s_per_image``: wall seconds per image at the current thread count.

    Example:
        >>> evaluate_micro_sd("micro/sd", n=16)["subject"]  # doctest: +SKIP
        0.875
    """
    sd = load_micro_sd(sd) if isinstance(sd, (str, os.PathLike)) else sd
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, n_objects) for _ in range(n)]
    captions = [s.caption(rng) for s in scenes]
    t0 = time.time()
    images = np.concatenate([
        generate_micro_sd(sd, captions[i:i + batch_size], num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, seed=seed + i)
        for i in range(0, n, batch_size)])
    seconds = (time.time() - t0) / n
    result = _mean_match(scenes, images, reader)
    result["s_per_image"] = seconds
    return result
