"""Kosmos-G as the text encoder of any Stable-Diffusion-1.5 diffusers pipeline.

The paper's key property: Kosmos-G's (B, 77, 768) condition replaces CLIP's text
embedding and the U-Net, VAE, ControlNets and LoRAs stay untouched. So this module
computes the condition and hands it to diffusers' own pipelines as ``prompt_embeds`` /
``negative_prompt_embeds``; the denoising loop is diffusers' code, not ours.

Why :class:`KosmosGPipeline` *owns* diffusers pipelines instead of subclassing
``DiffusionPipeline``: diffusers' ``save_pretrained`` / ``from_pretrained`` /
``components`` machinery resolves every registered module to a diffusers or
transformers class (``model_index.json`` holds ``[library, class]`` pairs), which our
``KosmosG`` and processor are not; the four SD tasks (text-to-image, img2img,
inpainting, each with or without ControlNet) are six different diffusers classes; and
owning them gives bit-exact parity with diffusers, its schedulers, LoRA loader, CPU
offload, progress bars and step callbacks for free. The six pipelines are built lazily
and share the same U-Net, VAE, ControlNet and scheduler objects.

Two diffusers 0.42 behaviours shape the code below:

* With ``text_encoder=None`` its ``encode_prompt`` crashes on a LoRA scale
  (``cross_attention_kwargs={"scale": s}`` calls ``scale_lora_layers(None, s)``), and
  ``load_lora_weights`` crashes on a LoRA file holding text-encoder keys. So the LoRA
  scale is applied here (:func:`_scaled_lora`) and LoRA files are loaded into the U-Net
  only (their CLIP text-encoder part has nothing to act on: Kosmos-G replaced CLIP).
* ``guidance_scale <= 1`` (or a U-Net with ``time_cond_proj_dim``) disables
  classifier-free guidance: no negative condition is computed and the U-Net batch is
  not doubled.

Prompt images are ``prompt_images=`` (``negative_prompt_images=`` for the negative
prompt), apart from diffusers' ``image=`` / ``mask_image=``, the picture that img2img and
inpainting start from. Steps, guidance and scheduler default to the Kosmos-G folder's
``generation_config.json`` (:class:`~kosmos_g.generation_config.GenerationConfig`).

Example:
    >>> from kosmos_g import KosmosGPipeline
    >>> pipe = KosmosGPipeline.from_pretrained("ckpt/kosmos-g", "ckpt/sd-v1-5",
    ...                                        dtype="fp16", device="cuda")  # doctest: +SKIP
    >>> image = pipe("<i> wearing <i>", prompt_images=["dog.png", "hat.png"],
    ...              generator=torch.Generator("cuda").manual_seed(0)).images[0]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .generation_config import GenerationConfig
from .kernels import use_matmul_attention_if_small
from .models import KosmosG, resolve_dtype
from .processing import ImageLike, KosmosGProcessor, ProcessedPrompt, Prompt, is_single_prompt, load_image
from .schedulers import SCHEDULERS, scheduler_name

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- schedulers

# From SD1.5's scheduler_config.json.
_SD15_SCHEDULER_OPTIONS = {"skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False,
                           "steps_offset": 1}


def make_scheduler(scheduler: str | Any, config: dict[str, Any]):
    """A diffusers scheduler from a name (built ``from_config(config)``) or an instance.

    ``config`` is the SD folder's ``scheduler_config.json``: the noise schedule (betas,
    offsets, prediction type) comes from the model, the sampling algorithm from the name.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> make_scheduler("ddim", DDIMScheduler().config).__class__.__name__
        'DDIMScheduler'
    """
    if not isinstance(scheduler, str):
        if not hasattr(scheduler, "set_timesteps"):
            raise ValueError(f"scheduler must be a name or a diffusers scheduler, got {type(scheduler).__name__}.")
        return scheduler
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[scheduler_name(scheduler)])
    accepted = inspect.signature(cls.__init__).parameters
    # Options the folder's config does not set (it was written for another scheduler
    # class) take SD1.5's values, not the class defaults: e.g. PNDM's PRK warm-up steps
    # break below 4 steps and SD1.5 skips them; DDIM must not clip or set alpha to one.
    extra = {k: v for k, v in _SD15_SCHEDULER_OPTIONS.items() if k in accepted and k not in config}
    return cls.from_config({**config, **extra})


# ----------------------------------------------------------------------------- prompts

PromptImages = Sequence[ImageLike] | Sequence[Sequence[ImageLike]]
"""One prompt's images (filling its ``<i>`` in order), or for a batch one list per prompt."""

_RENAMED = {"images": "prompt_images", "negative_images": "negative_prompt_images"}


def _refuses_old_image_names(fn: Callable) -> Callable:
    """Refuse ``images=`` / ``negative_images=`` with their names: ``images=`` next to diffusers'
    ``image=`` (the img2img picture) was easy to mix up, and ``__call__`` would otherwise hand it
    on to diffusers through ``**kwargs``."""
    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for old, new in _RENAMED.items():
            if old in kwargs:
                raise TypeError(f"{fn.__qualname__}() got `{old}=`; pass the prompt's images as `{new}=` "
                                "(`image=` is the picture img2img and inpainting start from).")
        return fn(*args, **kwargs)
    return checked


def as_batch(prompt: Prompt | Sequence[Prompt], prompt_images: Any = None, *, name: str = "prompt",
             batch_size: int | None = None) -> list[tuple[Prompt | None, list[ImageLike] | None]]:
    """Normalise one prompt or a batch to ``[(prompt, images), ...]``.

    ``"<i> wearing <i>"`` + ``prompt_images=["dog.png", "hat.png"]`` and ``["A photo of",
    Path("dog.png")]`` are one prompt each: a list is one prompt when it holds an image (a PIL
    image, numpy array or ``pathlib.Path``; every ``str`` in it is text), see
    :func:`~kosmos_g.processing.is_single_prompt`. ``["<i> on grass", "a cat"]`` +
    ``prompt_images=[["dog.png"], []]`` is a batch, as is any list of only ``str`` and lists.
    With ``batch_size``, a single prompt is repeated to that size (negative prompts).

    Example:
        >>> as_batch(["<i> on grass", "a cat"], [["dog.png"], []])
        [('<i> on grass', ['dog.png']), ('a cat', [])]
    """
    if prompt is None:
        if prompt_images:
            raise ValueError(f"{name}_images given without a {name}.")
        return [(None, None)] * (batch_size or 1)
    if is_single_prompt(prompt):
        if prompt_images is not None and not isinstance(prompt_images, (list, tuple)):
            prompt_images = [prompt_images]  # one image for a one-placeholder prompt
        pairs = [(prompt, list(prompt_images) if prompt_images is not None else None)]
        return pairs * batch_size if batch_size else pairs
    prompts = list(prompt)
    if not prompts:
        raise ValueError(f"Empty batch: `{name}` is an empty list.")
    if prompt_images is None:
        per_prompt: list[Any] = [None] * len(prompts)
    else:
        per_prompt = list(prompt_images)
        if len(per_prompt) != len(prompts) or any(not isinstance(im, (list, tuple)) for im in per_prompt):
            raise ValueError(
                f"For a batch of {len(prompts)} prompts, pass `{name}_images` "
                "as one list of images per prompt (an empty list for a text-only prompt)."
            )
        per_prompt = [list(im) for im in per_prompt]
    pairs = list(zip(prompts, per_prompt))
    if batch_size is not None and len(pairs) != batch_size:
        raise ValueError(f"Got {len(pairs)} {name}s for {batch_size} prompts; give one per prompt or a single one.")
    return pairs


def _encode_items(model: KosmosG, processor: KosmosGProcessor,
                  items: Sequence[ProcessedPrompt]) -> torch.Tensor:
    """One batched encoder pass over processed prompts: (N, 77, D)."""
    batch = processor.collate(items)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        return model.encode(**batch)


def _encode_prompts(model: KosmosG, processor: KosmosGProcessor, pairs: list, negative_pairs: list | None,
                    null: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Prompts and (deduplicated) negatives in one encoder pass.

    Returns (B, 77, D) conditions, (B, 77, D) negatives or None, and the null condition
    (77, D) if one was used. A given ``null`` is reused instead of encoding `<s>` again:
    padded to the prompts' length in the batch, it would cost as much as a prompt.
    """
    items = [processor.encode_prompt(p, im) for p, im in pairs]
    null_key = tuple(processor.negative(None).input_ids)
    rows: list[int] = []  # per prompt: index into `uniques`, or -1 for the given null
    uniques: list[ProcessedPrompt] = []
    seen: dict[tuple[int, ...], int] = {}
    for p, im in negative_pairs or []:
        neg = processor.negative(p, im)
        key = tuple(neg.input_ids) if not neg.pixel_values else None
        if key == null_key and null is not None:
            rows.append(-1)
        elif key is not None and key in seen:  # the usual case: one null condition for all
            rows.append(seen[key])
        else:
            if key is not None:
                seen[key] = len(uniques)
            rows.append(len(uniques))
            uniques.append(neg)
    if items or uniques:
        cond = _encode_items(model, processor, items + uniques)  # (B + U, 77, D)
    else:  # only the given null was needed
        cond = null.new_zeros((0, *null.shape))
    B = len(items)
    if null is None and null_key in seen:
        null = cond[B + seen[null_key]]
    negative = None
    if negative_pairs is not None:
        negative = torch.stack([null.to(cond) if r < 0 else cond[B + r] for r in rows])
    return cond[:B], negative, null


@_refuses_old_image_names
def kosmos_g_prompt_embeds(
    model: KosmosG,
    processor: KosmosGProcessor,
    prompt: Prompt | Sequence[Prompt],
    prompt_images: PromptImages | None = None,
    negative_prompt: Prompt | Sequence[Prompt] | None = None,
    negative_prompt_images: PromptImages | None = None,
    *,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prompt_embeds`` and ``negative_prompt_embeds`` for any diffusers SD1.5 pipeline.

    Prompts and negative prompts go through the encoder in ONE batched pass. The
    negative condition is the official one: ``<s>`` + the negative text, or ``<s>``
    alone (the null condition) when there is none. Outputs are (B * n, 77, D), repeated
    per image like diffusers does, on ``device`` in ``dtype`` (give the U-Net's).

    Example:
        >>> from diffusers import StableDiffusionControlNetPipeline  # doctest: +SKIP
        >>> pe, npe = kosmos_g_prompt_embeds(model, processor, "<i> on the beach", prompt_images=["dog.png"],
        ...                                  device=sd.device, dtype=sd.unet.dtype)  # doctest: +SKIP
        >>> sd(prompt_embeds=pe, negative_prompt_embeds=npe, image=canny).images  # doctest: +SKIP
    """
    pairs = as_batch(prompt, prompt_images)
    negative_pairs = as_batch(negative_prompt, negative_prompt_images, name="negative_prompt",
                              batch_size=len(pairs)) if do_classifier_free_guidance else None
    pe, npe, _ = _encode_prompts(model, processor, pairs, negative_pairs)
    return _expand(pe, num_images_per_prompt, device, dtype), _expand(npe, num_images_per_prompt, device, dtype)


def _expand(t: torch.Tensor | None, n: int, device: Any, dtype: Any) -> torch.Tensor | None:
    """(B, 77, D) -> (B * n, 77, D), prompt-major like diffusers, on device/dtype."""
    if n < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {n}.")
    if t is None:
        return None
    return t.repeat_interleave(n, dim=0).to(device=device or t.device, dtype=dtype or t.dtype)


def _state_key(model: torch.nn.Module) -> tuple | None:
    """Changes whenever a parameter is replaced, modified in place, moved or cast
    (None when that cannot be told: inference-mode tensors have no version counter)."""
    try:
        return tuple((id(p), p._version, p.device, p.dtype) for p in model.parameters())
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- LoRA

@contextlib.contextmanager
def _scaled_lora(unet: torch.nn.Module, scale: float | None) -> Iterator[None]:
    """Multiply every LoRA layer's scaling by ``scale`` for the duration, then restore it
    exactly (diffusers' own scale/unscale divides back, which can drift by an ulp)."""
    if scale is None or scale == 1.0 or not getattr(unet, "peft_config", None):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            m.scale_layer(scale)
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling.clear()
            m.scaling.update(s)


def _split_lora_scale(lora_scale: float | None, cross_attention_kwargs: dict[str, Any] | None,
                      ) -> tuple[float | None, dict[str, Any]]:
    """Take diffusers' spelling of the LoRA scale, ``cross_attention_kwargs["scale"]``, out of the
    U-Net's kwargs: :func:`_scaled_lora` applies it (diffusers would crash without a text encoder)."""
    cross_attention_kwargs = dict(cross_attention_kwargs or {})
    if "scale" in cross_attention_kwargs:
        if lora_scale is not None:
            raise ValueError("Give the LoRA scale once: `lora_scale` or cross_attention_kwargs['scale'].")
        lora_scale = cross_attention_kwargs.pop("scale")
    return lora_scale, cross_attention_kwargs


def _unet_only_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    keep = {k: v for k, v in state_dict.items() if not k.startswith("text_encoder")}
    return keep, len(state_dict) - len(keep)


# ----------------------------------------------------------------------------- pipeline

_TASKS = ("text2img", "img2img", "inpaint")
_DIFFUSERS_CLASSES = {
    ("text2img", False): "StableDiffusionPipeline",
    ("img2img", False): "StableDiffusionImg2ImgPipeline",
    ("inpaint", False): "StableDiffusionInpaintPipeline",
    ("text2img", True): "StableDiffusionControlNetPipeline",
    ("img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    ("inpaint", True): "StableDiffusionControlNetInpaintPipeline",
}


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} is not a folder: {path} ({hint})")


def _pixel_space(sd_dir: Path) -> bool:
    """Whether an SD folder holds a pixel-space U-Net: no ``vae/``, 3 channels in and out."""
    return not (sd_dir / "vae").exists() and _rgb_unet(sd_dir / "unet" / "config.json")


def check_pretrained_folders(kosmos_dir: str | os.PathLike, sd_dir: str | os.PathLike,
                             controlnet: Sequence[str | os.PathLike] | None = None) -> None:
    """Refuse a missing folder, a file given for a folder, and an SD or ControlNet folder without
    its parts, reading nothing but the U-Net's config: what :meth:`KosmosGPipeline.from_pretrained`
    checks before it loads any weights, for callers (the CLI) that want to fail before their own
    work too. Raises ``FileNotFoundError`` / ``NotADirectoryError`` naming the path.

    Example:
        >>> check_pretrained_folders("ckpt/kosmos-g", "ckpt/sd-v1-5")  # doctest: +SKIP
    """
    kosmos_dir, sd_dir = Path(kosmos_dir), Path(sd_dir)
    _require_dir(kosmos_dir, "Kosmos-G folder", "pass the folder holding config.json and model.safetensors")
    _require_dir(sd_dir, "SD folder", "pass a diffusers Stable Diffusion 1.5 folder")
    pixel_space = _pixel_space(sd_dir)
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if sub == "vae" and pixel_space:
            continue
        if not (sd_dir / sub).is_dir():
            raise FileNotFoundError(
                f"SD folder {sd_dir} has no {sub}/; pass a diffusers Stable Diffusion 1.5 folder "
                "(unet/, vae/, scheduler/; text_encoder/ is not needed)."
            )
        if not (sd_dir / sub / name).is_file():
            raise FileNotFoundError(f"SD folder {sd_dir} has {sub}/ but no {sub}/{name}.")
    for net in controlnet or []:
        _require_dir(Path(net), "ControlNet folder", "pass a diffusers ControlNet folder")
        if not (Path(net) / "config.json").is_file():
            raise FileNotFoundError(f"ControlNet folder {net} has no config.json.")


def _load_diffusers(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)``, its ``OSError`` on missing or damaged weights made a
    ``ValueError`` that names the folder (diffusers' own message is kept, on one line)."""
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        detail = " ".join(str(e).split())
        raise ValueError(f"{what} {folder} could not be loaded; are its weights damaged or incomplete? "
                         f"({detail})") from e


def _rgb_unet(config_path: Path) -> bool:
    """Whether a U-Net config describes a pixel-space model (3 channels in and out)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("in_channels") == 3 and config.get("out_channels") == 3


class KosmosGPipeline:
    """Interleaved text+image prompts -> images, through diffusers' SD1.5 pipelines.

    Build with :meth:`from_pretrained` (a Kosmos-G folder + an SD1.5 diffusers folder;
    the SD folder's CLIP text encoder is never loaded) or from objects.

    A pixel-space U-Net (3 channels in and out, no ``vae/``: the micro world's micro-SD)
    is supported for text-to-image: its samples are the images, in [-1, 1], and
    ``height``/``width`` are pixels.

    ``generation_config`` holds the sampling defaults of a call (steps, guidance) and the
    scheduler :meth:`from_pretrained` builds when given none; ``from_pretrained`` reads it
    from the Kosmos-G folder's ``generation_config.json``.

    Example:
        >>> pipe = KosmosGPipeline.from_pretrained("ckpt/kosmos-g", "ckpt/sd-v1-5")  # doctest: +SKIP
        >>> pipe(["A photo of", Path("dog.png"), "on the beach"], num_inference_steps=25).images  # doctest: +SKIP
    """

    def __init__(self, kosmos_g: KosmosG, processor: KosmosGProcessor, unet: torch.nn.Module,
                 vae: torch.nn.Module, scheduler: Any, controlnet: Any = None, *,
                 generation_config: GenerationConfig | None = None) -> None:
        D, C = kosmos_g.config.aligner.output_dim, unet.config.cross_attention_dim
        if D != C:
            raise ValueError(
                f"Kosmos-G's condition is {D}-wide but the U-Net's cross_attention_dim is {C}; "
                "use an SD1.x U-Net (768) with the official model, or a Kosmos-G aligned to this U-Net."
            )
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise ValueError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}.")
        self.generation_config = generation_config or GenerationConfig()
        self.kosmos_g = kosmos_g.eval()
        self.processor = processor
        self.unet = unet
        self.vae = vae
        if isinstance(controlnet, (list, tuple)):
            if not controlnet:
                controlnet = None
            elif len(controlnet) == 1:
                controlnet = controlnet[0]
            else:
                from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

                controlnet = MultiControlNetModel(list(controlnet))
        self.controlnet = controlnet
        if isinstance(scheduler, str):
            raise ValueError("Pass a scheduler instance here; names are for from_pretrained() and "
                             "the `scheduler` setter, which know the SD noise schedule.")
        self._scheduler = make_scheduler(scheduler, {})
        # Names given later are built from the model's own schedule, whatever came between.
        self._scheduler_config = dict(scheduler.config)
        self._pipes: dict[tuple[str, bool], Any] = {}
        self._progress_bar_config: dict[str, Any] = {}
        self._offload: dict[str, Any] | None = None
        self._offload_owner: Any = None
        self._loras: dict[str, float] = {}  # adapter name -> weight, in load order
        self._null: tuple[tuple | None, torch.Tensor | None] = (None, None)  # (model state, null condition)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, kosmos_dir: str | os.PathLike, sd_dir: str | os.PathLike, *,
                        controlnet: str | os.PathLike | Sequence[str | os.PathLike] | Any = None,
                        scheduler: str | Any | None = None,
                        dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> "KosmosGPipeline":
        """Load a Kosmos-G folder and the U-Net, VAE and scheduler config of an SD folder.

        ``controlnet`` is a diffusers ControlNet folder, a list of them (used together),
        or already-built ``ControlNetModel`` objects. ``scheduler`` is a name from
        :data:`SCHEDULERS` (built from the SD folder's scheduler config) or an instance;
        None takes the one in the Kosmos-G folder's ``generation_config.json``, which also
        becomes :attr:`generation_config` (the defaults when the folder has none).

        Example:
            >>> pipe = KosmosGPipeline.from_pretrained(
            ...     "ckpt/kosmos-g", "ckpt/sd-v1-5", controlnet="ckpt/control_v11p_sd15_canny",
            ...     scheduler="unipc", dtype="fp16", device="cuda")  # doctest: +SKIP
        """
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

        kosmos_dir, sd_dir = Path(kosmos_dir), Path(sd_dir)
        nets = [controlnet] if controlnet is not None and not isinstance(controlnet, (list, tuple)) else controlnet
        check_pretrained_folders(kosmos_dir, sd_dir, [n for n in nets or [] if isinstance(n, (str, os.PathLike))])
        pixel_space = _pixel_space(sd_dir)
        generation_config = GenerationConfig.from_pretrained(kosmos_dir)
        dtype = resolve_dtype(dtype)
        kosmos_g = KosmosG.from_pretrained(kosmos_dir, dtype=dtype, device=device)
        processor = KosmosGProcessor.from_pretrained(kosmos_dir)
        load = {"torch_dtype": dtype} if dtype is not None else {}
        unet = _load_diffusers(UNet2DConditionModel, sd_dir / "unet", "U-Net", **load)
        use_matmul_attention_if_small(unet)  # the micro world's 8x8 maps; SD1.5 keeps the fused kernel
        vae = None if pixel_space else _load_diffusers(AutoencoderKL, sd_dir / "vae", "VAE", **load)
        config = json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        sched = make_scheduler(generation_config.scheduler if scheduler is None else scheduler, config)
        if nets is not None:
            nets = [_load_diffusers(ControlNetModel, Path(net), "ControlNet", **load)
                    if isinstance(net, (str, os.PathLike)) else net for net in nets]
        pipe = cls(kosmos_g, processor, unet, vae, sched, controlnet=nets, generation_config=generation_config)
        if device is not None:
            pipe.to(device)
        return pipe

    # ------------------------------------------------------------------ devices, schedulers
    @property
    def device(self) -> torch.device:
        """Where the U-Net runs (its execution device under CPU offload)."""
        if self._offload_owner is not None:
            return self._offload_owner._execution_device
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | str | None = None) -> "KosmosGPipeline":
        """Move (and/or cast) every model: Kosmos-G, U-Net, VAE, ControlNet."""
        move = {k: v for k, v in (("device", device), ("dtype", resolve_dtype(dtype))) if v is not None}
        for m in (self.kosmos_g, self.unet, self.vae, self.controlnet):
            if m is not None and move:
                m.to(**move)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None,
                                 device: torch.device | str | None = None) -> None:
        """Keep models on the CPU and move each to the accelerator only while it runs
        (diffusers' model offload for U-Net/VAE/ControlNet; Kosmos-G the same way)."""
        self._offload = {"gpu_id": gpu_id, "device": device}
        self._offload_owner = None
        self.kosmos_g.to("cpu")
        self._activate(self.diffusers_pipeline("text2img", controlnet=False))

    @property
    def scheduler(self):
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self._scheduler = make_scheduler(scheduler, self._scheduler_config)
        for pipe in self._pipes.values():
            pipe.scheduler = self._scheduler

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the denoising progress bar (e.g. ``disable=True``)."""
        self._progress_bar_config.update(kwargs)
        for pipe in self._pipes.values():
            pipe.set_progress_bar_config(**self._progress_bar_config)

    def diffusers_pipeline(self, task: str = "text2img", controlnet: bool | None = None):
        """The diffusers pipeline doing ``task`` ("text2img", "img2img", "inpaint"), sharing
        this pipeline's models; ControlNet variant when ``controlnet`` (default: if one is loaded)."""
        import diffusers

        if task not in _TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {_TASKS}.")
        use_cn = self.controlnet is not None if controlnet is None else controlnet
        if use_cn and self.controlnet is None:
            raise ValueError("No ControlNet loaded; pass controlnet= to KosmosGPipeline.from_pretrained.")
        key = (task, bool(use_cn))
        if key not in self._pipes:
            cls = getattr(diffusers, _DIFFUSERS_CLASSES[key])
            parts = dict(vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet,
                         scheduler=self._scheduler, safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)
            if use_cn:
                parts["controlnet"] = self.controlnet
            pipe = cls(**parts)
            pipe.set_progress_bar_config(**self._progress_bar_config)
            self._pipes[key] = pipe
        return self._pipes[key]

    def _activate(self, pipe: Any) -> None:
        # Offload hooks live on the shared modules; the pipeline about to run re-installs them.
        if self._offload is not None and self._offload_owner is not pipe:
            pipe.enable_model_cpu_offload(**self._offload)
            self._offload_owner = pipe

    # ------------------------------------------------------------------ encoding
    def do_classifier_free_guidance(self, guidance_scale: float) -> bool:
        """Whether diffusers will run the unconditional branch (as its pipelines decide)."""
        return guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @_refuses_old_image_names
    def encode_prompt(self, prompt: Prompt | Sequence[Prompt],
                      prompt_images: PromptImages | None = None,
                      negative_prompt: Prompt | Sequence[Prompt] | None = None,
                      negative_prompt_images: PromptImages | None = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The condition of a prompt (batch), ready for the U-Net: ``(prompt_embeds,
        negative_prompt_embeds)``, each (B * num_images_per_prompt, 77, D) in the U-Net's
        dtype and device (negative is None without guidance). Cache and pass them back as
        ``prompt_embeds=`` / ``negative_prompt_embeds=`` to skip the encoder.

        Example:
            >>> pe, npe = pipe.encode_prompt("<i> wearing <i>", ["dog.png", "hat.png"])  # doctest: +SKIP
            >>> [pipe(prompt_embeds=pe, negative_prompt_embeds=npe, generator=g) for g in gens]  # doctest: +SKIP
        """
        device = self.device
        pairs = as_batch(prompt, prompt_images)
        negative_pairs = as_batch(negative_prompt, negative_prompt_images, name="negative_prompt",
                                  batch_size=len(pairs)) if do_classifier_free_guidance else None
        with self._kosmos_on(device):
            null = self._null_condition() if do_classifier_free_guidance else None
            pe, npe, _ = _encode_prompts(self.kosmos_g, self.processor, pairs, negative_pairs, null)
        return (_expand(pe, num_images_per_prompt, device, self.dtype),
                _expand(npe, num_images_per_prompt, device, self.dtype))

    def _null_condition(self) -> torch.Tensor:
        """The official null condition (`<s>` alone), (77, D), cached per model state.

        It is the same for every call with the same weights, so it is encoded once, on
        its own (one token), instead of padded to the prompts' length in every batch.
        Encoding it alone also keeps each prompt's batch the same from call to call, so
        a seed reproduces bit for bit.
        """
        key = _state_key(self.kosmos_g)
        if key is None or self._null[0] != key:
            null = _encode_items(self.kosmos_g, self.processor, [self.processor.negative(None)])[0]
            self._null = (key, null)
        return self._null[1]

    @contextlib.contextmanager
    def _kosmos_on(self, device: torch.device) -> Iterator[None]:
        if self._offload is None:
            yield
            return
        self.kosmos_g.to(device)
        try:
            yield
        finally:
            self.kosmos_g.to("cpu")

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path: str | os.PathLike | Sequence[str | os.PathLike],
                  scale: float | Sequence[float] = 1.0,
                  adapter_name: str | Sequence[str] | None = None) -> list[str]:
        """Load SD1.5 LoRA ``.safetensors`` file(s) into the U-Net (diffusers' loader: its
        own, kohya and other community key formats) and make all loaded LoRAs active
        with their ``scale``. A file's CLIP text-encoder weights are skipped (Kosmos-G
        replaces CLIP). Returns the adapter names (default: the file stems).

        Example:
            >>> pipe.load_lora(["style.safetensors", "detail.safetensors"], scale=[0.8, 0.5])  # doctest: +SKIP
            ['style', 'detail']
        """
        from diffusers import StableDiffusionPipeline

        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        scales = [scale] * len(paths) if isinstance(scale, (int, float)) else list(scale)
        names = ([adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
                 if adapter_name is not None else [None] * len(paths))
        if len(scales) != len(paths) or len(names) != len(paths):
            raise ValueError(f"Got {len(paths)} LoRA files but {len(scales)} scales / {len(names)} names.")
        loaded = []
        for p, s, name in zip(paths, scales, names):
            p = Path(p)
            if not p.is_file():
                raise FileNotFoundError(f"LoRA file not found: {p}")
            if p.suffix != ".safetensors":
                raise ValueError(f"LoRA {p} is not a .safetensors file; convert it (pickles can run code).")
            name = name or p.stem
            if name in self._loras:
                if name == p.stem and adapter_name is None:
                    i = 2
                    while f"{p.stem}-{i}" in self._loras:
                        i += 1
                    name = f"{p.stem}-{i}"
                else:
                    raise ValueError(f"A LoRA named {name!r} is already loaded; pick another adapter_name.")
            state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
                str(p.parent), weight_name=p.name, local_files_only=True, return_lora_metadata=True)
            state, dropped = _unet_only_lora(state)
            if dropped:
                logger.info("LoRA %s: skipped %d CLIP text-encoder tensors (Kosmos-G replaces CLIP).", p, dropped)
            if not any(k.startswith("unet") for k in state):
                raise ValueError(f"LoRA {p} has no U-Net weights that diffusers recognises as SD1.5.")
            with warnings.catch_warnings():  # several adapters are what we want here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                StableDiffusionPipeline.load_lora_into_unet(
                    state, network_alphas=alphas, unet=self.unet, adapter_name=name, metadata=metadata,
                    _pipeline=self._offload_owner)
            self._loras[name] = float(s)
            loaded.append(name)
        self.unet.set_adapters(list(self._loras), list(self._loras.values()))
        return loaded

    @property
    def loras(self) -> dict[str, float]:
        """Loaded LoRA adapters and their weights, in load order."""
        return dict(self._loras)

    def set_lora_scale(self, scales: dict[str, float]) -> None:
        """Change the weight of loaded LoRA adapters, e.g. ``{"style": 0.6}``."""
        unknown = set(scales) - set(self._loras)
        if unknown:
            raise ValueError(f"No LoRA named {sorted(unknown)}; loaded: {list(self._loras)}.")
        self._loras.update({k: float(v) for k, v in scales.items()})
        self.unet.set_adapters(list(self._loras), list(self._loras.values()))

    def unload_lora(self) -> None:
        """Remove every LoRA from the U-Net, restoring its original weights exactly."""
        if self._loras or getattr(self.unet, "peft_config", None):
            self.unet.unload_lora()
        self._loras.clear()

    # ------------------------------------------------------------------ generation
    @_refuses_old_image_names
    def __call__(
        self,
        prompt: Prompt | Sequence[Prompt] | None = None,
        prompt_images: PromptImages | None = None,
        negative_prompt: Prompt | Sequence[Prompt] | None = None,
        negative_prompt_images: PromptImages | None = None,
        *,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        lora_scale: float | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Generate images from an interleaved prompt (or a batch of them).

        ``prompt_images`` fill the prompt's ``<i>`` placeholders in order (for a batch: one
        list per prompt), ``negative_prompt_images`` those of ``negative_prompt``. A list
        prompt places its images itself: ``["A photo of", Path("dog.png"), "on the beach"]``
        is one prompt (every ``str`` in it is text; images are PIL images, numpy arrays or
        ``pathlib.Path``), while a list of only ``str`` is a batch. ``image``
        (+ ``mask_image``) switch to img2img (inpainting), with ``strength``;
        ``control_image`` feeds the ControlNet(s). ``num_inference_steps`` and
        ``guidance_scale`` default to :attr:`generation_config`. ``lora_scale`` scales all
        loaded LoRAs for this call. Other keyword arguments (``eta``, ``guidance_rescale``,
        ``control_guidance_start``, ``padding_mask_crop``...) go to the diffusers pipeline.
        Returns diffusers' output (``.images``).

        Example:
            >>> pipe("<i> make it snowy", prompt_images=["house.png"], image="house.png",
            ...      strength=0.7)  # doctest: +SKIP
        """
        # 0. Sampling defaults: the model folder's generation_config.json.
        if num_inference_steps is None:
            num_inference_steps = self.generation_config.num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.generation_config.guidance_scale

        # 1. Check inputs; they decide the task.
        task = self._check_inputs(prompt, prompt_images, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                  image, mask_image, control_image)

        # 2. Pick diffusers' pipeline for the task and translate the call into its arguments.
        pipe = self.diffusers_pipeline(task)
        lora_scale, cross_attention_kwargs = _split_lora_scale(lora_scale, cross_attention_kwargs)
        call = self._diffusers_arguments(
            pipe, task,
            always=dict(num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=generator, output_type=output_type,
                        callback_on_step_end=callback_on_step_end,
                        cross_attention_kwargs=cross_attention_kwargs or None, **kwargs),
            if_given=dict(height=height, width=width, latents=latents, strength=strength, image=image,
                          mask_image=mask_image),
            control_image=control_image, controlnet_conditioning_scale=controlnet_conditioning_scale)

        # 3. Encode the prompt once (the encoder never runs inside the denoising loop).
        prompt_embeds, negative_prompt_embeds = self._prepare_condition(
            prompt, prompt_images, negative_prompt, negative_prompt_images, prompt_embeds, negative_prompt_embeds,
            do_classifier_free_guidance=self.do_classifier_free_guidance(guidance_scale))

        # 4. Denoise and decode: diffusers' own loop, LoRA scaled for this call only.
        self._activate(pipe)
        if self.vae is None:
            return self._pixel_space_call(pipe, prompt_embeds, negative_prompt_embeds, lora_scale, call)
        with _scaled_lora(self.unet, lora_scale):
            return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **call)

    def _check_inputs(self, prompt: Any, prompt_images: Any, negative_prompt: Any, prompt_embeds: Any,
                      negative_prompt_embeds: Any, image: Any, mask_image: Any, control_image: Any) -> str:
        """Refuse contradicting arguments; returns the task they ask for: "text2img", "img2img" or "inpaint"."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` (with `prompt_images`) and `prompt_embeds`.")
        if prompt_embeds is not None and prompt_images is not None:
            raise ValueError("`prompt_images` belong to `prompt`; with `prompt_embeds` they are already encoded.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass `negative_prompt` or `negative_prompt_embeds`, not both.")
        if mask_image is not None and image is None:
            raise ValueError("`mask_image` needs `image` (the picture to inpaint).")
        if (control_image is None) != (self.controlnet is None):
            raise ValueError(
                "This pipeline has a ControlNet; pass `control_image=`." if self.controlnet is not None
                else "`control_image` given but no ControlNet is loaded; pass controlnet= to from_pretrained."
            )
        task = "inpaint" if mask_image is not None else "img2img" if image is not None else "text2img"
        if self.vae is None and (task != "text2img" or self.controlnet is not None):
            raise ValueError(f"This pipeline's U-Net works in pixel space (no VAE): only text-to-image without "
                             f"ControlNet is supported, not {task}{' with ControlNet' if self.controlnet else ''}.")
        return task

    def _diffusers_arguments(self, pipe: Any, task: str, *, always: dict[str, Any], if_given: dict[str, Any],
                             control_image: Any, controlnet_conditioning_scale: Any) -> dict[str, Any]:
        """Keyword arguments for ``pipe`` (diffusers' pipeline for ``task``), all but the condition.

        The ControlNet's image is diffusers' ``image`` in text-to-image and ``control_image``
        otherwise; image paths are loaded. An argument ``pipe`` does not take is refused by
        name, never dropped.
        """
        call = dict(always)
        if control_image is not None:
            if_given = {**if_given, "image" if task == "text2img" else "control_image": control_image}
            call["controlnet_conditioning_scale"] = controlnet_conditioning_scale
        call.update({k: v for k, v in if_given.items() if v is not None})
        accepted = inspect.signature(pipe.__call__).parameters
        bad = sorted(k for k in call if k not in accepted)
        if bad:
            raise ValueError(f"{', '.join(bad)} not supported for {task}"
                             f"{' with ControlNet' if control_image is not None else ''} "
                             f"({type(pipe).__name__}).")
        for key in ("image", "mask_image", "control_image"):
            if isinstance(call.get(key), (str, os.PathLike)):
                call[key] = load_image(call[key])
        if isinstance(call.get("image"), list) and task == "text2img":  # several ControlNets
            call["image"] = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in call["image"]]
        return call

    def _prepare_condition(self, prompt: Any, prompt_images: Any, negative_prompt: Any, negative_prompt_images: Any,
                           prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None, *,
                           do_classifier_free_guidance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The call's ``(prompt_embeds, negative_prompt_embeds)`` on the U-Net's device and dtype:
        the prompt encoded, or the given embeddings with a negative encoded where guidance needs
        one and none was given. The negative is None without guidance."""
        cfg = do_classifier_free_guidance
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, prompt_images, negative_prompt, negative_prompt_images, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg)
        elif cfg and negative_prompt_embeds is None:
            # Precomputed prompt, no negative: the official null condition (or the negative text).
            negative_prompt_embeds = self._negative_only(negative_prompt, negative_prompt_images,
                                                         prompt_embeds.shape[0])
        prompt_embeds = prompt_embeds.to(device=self.device, dtype=self.dtype)
        if cfg and negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=self.device, dtype=self.dtype)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    def _pixel_space_call(self, pipe: Any, prompt_embeds: torch.Tensor, negative_prompt_embeds: Any,
                          lora_scale: float | None, call: dict[str, Any]) -> Any:
        """diffusers' loop on an RGB U-Net: its "latents" are the image, so nothing is decoded.

        diffusers sizes latents as pixels / ``vae_scale_factor`` (8 without a VAE), so pixel
        sizes are scaled up on the way in and the samples are post-processed here.
        """
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        output_type = call.pop("output_type")
        return_dict = call.pop("return_dict", True)
        f = pipe.vae_scale_factor
        for key in ("height", "width"):
            call[key] = call.get(key, self.unet.config.sample_size) * f
        with _scaled_lora(self.unet, lora_scale):
            out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                       output_type="latent", **call)
        samples = out.images if hasattr(out, "images") else out[0]  # (B, 3, H, W) in [-1, 1]
        if output_type != "latent":
            samples = pipe.image_processor.postprocess(samples.float(), output_type=output_type)
        if not return_dict:
            return samples, None
        return StableDiffusionPipelineOutput(images=samples, nsfw_content_detected=None)

    def _negative_only(self, negative_prompt: Any, negative_prompt_images: Any, batch_size: int) -> torch.Tensor:
        """Negative conditions for ``batch_size`` precomputed prompt embeddings."""
        pairs = as_batch(negative_prompt, negative_prompt_images, name="negative_prompt", batch_size=batch_size)
        with self._kosmos_on(self.device):
            _, npe, _ = _encode_prompts(self.kosmos_g, self.processor, [], pairs, self._null_condition())
        return npe.to(device=self.device, dtype=self.dtype)
