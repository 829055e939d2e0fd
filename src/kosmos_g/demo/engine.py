"""What the web demo does, without the web: load once, check browser values, sample, write.

Everything a browser sends is untrusted. :meth:`Engine.parse` turns the raw values of one
request into a :class:`Request` or raises :class:`DemoError`, whose message is one sentence
meant for the page. Uploaded images arrive as the upload server's file records; they must
lie under the upload folder, stay under the byte and pixel limits (read from the header,
before decoding) and be PNG, JPEG, WebP, BMP or GIF. ControlNets and LoRAs are picked by
index into what the command line loaded, so no browser value ever names a server file.

One generation runs at a time per device (a lock per device, whatever the web server's
queue does). :meth:`Engine.start` runs a request in a thread and returns a :class:`Job` with
its live step count; :meth:`Job.cancel` makes diffusers' ``callback_on_step_end`` set the
pipeline's interrupt flag, so the loop stops after the step it is in.

Example:
    >>> engine = Engine.load("ckpt/kosmos-g", "ckpt/sd-v1-5", device="cuda")  # doctest: +SKIP
    >>> request = engine.parse(prompt="<i> on the beach", images=[upload], steps=25)  # doctest: +SKIP
    >>> job = engine.start(request); job.wait(); job.files  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from ..processing import PLACEHOLDER, load_image
from ..schedulers import SCHEDULERS, scheduler_name
from .limits import Limits

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "kosmos-g-demo/1"
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF"}
"""PIL format -> name shown in messages: the only upload types accepted (checked from the content)."""
NONE_CHOICE = -1
"""The ControlNet / LoRA choice meaning "none"; any other choice is an index into what was loaded."""

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def _device_lock(device: Any) -> threading.Lock:
    """One lock per device, shared by every engine in the process: one generation at a time each."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


class DemoError(ValueError):
    """A request the demo refuses; its message is one sentence for the page."""


@dataclass
class Request:
    """One checked request: decoded images and values within :class:`Limits`."""

    prompt: str
    images: list[Image.Image]
    negative: str | None = None
    negative_images: list[Image.Image] = field(default_factory=list)
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    num_images: int = 1
    width: int = 512
    height: int = 512
    scheduler: str = "dpm++"
    controlnet: int | None = None
    control_image: Image.Image | None = None
    control_scale: float = 1.0
    lora: int | None = None
    lora_scale: float = 1.0


class Job:
    """A request on its way through the device: live ``step`` / ``total`` and ``state``
    (``"waiting"`` for the device, ``"running"``, ``"done"``, ``"cancelled"``, ``"failed"``)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.state = "waiting"
        self.step = 0
        self.total = request.steps
        self.cancelled_at: int | None = None
        self.files: list[Path] = []  # PNG, JSON, PNG, JSON, ...
        self.seconds = 0.0
        self.error: DemoError | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop the sampling loop after the step it is in (or before it starts); a no-op once done."""
        if not self._done.is_set() and not self._cancel.is_set():
            self.cancelled_at = self.step
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job has finished (done, cancelled or failed); False on timeout."""
        return self._done.wait(timeout)

    @property
    def images(self) -> list[Path]:
        return [p for p in self.files if p.suffix == ".png"]


# ----------------------------------------------------------------------------- uploads

def _number(value: Any, what: str, lo: float, hi: float, *, integer: bool) -> int | float:
    """A number from the browser within [lo, hi], or a DemoError naming the field and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not lo <= value <= hi:
        kind = "a whole number" if integer else "a number"
        raise DemoError(f"{what} must be {kind} from {lo:g} to {hi:g}.")
    return int(value) if integer else float(value)


def _text(value: Any, what: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DemoError(f"{what} must be text.")
    if len(value) > limit:
        raise DemoError(f"{what} is {len(value)} characters long; the limit is {limit}.")
    return value


def _choice(value: Any, what: str, n: int) -> int | None:
    """An index into the ``n`` loaded items, or None for :data:`NONE_CHOICE`; nothing else."""
    if value is None or value == NONE_CHOICE:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise DemoError(f"{what} must be one of the {n} listed on the page (or none).")
    return value


def _upload_path(value: Any) -> str | None:
    """The stored path of an upload record (the upload server's ``{"path": ...}``), or None for none."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DemoError("An image field must hold an uploaded image.")
    return value


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def canny_edges(image: Image.Image, low: float = 0.1, high: float = 0.2, sigma: float = 1.4) -> Image.Image:
    """Canny edges, white on black, the control image of a canny ControlNet; numpy and PIL only.

    ``low`` and ``high`` are the hysteresis thresholds as fractions of the largest gradient
    (OpenCV's ``Canny(image, 100, 200)`` on a typical photo is close to the defaults).
    Blur, Sobel gradients, non-maximum suppression along the gradient, then the weak edges
    joined to a strong one are kept.

    Example:
        >>> im = Image.new("RGB", (32, 32)); im.paste((255, 255, 255), (8, 8, 24, 24))
        >>> np.asarray(canny_edges(im))[16, 6:11, 0].tolist()
        [0, 0, 255, 0, 0]
    """
    if not 0 <= low <= high <= 1:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high <= 1, got {low}, {high}.")
    gray = image.convert("L").filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image.convert("L")
    g = np.asarray(gray, dtype=np.float32)  # (H, W)
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)
    if mag.max() == 0:
        return Image.new("RGB", image.size)
    # Non-maximum suppression: keep a pixel only if it beats both of its neighbours across the edge.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = (((angle + 22.5) // 45) % 4).astype(np.int8)  # 0: horizontal gradient, 1: 45, 2: 90, 3: 135
    m = np.pad(mag, 1)
    H, W = mag.shape
    neighbours = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for d, ((ay, ax), (by, bx)) in neighbours.items():
        a = m[1 + ay:1 + ay + H, 1 + ax:1 + ax + W]
        b = m[1 + by:1 + by + H, 1 + bx:1 + bx + W]
        keep |= (direction == d) & (mag > a) & (mag >= b)  # a tie (a symmetric step) keeps one pixel
    thin = np.where(keep, mag, 0.0) / mag.max()
    strong, weak = thin >= high, thin >= low
    # Hysteresis: grow the strong edges through 8-connected weak pixels until nothing changes.
    edges = strong
    for _ in range(H * W):
        grown = np.asarray(Image.fromarray(edges.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
        grown &= weak
        if (grown == edges).all():
            break
        edges = grown
    return Image.fromarray(edges.astype(np.uint8) * 255).convert("RGB")


# ----------------------------------------------------------------------------- engine

class Engine:
    """Models loaded once, a device lock, request checking and sampling for the web demo.

    ``pipe`` is a :class:`~kosmos_g.pipeline.KosmosGPipeline` without a ControlNet; each of
    ``controlnets`` (``(name, ControlNetModel)``) gets a pipeline sharing its models. LoRAs
    are loaded into its U-Net (:meth:`KosmosGPipeline.load_lora`) and ``loras`` names them in
    order; a request switches one on with its scale. Outputs go to ``output_dir``.
    """

    def __init__(self, pipe: Any, *, output_dir: str | os.PathLike, upload_root: str | os.PathLike | None = None,
                 controlnets: Sequence[tuple[str, Any]] = (), loras: Sequence[str] = (),
                 limits: Limits | None = None, model_name: str = "kosmos-g", history: int = 32) -> None:
        from ..pipeline import KosmosGPipeline

        if pipe.controlnet is not None:
            raise ValueError("Give the engine a pipeline without a ControlNet; pass ControlNets as controlnets=.")
        if controlnets and pipe.vae is None:
            raise ValueError("This SD folder's U-Net works in pixel space (no VAE), which ControlNet does not "
                             "support; drop --controlnet or use a latent SD1.5 folder.")
        unknown = [n for n in loras if n not in pipe.loras]
        if unknown:
            raise ValueError(f"LoRA(s) {unknown} are not loaded into the pipeline; loaded: {list(pipe.loras)}.")
        self.pipe = pipe
        self.limits = limits or Limits()
        self.model_name = model_name
        self.controlnet_names = [name for name, _ in controlnets]
        self._pipes = [pipe] + [
            KosmosGPipeline(pipe.kosmos_g, pipe.processor, pipe.unet, pipe.vae, pipe.scheduler, controlnet=net,
                            generation_config=pipe.generation_config) for _, net in controlnets]
        for p in self._pipes:
            p.set_progress_bar_config(disable=True)
        self.lora_names = list(loras)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.upload_root = Path(upload_root).resolve() if upload_root is not None else None
        self.lock = _device_lock(pipe.device)
        self.history: deque[Job] = deque(maxlen=history)  # finished jobs, newest last
        self._next_index = 0
        self._index_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | os.PathLike, sd_dir: str | os.PathLike, *,
             controlnet_dirs: Sequence[str | os.PathLike] = (), lora_files: Sequence[str | os.PathLike] = (),
             device: str | None = None, dtype: str | None = None, output_dir: str | os.PathLike | None = None,
             upload_root: str | os.PathLike | None = None, limits: Limits | None = None) -> "Engine":
        """Load the models once: a Kosmos-G folder, an SD1.5 folder, ControlNet folders (each a
        choice on the page) and LoRA ``.safetensors`` files (each a choice, off until picked).
        Folders and files are checked before any weights load.

        Example:
            >>> Engine.load("ckpt/kosmos-g", "ckpt/sd-v1-5", controlnet_dirs=["ckpt/canny"])  # doctest: +SKIP
        """
        import torch
        from diffusers import ControlNetModel

        from ..models import resolve_dtype
        from ..pipeline import KosmosGPipeline, _load_diffusers, check_pretrained_folders

        check_pretrained_folders(model_dir, sd_dir, list(controlnet_dirs))
        for f in lora_files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"LoRA file not found: {f}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = "fp16" if str(device).startswith("cuda") else "fp32"
        pipe = KosmosGPipeline.from_pretrained(model_dir, sd_dir, dtype=dtype, device=device)
        if controlnet_dirs and pipe.vae is None:
            raise ValueError(f"SD folder {sd_dir} works in pixel space (no VAE), which ControlNet does not "
                             "support; drop --controlnet or pass a latent SD1.5 folder with --sd.")
        nets = []
        for d in controlnet_dirs:
            net = _load_diffusers(ControlNetModel, Path(d), "ControlNet", torch_dtype=resolve_dtype(dtype))
            nets.append((Path(d).resolve().name, net.to(device)))
        names = pipe.load_lora(list(lora_files), scale=0.0) if lora_files else []
        out = output_dir if output_dir is not None else tempfile.mkdtemp(prefix="kosmos-g-demo-")
        return cls(pipe, output_dir=out, upload_root=upload_root, controlnets=nets, loras=names, limits=limits,
                   model_name=Path(model_dir).resolve().name)

    # ------------------------------------------------------------------ defaults
    @property
    def native_size(self) -> int:
        """The U-Net's own image side, in pixels."""
        unet = self.pipe.unet
        factor = 1 if self.pipe.vae is None else 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return int(unet.config.sample_size) * factor

    @property
    def size_range(self) -> tuple[int, int]:
        """The width/height a request may ask for: half to twice the native side, multiples of 8."""
        native = self.native_size
        lo = max(8, native // 2 // 8 * 8)
        return lo, max(lo, min(self.limits.max_side, native * 2) // 8 * 8)

    @property
    def defaults(self) -> dict[str, Any]:
        """The model's sampling defaults (its ``generation_config.json``) and native size."""
        config = self.pipe.generation_config
        return {"steps": min(config.num_inference_steps, self.limits.max_steps),
                "guidance": config.guidance_scale, "scheduler": config.scheduler,
                "width": self.native_size, "height": self.native_size}

    # ------------------------------------------------------------------ checking
    def upload_file(self, value: Any, what: str) -> Path | None:
        """The file of an upload record (None for an empty field), refused unless it lies under
        the upload folder: a browser may hand back what it uploaded, never name a server file."""
        path = _upload_path(value)
        if path is None:
            return None
        p = Path(path).resolve()
        if self.upload_root is not None and not _inside(p, self.upload_root):
            raise DemoError(f"{what} is not an uploaded file; upload the image from your computer.")
        if not p.is_file():
            raise DemoError(f"{what} is no longer on the server; upload it again.")
        return p

    def check_upload(self, value: Any, what: str) -> Image.Image | None:
        """An upload record -> RGB image, or None for an empty field; ``DemoError`` (naming ``what``,
        never the server path) for a file outside the upload folder, too large, not an image of an
        accepted type, above the pixel limit or unreadable."""
        p = self.upload_file(value, what)
        if p is None:
            return None
        if p.stat().st_size > self.limits.max_upload_bytes:
            raise DemoError(f"{what} is {p.stat().st_size / 1e6:.1f} MB; the limit is "
                            f"{self.limits.max_upload_mb:g} MB.")
        kinds = ", ".join(IMAGE_FORMATS.values())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(p)  # reads the header only
        except Image.DecompressionBombError:
            raise DemoError(f"{what} is larger than {self.limits.max_image_pixels:,} pixels; "
                            "downscale it first.") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise DemoError(f"{what} could not be read as an image; upload a {kinds} file.") from None
        with im:
            if im.format not in IMAGE_FORMATS:
                raise DemoError(f"{what} is a {im.format} file; only {kinds} images are accepted.")
            w, h = im.size
            if w * h > self.limits.max_image_pixels:
                raise DemoError(f"{what} is {w}x{h} ({w * h:,} pixels); the limit is "
                                f"{self.limits.max_image_pixels:,} pixels, so downscale it first.")
            try:
                return load_image(im)  # decodes, honours EXIF, flattens alpha onto white
            except (OSError, SyntaxError, ValueError):
                raise DemoError(f"{what} is damaged or truncated; upload a complete {kinds} file.") from None

    def _slot_images(self, prompt: str, slots: Sequence[Any], what: str, n_max: int) -> list[Image.Image]:
        """The images for ``prompt``'s ``<i>``: slot k fills the k-th ``<i>``; every slot past the
        count must be empty. Uploads are checked only after the counts agree."""
        n = prompt.count(PLACEHOLDER)
        slots = list(slots)
        if n > n_max:
            raise DemoError(f"The {what} has {n} {PLACEHOLDER} but at most {n_max} images are allowed.")
        filled = [k for k, v in enumerate(slots) if v is not None]
        missing = [k for k in range(n) if k >= len(slots) or slots[k] is None]
        extra = [k for k in filled if k >= n]
        if missing or extra:
            noun = "image" if len(filled) == 1 else "images"
            fix = (f"upload an image into slot {missing[0] + 1}" if missing
                   else f"remove the image in slot {extra[0] + 1} or add a {PLACEHOLDER} for it")
            raise DemoError(f"The {what} has {n} {PLACEHOLDER} but {len(filled)} {noun} "
                            f"{'was' if len(filled) == 1 else 'were'} given; {fix}.")
        label = "Image" if what == "prompt" else "Negative image"
        return [self.check_upload(slots[k], f"{label} {k + 1}") for k in range(n)]

    def parse(self, *, prompt: Any, images: Sequence[Any] = (), negative: Any = None,
              negative_images: Sequence[Any] = (), steps: Any = None, guidance: Any = None, seed: Any = 0,
              randomize_seed: Any = False, num_images: Any = 1, width: Any = None, height: Any = None,
              scheduler: Any = None, controlnet: Any = NONE_CHOICE, control_image: Any = None,
              control_scale: Any = 1.0, lora: Any = NONE_CHOICE, lora_scale: Any = 1.0) -> Request:
        """Check one request's raw browser values (None takes the model's default) into a
        :class:`Request`; the first problem raises :class:`DemoError`.

        Example:
            >>> engine.parse(prompt="<i> on the grass", images=[{"path": upload}], steps=20)  # doctest: +SKIP
        """
        lim, d = self.limits, self.defaults
        prompt = _text(prompt, "The prompt", lim.max_prompt_chars)
        if not prompt.strip():
            raise DemoError(f"Type a prompt first, with a {PLACEHOLDER} where each image goes.")
        if len(images) > lim.max_slots:
            raise DemoError(f"At most {lim.max_slots} prompt images are allowed, got {len(images)}.")
        if len(negative_images) > lim.max_negative_slots:
            raise DemoError(f"At most {lim.max_negative_slots} negative images are allowed.")
        negative = _text(negative, "The negative prompt", lim.max_prompt_chars) or None
        lo, hi = self.size_range
        r = Request(
            prompt=prompt, images=[],
            steps=_number(d["steps"] if steps is None else steps, "Steps", 1, lim.max_steps, integer=True),
            guidance=_number(d["guidance"] if guidance is None else guidance, "Guidance", 0, 30, integer=False),
            seed=_number(0 if seed is None else seed, "The seed", 0, 2**31 - 1, integer=True),
            num_images=_number(num_images, "The number of images", 1, lim.max_images, integer=True),
            width=_number(d["width"] if width is None else width, "Width", lo, hi, integer=True),
            height=_number(d["height"] if height is None else height, "Height", lo, hi, integer=True),
            control_scale=_number(control_scale, "The ControlNet scale", 0, 2, integer=False),
            lora_scale=_number(lora_scale, "The LoRA scale", -2, 2, integer=False))
        if r.width % 8 or r.height % 8:
            raise DemoError("Width and height must be multiples of 8.")
        if randomize_seed is True:
            r.seed = secrets.randbelow(2**31 - lim.max_images)
        elif randomize_seed not in (False, None):
            raise DemoError("Randomize seed must be true or false.")
        name = d["scheduler"] if scheduler is None else scheduler
        try:
            r.scheduler = scheduler_name(name) if isinstance(name, str) else ""
        except ValueError:
            r.scheduler = ""
        if not r.scheduler:
            raise DemoError(f"The scheduler must be one of {', '.join(SCHEDULERS)}.")
        r.controlnet = _choice(controlnet, "The ControlNet", len(self.controlnet_names))
        r.lora = _choice(lora, "The LoRA", len(self.lora_names))
        r.images = self._slot_images(prompt, images, "prompt", lim.max_slots)
        if negative is not None:
            r.negative = negative
            r.negative_images = self._slot_images(negative, negative_images, "negative prompt",
                                                  lim.max_negative_slots)
        elif any(v is not None for v in negative_images):
            raise DemoError(f"Negative images need a negative prompt with a {PLACEHOLDER} for each.")
        if r.controlnet is not None:
            r.control_image = self.check_upload(control_image, "The control image")
            if r.control_image is None:
                raise DemoError("A ControlNet is picked but there is no control image; upload one or make "
                                "canny edges from a photo.")
        return r

    # ------------------------------------------------------------------ running
    def start(self, request: Request) -> Job:
        """Run ``request`` in a background thread (it waits for the device); returns its :class:`Job`."""
        job = Job(request)
        threading.Thread(target=self.run, args=(job,), name="kosmos-g-demo-job", daemon=True).start()
        return job

    def run(self, job: Job | Request) -> Job:
        """Run a job (or a request) here and now, waiting for the device; returns the job, whose
        ``error`` is a :class:`DemoError` when it was cancelled or the pipeline refused it."""
        job = job if isinstance(job, Job) else Job(job)
        try:
            with self.lock:
                if job.cancelled:
                    raise DemoError("Cancelled before it started.")
                job.state = "running"
                t0 = time.perf_counter()
                images = self._sample(job)
                job.seconds = time.perf_counter() - t0
            if job.cancelled:
                raise DemoError(f"Cancelled after {job.step} of {job.total} steps.")
            job.files = self._write(job.request, images, job.seconds)
            job.state = "done"
        except DemoError as e:
            job.error, job.state = e, "cancelled" if job.cancelled else "failed"
        except ValueError as e:  # the library refused a value: its message is one line
            job.error, job.state = DemoError(" ".join(str(e).split())), "failed"
        except Exception as e:  # a bug or the device: logged in full, one line for the page
            logger.exception("generation failed")
            job.error, job.state = DemoError(f"Generation failed ({type(e).__name__}); see the server log."), "failed"
        finally:
            self.history.append(job)
            job._done.set()
        return job

    def _sample(self, job: Job) -> list[Image.Image]:
        import torch

        r = job.request
        pipe = self._pipes[0 if r.controlnet is None else r.controlnet + 1]
        pipe.scheduler = r.scheduler
        if self.lora_names:
            self.pipe.set_lora_scale({n: r.lora_scale if k == r.lora else 0.0 for k, n in enumerate(self.lora_names)})

        def on_step_end(diffusers_pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            job.step = step + 1
            job.total = getattr(diffusers_pipe, "num_timesteps", None) or job.total
            if job.cancelled:
                diffusers_pipe._interrupt = True  # diffusers skips every remaining step
            return {}

        extra: dict[str, Any] = {}
        if r.controlnet is not None:
            extra = {"control_image": r.control_image, "controlnet_conditioning_scale": r.control_scale}
        # CPU generators, one per image: image k of seed s is the same on any device.
        generators = [torch.Generator("cpu").manual_seed(r.seed + k) for k in range(r.num_images)]
        out = pipe(r.prompt, prompt_images=r.images, negative_prompt=r.negative,
                   negative_prompt_images=r.negative_images or None, num_images_per_prompt=r.num_images,
                   num_inference_steps=r.steps, guidance_scale=r.guidance, height=r.height, width=r.width,
                   generator=generators, callback_on_step_end=on_step_end, **extra)
        return list(out.images)

    # ------------------------------------------------------------------ output
    def _claim(self, stem: str) -> tuple[Path, Path]:
        """Two fresh names, ``NNNNN-stem.png`` and ``.json``, created exclusively."""
        with self._index_lock:
            while True:
                index = self._next_index
                self._next_index += 1
                png, sidecar = (self.output_dir / f"{index:05d}-{stem}{s}" for s in (".png", ".json"))
                try:
                    os.close(os.open(png, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                except FileExistsError:
                    continue
                try:
                    os.close(os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                except FileExistsError:
                    png.unlink()
                    continue
                return png, sidecar

    def _write(self, r: Request, images: list[Image.Image], seconds: float) -> list[Path]:
        from .. import __version__

        slug = re.sub(r"[^a-z0-9]+", "-", r.prompt.replace(PLACEHOLDER, " ").lower()).strip("-")[:40].rstrip("-")
        files: list[Path] = []
        settings = {
            "prompt": r.prompt, "image_sha256": [_digest(im) for im in r.images],
            "negative_prompt": r.negative, "negative_image_sha256": [_digest(im) for im in r.negative_images],
            "steps": r.steps, "guidance": r.guidance, "scheduler": r.scheduler, "seed": r.seed,
            "num_images": r.num_images, "width": r.width, "height": r.height,
            "controlnet": None if r.controlnet is None else self.controlnet_names[r.controlnet],
            "control_scale": r.control_scale if r.controlnet is not None else None,
            "control_image_sha256": _digest(r.control_image) if r.control_image is not None else None,
            "lora": None if r.lora is None else self.lora_names[r.lora],
            "lora_scale": r.lora_scale if r.lora is not None else None,
            "model": self.model_name, "dtype": str(self.pipe.dtype).replace("torch.", ""),
            "device": str(self.pipe.device),
        }
        for k, image in enumerate(images):
            png, sidecar = self._claim(f"{slug or 'image'}-s{r.seed + k}")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            png.write_bytes(buf.getvalue())
            record = {"format": SIDECAR_FORMAT, "kosmos_g_version": __version__, "file": png.name,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds / len(images), 3),
                      "image_seed": r.seed + k, "image_index": k, "settings": settings}
            sidecar.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            files += [png, sidecar]
        return files


def _digest(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels and size (what the model saw, whatever file it came in)."""
    h = hashlib.sha256(f"{image.size[0]}x{image.size[1]}".encode())
    h.update(image.convert("RGB").tobytes())
    return h.hexdigest()
