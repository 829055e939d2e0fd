"""Resumable, sharded runs that turn a list of inputs into WebDataset shards.

Every data command (``compose``, ``instructpix2pix``, ``captions``) lists its inputs in a
fixed order, cuts the list into chunks of ``chunk_size`` and turns chunk ``j`` into exactly
one output shard ``<prefix>-{j:06d}.tar`` (absent when the chunk kept nothing). Finishing a
chunk means three atomic steps: the shard is published (:class:`ShardWriter`), then a record
``_chunks/{j:06d}.json`` with its keys, failures and counts, then ``manifest.json`` and
``failures.jsonl`` are rewritten from all records. A chunk is done when its record exists:

- a re-run skips done chunks and redoes the others from scratch (a shard published
  without its record is replaced), so a killed run resumed gives the same samples as an
  uninterrupted one, none duplicated, none lost;
- ``shard=(i, n)`` runs chunks ``j % n == i`` only, so ``n`` machines sharing one output
  folder split the work with no coordination and name the same shards one machine would;
- a sample that cannot be made (unreadable image, no entity...) is a failure with a reason,
  logged in ``failures.jsonl`` and counted in the manifest, never fatal.

Example:
    >>> import tempfile
    >>> items = [InputItem(key=f"k{i}", source=f"s{i}") for i in range(5)]
    >>> def chunk_fn(chunk, progress):
    ...     return ([{"__key__": it.key, "json": {"kind": "text", "text": it.key}} for it in chunk[:-1]],
    ...             [{"key": chunk[-1].key, "reason": "example"}])
    >>> out = tempfile.mkdtemp()
    >>> m = run_chunks(items, out, chunk_fn, chunk_size=2, prefix="t", progress=False)
    >>> m["samples"], m["failures"], len(m["shards"])
    (2, {'example': 3}, 2)
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..fileio import atomic_write_text
from .shards import IMAGE_EXTENSIONS, ShardWriter, split_member_name

RECORDS = "_chunks"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"


@dataclass(frozen=True)
class InputItem:
    """One input: its output key, where it comes from, and how to read it.

    ``path`` is an image file, or with ``offset``/``size`` a member of the tar ``path``;
    ``caption`` is the source's own caption when it has one; ``extra`` holds what a converter
    needs (e.g. a second image).
    """

    key: str
    source: str
    path: str | None = None
    offset: int | None = None
    size: int | None = None
    caption: str | None = None
    extra: dict = field(default_factory=dict)

    def read_bytes(self) -> bytes:
        """The image bytes (from the file, or the tar member at ``offset``)."""
        if self.path is None:
            raise ValueError(f"Input {self.source!r} has no image path.")
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def parse_shard_spec(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1).

    Example:
        >>> parse_shard_spec("2/8")
        (2, 8)
    """
    if spec is None:
        return 0, 1
    if isinstance(spec, tuple):
        i, n = spec
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise ValueError(f"--shard {spec!r} is not 'i/n'; use e.g. 0/4 for the first of 4 machines.")
        i, n = int(m.group(1)), int(m.group(2))
    if not 0 <= i < n:
        raise ValueError(f"--shard {i}/{n}: need 0 <= i < n (machines are numbered from 0).")
    return i, n


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one sample from the run's seed and the sample's key: the same sample gets
    the same random choices whatever the batching, engine or machine split."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def safe_key(text: str) -> str:
    """A WebDataset key from a path-like name: anything but letters, digits, '-' and '_' becomes '_'.

    Example:
        >>> safe_key("photos/2021/dog.1.jpg")
        'photos_2021_dog_1_jpg'
    """
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return key or "x"


def unique_keys(items: list[InputItem]) -> list[InputItem]:
    """Items whose keys are unique: a repeated key gets ``_2``, ``_3``... in listing order."""
    seen: Counter = Counter()
    out = []
    for it in items:
        seen[it.key] += 1
        if seen[it.key] > 1:
            it = InputItem(**{**asdict(it), "key": f"{it.key}_{seen[it.key]}"})
        out.append(it)
    return out


# ----------------------------------------------------------------------------- listing inputs

def _image_files(folder: Path) -> list[Path]:
    exts = {f".{e}" for e in IMAGE_EXTENSIONS}
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                  key=lambda p: p.relative_to(folder).as_posix())


def _sidecar_caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None


def list_tar(path: str | os.PathLike) -> list[InputItem]:
    """The image samples of one WebDataset tar (as img2dataset writes: ``KEY.jpg`` + ``KEY.txt`` /
    ``KEY.json``), read from the headers and the small text members only."""
    path = str(path)
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            if key is None:
                continue
            if key not in groups:
                groups[key] = {}
                order.append(key)
            g = groups[key]
            if ext in IMAGE_EXTENSIONS and "image" not in g:
                g["image"] = (info.offset_data, info.size)
            elif ext == "txt":
                g["caption"] = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
            elif ext == "json" and "caption" not in g:
                try:
                    meta = json.loads(tar.extractfile(info).read())
                    if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                        g["caption"] = meta["caption"].strip()
                except (ValueError, UnicodeDecodeError):
                    pass
    stem = safe_key(Path(path).name.rsplit(".tar", 1)[0])
    items = []
    for key in order:
        g = groups[key]
        if "image" in g:
            offset, size = g["image"]
            items.append(InputItem(key=f"{stem}_{safe_key(key)}", source=f"{path}:{key}", path=path,
                                   offset=offset, size=size, caption=g.get("caption")))
    return items


def _list_file(path: Path) -> list[InputItem]:
    """A list file: ``.jsonl`` rows ``{"image"|"path": ..., "caption"|"text": ...}``, or lines
    ``PATH`` / ``PATH<TAB>CAPTION`` (``.txt``/``.tsv``). Relative paths are relative to the file."""
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); write one object per line.") from e
            image = row.get("image", row.get("path")) if isinstance(row, dict) else None
            caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(image, str):
                raise ValueError(f"{path}:{n} has no \"image\" (or \"path\") string; write "
                                 '{"image": "a.jpg", "caption": "..."}.')
        else:
            image, _, caption = line.partition("\t")
            image, caption = image.strip(), caption.strip() or None
        full = Path(image) if Path(image).is_absolute() else path.parent / image
        items.append(InputItem(key=safe_key(Path(image).with_suffix("").as_posix()), source=image, path=str(full),
                               caption=caption))
    return items


def list_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputItem]:
    """Inputs in a fixed order from a folder tree of images (``NAME.txt`` beside an image is its
    caption), a list file (``.txt``/``.tsv``/``.jsonl``), WebDataset tars (a ``.tar``, a folder
    holding only tars, a glob or ``{000..009}`` pattern), or a list of these.

    Example:
        >>> list_images("photos/")  # doctest: +SKIP
        [InputItem(key='beach_dog', source='beach/dog.jpg', path='photos/beach/dog.jpg', ...), ...]
    """
    from .shards import expand_shards

    if isinstance(spec, (list, tuple)):
        return unique_keys([it for s in spec for it in list_images(s)])
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_dir():
        images = _image_files(path)
        if images:
            return unique_keys([InputItem(key=safe_key(p.relative_to(path).with_suffix("").as_posix()),
                                          source=p.relative_to(path).as_posix(), path=str(p),
                                          caption=_sidecar_caption(p)) for p in images])
        if not glob.glob(os.path.join(glob.escape(text), "*.tar")):
            raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards in folder {path}.")
    elif path.is_file() and path.suffix.lower() in (".txt", ".tsv", ".jsonl"):
        return unique_keys(_list_file(path))
    elif path.is_file() and path.suffix.lower() != ".tar":
        raise ValueError(f"Input {path} is neither a folder, a .tar, nor a list file (.txt, .tsv, .jsonl).")
    elif not path.exists() and not any(c in text for c in "*?[{"):
        raise FileNotFoundError(f"Input not found: {path}")
    return unique_keys([it for tar in expand_shards(text) for it in list_tar(tar)])


# ----------------------------------------------------------------------------- running chunks

ChunkFn = Callable[[list[InputItem], Callable[..., None]], tuple[Iterable[dict], list[dict]]]


def _record_path(out: Path, j: int) -> Path:
    return out / RECORDS / f"{j:06d}.json"


def done_chunks(out_dir: str | os.PathLike) -> set[int]:
    """The chunk numbers whose record exists in ``out_dir``."""
    folder = Path(out_dir) / RECORDS
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if re.fullmatch(r"\d{6,}", p.stem)}


def _check_run(out: Path, run_info: dict) -> None:
    """Refuse to resume into a folder made with other settings (another chunk size, other inputs)."""
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("run", {})
    except json.JSONDecodeError:
        return
    for name in ("command", "chunk_size", "inputs", "prefix", "config"):
        if name in old and old[name] != run_info.get(name):
            if name == "config" and isinstance(old[name], dict):
                new = run_info.get(name) or {}
                diff = sorted(k for k in set(old[name]) | set(new) if old[name].get(k) != new.get(k))
                raise ValueError(f"{out} holds a run made with other settings ({', '.join(diff)}); resume with the "
                                 "same settings or write to another folder.")
            raise ValueError(f"{out} holds a run with {name}={old[name]!r}, not {run_info.get(name)!r}; resume with "
                             "the same settings or write to another folder.")


def write_manifest(out_dir: str | os.PathLike, run_info: dict | None = None) -> dict:
    """Rebuild ``manifest.json`` and ``failures.jsonl`` from the chunk records (atomic); returns the manifest."""
    out = Path(out_dir)
    records = []
    for j in sorted(done_chunks(out)):
        records.append(json.loads(_record_path(out, j).read_text(encoding="utf-8")))
    if run_info is None and (out / MANIFEST).is_file():
        run_info = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("run", {})
    failures: Counter = Counter()
    lines = []
    for rec in records:
        for f in rec["failures"]:
            failures[f["reason"]] += 1
            lines.append(json.dumps({"chunk": rec["chunk"], **f}, ensure_ascii=False))
    manifest = {
        "run": run_info or {},
        "chunks_done": len(records),
        "chunks_total": (run_info or {}).get("chunks"),
        "samples": sum(len(r["keys"]) for r in records),
        "failures": dict(sorted(failures.items())),
        "shards": [{"name": r["shard"], "samples": len(r["keys"])} for r in records if r["shard"]],
    }
    atomic_write_text(out / FAILURES, "".join(line + "\n" for line in lines))
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def plan_chunks(items: Sequence[InputItem], out_dir: str | os.PathLike, *, chunk_size: int, prefix: str,
                shard: str | tuple[int, int] | None, run_info: dict | None,
                ) -> tuple[list[list[InputItem]], list[int], dict]:
    """(all chunks, the numbers of those this machine owns and has not finished, the full run info);
    refuses a folder holding a run made with other settings."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    i, n = parse_shard_spec(shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [list(items[s:s + chunk_size]) for s in range(0, len(items), chunk_size)]
    run_info = {**(run_info or {}), "chunk_size": chunk_size, "prefix": prefix, "inputs": len(items),
                "chunks": len(chunks)}
    _check_run(out, run_info)
    done = done_chunks(out)
    return chunks, [j for j in range(len(chunks)) if j % n == i and j not in done], run_info


def finish_chunk(out_dir: str | os.PathLike, j: int, *, prefix: str, chunk_size: int, samples: Iterable[dict],
                 failures: list[dict], run_info: dict) -> list[str]:
    """Write chunk ``j``'s samples as shard ``<prefix>-{j:06d}.tar``, then its record, then the manifest.

    ``failures`` may be filled while ``samples`` is consumed (a generator); it is read afterwards.
    Returns the keys written.
    """
    out = Path(out_dir)
    name = f"{prefix}-{j:06d}.tar"
    (out / name).unlink(missing_ok=True)  # published by a run killed before its record: redo
    keys: list[str] = []
    with ShardWriter(out, prefix=prefix, max_samples=chunk_size, start_index=j, overwrite=True) as writer:
        for sample in samples:
            keys.append(writer.write(sample))
    if writer.shards and writer.shards[0].name != name:
        raise RuntimeError(f"chunk {j} wrote {writer.shards[0].name}, expected {name}")
    record = {"chunk": j, "shard": name if keys else None, "keys": keys, "failures": failures}
    atomic_write_text(_record_path(out, j), json.dumps(record, ensure_ascii=False))
    write_manifest(out, run_info)
    return keys


class Progress:
    """A tqdm bar over inputs with the kept count and the dropped counts by reason in its postfix."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.counts: Counter = Counter()
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)

    def update(self, k: int = 1, *, kept: int = 0, reasons: Iterable[str] = ()) -> None:
        self.counts["kept"] += kept
        for r in reasons:
            self.counts[r] += 1
        self.bar.update(k)
        self.bar.set_postfix(self.counts, refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_chunks(items: Sequence[InputItem], out_dir: str | os.PathLike, chunk_fn: ChunkFn, *, chunk_size: int = 1000,
               prefix: str = "shard", shard: str | tuple[int, int] | None = None, progress: bool = True,
               run_info: dict | None = None, desc: str = "samples") -> dict:
    """Run ``chunk_fn`` on every chunk of ``items`` this machine owns and is not done; returns the manifest.

    ``chunk_fn(chunk, update)`` returns (samples for :class:`ShardWriter`, failures as
    ``{"key", "source", "reason", ...}`` dicts); it calls ``update(n, kept=..., reasons=...)`` as it
    goes to move the progress bar. The samples may be a generator that fills the failure list as it
    runs: the list is read once the samples are written.
    """
    chunks, todo, run_info = plan_chunks(items, out_dir, chunk_size=chunk_size, prefix=prefix, shard=shard,
                                         run_info=run_info)
    bar = Progress(sum(len(chunks[j]) for j in todo), desc, progress)
    try:
        for j in todo:
            samples, failures = chunk_fn(chunks[j], bar.update)
            finish_chunk(out_dir, j, prefix=prefix, chunk_size=chunk_size, samples=samples, failures=failures,
                         run_info=run_info)
    finally:
        bar.close()
    return write_manifest(out_dir, run_info)


def read_failures(out_dir: str | os.PathLike) -> list[dict]:
    """The failure log of a run folder, one dict per failed sample."""
    path = Path(out_dir) / FAILURES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def decode_bytes(data: bytes):
    """Bytes -> an RGB PIL image (EXIF-rotated, alpha over white); ``ValueError`` when they do not decode
    or their header claims more than :data:`kosmos_g.processing.MAX_IMAGE_PIXELS` pixels."""
    from PIL import Image, UnidentifiedImageError

    from ..processing import MAX_IMAGE_PIXELS, to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # from the header: refused before decoding
                raise ValueError(f"{im.width}x{im.height} is over the {MAX_IMAGE_PIXELS:,}-pixel limit")
            im.load()
            return to_rgb(im.copy() if im.mode != "P" else im.convert("RGBA"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "data", str(e))  # no addresses: logs compare
        raise ValueError(f"cannot decode image ({detail})") from e
