"""Tiny shards and a tiny setup for training tests, benchmarks and a first try.

``python -m kosmos_g.train.testing runs/tiny`` writes a random tiny Kosmos-G, a tiny
SD1.5-layout folder and a few shards of every sample kind under ``runs/tiny``: the
paths the packaged ``tiny-stage*`` recipes point at, so that

    python -m kosmos_g.train.testing runs/tiny
    kosmos-g train stage1 --config tiny-stage1

runs from a fresh clone with no download.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ..data.shards import ShardWriter
from ..testing import TINY_CORPUS

KIND_DIRS = ("text", "caption", "interleaved", "edit", "compositional")
_COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 215, 40)}


def _picture(rng: np.random.Generator, size: int, color: tuple[int, int, int] | None = None) -> np.ndarray:
    """A background plus one coloured square: enough structure for a VAE/CLIP to see."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    c = np.array(color if color is not None else rng.integers(0, 256, 3), dtype=np.uint8)
    s = int(rng.integers(size // 4, size // 2))
    y, x = rng.integers(0, size - s, 2)
    img[y:y + s, x:x + s] = c
    return img


def tiny_samples(kind: str, n: int, *, seed: int = 0, size: int = 32) -> list[dict]:
    """``n`` samples of one kind, following ``docs/data-format.md``."""
    rng = np.random.default_rng([seed, KIND_DIRS.index(kind)])
    out = []
    for i in range(n):
        text = TINY_CORPUS[int(rng.integers(len(TINY_CORPUS)))]
        if kind == "text":
            s = {"json": {"kind": "text", "text": f"{text}. {TINY_CORPUS[i % len(TINY_CORPUS)]}"}}
        elif kind == "caption":
            s = {"json": {"kind": "caption", "caption": text}, "png": _picture(rng, size)}
        elif kind == "interleaved":
            s = {"json": {"kind": "interleaved", "segments": [{"text": text}, {"image": 0},
                                                              {"text": TINY_CORPUS[i % 10]}, {"image": 1}]},
                 "0.png": _picture(rng, size), "1.png": _picture(rng, size)}
        elif kind == "edit":
            src = _picture(rng, size)
            tgt = src.copy()
            tgt[: size // 2] = 255 - tgt[: size // 2]
            s = {"json": {"kind": "edit", "caption": text, "instruction": "make it snowy"},
                 "src.png": src, "tgt.png": tgt}
        elif kind == "compositional":
            names = list(_COLORS)
            a, b = names[i % 4], names[(i + 1) % 4]
            caption = f"a {a} square next to a {b} square"
            ents = []
            for name in (a, b):
                start = caption.index(f"{name} square")
                ents.append({"text": f"{name} square", "start": start, "end": start + len(name) + 7})
            s = {"json": {"kind": "compositional", "caption": caption, "entities": ents},
                 "tgt.png": _picture(rng, size, _COLORS[a])}
            for j, name in enumerate((a, b)):
                crop = np.empty((size // 2, size // 2, 3), np.uint8)
                crop[:] = _COLORS[name]
                white = crop.copy()
                white[:2], white[-2:] = 255, 255
                s[f"e{j}_square.png"], s[f"e{j}_white.png"] = crop, white
        else:
            raise ValueError(f"Unknown kind {kind!r}; choose one of {KIND_DIRS}.")
        out.append(s)
    return out


def make_tiny_shards(root: str | os.PathLike, *, n: int = 16, per_shard: int = 4, seed: int = 0,
                     size: int = 32, kinds: tuple[str, ...] = KIND_DIRS) -> dict[str, Path]:
    """Write ``n`` samples of each kind into ``root/<kind>/shard-*.tar``; returns the folders.
    Shards already there are replaced (the same arguments write the same bytes)."""
    root = Path(root)
    dirs = {}
    for kind in kinds:
        with ShardWriter(root / kind, max_samples=per_shard, overwrite=True) as writer:
            for i, sample in enumerate(tiny_samples(kind, n, seed=seed, size=size)):
                writer.write(sample, key=f"{kind}-{i:05d}")
        dirs[kind] = root / kind
    return dirs


def make_tiny_setup(root: str | os.PathLike, *, n: int = 16) -> dict[str, Path]:
    """A tiny Kosmos-G, a tiny SD folder and tiny shards under ``root`` (the tiny recipes' paths)."""
    from ..testing import make_tiny_kosmos_g, make_tiny_sd

    root = Path(root)
    make_tiny_kosmos_g(root / "kosmos-g")
    make_tiny_sd(root / "sd", cross_attention_dim=32)
    shards = make_tiny_shards(root / "shards", n=n)
    return {"kosmos_g": root / "kosmos-g", "sd": root / "sd", **shards}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny training setup the tiny-stage* recipes use.")
    parser.add_argument("root", nargs="?", default="runs/tiny")
    args = parser.parse_args(argv)
    for name, path in make_tiny_setup(args.root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
