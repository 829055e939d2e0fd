"""Look at shards: counts per kind, entities per compositional sample, and a contact sheet.

The sheet has one row per sample: the target (or an edit's source and target), then each
entity's square crop and whitened crop labelled with the entity's words, and the caption
(or the instruction) under the row, so that a person can judge masks and entities at a glance.

Example:
    >>> report = inspect_shards("shards/comp", sheet="comp.png", rows=16)  # doctest: +SKIP
    >>> report["kinds"], report["entities"]                                 # doctest: +SKIP
    ({'compositional': 731}, {'1': 402, '2': 251, '3': 78})
"""

from __future__ import annotations

import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .shards import BadSample, decode_image, expand_shards, iter_shards, validate_sample

THUMB = 96
PAD = 4
TEXT_H = 14


def _label(draw, xy: tuple[int, int], text: str, width: int) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    chars = max(4, width // 6)
    draw.text(xy, text if len(text) <= chars else text[:chars - 1] + "~", fill=(0, 0, 0), font=font)


def _row_images(raw: dict, meta: dict) -> tuple[list[tuple[Any, str]], str]:
    """(thumbnails with their labels, the line under the row) for one sample."""
    kind = meta["kind"]
    if kind == "compositional":
        tiles = [(decode_image(raw, "tgt"), "target")]
        for i, ent in enumerate(meta["entities"]):
            tiles += [(decode_image(raw, f"e{i}_square"), ent.get("text", "?")),
                      (decode_image(raw, f"e{i}_white"), "whitened")]
        return tiles, meta["caption"]
    if kind == "edit":
        return [(decode_image(raw, "src"), "source"), (decode_image(raw, "tgt"), "target")], \
            f"{meta['caption']} -> {meta['instruction']}"
    if kind == "caption":
        return [(decode_image(raw), "image")], meta["caption"]
    if kind == "interleaved":
        tiles = [(decode_image(raw, str(s["image"])), f"image {s['image']}") for s in meta["segments"] if "image" in s]
        return tiles, " ".join(s.get("text", "<image>") for s in meta["segments"])
    return [], meta.get("text", "")


def contact_sheet(rows: Sequence[tuple[list[tuple[Any, str]], str]], *, thumb: int = THUMB):
    """A white PNG-ready image with one row of labelled thumbnails per entry, and its caption under it."""
    from PIL import Image, ImageDraw

    n_cols = max([len(tiles) for tiles, _ in rows] + [1])
    width = PAD + n_cols * (thumb + PAD)
    wrap = max(20, width // 6)
    heights = [thumb + TEXT_H + PAD + TEXT_H * max(1, len(textwrap.wrap(text, wrap)[:3])) + PAD for _, text in rows]
    sheet = Image.new("RGB", (width, PAD + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for (tiles, text), h in zip(rows, heights):
        for c, (img, label) in enumerate(tiles):
            x = PAD + c * (thumb + PAD)
            tile = img.copy()
            tile.thumbnail((thumb, thumb))
            sheet.paste(tile, (x, y))
            draw.rectangle([x - 1, y - 1, x + tile.width, y + tile.height], outline=(180, 180, 180))
            _label(draw, (x, y + thumb + 1), label, thumb)
        for k, line in enumerate(textwrap.wrap(text, wrap)[:3]):
            _label(draw, (PAD, y + thumb + TEXT_H + k * TEXT_H), line, width)
        y += h
        draw.line([0, y - PAD // 2, width, y - PAD // 2], fill=(220, 220, 220))
    return sheet


def inspect_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], *, sheet: str | os.PathLike | None = None,
                   rows: int = 16) -> dict:
    """Count the samples of some shards by kind, entities per compositional sample, bad samples and
    damaged shards; with ``sheet``, write a contact sheet of the first ``rows`` good samples (PNG)."""
    from ..fileio import atomic_file

    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}.")
    paths = expand_shards(spec)
    kinds: Counter = Counter()
    entities: Counter = Counter()
    bad: Counter = Counter()
    damaged: list[str] = []
    caption_words: list[int] = []
    sheet_rows: list[tuple[list[tuple[Any, str]], str]] = []
    for raw in iter_shards(paths, on_error=lambda path, e: damaged.append(f"{Path(path).name}: {e}")):
        try:
            meta = validate_sample(raw)
        except BadSample as e:
            bad[str(e).split(":")[0][:80]] += 1
            continue
        kinds[meta["kind"]] += 1
        if meta["kind"] == "compositional":
            entities[str(len(meta["entities"]))] += 1
        if isinstance(meta.get("caption"), str):
            caption_words.append(len(meta["caption"].split()))
        if sheet is not None and len(sheet_rows) < rows:
            try:
                sheet_rows.append(_row_images(raw, meta))
            except BadSample:
                bad["undecodable image"] += 1
    report = {"shards": len(paths), "samples": sum(kinds.values()), "kinds": dict(sorted(kinds.items())),
              "entities": dict(sorted(entities.items(), key=lambda kv: int(kv[0]))), "bad": sum(bad.values()),
              "damaged_shards": damaged}
    if caption_words:
        report["caption_words"] = {"mean": round(sum(caption_words) / len(caption_words), 2),
                                   "max": max(caption_words)}
    if sheet is not None:
        if not sheet_rows:
            raise ValueError(f"No readable sample in {spec} to draw a contact sheet from.")
        sheet = Path(sheet)
        if sheet.suffix.lower() != ".png":
            raise ValueError(f"--sheet {sheet} must be a .png file name.")
        with atomic_file(sheet) as tmp:
            contact_sheet(sheet_rows).save(tmp, format="PNG")
        report["sheet"] = str(sheet)
    return report
