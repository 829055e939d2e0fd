"""WebDataset tar shards: write them, list them, stream their samples, validate them.

The schema (which members each sample ``kind`` has) is ``docs/data-format.md``. A shard
is a plain POSIX tar whose members are named ``<key>.<ext>``; consecutive members with
the same key form one sample, exactly as ``webdataset`` groups them, so shards written
here are read by ``webdataset.WebDataset`` too, and any WebDataset shard that follows
the schema is read here.

Reading is deliberately dumb and total: :func:`iter_shard` yields raw samples (member
name -> bytes) and reports a damaged tar through a callback instead of raising, and
:func:`validate_sample` raises :class:`BadSample` (a ``ValueError``) naming what is
wrong. The training streams count and skip such samples; nothing here decodes images
eagerly.

Example:
    >>> import numpy as np, tempfile
    >>> from kosmos_g.data.shards import ShardWriter, iter_shard, validate_sample
    >>> out = tempfile.mkdtemp()
    >>> with ShardWriter(out, max_samples=2) as w:
    ...     for i in range(3):
    ...         _ = w.write({"json": {"kind": "caption", "caption": "a red dot"},
    ...                      "png": np.zeros((8, 8, 3), np.uint8)})
    >>> [p.name for p in w.shards]
    ['shard-000000.tar', 'shard-000001.tar']
    >>> raw = next(iter_shard(w.shards[0]))
    >>> raw["__key__"], sorted(k for k in raw if not k.startswith("__"))
    ('000000000', ['json', 'png'])
    >>> validate_sample(raw)["caption"]
    'a red dot'
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..fileio import atomic_file

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
KINDS = ("caption", "text", "interleaved", "edit", "compositional")

# tar members get a fixed mtime so that writing the same samples twice gives the same bytes.
_MTIME = 0


class BadSample(ValueError):
    """A sample that does not follow ``docs/data-format.md`` (missing member, bad json...)."""


# ----------------------------------------------------------------------------- writing

def encode_member(name: str, value: Any) -> bytes:
    """Serialise one member value according to its extension.

    ``bytes`` pass through; ``str`` is UTF-8; ``json`` members take any JSON value;
    image members (``png``/``jpg``/``jpeg``/``webp``) take a PIL image or an (H, W, 3)
    / (H, W) uint8 array.
    """
    ext = name.rsplit(".", 1)[-1].lower()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if ext == "json":
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext in IMAGE_EXTENSIONS:
        from PIL import Image

        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8 or value.ndim not in (2, 3):
                raise ValueError(f"Member {name!r}: arrays must be uint8 HxW or HxWx3, got "
                                 f"{value.dtype} {value.shape}.")
            value = Image.fromarray(value)
        if not isinstance(value, Image.Image):
            raise ValueError(f"Member {name!r}: expected a PIL image or uint8 array, got {type(value).__name__}.")
        buf = io.BytesIO()
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[ext]
        if fmt == "JPEG" and value.mode not in ("RGB", "L"):
            value = value.convert("RGB")
        value.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()
    raise ValueError(
        f"Member {name!r}: cannot encode a {type(value).__name__}; pass bytes, str, a JSON value "
        "for 'json', or an image for png/jpg."
    )


class ShardWriter:
    """Write samples into numbered tar shards, each published atomically.

    A shard is written to a hidden temporary beside it (:func:`kosmos_g.fileio.atomic_file`)
    and renamed to ``<prefix>-NNNNNN.tar`` only when it is complete, so a crashed writer
    never leaves a half shard that looks whole: an error inside the ``with`` block removes
    the unfinished shard and keeps the complete ones. A new shard starts after
    ``max_samples`` samples or once the current one exceeds ``max_bytes``. Existing shards of
    the same prefix numbered ``start_index`` or more are refused before anything is written
    (``ValueError``), as they could be replaced.

    Args:
        directory: where the shards go (created if needed).
        prefix: shard file name prefix.
        max_samples: samples per shard.
        max_bytes: optional size cap per shard (a sample is never split).
        start_index: number of the first shard (to append to an existing set).
        overwrite: replace existing shards of the same names (others of the set stay).

    Example:
        >>> with ShardWriter("shards/captions", max_samples=1000) as w:  # doctest: +SKIP
        ...     w.write({"json": {"kind": "caption", "caption": c}, "jpg": img}, key=f"{i:08d}")
    """

    def __init__(self, directory: str | os.PathLike, *, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int | None = None, start_index: int = 0, overwrite: bool = False) -> None:
        if max_samples <= 0:
            raise ValueError(f"max_samples must be > 0, got {max_samples}.")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"prefix must be a plain name without '/' or '.', got {prefix!r}.")
        if not overwrite:
            _refuse_existing_shards(Path(directory), prefix, start_index)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.index = start_index
        self.shards: list[Path] = []
        self.total = 0
        self._tar: tarfile.TarFile | None = None
        self._shard: Path | None = None
        self._publish = contextlib.ExitStack()  # the open shard's atomic_file: exiting it publishes
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._publish.__exit__(exc_type, exc, tb)  # removes the unfinished shard, never publishes it

    # ------------------------------------------------------------------ writing
    def write(self, sample: Mapping[str, Any], key: str | None = None) -> str:
        """Add one sample (member name -> value); returns its key.

        The key is ``key``, else ``sample["__key__"]``, else a running number. Keys may
        not contain '.', since WebDataset splits member names at the first dot.
        """
        key = key if key is not None else sample.get("__key__")
        key = f"{self.total:09d}" if key is None else str(key)
        if not key or "." in key.rsplit("/", 1)[-1] or key.startswith("/"):
            raise ValueError(f"Invalid sample key {key!r}: it must be non-empty, relative and contain no '.'.")
        members = {name: value for name, value in sample.items() if not name.startswith("__")}
        if not members:
            raise ValueError(f"Sample {key!r} has no members.")
        if self._tar is None or self._count >= self.max_samples or (
                self.max_bytes is not None and self._bytes >= self.max_bytes):
            self._next_shard()
        if key in self._keys:
            raise ValueError(f"Duplicate key {key!r} in shard {self._shard}; keys must be unique per shard.")
        self._keys.add(key)
        for name, value in members.items():
            data = encode_member(name, value)
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._count += 1
        self.total += 1
        return key

    def _next_shard(self) -> None:
        self._finish()
        self._shard = self.directory / f"{self.prefix}-{self.index:06d}.tar"
        self.index += 1
        tmp = self._publish.enter_context(atomic_file(self._shard))
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count, self._bytes, self._keys = 0, 0, set()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._publish.close()  # renames the temporary to the shard
        self.shards.append(self._shard)
        self._tar = None

    def close(self) -> list[Path]:
        """Publish the last shard; returns every shard written."""
        self._finish()
        return self.shards


def _refuse_existing_shards(directory: Path, prefix: str, start_index: int) -> None:
    """Raise ``ValueError`` if ``directory`` holds shards ``<prefix>-NNNNNN.tar`` numbered from
    ``start_index`` on, which a writer starting there would replace."""
    if not directory.is_dir():
        return
    numbers = sorted(int(m.group(1)) for p in directory.iterdir()
                     if (m := re.fullmatch(rf"{re.escape(prefix)}-(\d{{6,}})\.tar", p.name)))
    taken = [n for n in numbers if n >= start_index]
    if taken:
        raise ValueError(f"{directory} already holds {prefix}-{taken[0]:06d}.tar; write to another folder, add "
                         f"to the set with start_index={numbers[-1] + 1}, or pass overwrite=True to replace it.")


# ----------------------------------------------------------------------------- listing

def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..003}.tar`` / ``{a,b}.tar`` -> the explicit names (braceexpand's rules, nested)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in _expand_braces(head + item + tail)]


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder, a glob, a brace pattern (``x-{000..009}.tar``) or a list.

    A folder means every ``*.tar`` in it (sorted). Half-written shards (hidden
    ``.NAME.tar.tmp-*`` temporaries) are never listed. Raises ``FileNotFoundError`` when a spec matches nothing.

    Example:
        >>> expand_shards("data/caps-{000..001}.tar")  # doctest: +SKIP
        ['data/caps-000.tar', 'data/caps-001.tar']
    """
    if isinstance(spec, (list, tuple)):
        return [p for item in spec for p in expand_shards(item)]
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not found:
            raise FileNotFoundError(f"No *.tar shards in folder {spec}.")
        return found
    out: list[str] = []
    for name in _expand_braces(spec):
        if any(c in name for c in "*?["):
            matches = sorted(glob.glob(name))
            if not matches:
                raise FileNotFoundError(f"No shards match {name!r}.")
            out += matches
        elif os.path.isfile(name):
            out.append(name)
        else:
            raise FileNotFoundError(f"Shard not found: {name}")
    return out


# ----------------------------------------------------------------------------- reading

def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``dir/abc.0.png`` -> (``dir/abc``, ``0.png``): WebDataset's key/extension rule."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def iter_shard(path: str | os.PathLike, on_error: Callable[[str, Exception], None] | None = None,
               ) -> Iterator[dict[str, Any]]:
    """Stream the raw samples of one shard: ``{"__key__", "__url__", ext: bytes, ...}``.

    A shard that cannot be opened or is truncated stops early; ``on_error(path, exc)``
    is called (or the error raised when no callback is given). Members whose names have
    no extension are ignored, like WebDataset does.
    """
    path = str(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r|*") as tar:  # streaming mode: no seeks, works on pipes
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current  # complete: the next sample has begun
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": path}
                current[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # A member read in part is dropped with the damaged tail; complete samples before
        # the damage were already yielded.
        current = None
        if on_error is None:
            raise
        on_error(path, e)
    if current is not None:
        yield current


def iter_shards(paths: Iterable[str | os.PathLike],
                on_error: Callable[[str, Exception], None] | None = None) -> Iterator[dict[str, Any]]:
    """:func:`iter_shard` over several shards in order."""
    for path in paths:
        yield from iter_shard(path, on_error)


# ----------------------------------------------------------------------------- validation

def image_member(raw: Mapping[str, Any], stem: str = "") -> str | None:
    """Name of the image member ``<stem>.png`` / ``.jpg`` / ... (``png``... when stem is ''), or None."""
    for ext in IMAGE_EXTENSIONS:
        name = f"{stem}.{ext}" if stem else ext
        if name in raw:
            return name
    return None


def _require_image(raw: Mapping[str, Any], stem: str, kind: str) -> None:
    if image_member(raw, stem) is None:
        label = f"{stem}.png" if stem else "png"
        raise BadSample(f"{kind} sample {raw.get('__key__')!r} has no {label} (or jpg) member.")


def _require_str(meta: Mapping[str, Any], field: str, kind: str, key: Any) -> str:
    value = meta.get(field)
    if not isinstance(value, str):
        raise BadSample(f"{kind} sample {key!r}: json field {field!r} must be a string, got {value!r}.")
    return value


def validate_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Parse and check a raw sample's ``json`` against its kind; returns the parsed json.

    Raises :class:`BadSample` naming the key and the problem. Images are only checked
    for presence here; decoding them is the consumer's job (and may fail later).
    """
    key = raw.get("__key__")
    if "json" not in raw:
        raise BadSample(f"Sample {key!r} has no json member.")
    try:
        meta = json.loads(raw["json"].decode("utf-8") if isinstance(raw["json"], bytes) else raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"Sample {key!r}: json member is not valid JSON ({e}).") from e
    if not isinstance(meta, dict):
        raise BadSample(f"Sample {key!r}: json member must be an object, got {type(meta).__name__}.")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise BadSample(f"Sample {key!r}: unknown kind {kind!r}; expected one of {list(KINDS)}.")
    if kind == "caption":
        _require_str(meta, "caption", kind, key)
        _require_image(raw, "", kind)
    elif kind == "text":
        _require_str(meta, "text", kind, key)
    elif kind == "interleaved":
        segments = meta.get("segments")
        if not isinstance(segments, list) or not segments:
            raise BadSample(f"interleaved sample {key!r}: 'segments' must be a non-empty list.")
        for seg in segments:
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                continue
            if isinstance(seg, dict) and isinstance(seg.get("image"), int) and not isinstance(seg["image"], bool):
                _require_image(raw, str(seg["image"]), kind)
                continue
            raise BadSample(f"interleaved sample {key!r}: bad segment {seg!r}; use {{'text': str}} "
                            "or {'image': int}.")
    elif kind == "edit":
        _require_str(meta, "caption", kind, key)
        _require_str(meta, "instruction", kind, key)
        if "target_caption" in meta:
            _require_str(meta, "target_caption", kind, key)
        _require_image(raw, "src", kind)
        _require_image(raw, "tgt", kind)
    elif kind == "compositional":
        caption = _require_str(meta, "caption", kind, key)
        entities = meta.get("entities")
        if not isinstance(entities, list):
            raise BadSample(f"compositional sample {key!r}: 'entities' must be a list.")
        _require_image(raw, "tgt", kind)
        for i, ent in enumerate(entities):
            ok = (isinstance(ent, dict) and isinstance(ent.get("start"), int) and isinstance(ent.get("end"), int)
                  and 0 <= ent["start"] < ent["end"] <= len(caption))
            if not ok:
                raise BadSample(f"compositional sample {key!r}: entity {i} {ent!r} needs 0 <= start < end "
                                f"<= len(caption)={len(caption)}.")
            _require_image(raw, f"e{i}_square", kind)
            _require_image(raw, f"e{i}_white", kind)
    return meta


@contextlib.contextmanager
def _open_image(raw: Mapping[str, Any], stem: str):
    """The image member ``<stem>.png``/``.jpg`` opened lazily by PIL; any failure to read it
    (missing, undecodable) is a :class:`BadSample`."""
    from PIL import Image, UnidentifiedImageError

    name = image_member(raw, stem)
    if name is None:
        raise BadSample(f"Sample {raw.get('__key__')!r} has no {stem or 'png'} image member.")
    try:
        with Image.open(io.BytesIO(raw[name])) as im:
            yield im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample(f"Sample {raw.get('__key__')!r}: cannot decode {name} ({e}).") from e


def decode_image(raw: Mapping[str, Any], stem: str = "", *, mask: bool = False):
    """Decode the image member ``<stem>.png``/``.jpg`` of a raw sample to an RGB PIL image
    (``mask=True``: a single-channel ``L`` image, e.g. a target's foreground mask).

    Raises :class:`BadSample` when the member is missing or cannot be decoded.
    """
    from ..processing import to_rgb

    with _open_image(raw, stem) as im:
        im.load()
        if mask:
            return im.convert("L")
        return to_rgb(im.copy() if im.mode != "P" else im.convert("RGBA"))


def image_size(raw: Mapping[str, Any], stem: str = "") -> tuple[int, int]:
    """(width, height) of an image member, read from its header without decoding the pixels."""
    with _open_image(raw, stem) as im:
        return im.size
