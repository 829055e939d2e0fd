"""Stage 3: instruction tuning through the frozen diffusion U-Net.

Kosmos-G's condition replaces CLIP's text embedding in a frozen SD1.5 U-Net; the
denoising loss (epsilon, or the scheduler's ``prediction_type``) at uniformly drawn
timesteps of the U-Net's own noise schedule trains the MLLM, the resampler, the vision
tower's last block and AlignerNet M through it. 10% of conditions are replaced by the
null condition (``<s>`` alone) so classifier-free guidance works.

Samples are mixed by weight (paper: caption : edit : compositional = 1 : 2 : 2):

- ``caption``: ``<s> caption`` -> the captioned image;
- ``edit`` (InstructPix2Pix): ``<s> caption <image>src</image> instruction`` -> the edited
  image, the caption dropped with p = 0.5;
- ``compositional``: the caption with each entity's crop placed right after the entity
  words, or replacing them (one coin per sample, as the official loader), and for each
  entity the background-whitened or the square crop (one coin per entity) -> the image.

``stage3.foreground_weight`` (not in the paper; default 1, off) weighs the pixels of a
target's optional foreground mask more in the loss (docs/data-format.md).
``stage3.text_align_weight`` (not in the paper; default 0, off) adds, for every sample whose
target has a caption (compositional samples; edits that carry the edited image's
``target_caption``), the MSE between the condition and the SD text encoder's states of it.

Every random choice of a sample (caption drop, placements, crops, timestep, noise,
null-condition dropout) comes from that sample's own generator, so runs resume exactly
and do not depend on how samples are spread over processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..data.shards import BadSample, decode_image, image_member, image_size, iter_shard, validate_sample
from ..kernels import resolve_precision, use_matmul_attention_if_small
from ..processing import KosmosGProcessor
from .base import Stage, keep_image_weights_in_graph
from .data import SampleFiltered
from .latents import LatentCache
from .modeling import add_lora, enable_gradient_checkpointing, load_kosmos_g, set_trainable
from .recipe import Stage3Spec
from .stage2 import check_clip_text, clip_ids, load_clip_text

logger = logging.getLogger(__name__)

KINDS = ("caption", "edit", "compositional")
_TARGET_STEM = {"caption": "", "edit": "tgt", "compositional": "tgt"}
_MASK_STEM = {"caption": "fg", "edit": "tgt_fg", "compositional": "tgt_fg"}
"""The optional foreground mask of each kind's target (``stage3.foreground_weight``)."""


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bilinear) and center-crop to ``size`` x ``size``."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_target(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bilinear), center-crop, scale to [-1, 1]: (3, size, size)."""
    arr = np.asarray(_resize_crop(image, size), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def foreground_weights(mask: Image.Image, size: int, factor: int, weight: float) -> torch.Tensor:
    """Per-position loss weights (1, size/factor, size/factor) from a target's foreground
    ``mask`` (``L``; 255 = foreground): the mask through the target's own resize and crop,
    averaged over each ``factor`` x ``factor`` block (a latent position covers that many
    pixels), mapped to ``1 + (weight - 1) * foreground`` and scaled to mean 1."""
    m = torch.from_numpy(np.asarray(_resize_crop(mask, size), dtype=np.float32) / 255.0)[None, None]
    if factor > 1:
        m = F.avg_pool2d(m, factor)
    w = 1.0 + (weight - 1.0) * m[0]
    return w / w.mean()


def compositional_segments(raw: dict[str, Any], meta: dict[str, Any], rng: np.random.Generator, *,
                           replace_prob: float, white_prob: float, max_images: int) -> list[Any]:
    """The interleaved prompt of a compositional sample (text pieces and entity crops)."""
    caption = meta["caption"]
    ordered = sorted(enumerate(meta["entities"]), key=lambda e: (e[1]["start"], e[1]["end"]))
    kept, cursor = [], 0
    for i, ent in ordered:  # overlapping entities keep the first one
        if ent["start"] >= cursor and len(kept) < max_images:
            kept.append((i, ent))
            cursor = ent["end"]
    replace = rng.random() < replace_prob
    segments: list[Any] = []
    cursor = 0
    for i, ent in kept:
        segments.append(caption[cursor:ent["start"] if replace else ent["end"]])
        stem = f"e{i}_white" if rng.random() < white_prob else f"e{i}_square"
        segments.append(decode_image(raw, stem))
        cursor = ent["end"]
    segments.append(caption[cursor:])
    return segments


@dataclass(frozen=True, kw_only=True)
class Stage3Options:
    """What stage 3's example builder and loss module read: the recipe's ``stage3`` section,
    resolved against the loaded scheduler, VAE and AlignerNet (:meth:`from_spec`)."""

    resolution: int
    """Target side in pixels (``stage3.resolution``)."""
    cond_dropout: float
    """Share of conditions replaced by the null condition."""
    caption_drop: float
    """Edit samples: probability of dropping the source caption."""
    entity_replace_prob: float
    """Compositional samples: probability that the crops replace the entity words."""
    white_crop_prob: float
    """Compositional samples: probability of the background-whitened crop."""
    max_caption_tokens: int
    """Caption samples with more MLLM tokens are filtered."""
    min_caption_image_size: int
    """Caption samples whose image is smaller on either side are filtered (0: none)."""
    foreground_weight: float
    """Weight of a target's foreground pixels (1.0: masks ignored)."""
    text_align_weight: float
    """Weight of the condition-to-caption-states MSE (0: off)."""
    num_train_timesteps: int
    """Length of the U-Net's training schedule; timesteps are drawn from [0, this)."""
    prediction_type: str
    """``epsilon`` or ``v_prediction`` (the scheduler's, or ``stage3.prediction_type``)."""
    latent_factor: int
    """Pixels per latent position along a side (the VAE's downsampling; 1 in pixel space)."""
    clip_length: int
    """Condition length (AlignerNet's queries), to which target captions' CLIP ids are padded."""
    unet_bf16: bool
    """The frozen U-Net's pass runs under bfloat16 autocast (``stage3.unet_precision``)."""

    @classmethod
    def from_spec(cls, spec: Stage3Spec, *, num_train_timesteps: int, prediction_type: str, latent_factor: int,
                  clip_length: int, unet_bf16: bool) -> "Stage3Options":
        """The spec's sample and loss settings plus the values the loaded models fix."""
        return cls(resolution=spec.resolution, cond_dropout=spec.cond_dropout, caption_drop=spec.caption_drop,
                   entity_replace_prob=spec.entity_replace_prob, white_crop_prob=spec.white_crop_prob,
                   max_caption_tokens=spec.max_caption_tokens, min_caption_image_size=spec.min_caption_image_size,
                   foreground_weight=spec.foreground_weight, text_align_weight=spec.text_align_weight,
                   num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                   latent_factor=latent_factor, clip_length=clip_length, unet_bf16=unet_bf16)


class Stage3Builder:
    """Raw sample -> prompt, target (or cached latent posterior) and its random draws (workers)."""

    def __init__(self, processor: KosmosGProcessor, options: Stage3Options, *,
                 latent_cache: LatentCache | None = None, clip_tokenizer=None) -> None:
        self.processor = processor
        self.options = options
        self.latent_cache = latent_cache
        self.clip_tokenizer = clip_tokenizer
        """Set (``stage3.text_align_weight``): compositional samples and edits with a
        ``target_caption`` carry the CLIP ids of their target's caption."""

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator, source: str) -> dict[str, Any]:
        opt = self.options
        meta = validate_sample(raw)
        kind = meta["kind"]
        if kind not in KINDS:
            raise BadSample(f"stage 3 uses {KINDS} samples, not {kind!r} ({raw.get('__key__')!r}).")
        example: dict[str, Any] = {
            "source": source, "key": raw["__key__"],
            "seed": int(rng.integers(0, 2 ** 62)),
            "timestep": int(rng.integers(0, opt.num_train_timesteps)),
            "drop": bool(rng.random() < opt.cond_dropout),
        }
        segments, target_caption, target = self._prompt(raw, meta, rng)
        if self.clip_tokenizer is not None and target_caption is not None:
            example["clip_ids"] = clip_ids(self.clip_tokenizer, target_caption, opt.clip_length)
        # captions are data: a literal "<i>" (HTML italics) is text, not a forgotten placeholder
        example["prompt"] = self.processor.encode_prompt(segments, literal_text=True)
        cached = self.latent_cache.get(source, raw["__key__"]) if self.latent_cache else None
        if cached is not None:
            example["latent_params"] = cached
        else:
            target = target if target is not None else decode_image(raw, _TARGET_STEM[kind])
            example["target"] = preprocess_target(target, opt.resolution)
        if opt.foreground_weight != 1.0 and image_member(raw, _MASK_STEM[kind]) is not None:
            example["loss_weight"] = self._loss_weight(raw, kind, target)
        return example

    def _prompt(self, raw: dict[str, Any], meta: dict[str, Any],
                rng: np.random.Generator) -> tuple[list[Any], str | None, Image.Image | None]:
        """(prompt segments, the target's caption if it has one, the target if already decoded)."""
        opt, kind = self.options, meta["kind"]
        if kind == "caption":
            target = None
            if len(self.processor.tokenizer.encode(meta["caption"])) > opt.max_caption_tokens:
                raise SampleFiltered
            if opt.min_caption_image_size:
                target = decode_image(raw)
                if min(target.size) < opt.min_caption_image_size:
                    raise SampleFiltered
            return [meta["caption"]], None, target  # the prompt is the caption itself
        if kind == "edit":
            caption = "" if rng.random() < opt.caption_drop else meta["caption"]
            return [caption, decode_image(raw, "src"), meta["instruction"]], meta.get("target_caption"), None
        segments = compositional_segments(raw, meta, rng, replace_prob=opt.entity_replace_prob,
                                          white_prob=opt.white_crop_prob, max_images=self.processor.max_images)
        return segments, meta["caption"], None

    def _loss_weight(self, raw: dict[str, Any], kind: str, target: Image.Image | None) -> torch.Tensor:
        """The per-position weights of the target's foreground mask (``stage3.foreground_weight``)."""
        mask = decode_image(raw, _MASK_STEM[kind], mask=True)
        size = target.size if target is not None else image_size(raw, _TARGET_STEM[kind])
        if mask.size != size:
            raise BadSample(f"{kind} sample {raw['__key__']!r}: foreground mask {_MASK_STEM[kind]} is "
                            f"{mask.size[0]}x{mask.size[1]} but its target is {size[0]}x{size[1]}; "
                            "a mask must match its target pixel for pixel.")
        opt = self.options
        return foreground_weights(mask, opt.resolution, opt.latent_factor, opt.foreground_weight)


@torch.no_grad()
def encode_targets(vae, targets: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> the VAE posterior's parameters (N, 2C, R/f, R/f), fp32."""
    return vae.encode(targets.to(vae.dtype)).latent_dist.parameters.float()


@torch.no_grad()
def draw_latents(params: torch.Tensor, seeds: Sequence[int], scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents sampled from posterior ``params`` (B, 2C, h, w) and the diffusion noise.

    Both come from each sample's own generator (seeded on the CPU, so they do not depend on
    the device or on which process holds the sample).
    """
    mean, logvar = params.chunk(2, dim=1)  # (B, C, h, w) each
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps, noise = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        eps.append(torch.randn(mean.shape[1:], generator=g))
        noise.append(torch.randn(mean.shape[1:], generator=g))
    latents = (mean + std * torch.stack(eps).to(mean.device)) * scaling
    return latents, torch.stack(noise).to(mean.device)


@torch.no_grad()
def draw_pixel_noise(pixels: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space targets (B, 3, R, R) as they are, and each sample's diffusion noise from its own generator."""
    noise = [torch.randn(pixels.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return pixels, torch.stack(noise).to(pixels.device)


def vae_geometry(vae) -> tuple[int, float]:
    """(pixels per latent position along a side, the latents' scaling factor) of ``vae``; (1, 1.0)
    without one (pixel space)."""
    if vae is None:
        return 1, 1.0
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return factor, float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)


class DiffusionModule(nn.Module):
    """Denoising loss through the frozen U-Net; ``forward(batch) -> {"loss": (sum, n), "loss/<src>": ...}``."""

    def __init__(self, model, unet, noise_scheduler, source_names: Sequence[str], options: Stage3Options) -> None:
        super().__init__()
        self.model = model
        self.frozen = {"unet": unet}  # a plain dict: not a submodule, so not wrapped, saved or synced
        self.noise_scheduler = noise_scheduler
        self.source_names = list(source_names)
        self.options = options

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        unet = self.frozen["unet"]
        pixels = batch["pixel_values"]
        has_images = pixels.shape[0] > 0
        hidden = self.model.hidden_states(batch["input_ids"], batch["attention_mask"], pixels if has_images else None,
                                          batch["image_mask"])
        cond = self.model.aligner(hidden, batch["attention_mask"])  # (B, 77, D)
        cond = keep_image_weights_in_graph(self.model, cond, pixels)
        align = None
        if batch.get("text_target") is not None:  # (B, 77, D); rows without a caption have align_mask False
            per_token = (cond.float() - batch["text_target"].float()).pow(2).mean(dim=2)  # (B, 77)
            align = per_token.mean(dim=1) * batch["align_mask"]
        null = self.model.unconditional(1).to(cond.dtype)  # (1, 77, D): "<s>" alone
        cond = torch.where(batch["drop"][:, None, None], null, cond)
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.options.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        with torch.autocast(noisy.device.type, dtype=torch.bfloat16, enabled=self.options.unet_bf16):
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
        err = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, C, h, w)
        if batch.get("loss_weight") is not None:  # (B, 1, h, w), mean 1 per sample
            err = err * batch["loss_weight"]
        per = err.mean(dim=(1, 2, 3))  # (B,)
        n = torch.tensor(per.shape[0], device=per.device)
        out = {}
        for k, name in enumerate(self.source_names):  # the denoising loss alone, per source
            hit = batch["source_ids"] == k
            out[f"loss/{name}"] = ((per * hit).sum(), hit.sum())
        if align is not None:
            out["align"] = (align.sum(), batch["align_mask"].sum())
            per = per + self.options.text_align_weight * align
        out["loss"] = (per.sum(), n)
        return out


class Stage3(Stage):
    name = "stage3"
    module_prefix = "model."

    def __init__(self, recipe, accelerator) -> None:
        super().__init__(recipe, accelerator)
        spec = recipe.stage3
        self.metric_names = tuple(f"loss/{s.name}" for s in self.sources if s.weight > 0)
        if spec.text_align_weight > 0:
            self.metric_names += ("align",)
        self.model, self.processor = load_kosmos_g(recipe.model)
        lora = recipe.model.lora is not None
        if lora:
            add_lora(self.model, recipe.model.lora)
        self.trainable = set_trainable(self.model, mllm=not lora, lora=lora, resampler=True, aligner=True,
                                       vision_last_block=spec.train_vision_last_block)
        self._load_diffusion(spec)
        self.vae_factor, self.scaling = vae_geometry(self.vae)
        self._check_diffusion(spec)
        for net in (self.unet, self.vae):
            if net is not None:
                net.requires_grad_(False).eval().to(self.device)
        use_matmul_attention_if_small(self.unet)  # micro-SD's 8x8 maps; SD1.5 keeps the fused kernel
        unet_bf16 = self._unet_bf16(spec)
        if recipe.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
            self.unet.enable_gradient_checkpointing()
        self.cache = self._latent_cache(spec)
        self.text_encoder, clip_tokenizer = self._load_text_encoder(spec)
        self.source_names = [s.name for s in self.sources]
        self.options = Stage3Options.from_spec(
            spec, num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            prediction_type=self.noise_scheduler.config.prediction_type, latent_factor=self.vae_factor,
            clip_length=self.model.config.aligner.num_queries, unet_bf16=unet_bf16)
        self.module = DiffusionModule(self.model, self.unet, self.noise_scheduler, self.source_names, self.options)
        self.builder = Stage3Builder(self.processor, self.options, latent_cache=self.cache,
                                     clip_tokenizer=clip_tokenizer)

    # ------------------------------------------------------------------ setup steps
    def _load_diffusion(self, spec: Stage3Spec) -> None:
        """The frozen U-Net, VAE (None: pixel space) and noise scheduler from ``stage3.sd_path``."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        sd = Path(spec.sd_path)
        if not (sd / "unet").is_dir():
            raise FileNotFoundError(f"stage3.sd_path={sd} has no unet/ subfolder; pass a diffusers SD folder.")
        # Frozen and never exported: held in the mixed-precision dtype, as diffusers' scripts do.
        self.unet = UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet", torch_dtype=self.weight_dtype)
        self.vae = None  # pixel space (micro-SD): the U-Net denoises RGB in [-1, 1] directly
        if (sd / "vae").is_dir():
            self.vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae", torch_dtype=self.weight_dtype)
        elif self.unet.config.in_channels != 3 or self.unet.config.out_channels != 3:
            raise FileNotFoundError(
                f"stage3.sd_path={sd} has no vae/ and its U-Net has {self.unet.config.in_channels} input "
                "channels; a latent U-Net needs the SD folder's vae/ (only an RGB U-Net runs in pixel space).")
        elif spec.latent_cache:
            raise ValueError(f"stage3.latent_cache is set but {sd} is a pixel-space model (no vae/): "
                             "there is nothing to cache; remove stage3.latent_cache.")
        self.noise_scheduler = DDPMScheduler.from_pretrained(str(sd), subfolder="scheduler")
        if spec.prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=spec.prediction_type)

    def _check_diffusion(self, spec: Stage3Spec) -> None:
        """Refuse a scheduler, U-Net or resolution this model cannot be trained through."""
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; use epsilon or v_prediction.")
        if self.unet.config.cross_attention_dim != self.model.config.aligner.output_dim:
            raise ValueError(f"The U-Net attends to {self.unet.config.cross_attention_dim}-wide conditions but "
                             f"AlignerNet outputs {self.model.config.aligner.output_dim}.")
        if spec.resolution % self.vae_factor:
            raise ValueError(f"stage3.resolution={spec.resolution} must be a multiple of the VAE factor "
                             f"{self.vae_factor}.")

    def _unet_bf16(self, spec: Stage3Spec) -> bool:
        """Whether the frozen U-Net runs under bfloat16 autocast (``stage3.unet_precision``)."""
        bf16 = spec.unet_precision is not None and resolve_precision(spec.unet_precision, self.device) == "bf16"
        if bf16:
            logger.info("stage3: the frozen U-Net runs under bfloat16 autocast (stage3.unet_precision=%s)",
                        spec.unet_precision)
        return bf16

    def _latent_cache(self, spec: Stage3Spec) -> LatentCache | None:
        if not spec.latent_cache:
            return None
        return LatentCache(spec.latent_cache, {
            "vae": str(Path(spec.sd_path).resolve() / "vae"), "resolution": spec.resolution,
            "latent_channels": self.vae.config.latent_channels})

    def _load_text_encoder(self, spec: Stage3Spec):
        """(frozen CLIP text encoder, its tokenizer) for ``stage3.text_align_weight``, else (None, None)."""
        if spec.text_align_weight <= 0:
            return None, None
        encoder, tokenizer = load_clip_text(spec.sd_path)
        check_clip_text(encoder, self.model.config.aligner, Path(spec.sd_path))
        encoder.requires_grad_(False).eval().to(self.device, dtype=self.weight_dtype)
        return encoder, tokenizer

    # ------------------------------------------------------------------ batches
    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate([ex["prompt"] for ex in examples])
        batch["seeds"] = torch.tensor([ex["seed"] for ex in examples], dtype=torch.long)
        batch["timesteps"] = torch.tensor([ex["timestep"] for ex in examples], dtype=torch.long)
        batch["drop"] = torch.tensor([ex["drop"] for ex in examples], dtype=torch.bool)
        batch["source_ids"] = torch.tensor([self.source_names.index(ex["source"]) for ex in examples])
        batch["keys"] = [(ex["source"], ex["key"]) for ex in examples]
        batch["cached"] = [ex.get("latent_params") for ex in examples]
        batch["targets"] = [ex.get("target") for ex in examples]
        if any("loss_weight" in ex for ex in examples):  # samples without a mask weigh every pixel alike
            shape = next(ex["loss_weight"].shape for ex in examples if "loss_weight" in ex)
            batch["loss_weight"] = torch.stack([ex.get("loss_weight", torch.ones(shape)) for ex in examples])
        if self.text_encoder is not None:  # text_align_weight: only samples with a target caption carry CLIP ids
            batch["clip_ids"] = [ex.get("clip_ids") for ex in examples]
            batch["align_mask"] = torch.tensor(["clip_ids" in ex for ex in examples])
        return batch

    def encode_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # pixel space: the target is the "latent"
            return targets.to(self.device).float()
        return encode_targets(self.vae, targets.to(self.device))

    @torch.no_grad()
    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        missing = [i for i, c in enumerate(batch["cached"]) if c is None]
        params: list[torch.Tensor | None] = [None if c is None else c.to(self.device).float()
                                             for c in batch["cached"]]
        if missing:
            fresh = self.encode_targets(torch.stack([batch["targets"][i] for i in missing]))
            for j, i in enumerate(missing):
                params[i] = fresh[j]
                if self.cache is not None:
                    self.cache.put(*batch["keys"][i], fresh[j])
        if self.vae is None:
            latents, noise = draw_pixel_noise(torch.stack(params), batch["seeds"].tolist())
        else:
            latents, noise = draw_latents(torch.stack(params), batch["seeds"].tolist(), self.scaling)
        out = {k: v for k, v in batch.items() if k not in ("cached", "targets", "keys", "seeds", "clip_ids")}
        out["latents"], out["noise"] = latents, noise
        if self.text_encoder is not None:  # encode only the rows that have a caption; the rest stay 0 (masked)
            rows = [i for i, ids in enumerate(batch["clip_ids"]) if ids is not None]
            width = self.text_encoder.config.hidden_size
            target = torch.zeros(len(batch["clip_ids"]), self.options.clip_length, width, device=self.device)
            if rows:
                ids = torch.tensor([batch["clip_ids"][i] for i in rows], dtype=torch.long, device=self.device)
                with self.accelerator.autocast():
                    target[rows] = self.text_encoder(input_ids=ids).last_hidden_state.float()
            out["text_target"] = target
        return out

    # ------------------------------------------------------------------ latent cache
    def before_training(self) -> None:
        if self.cache is not None and self.recipe.stage3.precompute_latents:
            self.precompute_latents()

    def precompute_latents(self) -> int:
        """Encode every stage-3 target once into the latent cache (shards split over processes)."""
        acc = self.accelerator
        size, batch_size = self.recipe.stage3.resolution, self.recipe.data.batch_size
        todo: list[tuple[str, str, Any]] = []
        written = 0

        def flush() -> None:
            nonlocal written
            if todo:
                params = self.encode_targets(torch.stack([t for _, _, t in todo]))
                for (src, key, _), p in zip(todo, params):
                    self.cache.put(src, key, p)
                written += len(todo)
                todo.clear()

        shards = [(s.name, path) for s in self.sources if s.weight > 0 for path in s.shards]
        mine = shards[acc.process_index::acc.num_processes]
        for name, path in tqdm(mine, desc="precomputing latents", disable=not acc.is_local_main_process):
            for raw in iter_shard(path, on_error=lambda p, e: logger.warning("damaged shard %s: %s", p, e)):
                try:
                    kind = validate_sample(raw)["kind"]
                    if kind not in KINDS or self.cache.path(name, raw["__key__"]).is_file():
                        continue
                    todo.append((name, raw["__key__"], preprocess_target(decode_image(raw, _TARGET_STEM[kind]), size)))
                except Exception as e:  # counted and skipped again during training
                    logger.warning("latent cache: skipping %r (%s)", raw.get("__key__"), e)
                    continue
                if len(todo) >= batch_size:
                    flush()
        flush()
        acc.wait_for_everyone()
        return written
