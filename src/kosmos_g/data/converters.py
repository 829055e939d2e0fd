"""Corpus converters: InstructPix2Pix -> ``edit`` shards, image-caption corpora -> ``caption`` shards.

Both run on :func:`kosmos_g.data.runner.run_chunks`, so they resume, split across machines
(``shard="i/n"``) and log failures exactly like ``compose``.

- :func:`convert_instructpix2pix`: the CLIP-filtered folder release (``seeds.json`` listing
  ``[prompt_folder, [seeds...]]``, each folder with ``prompt.json`` and ``{seed}_0.jpg`` /
  ``{seed}_1.jpg``), or its parquet release (``original_prompt``, ``original_image``,
  ``edit_prompt``, ``edited_prompt``, ``edited_image``). One sample per (prompt, seed); both
  images resized so the shorter side is ``size`` (512), as the release's script does.
- :func:`convert_captions`: img2dataset output (WebDataset tars or parquet with image bytes) or
  TSV/JSONL lists of local paths and captions, with the stage-2 caption filters: empty
  captions, captions over ``max_clip_tokens`` CLIP tokens (75, what the text encoder sees; needs
  a CLIP tokenizer folder) or ``max_words`` words, images whose shorter side is under ``min_side``.

Example:
    >>> convert_instructpix2pix("clip-filtered-dataset/", "shards/edit")        # doctest: +SKIP
    {'samples': 313010, 'failures': {'missing_image': 2}, ...}
    >>> convert_captions("laion-wds/", "shards/caption", max_clip_tokens=75,    # doctest: +SKIP
    ...                  clip_tokenizer="models/sd15/tokenizer")
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from .entities import clean_caption
from .runner import InputItem, decode_bytes, list_images, parse_shard_spec, run_chunks, safe_key

MISSING, UNREADABLE, BAD_PROMPT = "missing_image", "unreadable_image", "bad_prompt"
EMPTY_CAPTION, TOO_LONG, TOO_SMALL = "empty_caption", "caption_too_long", "image_too_small"


def resize_shorter(image, size: int):
    """Resize a PIL image so its shorter side is ``size`` (bicubic); unchanged when it already is."""
    from PIL import Image

    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def _require_pyarrow(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"Reading {path} needs pyarrow; pip install pyarrow (or the 'data' extra).") from e
    return pq


def _image_bytes(value: Any) -> bytes | None:
    """Image bytes from a parquet cell: raw bytes, or a ``{"bytes": ...}`` struct (HF datasets' Image)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


class _ParquetRows:
    """Rows of parquet files read one file at a time (the last file is kept for the next chunk)."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._rows: list[dict] = []

    def row(self, path: str, index: int) -> dict:
        if path != self._path:
            pq = _require_pyarrow(Path(path))
            self._rows, self._path = pq.read_table(path).to_pylist(), path
        return self._rows[index]


def _parquet_items(path: Path, kind: str) -> list[InputItem]:
    pq = _require_pyarrow(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"No .parquet files in folder {path}.")
    items = []
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        stem = safe_key(f.stem)
        items += [InputItem(key=f"{stem}_{i:07d}", source=f"{f.name}:{i}", path=str(f), extra={"row": i, "kind": kind})
                  for i in range(n)]
    return items


# ----------------------------------------------------------------------------- InstructPix2Pix

def list_instructpix2pix(path: str | os.PathLike) -> list[InputItem]:
    """One input per (prompt folder, seed) of the folder release, or per row of the parquet release."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"InstructPix2Pix data not found: {path}")
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return _parquet_items(path, "ip2p")
    if not path.is_dir():
        raise ValueError(f"{path} is neither the InstructPix2Pix folder release nor a .parquet file.")
    seeds_file = path / "seeds.json"
    if seeds_file.is_file():
        try:
            listing = json.loads(seeds_file.read_text(encoding="utf-8"))
            pairs = [(str(name), [int(s) for s in seeds]) for name, seeds in listing]
        except (ValueError, TypeError) as e:
            raise ValueError(f"{seeds_file} is not a list of [prompt_folder, [seeds...]] ({e}).") from e
    else:  # no listing: every prompt folder, the seeds its images name
        pairs = sorted((d.name, sorted(int(p.name.split("_")[0]) for p in d.glob("*_0.jpg")))
                       for d in path.iterdir() if (d / "prompt.json").is_file())
    if not pairs:
        raise FileNotFoundError(f"No prompt folders (with prompt.json) in {path}, and no seeds.json.")
    return [InputItem(key=safe_key(f"{name}_{seed}"), source=f"{name}/{seed}", path=str(path / name),
                      extra={"seed": seed}) for name, seeds in pairs for seed in seeds]


def _ip2p_record(item: InputItem, rows: _ParquetRows) -> tuple[dict[str, Any], Any, Any]:
    """(prompt dict, source bytes, edited bytes) of one input; raises ``LookupError`` / ``ValueError``."""
    if item.extra.get("kind") == "ip2p":
        row = rows.row(item.path, item.extra["row"])
        prompt = {"input": row.get("original_prompt"), "edit": row.get("edit_prompt"),
                  "output": row.get("edited_prompt")}
        src, tgt = _image_bytes(row.get("original_image")), _image_bytes(row.get("edited_image"))
        if src is None or tgt is None:
            raise LookupError("no image bytes in the row")
        return prompt, src, tgt
    folder, seed = Path(item.path), item.extra["seed"]
    try:
        prompt = json.loads((folder / "prompt.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KeyError(f"cannot read {folder.name}/prompt.json ({e})") from e
    images = []
    for i in (0, 1):
        f = folder / f"{seed}_{i}.jpg"
        if not f.is_file():
            raise LookupError(f"{f.name} is missing")
        images.append(f.read_bytes())
    return prompt, images[0], images[1]


def convert_instructpix2pix(path: str | os.PathLike, out_dir: str | os.PathLike, *, size: int = 512,
                            chunk_size: int = 1000, shard: str | tuple[int, int] | None = None,
                            image_format: str = "jpg", progress: bool = True) -> dict:
    """InstructPix2Pix (folder or parquet release) -> ``edit`` shards; returns the manifest."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    parse_shard_spec(shard)
    items = list_instructpix2pix(path)
    rows = _ParquetRows()

    def chunk_fn(chunk: list[InputItem], update) -> tuple[Iterator[dict], list[dict]]:
        failures: list[dict] = []

        def samples() -> Iterator[dict]:
            for item in chunk:
                reason, detail = None, None
                try:
                    prompt, src, tgt = _ip2p_record(item, rows)
                    texts = [prompt.get(k) for k in ("input", "edit", "output")] if isinstance(prompt, dict) else []
                    if len(texts) != 3 or not all(isinstance(t, str) and t.strip() for t in texts):
                        raise KeyError("prompt needs non-empty input, edit and output strings")
                    images = [resize_shorter(decode_bytes(b), size) for b in (src, tgt)]
                except KeyError as e:
                    reason, detail = BAD_PROMPT, str(e).strip("'\"")
                except LookupError as e:
                    reason, detail = MISSING, str(e)
                except (ValueError, OSError) as e:
                    reason, detail = UNREADABLE, str(e)
                if reason:
                    failures.append({"key": item.key, "source": item.source, "reason": reason, "detail": detail})
                    update(1, reasons=[reason])
                    continue
                caption, instruction, target = (clean_caption(t) for t in texts)
                yield {"__key__": item.key,
                       "json": {"kind": "edit", "caption": caption, "instruction": instruction,
                                "target_caption": target, "source": item.source},
                       f"src.{image_format}": images[0], f"tgt.{image_format}": images[1]}
                update(1, kept=1)

        return samples(), failures

    run_info = {"command": "instructpix2pix", "config": {"size": size, "image_format": image_format}}
    return run_chunks(items, out_dir, chunk_fn, chunk_size=chunk_size, prefix="edit", shard=shard,
                      progress=progress, run_info=run_info, desc="instructpix2pix")


# ----------------------------------------------------------------------------- captions

def list_caption_inputs(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputItem]:
    """img2dataset tars or parquet, or TSV/JSONL lists of local paths and captions."""
    if isinstance(spec, (list, tuple)):
        return [it for s in spec for it in list_caption_inputs(s)]
    path = Path(spec)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return _parquet_items(path, "captions")
    return list_images(spec)


def convert_captions(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                     max_clip_tokens: int | None = None, clip_tokenizer: str | os.PathLike | None = None,
                     max_words: int | None = None, min_side: int = 0, chunk_size: int = 1000,
                     shard: str | tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Image-caption pairs -> ``caption`` shards, with the stage-2 caption filters; returns the manifest.

    Images are stored as they come (no re-encoding) once they decode.
    """
    if max_clip_tokens is not None and clip_tokenizer is None:
        raise ValueError("max_clip_tokens needs a CLIP tokenizer folder (--clip-tokenizer DIR, e.g. an SD1.5 "
                         "folder's tokenizer/).")
    for name, value in (("max_clip_tokens", max_clip_tokens), ("max_words", max_words)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if min_side < 0:
        raise ValueError(f"min_side must be >= 0, got {min_side}.")
    parse_shard_spec(shard)
    tokenizer = None
    if clip_tokenizer is not None:
        from transformers import AutoTokenizer

        if not Path(clip_tokenizer).is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder {clip_tokenizer} does not exist.")
        tokenizer = AutoTokenizer.from_pretrained(str(clip_tokenizer))
    items = list_caption_inputs(inputs)
    if not items:
        raise ValueError(f"No image-caption pairs found in {inputs}.")
    rows = _ParquetRows()

    def read(item: InputItem) -> tuple[str | None, bytes]:
        if item.extra.get("kind") == "captions":
            row = rows.row(item.path, item.extra["row"])
            data = next((b for k in ("jpg", "image", "png", "webp") if (b := _image_bytes(row.get(k)))), None)
            if data is None:
                raise LookupError("no image bytes in the row (columns jpg/image/png/webp)")
            caption = row.get("caption", row.get("text"))
            return caption if isinstance(caption, str) else None, data
        return item.caption, item.read_bytes()

    def check(caption: str | None, data: bytes) -> tuple[str | None, str | None]:
        """(failure reason, its detail), or (None, None) for a pair that passes the filters."""
        if not caption:
            return EMPTY_CAPTION, None
        if max_words is not None and len(caption.split()) > max_words:
            return TOO_LONG, f"{len(caption.split())} words > {max_words}"
        if tokenizer is not None:
            n = len(tokenizer(caption, add_special_tokens=False)["input_ids"])
            if n > max_clip_tokens:
                return TOO_LONG, f"{n} CLIP tokens > {max_clip_tokens}"
        image = decode_bytes(data)  # decodes the whole image: a truncated file fails here, not in training
        if min(image.size) < min_side:
            return TOO_SMALL, f"{image.size[0]}x{image.size[1]} < {min_side}"
        return None, None

    def chunk_fn(chunk: list[InputItem], update) -> tuple[Iterator[dict], list[dict]]:
        failures: list[dict] = []

        def samples() -> Iterator[dict]:
            for item in chunk:
                try:
                    caption, data = read(item)
                    caption = clean_caption(caption or "")
                    reason, detail = check(caption, data)
                except LookupError as e:
                    reason, detail = MISSING, str(e)
                except (ValueError, OSError) as e:
                    reason, detail = UNREADABLE, str(e)
                if reason:
                    failures.append({"key": item.key, "source": item.source, "reason": reason,
                                     **({"detail": detail} if detail else {})})
                    update(1, reasons=[reason])
                    continue
                fmt = _format(data)
                if fmt not in ("JPEG", "PNG", "WEBP"):  # e.g. GIF/BMP: stored as PNG, which every reader takes
                    data, fmt = _png_bytes(data), "PNG"
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
                yield {"__key__": item.key, "json": {"kind": "caption", "caption": caption, "source": item.source},
                       ext: data}
                update(1, kept=1)

        return samples(), failures

    run_info = {"command": "captions", "config": {"max_clip_tokens": max_clip_tokens, "max_words": max_words,
                                                  "min_side": min_side}}
    return run_chunks(items, out_dir, chunk_fn, chunk_size=chunk_size, prefix="caption", shard=shard,
                      progress=progress, run_info=run_info, desc="captions")


def _format(data: bytes) -> str | None:
    """PIL's name for the format of image bytes that already decoded once."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.format


def _png_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    decode_bytes(data).save(buf, format="PNG")
    return buf.getvalue()
