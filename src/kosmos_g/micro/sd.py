"""micro-SD: the micro world's stand-in for Stable Diffusion 1.5.

A diffusers ``UNet2DConditionModel`` conditioned on the FROZEN micro-CLIP text encoder's
``last_hidden_state`` (as SD1.5 is on CLIP's), trained text-to-image on full captions with
caption dropout, in PIXEL space at 32x32 (no VAE). It is saved in the SD1.5 folder layout
minus ``vae/``, so the library's :class:`kosmos_g.pipeline.KosmosGPipeline` and stage 3 read
it like any SD1.5 folder, and :func:`generate_micro_sd` samples it with diffusers' own
``StableDiffusionPipeline``.

:func:`train_micro_sd` runs the recipe's training runs in order (:class:`MicroSDRecipe`):
the first trains a fresh U-Net, each later one continues the previous run's.

Example:
    >>> import tempfile
    >>> from diffusers import UNet2DConditionModel
    >>> from kosmos_g.micro.clip import SMOKE_CLIP_RECIPE, train_micro_clip
    >>> with tempfile.TemporaryDirectory() as d:
    ...     clip = train_micro_clip(f"{d}/clip", SMOKE_CLIP_RECIPE, progress=False)
    ...     sd = train_micro_sd(f"{d}/sd", clip, SMOKE_SD_RECIPE, progress=False)
    ...     UNet2DConditionModel.from_pretrained(sd / "unet").config.sample_size
    32
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..fileio import atomic_dir, atomic_file, atomic_write_text
from ..kernels import resolve_precision, use_matmul_attention_if_small
from ..train.schedules import warmup_decay
from . import world
from .world import EVAL_SEED, Scene

logger = logging.getLogger(__name__)


SD_SIZE = 32
"""micro-SD's resolution. It diffuses in PIXEL space (no VAE): at 32 px a U-Net step costs
about what a 64 px latent (f=4) one costs plus the VAE encode, and a micro-VAE good enough
to keep patterns took longer to train than the whole U-Net (docs/micro-world.md)."""


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
    (32 heads of 4 channels train 15-20% slower per step on 2 cores, and draw no better)."""


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




@dataclass(frozen=True)
class SDRun:
    """One micro-SD training run: its length, learning rate (linear warm-up, then a cosine decay
    to 0.1 x ``lr``) and seed."""

    steps: int
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"micro-SD run {self}: steps must be >= 1, lr > 0 and warmup >= 0")


@dataclass(frozen=True)
class MicroSDRecipe:
    """How micro-SD is trained; the defaults are the shipped micro-SD's recipe."""

    runs: tuple[SDRun, ...] = (SDRun(1000), SDRun(1000, 5e-4, 50, 1), SDRun(1500, 5e-4, 50, 1),
                               SDRun(1500, 5e-4, 50, 1), SDRun(1500, 5e-4, 50, 1))
    """The first run trains a fresh U-Net; each later one continues the previous run's (its EMA
    weights) with a fresh optimizer and EMA. Restarting the schedule this way reached a better
    U-Net than one long run of the same total length."""
    batch_size: int = 32
    resolution: int = SD_SIZE
    caption_dropout: float = 0.1
    """Share of captions replaced by ``""``: the unconditional prompt of classifier-free guidance."""
    prediction_type: str = "v_prediction"
    object_weight: float = 5.0
    """Pixels of objects weigh this many times background pixels in the loss (the renderer's exact
    masks). The caption fixes the image, so the optimum is unchanged, but objects, a few percent
    of the pixels, are learned several times sooner."""
    ema_decay: float = 0.995
    """An EMA of the U-Net is what each run saves."""
    sizes: MicroUNetSizes = field(default_factory=MicroUNetSizes)
    """The U-Net built by the first run (later runs keep the saved one's)."""
    checkpoint_every: int = 250
    """Steps between resumable training states (0: never)."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("MicroSDRecipe.runs is empty; give at least one SDRun")
        if self.batch_size < 1:
            raise ValueError(f"micro-SD batch_size={self.batch_size} must be >= 1")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={self.prediction_type!r} is unknown; use 'epsilon' or 'v_prediction'")
        levels = len(self.sizes.block_out_channels)
        if self.resolution < 16 or self.resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution={self.resolution} must be >= 16 and divisible by {2 ** (levels - 1)} "
                             f"(the U-Net halves it {levels - 1} times); e.g. 32 or 64")


SMOKE_SD_RECIPE = MicroSDRecipe(runs=(SDRun(3, warmup=1), SDRun(2, 5e-4, 1, 1)), batch_size=4, sizes=SMOKE_UNET)
"""A tiny micro-SD for tests: a first run and one continuation, a few steps of batch 4."""


def run_folders(sd_dir: str | os.PathLike, recipe: MicroSDRecipe) -> list[Path]:
    """Where each run of ``recipe`` is saved: ``<sd_dir>-phase1``, ``<sd_dir>-phase2``, ... and,
    for the last run, ``sd_dir`` itself."""
    sd_dir = Path(sd_dir)
    return [sd_dir.with_name(f"{sd_dir.name}-phase{i}") for i in range(1, len(recipe.runs))] + [sd_dir]


def train_micro_sd(sd_dir: str | os.PathLike, clip_dir: str | os.PathLike,
                   recipe: MicroSDRecipe = MicroSDRecipe(), *, precision: str = "fp32", progress: bool = True,
                   step_callback: Callable[[int], None] | None = None) -> Path:
    """Every run of ``recipe`` (see :func:`run_folders`), each skipped when its folder exists and
    resumed from its last training state when interrupted, so a killed job continues where it
    stopped. Returns ``sd_dir``.

    ``precision="bf16"`` runs the U-Net's forward pass under bfloat16 autocast (weights, EMA,
    optimizer and loss stay float32); on CPUs with native bfloat16 (AVX512-BF16, AMX) a step
    takes about half the time of ``"fp32"`` (``benchmarks/micro_train.py``), elsewhere longer.
    ``"auto"`` picks bf16 on such CPUs (:func:`kosmos_g.kernels.resolve_precision`).
    ``step_callback(step)``, if given, is called before each step (``train-all`` uses it to
    give the job more threads once the jobs beside it are done).
    """
    clip_dir = Path(clip_dir)
    for p in (clip_dir / "text_encoder", clip_dir / "tokenizer"):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} not found; train micro-CLIP first (kosmos_g.micro.clip.train_micro_clip)")
    folders = run_folders(sd_dir, recipe)
    for i, (run, folder) in enumerate(zip(recipe.runs, folders)):
        if not folder.exists():
            _train_run(folder, clip_dir, recipe, run, resume_unet=folders[i - 1] / "unet" if i else None,
                       precision=resolve_precision(precision), progress=progress, step_callback=step_callback)
    return folders[-1]


class _Text:
    """The frozen micro-CLIP text encoder and its tokenizer (micro-SD's conditions)."""

    def __init__(self, clip_dir: Path) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
        self.encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder").eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        return encode_captions(self.encoder, self.tokenizer, captions)  # (B, L, D)


def _train_run(out_dir: Path, clip_dir: Path, recipe: MicroSDRecipe, run: SDRun, *, resume_unet: Path | None,
               precision: str, progress: bool, step_callback: Callable[[int], None] | None) -> None:
    """One run into ``out_dir`` (atomically). Deterministic for a seed on a fixed thread count."""
    from diffusers import DDPMScheduler

    text = _Text(clip_dir)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=recipe.prediction_type)
    torch.manual_seed(run.seed)
    rng = np.random.default_rng(run.seed)
    unet = _unet_for(recipe, resume_unet, cross_attention_dim=text.encoder.config.hidden_size)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=run.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(run.warmup, run.steps, "cosine", floor=0.1))
    settings = {**_recipe_record(recipe, run), "resumed_from": None if resume_unet is None else str(resume_unet),
                "sizes": asdict(unet_sizes(unet)), "precision": precision,
                "parameters": sum(p.numel() for p in unet.parameters())}
    state = _TrainingState(out_dir.parent / f".{out_dir.name}.partial.pt", settings)
    start, elapsed, log = state.restore(unet=unet, ema=ema, opt=opt, sched=sched, rng=rng)
    bar = tqdm(range(start, run.steps), initial=start, total=run.steps, desc="micro-SD", disable=not progress)
    t0 = time.time() - elapsed
    for step in bar:
        if step_callback is not None:
            step_callback(step)
        loss = _step_loss(unet, text, noise_sched, recipe, rng, precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _update_ema(ema, unet, min(recipe.ema_decay, (1 + step) / (10 + step)))  # a short EMA warm-up
        if step % 50 == 0 or step == run.steps - 1:
            log.append({"step": step, "loss": loss.item(), "time_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if recipe.checkpoint_every and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < run.steps:
            state.save(step + 1, time.time() - t0, log, unet=unet, ema=ema, opt=opt, sched=sched, rng=rng)
    unet.load_state_dict(ema)
    unet.eval()
    with atomic_dir(out_dir) as tmp:
        save_micro_sd(tmp, unet=unet, text_encoder=text.encoder, tokenizer=text.tokenizer,
                      scheduler=micro_scheduler(recipe.prediction_type))
        settings["threads"] = torch.get_num_threads()  # results are exact for a seed and thread count
        atomic_write_text(tmp / "train_log.json", json.dumps({"recipe": settings, "log": log}, indent=1))
    state.remove()


def _recipe_record(recipe: MicroSDRecipe, run: SDRun) -> dict[str, Any]:
    """What a run's ``train_log.json`` (and its resumable state) records of its recipe."""
    shared = {k: v for k, v in asdict(recipe).items() if k not in ("runs", "sizes", "checkpoint_every")}
    return {**asdict(run), **shared}


def _unet_for(recipe: MicroSDRecipe, resume_unet: Path | None, *, cross_attention_dim: int):
    """A fresh micro U-Net, or the one a previous run saved (in training mode, matmul attention)."""
    from diffusers import UNet2DConditionModel

    if resume_unet is not None:
        unet = UNet2DConditionModel.from_pretrained(resume_unet)
        if unet.config.sample_size != recipe.resolution:
            raise ValueError(f"{resume_unet} was trained at {unet.config.sample_size} px, not "
                             f"resolution={recipe.resolution}")
    else:
        unet = micro_unet(recipe.sizes, cross_attention_dim=cross_attention_dim, sample_size=recipe.resolution)
    unet.train()
    use_matmul_attention_if_small(unet)
    logger.info("micro-SD: training %d U-Net parameters; text encoder frozen", sum(p.numel() for p in unet.parameters()))
    return unet


def _step_loss(unet, text: _Text, noise_sched, recipe: MicroSDRecipe, rng: np.random.Generator,
               precision: str) -> torch.Tensor:
    """The object-weighted denoising loss on one fresh batch of the world's scenes."""
    scenes, images, masks = _scenes_and_images(rng, recipe.batch_size, recipe.resolution)
    weight = 1.0 + (recipe.object_weight - 1.0) * torch.from_numpy(masks).float()[:, None]  # (B, 1, S, S)
    weight = weight / weight.mean(dim=(1, 2, 3), keepdim=True)
    captions = ["" if rng.random() < recipe.caption_dropout else s.caption(rng) for s in scenes]
    cond = text(captions)  # (B, L, D)
    x0 = images_to_sd_pixels(images)  # (B, 3, S, S)
    noise = torch.randn_like(x0)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (recipe.batch_size,))
    noisy = noise_sched.add_noise(x0, noise, t)
    target = noise if recipe.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred = unet(noisy, t, cond).sample
    per_sample = (F.mse_loss(pred.float(), target, reduction="none") * weight).mean(dim=(1, 2, 3))  # (B,)
    return per_sample.mean()


@torch.no_grad()
def _update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for k, v in model.state_dict().items():
        ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)


class _TrainingState:
    """A run's whole training state (weights, EMA, optimizer, schedule, both random generators),
    written atomically beside its output folder, so an interrupted run resumes to the same
    weights as an uninterrupted one (on the same thread count)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings

    def save(self, step: int, elapsed: float, log: list[dict[str, float]], *, unet, ema, opt, sched,
             rng: np.random.Generator) -> None:
        with atomic_file(self.path) as tmp:
            torch.save({"recipe": self.settings, "step": step, "elapsed": elapsed, "log": log,
                        "unet": unet.state_dict(), "ema": ema, "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}, tmp)

    def restore(self, *, unet, ema, opt, sched, rng: np.random.Generator) -> tuple[int, float, list[dict[str, float]]]:
        """Load a saved state into the fresh objects: ``(step, elapsed seconds, log)``, or
        ``(0, 0.0, [])`` when there is none. A state from another recipe is refused, not mixed in."""
        if not self.path.is_file():
            return 0, 0.0, []
        state = torch.load(self.path, weights_only=True)
        if state["recipe"] != self.settings:
            diff = sorted(k for k in self.settings.keys() | state["recipe"].keys()
                          if self.settings.get(k) != state["recipe"].get(k))
            raise ValueError(f"{self.path} holds a partial micro-SD run with another recipe (differing: {diff}); "
                             "resume it with the recipe it was started with, or delete it to start over.")
        unet.load_state_dict(state["unet"])
        for k, v in state["ema"].items():
            ema[k].copy_(v)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        logger.info("micro-SD: resuming %s at step %d", self.path, state["step"])
        return state["step"], state["elapsed"], state["log"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def save_micro_sd(path: str | os.PathLike, *, unet, text_encoder, tokenizer, scheduler) -> Path:
    """Write the SD1.5 folder layout without ``vae/`` (``model_index.json`` says ``vae: null``)."""
    path = Path(path)
    unet.save_pretrained(path / "unet")
    config = json.loads((path / "unet" / "config.json").read_text())
    if config.pop("_name_or_path", None) is not None:  # where it was loaded from: a local path, not for shipping
        atomic_write_text(path / "unet" / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
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
    atomic_write_text(path / "model_index.json", json.dumps(index, indent=2))
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
                                "(kosmos_g.micro.sd.train_micro_sd)?")
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet", torch_dtype=torch.float32).eval()
    use_matmul_attention_if_small(unet)
    return MicroSD(
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(sd_dir / "scheduler"),
        # the shipped weights are fp16: without a dtype, transformers keeps the stored one
        text_encoder=CLIPTextModel.from_pretrained(sd_dir / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(sd_dir / "tokenizer"),
    )




def micro_sd_pipeline(sd: MicroSD | str | os.PathLike):
    """diffusers' ``StableDiffusionPipeline`` on a micro-SD folder (or loaded :class:`MicroSD`):
    no VAE, so its "latents" are the 32x32 images in [-1, 1] (ask for ``output_type="latent"``)."""
    from diffusers import StableDiffusionPipeline

    sd = load_micro_sd(sd) if isinstance(sd, (str, os.PathLike)) else sd
    pipe = StableDiffusionPipeline(vae=None, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_micro_sd(sd: Any, captions: list[str], *, num_inference_steps: int = 20,
                      guidance_scale: float = 4.0, seeds: Sequence[int] | int = 0) -> np.ndarray:
    """Text-to-image with micro-SD through diffusers' SD pipeline: ``(B, S, S, 3)`` uint8, one image
    per caption. ``sd``: a folder, a :class:`MicroSD` or a :func:`micro_sd_pipeline`. ``seeds``: one
    per caption (each image's noise from its own generator), or one int for the whole batch.

    Example:
        >>> generate_micro_sd("micro/sd", ["a large red solid star in the center, "  # doctest: +SKIP
        ...                                "on a gray background"]).shape
        (1, 32, 32, 3)
    """
    pipe = sd if hasattr(sd, "unet") and hasattr(sd, "vae_scale_factor") else micro_sd_pipeline(sd)
    captions = list(captions)
    if isinstance(seeds, int):
        generator: Any = torch.Generator().manual_seed(seeds)
    else:
        if len(seeds) != len(captions):
            raise ValueError(f"{len(seeds)} seeds for {len(captions)} captions; give one seed per caption")
        generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
    samples = pipe(captions, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=generator, output_type="latent").images  # (B, 3, S, S) in [-1, 1]
    return sd_pixels_to_images(samples)


def _mean_match(scenes: Sequence[Scene], images: np.ndarray, reader: Any = None) -> dict[str, float]:
    """Mean :func:`.reader.match_scene` of ``images`` read back (by ``reader``: a folder, a loaded
    :class:`.reader.AttributeReader`, or None for the shipped one) against ``scenes``, plus ``exact``."""
    from .reader import as_reader, match_scene, read_scenes

    rows = []
    for scene, seen in zip(scenes, read_scenes(as_reader(reader), images)):
        row = match_scene(scene, seen)
        row["exact"] = float(set(seen.objects) == set(scene.objects) and seen.background == scene.background)
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def evaluate_micro_sd(sd: MicroSD | str | os.PathLike, *, n: int = 48, n_objects: int | None = 1,
                      num_inference_steps: int = 20, guidance_scale: float = 4.0, seed: int = EVAL_SEED,
                      batch_size: int = 16, reader: Any = None) -> dict[str, float]:
    """Caption-following of micro-SD: one image for each of ``n`` fresh captions (scenes of
    ``n_objects`` objects; None: 1-3), read back with the attribute reader (``reader``: a
    folder or a loaded one; default: the shipped :mod:`.reader`), averaged
    :func:`.reader.match_scene` (``subject``: shape, colour and pattern all right; ``exact``: the
    whole scene). ``s_per_image``: wall seconds per image at the current thread count.

    Example:
        >>> evaluate_micro_sd("micro/sd", n=16)["subject"]  # doctest: +SKIP
        0.875
    """
    pipe = micro_sd_pipeline(sd)
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, n_objects) for _ in range(n)]
    captions = [s.caption(rng) for s in scenes]
    t0 = time.time()
    images = np.concatenate([
        generate_micro_sd(pipe, captions[i:i + batch_size], num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, seeds=range(seed + i, seed + i + len(captions[i:i + batch_size])))
        for i in range(0, n, batch_size)])
    seconds = (time.time() - t0) / n
    result = _mean_match(scenes, images, reader)
    result["s_per_image"] = seconds
    return result
