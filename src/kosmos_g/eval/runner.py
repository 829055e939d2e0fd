"""Resumable, batched, multi-process generation and scoring for the evaluation protocols.

A run is a list of :class:`Item` (one image each: its prompt, seed, the text and reference it is scored
against). :func:`generate_items` writes each image as ``KEY.png`` with a ``KEY.json`` sidecar holding
the settings it was made with; an image whose sidecar matches the current settings is not made again,
so a killed run continues where it stopped, and an image made with OTHER settings is refused (never
silently mixed, never overwritten without ``overwrite=True``). :func:`score_items` scores the images.

Under ``accelerate launch`` every process takes every ``world_size``-th group of items (a group: one
prompt's images, so batches are the same with any process count), makes and scores its share, and the
per-image scores and FID statistics are gathered once, on the main process, which writes the reports.

Example:
    >>> items = [Item(key="a/00-0", prompt="<i> in the snow", images=[Path("dog.jpg")], seed=0)]  # doctest: +SKIP
    >>> generate_items(items, Path("out"), lambda: KosmosGGenerator(...), settings={...})  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..fileio import atomic_write_bytes, atomic_write_text
from .metrics import ClipScorer, DinoScorer, FeatureStats, cosine, load_rgb, resize_center_crop

__all__ = ["Item", "process_state", "KosmosGGenerator", "SDGenerator", "generate_items", "score_items",
           "image_stats", "my_share", "grid_image", "write_report", "SIDECAR_FORMAT", "REPORT_FORMAT"]

SIDECAR_FORMAT = "kosmos-g-eval/1"
REPORT_FORMAT = "kosmos-g-eval-report/1"


@dataclass
class Item:
    """One image to make and score."""

    key: str
    """Its path under the output folder, without suffix: ``dog/00-in-the-jungle-0``."""
    prompt: str
    """What the generator gets (``<i>`` placeholders filled by ``images``)."""
    images: list[Path] = field(default_factory=list)
    seed: int = 0
    text: str | None = None
    """What CLIP-T scores the image against (None: no CLIP-T)."""
    reference: Path | None = None
    """What DINO and CLIP-I compare the image with (None: not scored)."""
    group: str = ""
    """Items of one group stay in one process and batch together (one prompt's images)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Kept in the reports (subject, prompt kind, caption id...)."""

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "images": [str(p) for p in self.images], "seed": self.seed}


# ----------------------------------------------------------------------------- processes


def process_state():
    """accelerate's process state. Without a GPU it is asked for the CPU (gloo) explicitly: otherwise
    ``accelerate launch --multi_gpu`` on CPUs starts independent single-process runs."""
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=world > 1 and not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(f"Launched as {world} processes but accelerate formed a group of {state.num_processes}; "
                           "check the accelerate launch flags.")
    return state


def my_share(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """This process's items: every ``world``-th group, starting at ``rank``."""
    groups: dict[str, int] = {}
    for it in items:
        groups.setdefault(it.group or it.key, len(groups))
    return [it for it in items if groups[it.group or it.key] % world == rank]


def _gather(obj: Any, state: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (one item with a single process)."""
    if state.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


# ----------------------------------------------------------------------------- generators


class KosmosGGenerator:
    """Kosmos-G through :class:`kosmos_g.pipeline.KosmosGPipeline`; each image has its own seeded CPU generator,
    so an image does not depend on what else is in its batch's noise."""

    def __init__(self, model: str | os.PathLike, sd: str | os.PathLike, *, scheduler: str, steps: int,
                 guidance: float, size: int | None, dtype: str, device: str | torch.device) -> None:
        from ..pipeline import KosmosGPipeline

        self.pipe = KosmosGPipeline.from_pretrained(model, sd, scheduler=scheduler, dtype=dtype, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.size = steps, guidance, size

    def __call__(self, items: Sequence[Item]) -> list[Any]:
        out = self.pipe([it.prompt for it in items], prompt_images=[[load_rgb(p) for p in it.images] for it in items],
                        num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.size,
                        width=self.size, generator=[torch.Generator("cpu").manual_seed(it.seed) for it in items])
        return list(out.images)


class SDGenerator:
    """The paper's SD baseline: diffusers' text-to-image pipeline on the SD folder's own CLIP text encoder,
    given each item's ``text`` (the original prompt, with the class noun) or its prompt."""

    def __init__(self, sd: str | os.PathLike, *, scheduler: str, steps: int, guidance: float, size: int | None,
                 dtype: str, device: str | torch.device) -> None:
        from diffusers import StableDiffusionPipeline

        from ..models import resolve_dtype
        from ..pipeline import make_scheduler

        sd = Path(sd)
        for sub in ("text_encoder", "tokenizer", "unet", "scheduler"):
            if not (sd / sub).is_dir():
                raise FileNotFoundError(f"--baseline sd needs {sd / sub}: the SD folder's own text encoder runs.")
        pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False,
                                                       dtype=resolve_dtype(dtype), local_files_only=True)
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.size = steps, guidance, size

    def __call__(self, items: Sequence[Item]) -> list[Any]:
        out = self.pipe([it.text or it.prompt for it in items], num_inference_steps=self.steps,
                        guidance_scale=self.guidance, height=self.size, width=self.size,
                        generator=[torch.Generator("cpu").manual_seed(it.seed) for it in items])
        return list(out.images)


# ----------------------------------------------------------------------------- generation


def _done(item: Item, out_dir: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``item``'s image is on disk, made with ``settings``; an image made otherwise is refused."""
    png, sidecar = out_dir / f"{item.key}.png", out_dir / f"{item.key}.json"
    if not png.is_file() or not sidecar.is_file():
        return False
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        same = record["format"] == SIDECAR_FORMAT and record["settings"] == settings \
            and record["item"] == json.loads(json.dumps(item.record()))
    except (json.JSONDecodeError, KeyError, TypeError):
        same = False
    if same or overwrite:
        return same
    raise ValueError(f"{png} was made with other settings or another prompt than this run's (see {sidecar.name}); "
                     "pass another --output-dir, or --overwrite to make it again.")


def generate_items(items: Sequence[Item], out_dir: Path, make_generator: Callable[[], Any], *,
                   settings: dict[str, Any], batch_size: int = 4, overwrite: bool = False,
                   progress: bool = True, desc: str = "generating") -> int:
    """Make this process's images that are not on disk yet (in batches within a group); returns how many it made.

    ``make_generator`` is called only if something is left to make, so a finished run loads no model.
    """
    from tqdm.auto import tqdm

    from .. import __version__

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}.")
    state = process_state()
    # Every process checks every image, so that all refuse the same conflict (none is left waiting).
    done = {it.key for it in items if _done(it, out_dir, settings, overwrite)}
    pending = [it for it in my_share(items, state.process_index, state.num_processes) if it.key not in done]
    made = 0
    if pending:
        generator = make_generator()
        batches: list[list[Item]] = []
        for it in pending:  # consecutive items of one group, at most batch_size
            if batches and len(batches[-1]) < batch_size and batches[-1][-1].group == it.group:
                batches[-1].append(it)
            else:
                batches.append([it])
        bar = tqdm(total=len(pending), desc=desc, unit="image", dynamic_ncols=True,
                   disable=not (progress and state.is_local_main_process))
        for batch in batches:
            t0 = time.perf_counter()
            images = generator(batch)
            seconds = (time.perf_counter() - t0) / len(batch)
            for it, image in zip(batch, images):
                png = out_dir / f"{it.key}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                atomic_write_bytes(png, buf.getvalue())  # the image first: a sidecar means the image is whole
                record = {"format": SIDECAR_FORMAT, "kosmos_g_version": __version__, "file": png.name,
                          "settings": settings, "item": it.record(), "seconds": round(seconds, 3),
                          "width": image.size[0], "height": image.size[1]}
                atomic_write_text(out_dir / f"{it.key}.json", json.dumps(record, indent=1) + "\n")
                made += 1
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    return made


# ----------------------------------------------------------------------------- scoring

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_path(image_dir: Path, key: str) -> Path:
    """The image file of ``key``: ``image_dir/KEY`` if KEY already ends with an image suffix, else ``KEY.png``."""
    p = image_dir / key
    return p if p.suffix.lower() in IMAGE_SUFFIXES else image_dir / f"{key}.png"


def score_items(items: Sequence[Item], image_dir: Path, *, dino: DinoScorer | None = None,
                clip: ClipScorer | None = None, inception: torch.nn.Module | None = None, fid_size: int = 256,
                batch_size: int = 16, progress: bool = True) -> tuple[list[dict[str, Any]], FeatureStats | None]:
    """Score every image (:func:`image_path`), this process its share; returns, gathered from all processes
    and in ``items`` order, one record per image (raw cosines ``dino``, ``clip_i``, ``clip_t`` where scored) and
    the Inception statistics of all images (``inception`` given) at ``fid_size``.
    """
    from tqdm.auto import tqdm

    state = process_state()
    mine = my_share(items, state.process_index, state.num_processes)
    missing = [str(image_path(image_dir, it.key)) for it in mine if not image_path(image_dir, it.key).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) to score are missing, e.g. {missing[0]}.")
    ref_cache: dict[Path, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    records: list[dict[str, Any]] = []
    stats = FeatureStats.empty(inception.num_features) if inception is not None else None
    bar = tqdm(total=len(mine), desc="scoring", unit="image", dynamic_ncols=True,
               disable=not (progress and state.is_local_main_process))
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        images = [load_rgb(image_path(image_dir, it.key)) for it in batch]
        recs = [{"key": it.key, **it.info} for it in batch]
        for ref in {it.reference for it in batch if it.reference is not None} - set(ref_cache):
            im = [load_rgb(ref)]
            ref_cache[ref] = (dino.features(im) if dino else None, clip.image_features(im) if clip else None)
        scored = [k for k, it in enumerate(batch) if it.reference is not None]
        if scored and dino is not None:
            f = dino.features([images[k] for k in scored])
            r = torch.cat([ref_cache[batch[k].reference][0] for k in scored])
            for k, c in zip(scored, cosine(f, r).tolist()):
                recs[k]["dino"] = c
        if clip is not None:
            g = clip.image_features(images)
            if scored:
                r = torch.cat([ref_cache[batch[k].reference][1] for k in scored])
                for k, c in zip(scored, cosine(g[scored], r).tolist()):
                    recs[k]["clip_i"] = c
            texted = [k for k, it in enumerate(batch) if it.text]
            if texted:
                t = clip.text_features([batch[k].text for k in texted])
                for k, c in zip(texted, cosine(g[texted], t).tolist()):
                    recs[k]["clip_t"] = c
        if inception is not None:
            x = torch.from_numpy(np.stack([resize_center_crop(im, fid_size, fid_size) for im in images]))
            stats = stats + FeatureStats.of(inception(x.permute(0, 3, 1, 2).contiguous()).cpu())
        records += recs
        bar.update(len(batch))
    bar.close()
    gathered = _gather((records, stats), state)
    order = {it.key: i for i, it in enumerate(items)}
    all_records = sorted((r for recs, _ in gathered for r in recs), key=lambda r: order[r["key"]])
    total = None
    if inception is not None:
        total = FeatureStats.empty(inception.num_features)
        for _, s in gathered:
            total = total + s
    return all_records, total


def image_stats(paths: Sequence[Path], inception: torch.nn.Module, *, size: int = 256, batch_size: int = 32,
                progress: bool = True, desc: str = "reference features") -> FeatureStats:
    """Inception statistics of image files (resized and centre-cropped to ``size``), split over the processes
    and summed; every process gets the total."""
    from tqdm.auto import tqdm

    state = process_state()
    mine = list(paths)[state.process_index::state.num_processes]
    stats = FeatureStats.empty(inception.num_features)
    bar = tqdm(total=len(mine), desc=desc, unit="image", dynamic_ncols=True,
               disable=not (progress and state.is_local_main_process))
    for start in range(0, len(mine), batch_size):
        arrays = [resize_center_crop(load_rgb(p), size, size) for p in mine[start:start + batch_size]]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        stats = stats + FeatureStats.of(inception(x).cpu())
        bar.update(len(arrays))
    bar.close()
    total = FeatureStats.empty(inception.num_features)
    for s in _gather(stats, state):
        total = total + s
    return total


# ----------------------------------------------------------------------------- reports


def write_report(out_dir: Path, name: str, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.md`` atomically; refuses to replace such files that this command did
    not write (a user's own file of that name)."""
    paths = out_dir / f"{name}.json", out_dir / f"{name}.md"
    old = paths[0]
    if old.is_file():
        try:
            ours = json.loads(old.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
        except (json.JSONDecodeError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(f"{old} exists and was not written by kosmos-g eval; move it or pass another "
                                  "--output-dir.")
    elif paths[1].is_file():
        raise FileExistsError(f"{paths[1]} exists and was not written by kosmos-g eval; move it or pass another "
                              "--output-dir.")
    atomic_write_text(paths[0], json.dumps({"format": REPORT_FORMAT, **result}, indent=1) + "\n")
    atomic_write_text(paths[1], markdown + "\n")
    return paths


def grid_image(rows: Sequence[Sequence[Any]], cell: int = 128):
    """A PIL grid: one row per list of PIL images (None leaves a cell white), each tile ``cell`` px square."""
    from PIL import Image

    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * cell, len(rows) * cell), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            if im is not None:
                canvas.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (x * cell, y * cell))
    return canvas
