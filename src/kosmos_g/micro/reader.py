"""A learned attribute reader: what a generated micro-world image shows, cell by cell.

Micro DreamBench scores generated images by reading back the scene they show. Matching
each grid cell against the renderer's exact pictures is exact on renders but brittle on
generated images: an object drawn one pixel off its cell centre no longer matches its own
template (a 1 px shift of real renders drops such a matcher's subject accuracy to 7%). So
the scenes are read by an attribute classifier trained on the renderer's ground truth:

* :class:`AttributeReader`: a small CNN that sees a 16x16 window around one grid cell's
  centre of a 32x32 image and predicts whether an object is there, and its shape, colour,
  pattern and size.
* :func:`train_reader`: trained only on renders of random scenes (0-4 objects, any
  attribute combination, held-out subjects included: the reader is a measuring
  instrument, not part of the model), with the window jittered by up to ``jitter``
  pixels, half the scenes rendered at 64 px and box-downsampled (soft edges), and
  blur, noise, gain and colour-cast augmentations, so that it reads what a drawing
  *looks like* rather than whether it is pixel-exact.
* :func:`read_scenes`: images (any square size; resized to 32 px) -> :class:`Scene`
  objects; the background is read analytically (:func:`read_background`: median pixel
  distance to each background's render, which objects do not move).

The shipped reader (``checkpoints/reader/``, 0.2M parameters, fp32) was built by
``kosmos-g micro train-reader`` with the defaults below, on one thread (~8 minutes);
it reads 1024 fresh renders back exactly at 32 and 64 px.

Example:
    >>> import numpy as np
    >>> from kosmos_g.micro import world
    >>> reader = load_reader()
    >>> scene = world.Scene("green", (world.ObjectSpec("star", "red", "dotted", "large", "left"),))
    >>> read_scenes(reader, world.render(scene, 32).image[None])[0] == scene
    True
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..fileio import atomic_dir
from . import CHECKPOINTS, world
from .world import ObjectSpec, Scene

READ_SIZE = 32
"""Images are read at 32x32 (micro-SD's resolution); other sizes are box-resized first."""
WINDOW = 16
"""Side of the window around a cell centre; a cell is ~10.7 px, a large object ~10 px across."""
SIZE_NAMES = tuple(world.SIZES)
HEADS = {"present": 2, "shape": len(world.SHAPES), "color": len(world.COLORS),
         "pattern": len(world.PATTERNS), "size": len(SIZE_NAMES)}
LABELS = {"shape": world.SHAPES, "color": tuple(world.COLORS), "pattern": world.PATTERNS, "size": SIZE_NAMES}


@dataclass
class ReaderConfig:
    """The reader's architecture and training-time augmentation."""

    width: int = 32
    """Channels of the first conv stage (the second has twice as many)."""
    jitter: int = 2
    """Training windows are shifted by up to this many pixels in each direction."""

    def __post_init__(self) -> None:
        if self.width < 4:
            raise ValueError(f"width={self.width} must be >= 4")
        if not 0 <= self.jitter <= 4:
            raise ValueError(f"jitter={self.jitter} must be in [0, 4] pixels (a cell is ~10 px)")


class AttributeReader(nn.Module):
    """(N, 3, 16, 16) windows in [-1, 1] -> logits per head (``HEADS``)."""

    def __init__(self, config: ReaderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReaderConfig()
        w = self.config.width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(2 * w * 16, 4 * w), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, n) for name, n in HEADS.items()})

    def forward(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(windows)
        return {name: head(h) for name, head in self.heads.items()}


# ============================================================================ geometry


def _centers(size: int = READ_SIZE) -> list[tuple[int, int]]:
    """(row, col) of every grid cell's centre pixel, in ``world.POSITIONS`` order."""
    return [world._center(p, size) for p in world.POSITIONS]


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, 32, 32) float in [-1, 1], box-resized when S != 32."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (B, S, S, 3) uint8, got shape {images.shape}")
    if images.shape[1] != READ_SIZE:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((READ_SIZE, READ_SIZE), Image.BOX))
                           for im in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _windows(x: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B * 9, 3, 16, 16): the window around each cell centre, shifted by
    ``shifts`` (B * 9, 2) pixels when given; borders replicate the image's edge."""
    pad = WINDOW // 2 + 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, 3, P, P)
    corners = torch.tensor(_centers()).repeat(x.shape[0], 1) + (pad - WINDOW // 2)  # (B * 9, 2) top, left
    if shifts is not None:
        corners = corners + shifts
    offsets = torch.arange(WINDOW)
    rows = (corners[:, 0, None] + offsets)[:, :, None]  # (N, 16, 1)
    cols = (corners[:, 1, None] + offsets)[:, None, :]  # (N, 1, 16)
    images = torch.arange(x.shape[0]).repeat_interleave(9)[:, None, None]  # (N, 1, 1)
    return padded.permute(0, 2, 3, 1)[images, rows, cols].permute(0, 3, 1, 2)  # gather, then (N, 3, 16, 16)


# ============================================================================ training data


def _random_scene(rng: np.random.Generator, max_objects: int = 4) -> Scene:
    """Any background, 0..``max_objects`` objects with uniformly random attributes in distinct cells.

    Not :func:`world.sample_scene`: that one keeps shapes distinct within a scene (so that
    captions can say "the circle"), and generated images repeat shapes; the reader must too."""
    k = int(rng.integers(max_objects + 1))
    cells = rng.choice(len(world.POSITIONS), k, replace=False)
    objects = tuple(ObjectSpec(world._pick(rng, world.SHAPES), world._pick(rng, tuple(world.COLORS)),
                               world._pick(rng, world.PATTERNS), world._pick(rng, SIZE_NAMES),
                               world.POSITIONS[int(c)]) for c in cells)
    return Scene(world._pick(rng, world.BACKGROUNDS), objects)


def _targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Per window (scene-major, ``world.POSITIONS`` order): present 0/1 and attribute indices (-100 if empty)."""
    rows = {name: [] for name in HEADS}
    for scene in scenes:
        by_cell = {o.position: o for o in scene.objects}
        for position in world.POSITIONS:
            obj = by_cell.get(position)
            rows["present"].append(int(obj is not None))
            for name, labels in LABELS.items():
                rows[name].append(labels.index(getattr(obj, name)) if obj is not None else -100)
    return {name: torch.tensor(v) for name, v in rows.items()}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per image: gain, colour cast, a little blur, Gaussian noise (what generated images do)."""
    b = x.shape[0]
    gain = 1 + 0.15 * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
    cast = 0.06 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    x = (x + 1) * gain - 1 + cast
    blur = torch.rand(b, generator=g) * 0.5  # weight of the 3x3 box-blurred image
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + blur.view(b, 1, 1, 1) * (soft - x)
    noise = torch.rand(b, 1, 1, 1, generator=g) * 0.08
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _batch(rng: np.random.Generator, g: torch.Generator, n_scenes: int, jitter: int):
    from PIL import Image

    scenes = [_random_scene(rng) for _ in range(n_scenes)]
    images = []
    for i, scene in enumerate(scenes):
        if i % 2:  # soft edges, as a U-Net draws them
            big = world.render(scene, 2 * READ_SIZE).image
            images.append(np.asarray(Image.fromarray(big).resize((READ_SIZE, READ_SIZE), Image.BOX)))
        else:
            images.append(world.render(scene, READ_SIZE).image)
    x = _augment(_pixels(np.stack(images)), g)
    shifts = torch.randint(-jitter, jitter + 1, (n_scenes * 9, 2), generator=g)
    return _windows(x, shifts), _targets(scenes)


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["present"], targets["present"])
    for name in LABELS:  # attributes only where an object is
        loss = loss + F.cross_entropy(logits[name], targets[name], ignore_index=-100)
    return loss


def train_reader(out_dir: str | os.PathLike, *, steps: int = 4000, batch_scenes: int = 32, lr: float = 2e-3,
                 seed: int = 0, config: ReaderConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train an :class:`AttributeReader` on renders and save it to ``out_dir`` (atomically).

    Returns the training record (also written as ``out_dir/train.json``): ``losses`` (the
    mean loss of every 50 steps), ``seconds`` and ``accuracy`` on 256 fresh unaugmented
    renders (whole scenes read exactly).
    """
    if steps < 1 or batch_scenes < 1:
        raise ValueError(f"steps={steps} and batch_scenes={batch_scenes} must be >= 1")
    config = config or ReaderConfig()
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = AttributeReader(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses, window, t0 = [], [], time.time()
    for _ in tqdm(range(steps), desc="reader", disable=not progress):
        windows, targets = _batch(rng, g, batch_scenes, config.jitter)
        loss = _loss(model(windows), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == 50 or len(losses) * 50 + len(window) == steps:
            losses.append(float(np.mean(window)))
            window = []
    model.eval()
    test_rng = np.random.default_rng(seed + 1)
    test = [_random_scene(test_rng) for _ in range(256)]
    seen = read_scenes(model, np.stack([world.render(s, READ_SIZE).image for s in test]))
    record = {"steps": steps, "batch_scenes": batch_scenes, "lr": lr, "seed": seed, "config": asdict(config),
              "losses": losses, "seconds": time.time() - t0,
              "accuracy": float(np.mean([a == _canonical(b) for a, b in zip(seen, test)]))}
    save_reader(out_dir, model, record)
    return record


# ============================================================================ save / load / read


def save_reader(out_dir: str | os.PathLike, model: AttributeReader, record: dict[str, Any] | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (fp32) and, given one, ``train.json``."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(asdict(model.config), indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if record is not None:
            (tmp / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    return Path(out_dir)


def as_reader(reader: "AttributeReader | str | os.PathLike | None") -> AttributeReader:
    """``reader`` itself when it is loaded already, else :func:`load_reader` of it (None: the shipped one)."""
    return reader if isinstance(reader, AttributeReader) else load_reader(reader)


def load_reader(path: str | os.PathLike | None = None) -> AttributeReader:
    """Load a reader folder (default: the one shipped in the package), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CHECKPOINTS / "reader"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"no attribute reader at {path} (config.json + model.safetensors); "
                                "build one with `kosmos-g micro train-reader --out DIR`.")
    model = AttributeReader(ReaderConfig(**json.loads((path / "config.json").read_text())))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


@lru_cache(maxsize=32)
def _background_phases(name: str, size: int) -> np.ndarray:
    """(P, S, S, 3) float32: ``name``'s render at every phase of its texture (P = 1 when flat)."""
    image = world.render_background(name, size).astype(np.float32)
    period = 2 * max(4, size // 8)  # tile size of world._background; the texture repeats within two
    if (image == image[:1, :1]).all():
        return image[None]
    return np.stack([np.roll(image, (dy, dx), axis=(0, 1)) for dy in range(period) for dx in range(period)])


def read_background(image: np.ndarray) -> str:
    """The background whose render is closest to ``image`` by median pixel distance (objects
    cover too few pixels to move a median), at the texture's best phase: a tiled or grid
    background drawn a pixel off is still that background."""
    x = image.astype(np.float32)[None]
    dist = [np.median(np.abs(x - _background_phases(b, image.shape[0])).sum(-1), axis=(1, 2)).min()
            for b in world.BACKGROUNDS]
    return world.BACKGROUNDS[int(np.argmin(dist))]


def _canonical(scene: Scene) -> Scene:
    """``scene`` with its objects in grid order (the order :func:`read_scenes` returns them in)."""
    return Scene(scene.background, tuple(sorted(scene.objects, key=lambda o: world.POSITIONS.index(o.position))))


@torch.no_grad()
def read_scenes(reader: AttributeReader, images: np.ndarray, batch_size: int = 256) -> list[Scene]:
    """The scene each of ``images`` ((B, S, S, 3) uint8) shows, objects in grid order."""
    images = np.asarray(images)
    x = _pixels(images)
    scenes = []
    for start in range(0, len(images), batch_size):
        chunk = x[start:start + batch_size]
        logits = reader(_windows(chunk))
        picks = {name: v.argmax(-1).view(len(chunk), 9).tolist() for name, v in logits.items()}
        for b in range(len(chunk)):
            objects = tuple(
                ObjectSpec(*(LABELS[name][picks[name][b][k]] for name in ("shape", "color", "pattern", "size")),
                           position=position)
                for k, position in enumerate(world.POSITIONS) if picks["present"][b][k])
            scenes.append(Scene(read_background(images[start + b]), objects))
    return scenes


def match_scene(target: Scene, seen: Scene) -> dict[str, float]:
    """Per-attribute agreement of a read-back scene with the scene a caption described.

    Each target object is matched to the unused ``seen`` object agreeing on the most of
    (shape, color, pattern, size, position); an unmatched target object gets every
    attribute wrong. Returns the mean over target objects of ``shape``, ``color``,
    ``pattern``, ``size``, ``position`` and ``subject`` (shape, color and pattern all
    right), plus ``background`` and ``count`` (same number of objects) as 0/1.

    Example:
        >>> a = Scene("gray", (ObjectSpec("circle", "red", "solid", "small", "left"),))
        >>> match_scene(a, Scene("pink", a.objects))["background"]
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


