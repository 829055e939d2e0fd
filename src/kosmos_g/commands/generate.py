"""``kosmos-g generate``: images from an interleaved prompt, each with a JSON sidecar.

Every PNG gets a ``.json`` beside it holding every setting and that image's seed;
``kosmos-g generate --from-json IMAGE.json`` re-runs it to the same pixels (same
machine type, device and dtype). Each output name is claimed with an exclusive create, so
runs sharing a folder never overwrite each other, and filled atomically
(:mod:`kosmos_g.fileio`), so a half-written PNG never appears under it. Steps, guidance and scheduler
default to the model folder's ``generation_config.json``, as in
:class:`kosmos_g.pipeline.KosmosGPipeline`, and each sidecar records the values used.

Example:
    kosmos-g generate "<i> wearing <i>" -i dog.png -i hat.png --model ckpt/kosmos-g \\
        --sd ckpt/sd-v1-5 --steps 25 --seed 7 -n 4 --grid -o outputs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import micro
from ..fileio import atomic_dir, atomic_write_bytes, prepare_output_dir
from ..generation_config import FILENAME as GENERATION_CONFIG, GenerationConfig
from ..schedulers import SCHEDULERS, scheduler_name

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = micro.CHECKPOINTS / "kosmos-g"
DEFAULT_SD = micro.CHECKPOINTS / "sd"
DEFAULT_OUTPUT_DIR = "outputs"
EXAMPLES_DIR = PACKAGE_DIR / "assets" / "examples"
MIN_GRID_SIDE = 256  # px: a grid of small images is scaled up (nearest neighbour) to at least this
RANDOM_TINY_VERSION = "random-tiny-v1"  # bump when make_tiny_* change, to rebuild caches
SIDECAR_FORMAT = "kosmos-g-generate/1"

EPILOG = f"""\
examples:
  kosmos-g generate "<i> wearing <i>" -i dog.png -i hat.png --model DIR --sd DIR -n 4 --grid
  kosmos-g generate "<i> make it snowy" -i house.png --init-image house.png --strength 0.7 ...
  kosmos-g generate "<i> in a forest" -i dog.png --controlnet canny/ --control-image edges.png ...
  kosmos-g generate --from-json outputs/00003-dog-s42.json     # re-run one image exactly
  kosmos-g generate "<i> wearing <i>" -i {EXAMPLES_DIR / 'dog.png'} -i {EXAMPLES_DIR / 'hat.png'} --random-tiny

--random-tiny uses a tiny model with RANDOM weights (the images are noise): it checks
that everything runs, without any checkpoint.
"""


@dataclass
class Settings:
    """Everything that determines the images; written to each sidecar.

    ``scheduler``, ``steps`` and ``guidance`` are None until :func:`generate` fills in the
    model folder's ``generation_config.json``, so a sidecar holds the values used.
    """

    prompt: str
    images: list[str] = field(default_factory=list)
    negative: str | None = None
    negative_images: list[str] = field(default_factory=list)
    model: str | None = None
    sd: str | None = None
    random_tiny: bool = False
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    num_images: int = 1
    batch_size: int = 1
    controlnet: list[str] = field(default_factory=list)
    control_images: list[str] = field(default_factory=list)
    control_scales: list[float] = field(default_factory=list)
    loras: list[dict[str, Any]] = field(default_factory=list)
    init_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    dtype: str = "fp32"
    device: str = "cpu"


# ----------------------------------------------------------------------------- parsing

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images from an interleaved text+image prompt",
        description="Generate images from a prompt whose '<i>' placeholders are filled, in order, "
                    "by the -i images. Writes PNGs and a JSON sidecar per image.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="prompt text; each '<i>' takes the next -i image")
    p.add_argument("-i", "--image", dest="images", action="append", default=[], metavar="IMG",
                   help="an image for the next '<i>' (repeat, in order)")
    src = p.add_argument_group("models")
    src.add_argument("--model", help="Kosmos-G folder (default: the embedded micro model)")
    src.add_argument("--sd", help="Stable Diffusion 1.5 diffusers folder (unet/, vae/, scheduler/; "
                                  "default: the embedded micro-SD)")
    src.add_argument("--random-tiny", action="store_true",
                     help="use a tiny model with RANDOM weights (output is noise): a smoke test")
    src.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                     help="a diffusers SD1.5 ControlNet folder (repeat for several)")
    src.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="an SD1.5 LoRA .safetensors file, optional scale (repeat for several)")
    gen = p.add_argument_group("sampling")
    from_model = f"default: the model folder's {GENERATION_CONFIG}, else"
    gen.add_argument("--steps", type=int, default=None,
                     help=f"denoising steps ({from_model} {GenerationConfig.num_inference_steps})")
    gen.add_argument("--guidance", type=float, default=None,
                     help=f"classifier-free guidance ({from_model} {GenerationConfig.guidance_scale})")
    gen.add_argument("--seed", type=int, help="seed of the first image; image k uses seed+k (default: random)")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    gen.add_argument("--batch-size", type=int, default=1,
                     help="images per U-Net batch (default 1; larger is faster on GPUs)")
    gen.add_argument("--size", help="WIDTHxHEIGHT or one number, multiples of 8 (default: the U-Net's)")
    gen.add_argument("--scheduler", default=None,
                     help=f"one of {', '.join(SCHEDULERS)} ({from_model} {GenerationConfig.scheduler})")
    gen.add_argument("--negative", metavar="TEXT", help="negative prompt ('<i>' placeholders allowed)")
    gen.add_argument("--negative-image", dest="negative_images", action="append", default=[], metavar="IMG",
                     help="an image for the negative prompt's next '<i>'")
    gen.add_argument("--control-image", dest="control_images", action="append", default=[], metavar="IMG",
                     help="control image, one per --controlnet, in order")
    gen.add_argument("--control-scale", dest="control_scales", action="append", type=float, default=[],
                     metavar="S", help="ControlNet conditioning scale (one, or one per --controlnet)")
    gen.add_argument("--init-image", metavar="IMG", help="start from this image (img2img)")
    gen.add_argument("--mask", metavar="IMG", help="inpaint the white area of this mask (needs --init-image)")
    gen.add_argument("--strength", type=float, help="how much of --init-image to redraw, 0-1")
    run = p.add_argument_group("run")
    run.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, else fp32")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                     help=f"output folder (default: {DEFAULT_OUTPUT_DIR}/)")
    run.add_argument("--grid", action="store_true", help="also save all images of this run as one grid")
    run.add_argument("--from-json", metavar="SIDECAR", help="re-run the image a sidecar describes")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", size)
    if not m:
        raise ValueError(f"--size {size!r}: use one number (512) or WIDTHxHEIGHT (512x768).")
    width = int(m.group(1))
    height = int(m.group(2) or width)
    for v in (width, height):
        if v <= 0 or v % 8:
            raise ValueError(f"--size {size!r}: width and height must be positive multiples of 8.")
    return height, width


def _parse_lora(spec: str) -> dict[str, Any]:
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # a ':' that is part of the path (e.g. C:\...)
    return {"path": str(Path(path).resolve()), "scale": scale}


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate the command line (before any model loads) into :class:`Settings`."""
    if args.prompt is None:
        raise ValueError("give a PROMPT (or --from-json SIDECAR).")
    for name in ("steps", "num_images", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {args.guidance}.")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}.")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (the picture to inpaint).")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength only applies with --init-image.")
    if args.size and args.init_image and not args.mask:
        raise ValueError("img2img keeps --init-image's size; resize that image instead of --size.")
    if args.random_tiny and (args.model or args.sd):
        raise ValueError("--random-tiny builds its own models; drop --model/--sd (or drop --random-tiny).")
    n_cn = len(args.controlnet)
    if len(args.control_images) != n_cn:
        raise ValueError(f"got {n_cn} --controlnet and {len(args.control_images)} --control-image; "
                         "give one control image per ControlNet, in order.")
    if args.control_scales and len(args.control_scales) not in (1, n_cn):
        raise ValueError(f"give one --control-scale, or one per --controlnet ({n_cn}).")
    if args.control_scales and not n_cn:
        raise ValueError("--control-scale needs --controlnet.")
    height, width = _parse_size(args.size)
    device = args.device or _default_device()
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return Settings(
        prompt=args.prompt, images=[str(Path(p).resolve()) for p in args.images],
        negative=args.negative, negative_images=[str(Path(p).resolve()) for p in args.negative_images],
        model=str(Path(args.model).resolve()) if args.model else None,
        sd=str(Path(args.sd).resolve()) if args.sd else None, random_tiny=args.random_tiny,
        scheduler=scheduler_name(args.scheduler) if args.scheduler else None, steps=args.steps,
        guidance=args.guidance,
        height=height, width=width, seed=seed, num_images=args.num_images, batch_size=args.batch_size,
        controlnet=[str(Path(p).resolve()) for p in args.controlnet],
        control_images=[str(Path(p).resolve()) for p in args.control_images],
        control_scales=list(args.control_scales), loras=[_parse_lora(s) for s in args.lora],
        init_image=str(Path(args.init_image).resolve()) if args.init_image else None,
        mask=str(Path(args.mask).resolve()) if args.mask else None, strength=args.strength,
        dtype=dtype, device=device,
    )


def _require_file(what: str, path: str | os.PathLike) -> None:
    if Path(path).is_dir():
        raise IsADirectoryError(f"{what} is a directory, not a file: {path}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _check_files(s: Settings) -> None:
    """Fail on bad prompts, missing files and unreadable or oversized images now, not after
    loading gigabytes. Images are checked from their headers, without decoding them."""
    from ..processing import check_image_file, split_prompt

    split_prompt(s.prompt, s.images)  # placeholder / image count
    if s.negative is not None:
        split_prompt(s.negative, s.negative_images)
    elif s.negative_images:
        raise ValueError("--negative-image needs --negative with '<i>' placeholders.")
    images = [("image", p) for p in s.images + s.negative_images] + \
        [("control image", p) for p in s.control_images] + \
        [("init image", p) for p in [s.init_image] if p] + [("mask", p) for p in [s.mask] if p]
    for what, path in images + [("LoRA file", lo["path"]) for lo in s.loras]:
        _require_file(what, path)
    for _, path in images:
        check_image_file(path)  # unreadable, or above processing.MAX_IMAGE_PIXELS


def _check_before_loading(s: Settings, outdir: Path) -> None:
    """Everything that can be refused without a model: prompt, input files and image headers,
    device, model folders and the output folder. So a run that cannot succeed loads nothing."""
    from ..pipeline import check_pretrained_folders

    _check_files(s)
    _check_device(s.device)
    if not s.random_tiny:  # --random-tiny builds its folders, which is already work
        check_pretrained_folders(*resolve_model_dirs(s), s.controlnet)
    prepare_output_dir(outdir)


# ----------------------------------------------------------------------------- models

def _cache_root() -> Path:
    root = os.environ.get("KOSMOS_G_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kosmos-g"


def random_tiny_dirs() -> tuple[Path, Path]:
    """A tiny random Kosmos-G folder and a matching tiny SD folder, built once and cached
    (under ``$KOSMOS_G_CACHE``, default ``~/.cache/kosmos-g``)."""
    from ..testing import make_tiny_kosmos_g, make_tiny_sd

    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "kosmos-g"
        root.mkdir(parents=True, exist_ok=True)
    final = root / RANDOM_TINY_VERSION

    def built() -> bool:
        return (final / "kosmos-g" / "model.safetensors").is_file() and (final / "sd" / "unet").is_dir()

    if not built():
        try:
            with atomic_dir(final, replace=final.exists()) as tmp:  # replace: an incomplete earlier build
                model, _ = make_tiny_kosmos_g(tmp / "kosmos-g")
                make_tiny_sd(tmp / "sd", cross_attention_dim=model.config.aligner.output_dim)
        except OSError:
            if not built():
                raise
            # another process finished first; its folder is the same
    return final / "kosmos-g", final / "sd"


def resolve_model_dirs(s: Settings) -> tuple[Path, Path]:
    if s.random_tiny:
        return random_tiny_dirs()
    model = Path(s.model) if s.model else DEFAULT_MODEL
    sd = Path(s.sd) if s.sd else DEFAULT_SD
    if not s.model and not DEFAULT_MODEL.is_dir() or not s.sd and not DEFAULT_SD.is_dir():
        missing = " and ".join(f for f, given in (("--model", s.model), ("--sd", s.sd)) if not given)
        raise ValueError(f"no {missing} given and the embedded micro model is not installed; pass "
                         "--model DIR --sd DIR, or --random-tiny to try the command with random weights.")
    return model, sd


def load_pipeline(s: Settings, quiet: bool = False):
    from ..pipeline import KosmosGPipeline

    _check_device(s.device)
    model_dir, sd_dir = resolve_model_dirs(s)
    if s.random_tiny:
        print(f"kosmos-g generate: --random-tiny: the weights are RANDOM (a tiny untrained model in "
              f"{model_dir.parent}); the images will be noise.", file=sys.stderr)
    # scheduler=None: the model folder's generation_config.json picks it.
    pipe = KosmosGPipeline.from_pretrained(model_dir, sd_dir, controlnet=s.controlnet or None,
                                           scheduler=s.scheduler, dtype=s.dtype, device=s.device)
    if s.loras:
        pipe.load_lora([lo["path"] for lo in s.loras], scale=[lo["scale"] for lo in s.loras])
    pipe.set_progress_bar_config(disable=quiet)
    return pipe


# ----------------------------------------------------------------------------- output

def _sha256(path: str | None) -> str | None:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.replace("<i>", " ").lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def _next_index(outdir: Path) -> int:
    used = [int(m.group(1)) for f in outdir.iterdir() if (m := re.match(r"(\d{5})-", f.name))]
    return max(used, default=-1) + 1


def _claim(outdir: Path, index: int, stem: str, suffixes: Sequence[str]) -> tuple[int, list[Path]]:
    """Claim ``NNNNN-<stem><suffix>`` in ``outdir`` for every suffix (an image and its sidecar)
    with an exclusive create, ``NNNNN`` the first free index from ``index`` on; returns the index
    used and the claimed paths.

    The scan in :func:`_next_index` only suggests a start: another run writing into the same
    folder may take a name after it, and ``O_EXCL`` makes exactly one of them get it. A name is
    claimed as an empty file; the complete file then replaces it (:func:`_publish`).
    """
    while True:
        paths = [outdir / f"{index:05d}-{stem}{suffix}" for suffix in suffixes]
        claimed: list[Path] = []
        try:
            for path in paths:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                claimed.append(path)
            return index, paths
        except FileExistsError:
            for path in claimed:
                path.unlink()
            index = max(index + 1, _next_index(outdir))


def _publish(files: dict[Path, bytes]) -> None:
    """Replace each claimed (empty) file with its data, atomically; on failure drop the claims
    that were not filled, so an interrupted run leaves no empty image or sidecar."""
    try:
        for path, data in files.items():
            atomic_write_bytes(path, data)
    except BaseException:
        for path in files:
            if path.is_file() and path.stat().st_size == 0:
                path.unlink()
        raise


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _grid(images: list) -> Any:
    """The images in a near-square grid; small tiles are scaled up by a whole factor with nearest
    neighbour (no blur, every pixel stays a sharp square) until the grid's shorter side is at
    least ``MIN_GRID_SIDE``, so that a grid of 32x32 micro images can be looked at."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    scale = max(1, math.ceil(MIN_GRID_SIDE / min(cols * w, rows * h)))
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im.resize((w, h), Image.Resampling.NEAREST), ((k % cols) * w, (k // cols) * h))
    return grid


def _with_sampling_defaults(s: Settings, config: GenerationConfig) -> Settings:
    """``s`` with the steps, guidance and scheduler it leaves open taken from the model's config."""
    return dataclasses.replace(
        s, scheduler=s.scheduler or config.scheduler,
        steps=config.num_inference_steps if s.steps is None else s.steps,
        guidance=config.guidance_scale if s.guidance is None else s.guidance)


# ----------------------------------------------------------------------------- running

def _call_arguments(s: Settings) -> dict[str, Any]:
    """The pipeline arguments besides the condition, seeds, steps and guidance: ControlNet
    images and scales, size, and img2img / inpainting inputs."""
    from ..processing import load_image

    extra: dict[str, Any] = {}
    if s.controlnet:
        controls = [load_image(p) for p in s.control_images]
        extra["control_image"] = controls[0] if len(controls) == 1 else controls
        scales = s.control_scales or [1.0]
        if len(s.controlnet) == 1:
            extra["controlnet_conditioning_scale"] = scales[0]
        else:
            extra["controlnet_conditioning_scale"] = scales * len(s.controlnet) if len(scales) == 1 else scales
    if not s.init_image or s.mask:  # img2img takes its size from the init image
        extra.update(height=s.height, width=s.width)
    if s.init_image:
        extra["image"] = load_image(s.init_image)
        if s.mask:
            extra["mask_image"] = load_image(s.mask)
        if s.strength is not None:
            extra["strength"] = s.strength
    return extra


def generate(s: Settings, outdir: Path, *, only_index: int | None = None, grid: bool = False,
             quiet: bool = False) -> list[Path]:
    """Generate ``s.num_images`` images (seeds ``s.seed + k``), write PNG + JSON sidecars.

    ``only_index`` keeps just that image (``--from-json``): its whole batch is re-run so
    that batch-dependent numerics match too.
    """
    import torch

    from .. import __version__

    _check_before_loading(s, outdir)
    pipe = load_pipeline(s, quiet=quiet)
    s = _with_sampling_defaults(s, pipe.generation_config)
    cfg = pipe.do_classifier_free_guidance(s.guidance)
    # The condition is computed once and reused by every batch below.
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        s.prompt, s.images, s.negative, s.negative_images or None, do_classifier_free_guidance=cfg)
    extra = _call_arguments(s)
    outdir.mkdir(parents=True, exist_ok=True)
    hashes = {p: _sha256(p) for p in s.images + s.negative_images + s.control_images
              + [s.init_image, s.mask] if p}
    seeds = [s.seed + k for k in range(s.num_images)]
    written: list[Path] = []
    images = []
    index = _next_index(outdir)
    first_index = None
    slug = _slug(s.prompt)
    for start in range(0, len(seeds), s.batch_size):
        batch_seeds = seeds[start:start + s.batch_size]
        if only_index is not None and not start <= only_index < start + len(batch_seeds):
            continue
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in batch_seeds]
        t0 = time.perf_counter()
        out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                   num_images_per_prompt=len(batch_seeds), num_inference_steps=s.steps,
                   guidance_scale=s.guidance, generator=generators,
                   **extra).images
        seconds = (time.perf_counter() - t0) / len(batch_seeds)
        for k, (seed, image) in enumerate(zip(batch_seeds, out)):
            if only_index is not None and start + k != only_index:
                continue
            data = _png_bytes(image)
            index, (png, sidecar) = _claim(outdir, index, f"{slug}-s{seed}", (".png", ".json"))
            first_index = index if first_index is None else first_index
            index += 1
            record = {
                "format": SIDECAR_FORMAT, "kosmos_g_version": __version__, "file": png.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 3),
                "image_seed": seed, "image_index": start + k,
                "width": image.size[0], "height": image.size[1], "settings": asdict(s),
                "input_sha256": hashes,
            }
            _publish({png: data, sidecar: (json.dumps(record, indent=2) + "\n").encode("utf-8")})
            written.append(png)
            images.append(image)
            print(png)
    if grid and len(images) > 1:
        data = _png_bytes(_grid(images))
        _, (path,) = _claim(outdir, first_index, f"{slug}-grid", (".png",))
        _publish({path: data})
        print(path)
    return written


def settings_from_sidecar(path: str | os.PathLike) -> tuple[Settings, int]:
    """The settings and image index a sidecar describes."""
    path = Path(path)
    _require_file("sidecar", path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        settings = Settings(**record["settings"])
        index = int(record["image_index"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a kosmos-g generate sidecar ({e}).") from None
    for p, digest in (record.get("input_sha256") or {}).items():
        if Path(p).is_file() and _sha256(p) != digest:
            print(f"kosmos-g generate: warning: {p} changed since {path.name} was written; "
                  "the image will differ.", file=sys.stderr)
    return settings, index


def main(args: argparse.Namespace) -> int:
    if args.from_json:
        if args.prompt is not None or args.images:
            raise ValueError("--from-json re-runs a sidecar as it is; drop PROMPT and -i.")
        s, index = settings_from_sidecar(args.from_json)
        if args.device:  # running elsewhere is allowed, though pixels may then differ
            s.device = args.device
        if args.dtype:
            s.dtype = args.dtype
        generate(s, Path(args.output_dir), only_index=index, quiet=args.quiet)
        return 0
    s = settings_from_args(args)
    generate(s, Path(args.output_dir), grid=args.grid, quiet=args.quiet)
    return 0
