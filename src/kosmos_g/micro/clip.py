"""micro-CLIP: the micro world's stand-in for CLIP ViT-L/14 (and for SD1.5's CLIP text encoder).

The paper freezes CLIP twice: its vision tower is the MLLM's image encoder and its text
encoder is the space AlignerNet aligns to. Nothing can be downloaded here, so micro-CLIP is
trained from scratch in the world, as a transformers ``CLIPModel``, so that the library's
loaders read it unchanged:

* CLIP's symmetric InfoNCE with a learnable temperature on (rendered scene, caption) and
  (entity crop, entity caption) pairs, with NegCLIP-style hard negatives: the caption of the
  scene with ONE attribute changed or two objects' attributes swapped (:func:`perturb_scene`);
* a token-identity loss: every token's state must name its own word, so the per-token states
  the U-Net reads tell "left" from "right" (InfoNCE alone supervises only the pooled token);
* a binding loss: each object's position word must say that object's shape, colour,
  pattern and size, so micro-SD keeps two subjects' attributes apart (:func:`binding_targets`).

:func:`train_micro_clip` saves ``clip/`` (``CLIPModel``), ``text_encoder/`` (micro-SD's
condition), ``vision/`` (what stage 1's ``model.vision_init`` loads) and ``tokenizer/``.

Example:
    >>> import tempfile
    >>> from transformers import CLIPTextModel
    >>> with tempfile.TemporaryDirectory() as d:
    ...     clip_dir = train_micro_clip(f"{d}/clip", SMOKE_CLIP_RECIPE, progress=False)
    ...     CLIPTextModel.from_pretrained(clip_dir / "text_encoder").config.hidden_size
    32
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import CLIP_MEAN, CLIP_STD
from ..fileio import atomic_dir, atomic_write_text
from ..train.schedules import warmup_decay
from . import world
from .tokenizers import CLIP_MAX_LENGTH, build_clip_tokenizer
from .world import EVAL_SEED, ObjectSpec, Scene

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
"""The world's resolution, and micro-CLIP's vision input (8x8 patches of 8 px + class token)."""


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
               hard_negatives: bool = True, bindings: bool = False) -> tuple[Any, ...]:
    """One micro-CLIP training batch: ``(images (B, 64, 64, 3) uint8, captions, negatives)``.

    A ``crop_fraction`` of the pairs are an entity crop (square or background-whitened,
    like a Kosmos-G subject image) with its entity caption; the rest are whole scenes
    with full captions. ``negatives[i]`` is the caption of item ``i``'s perturbed scene
    (:func:`perturb_scene`); empty when ``hard_negatives`` is False. ``bindings=True`` adds a
    fourth element: per item its :func:`binding_targets` (``[]`` for a crop); it draws no random
    numbers, so the batch is the same either way.
    """
    images, captions, negatives, binds = [], [], [], []
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
    return (np.stack(images), captions, negatives, *([binds] if bindings else []))


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
    "right" (docs/micro-world.md).

    ``bind_weight`` > 0 adds a binding loss: ``bind_head`` (a linear map from the text width
    to ``sum(BIND_CLASSES)`` logits) reads, from the state of each object's position word
    (``bindings[i]``, from :func:`binding_targets`), that object's shape, colour, pattern and
    size (the mean of the four cross-entropies over every labelled object of the batch).
    Without it the state of "left" says which cell but not what is in it, and micro-SD
    mixes up the attributes of two subjects (docs/micro-world.md).
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
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(warmup, steps, "cosine", floor=0.1))


@dataclass(frozen=True)
class MicroCLIPRecipe:
    """How micro-CLIP is trained; the defaults are the shipped micro-CLIP's recipe."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    """Linear warm-up steps, then a cosine decay to 0.1 x ``lr``."""
    crop_fraction: float = 0.25
    """Share of pairs that are an entity crop with its entity caption (a Kosmos-G subject image)."""
    hard_negatives: bool = True
    token_weight: float = 1.0
    """The token-identity loss (:func:`clip_loss`). Trained on InfoNCE alone, the per-token states
    of "... on the left, ..." and "... on the right, ..." differed by 3.5 (L2 over the 40 x 64
    states) against 42 for a colour swap, and micro-SD put objects in the named cell at chance;
    with it every attribute word's state moves by about 18."""
    bind_weight: float = 1.0
    """The binding loss (:func:`clip_loss`; its linear head is trained beside the model and not
    saved): each object's position word must say what the object is. 0: off."""
    sizes: MicroClipSizes = field(default_factory=MicroClipSizes)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"micro-CLIP steps={self.steps} and batch_size={self.batch_size} must be >= 1 and >= 2")
        if self.bind_weight < 0 or self.token_weight < 0:
            raise ValueError(f"micro-CLIP bind_weight={self.bind_weight} and token_weight={self.token_weight} "
                             "must be >= 0 (0: off)")


SMOKE_CLIP_RECIPE = MicroCLIPRecipe(steps=4, batch_size=8, warmup=1, sizes=SMOKE_CLIP)
"""A tiny micro-CLIP for tests: every loss, 4 steps of batch 8."""


def train_micro_clip(out_dir: str | os.PathLike, recipe: MicroCLIPRecipe = MicroCLIPRecipe(), *,
                     progress: bool = True, log_every: int = 50) -> Path:
    """Train micro-CLIP from scratch and save ``out_dir/{clip,text_encoder,vision,tokenizer}``
    plus ``train_log.json`` (atomically). Deterministic for a seed on a fixed thread count.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = train_micro_clip(f"{d}/clip", SMOKE_CLIP_RECIPE, progress=False)
        ...     sorted(x.name for x in p.iterdir())
        ['clip', 'text_encoder', 'tokenizer', 'train_log.json', 'vision']
    """
    from transformers import CLIPModel, CLIPTokenizer

    r = recipe
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer(tmp / "tokenizer"))
        torch.manual_seed(r.seed)
        rng = np.random.default_rng(r.seed)
        config = micro_clip_config(len(tok), r.sizes, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = CLIPModel(config)
        model.set_attn_implementation("eager")  # 65 tokens x 64 wide: plain matmuls beat SDPA on a CPU (13%)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("micro-CLIP: training all %d parameters", n_params)
        named = list(model.named_parameters())
        bind_head = None
        if r.bind_weight > 0:  # created after the model, so the model's initial weights do not change
            bind_head = torch.nn.Linear(config.text_config.hidden_size, sum(BIND_CLASSES))
            named += [("bind_head." + n, p) for n, p in bind_head.named_parameters()]
        opt, sched = _clip_optimizer(named, r.lr, r.weight_decay, r.warmup, r.steps)
        log: list[dict[str, float]] = []
        bar = tqdm(range(r.steps), desc="micro-CLIP", disable=not progress)
        t0 = time.time()
        for step in bar:
            images, captions, negatives, binds = clip_batch(rng, r.batch_size, crop_fraction=r.crop_fraction,
                                                            hard_negatives=r.hard_negatives, bindings=True)
            # Pad to the longest caption only: the text tower is causal and pools at the first
            # end token, so the padding after it changes nothing but the cost.
            ids = tok(captions + negatives, padding="longest", truncation=True, return_tensors="pt").input_ids
            neg = ids[r.batch_size:] if negatives else None
            loss, stats = clip_loss(model, images_to_clip_pixels(images), ids[:r.batch_size], neg,
                                    token_weight=r.token_weight, bind_weight=r.bind_weight, bind_head=bind_head,
                                    bindings=binds)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % log_every == 0 or step == r.steps - 1:
                log.append({"step": step, "loss": loss.item(), "time_s": time.time() - t0, **stats})
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['acc']:.2f}")
        model.eval()
        save_micro_clip_towers(model, tmp)
        record = {"recipe": {**asdict(r), "parameters": n_params}, "log": log}
        atomic_write_text(tmp / "train_log.json", json.dumps(record, indent=1))
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


