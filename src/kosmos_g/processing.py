"""Turn interleaved text+image prompts into model inputs.

A prompt is either a string with ``<i>`` placeholders plus an ordered image list,
``("<i> wearing <i>", ["dog.png", hat])``, or a Python list mixing text and images,
``["A photo of", Path("dog.png"), "on the beach"]``. In the list form every ``str`` is
text and the images are PIL images, numpy arrays and ``pathlib.Path`` (any
``os.PathLike``); a list is one prompt when it holds an image, and a batch of prompts
when it holds only ``str`` and lists (:func:`is_single_prompt`). Each image becomes
``<image>``, N slots and ``</image>`` (N = 64 for the official model); the slots hold
the ``<image>`` id and are overwritten by the resampler's output inside the model.
Every sequence starts with ``<s>`` and has no ``</s>``, exactly like the official demo.

Batches are right-padded; positions, attention and AlignerNet ignore padding, so a
prompt's condition does not depend on what else is in its batch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD, KosmosGConfig
from .tokenizer import FairseqTokenizer, HFTokenizer, load_tokenizer

PLACEHOLDER = "<i>"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_DIR = "tokenizer"

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]
"""An image where only an image can stand (``prompt_images``, ``load_image``): a ``str`` is a path."""
Segment = Union[str, Image.Image, os.PathLike, np.ndarray]
"""A piece of a list prompt: a ``str`` is text; a PIL image, numpy array or ``os.PathLike`` an image."""
Prompt = Union[str, Sequence[Segment]]

# A str prompt or text segment that is just a file name with one of these is refused:
# it was meant as an image, and read as text it would silently become words or a prompt.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

MAX_IMAGE_PIXELS = 40_000_000
"""Image files above this many pixels (40 megapixels, e.g. 8000x5000) are refused from their
header, before any decoding. A prompt image is shrunk to 224 px anyway, while loading one
raises peak memory by about 15 bytes a pixel (1.5 GB for 100 megapixels); PIL's own guard
only warns from 89 megapixels and fails with a traceback from 179."""


# ----------------------------------------------------------------------------- images

def _open_image(path: Path) -> Image.Image:
    """``Image.open`` (which reads the header only), refusing images above
    :data:`MAX_IMAGE_PIXELS` before their pixels are decoded."""
    if not path.exists():
        raise ValueError(f"Image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"Image {path} is a directory, not an image file.")
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: refused below, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        _refuse_size(path, _header_size(path))
        raise  # not reached: PIL refuses only images far above our limit
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"Cannot read image file {path}: {e}. Is it a complete PNG/JPEG?") from e
    try:
        _refuse_size(path, im.size)
    except ValueError:
        im.close()
        raise
    return im


def _refuse_size(path: Path, size: tuple[int, int] | None) -> None:
    width, height = size or (0, 0)
    if size is None or width * height > MAX_IMAGE_PIXELS:
        shape = f"{width}x{height} ({width * height:,} pixels)" if size else "too large"
        raise ValueError(f"Image {path} is {shape}; image files above {MAX_IMAGE_PIXELS:,} pixels "
                         f"({MAX_IMAGE_PIXELS / 1e6:g} megapixels, kosmos_g.processing.MAX_IMAGE_PIXELS) "
                         "are refused. Downscale it first.")


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header of an image PIL refuses to open (its decompression-bomb
    limit), read by the format's plugin as ``Image.open`` does, without that check."""
    Image.init()
    with open(path, "rb") as f:
        prefix = f.read(16)
        for name in Image.ID:
            factory, accept = Image.OPEN[name]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
            f.seek(0)
            try:
                return tuple(factory(f, str(path)).size)
            except Exception:  # not this format after all; PIL tries the next one too
                continue
    return None


def check_image_file(path: str | os.PathLike) -> tuple[int, int]:
    """The (width, height) of an image file, read from its header without decoding; raises
    ``ValueError`` naming the file if it is missing, a folder, unreadable or above
    :data:`MAX_IMAGE_PIXELS`.

    Example:
        >>> check_image_file(Path(__file__).parent / "assets" / "examples" / "dog.png")
        (128, 128)
    """
    path = Path(path)
    with _open_image(path) as im:
        return im.size


def load_image(image: ImageLike) -> Image.Image:
    """Open a path (or pass through a PIL image / HWC uint8 array) as an RGB PIL image.

    Honours EXIF orientation; composites transparency onto white; converts palette,
    grayscale and 16-bit images. Missing, unreadable or truncated files, and files above
    :data:`MAX_IMAGE_PIXELS` (checked from the header, before decoding), raise
    ``ValueError`` naming the file. Images already in memory are not size-checked.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        with _open_image(path) as im:
            try:
                im.load()  # decode now so truncation is caught here, with the name
                image = im.copy() if im.mode != "P" else im.convert("RGBA")
            except (OSError, SyntaxError) as e:
                raise ValueError(f"Cannot read image file {path}: {e}. Is it a complete PNG/JPEG?") from e
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"Array images must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}.")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"Expected a PIL image, a path or a uint8 array, got {type(image).__name__}.")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (EXIF-rotated; alpha over white; 16-bit scaled to 8-bit)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def preprocess_image(image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), center-crop, normalise: (3, size, size).

    Matches the official torchvision ``Resize(size, BICUBIC) + CenterCrop(size)``.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


# ----------------------------------------------------------------------------- prompts

def is_image(segment: object) -> bool:
    """Whether a list-prompt segment is an image: a PIL image, a numpy array or an ``os.PathLike``
    such as ``pathlib.Path``. A ``str`` is never an image there: it is text."""
    return isinstance(segment, (Image.Image, np.ndarray, os.PathLike))


def is_single_prompt(prompt: object) -> bool:
    """Whether ``prompt`` is one prompt rather than a batch: a ``str``, or a list (tuple) holding
    an image (or anything else but ``str`` and lists, which :func:`split_prompt` then refuses).
    A list of only ``str`` and lists is a batch, each element one prompt.

    Example:
        >>> is_single_prompt(["A photo of", Path("dog.png"), "on the beach"]), is_single_prompt(["a", "b"])
        (True, False)
    """
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(
            f"A prompt is a str (with '{PLACEHOLDER}' for its images) or a list of text and images, "
            f"got {type(prompt).__name__}; for an image alone pass [image]."
        )
    return any(not isinstance(p, (str, list, tuple)) for p in prompt)


def _looks_like_image_file(text: str) -> bool:
    """A bare file name with an image suffix: meant as an image, though a str is always text."""
    text = text.strip()
    return bool(text) and not any(c.isspace() for c in text) and text.lower().endswith(IMAGE_SUFFIXES)


def _refuse_image_file_name(text: str) -> None:
    if _looks_like_image_file(text):
        raise ValueError(
            f"{text!r} looks like an image file, but a str in a prompt is always text (and a list of "
            f"only str is a batch of text prompts): put '{PLACEHOLDER}' in the text and give the image for it "
            f"(prompt_images=, or -i on the command line), or in a list prompt pass Path({text!r})."
        )


def split_prompt(prompt: Prompt, images: Sequence[ImageLike] | None = None, *,
                 literal_text: bool = False) -> list[Segment]:
    """Normalise either prompt form to an ordered list of text and image segments.

    In a list prompt every ``str`` is text and every PIL image, numpy array and
    ``pathlib.Path`` an image (:func:`is_image`); anything else, a nested list included, is
    refused. It places its images itself, so a ``<i>`` inside one of its strings is most
    likely a forgotten placeholder and raises. So does text that is just an image file name
    (``"dog.png"``), meant as an image but read as words. With ``literal_text=True``
    (training data, whose captions may hold HTML italics or file names) such text is kept.

    Image paths given as ``str`` in ``images`` become :class:`~pathlib.Path` segments, so
    that every ``str`` segment is text and every other segment an image. One image for a
    one-placeholder prompt may be given without a list.

    Example:
        >>> split_prompt("<i> wearing <i>", ["dog.png", "hat.png"])
        ['', PosixPath('dog.png'), ' wearing ', PosixPath('hat.png'), '']
    """
    if isinstance(prompt, str):
        if images is None:
            images = []
        elif isinstance(images, str) or is_image(images):
            images = [images]  # one image for a one-placeholder prompt
        images = list(images)
        n = prompt.count(PLACEHOLDER)
        if not n and not literal_text:
            _refuse_image_file_name(prompt)
        if n != len(images):
            raise ValueError(
                f"Prompt {prompt!r} has {n} '{PLACEHOLDER}' placeholder(s) but {len(images)} image(s) "
                f"were given; pass exactly one image per '{PLACEHOLDER}', in order."
            )
        texts = prompt.split(PLACEHOLDER)
        segments: list[Segment] = [texts[0]]
        for image, text in zip(images, texts[1:]):
            segments += [Path(image) if isinstance(image, str) else image, text]
        return segments
    if not isinstance(prompt, (list, tuple)):
        is_single_prompt(prompt)  # raises, naming what a prompt is
    if images:
        raise ValueError("Pass images either inside the list prompt or as its image list, not both.")
    segments = list(prompt)
    for k, seg in enumerate(segments):
        if isinstance(seg, str):
            if not literal_text and PLACEHOLDER in seg:
                raise ValueError(
                    f"List prompts place images directly; found '{PLACEHOLDER}' in {seg!r}. "
                    "Replace it with the image itself (or pass literal_text=True to keep it as text)."
                )
            if not literal_text:
                _refuse_image_file_name(seg)
        elif not is_image(seg):
            what = "a list" if isinstance(seg, (list, tuple)) else type(seg).__name__
            raise ValueError(
                f"A list prompt holds text (str) or an image (PIL image, numpy array, pathlib.Path), "
                f"but position {k} is {what}. For a batch, make every prompt a str or a list."
            )
    return segments


@dataclass
class ProcessedPrompt:
    """One prompt: token ids, which of them are image slots, and its images."""

    input_ids: list[int]
    image_mask: list[bool]
    pixel_values: list[torch.Tensor]


class KosmosGProcessor:
    """Tokenises interleaved prompts and preprocesses their images.

    Example:
        >>> proc = KosmosGProcessor.from_pretrained("checkpoints/kosmos-g")  # doctest: +SKIP
        >>> batch = proc(["<i> wearing <i>", "a dog"], images=[[dog, hat], []])  # doctest: +SKIP
        >>> batch["input_ids"].shape, batch["pixel_values"].shape  # doctest: +SKIP
        (torch.Size([2, 136]), torch.Size([2, 3, 224, 224]))
    """

    def __init__(self, tokenizer: FairseqTokenizer | HFTokenizer, *, image_size: int = 224,
                 num_image_tokens: int = 64, max_images: int = 10, max_length: int = 2048,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.max_images = max_images
        self.max_length = max_length
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)

    @classmethod
    def from_config(cls, tokenizer: FairseqTokenizer | HFTokenizer, config: KosmosGConfig) -> "KosmosGProcessor":
        if len(tokenizer) > config.mllm.vocab_size:
            raise ValueError(
                f"Tokenizer has {len(tokenizer)} symbols but the model embeds only "
                f"{config.mllm.vocab_size}; they do not belong together."
            )
        return cls(tokenizer, image_size=config.vision.image_size,
                   num_image_tokens=config.num_image_tokens, max_images=config.max_images,
                   max_length=config.mllm.max_positions, image_mean=config.image_mean,
                   image_std=config.image_std)

    # ------------------------------------------------------------------ one prompt
    def encode_prompt(self, prompt: Prompt, images: Sequence[ImageLike] | None = None, *,
                      literal_text: bool = False) -> ProcessedPrompt:
        """Token ids, slot mask and preprocessed images of one prompt (see :func:`split_prompt`
        for ``literal_text``)."""
        segments = split_prompt(prompt, images, literal_text=literal_text)
        n_images = sum(not isinstance(s, str) for s in segments)
        if n_images > self.max_images:
            raise ValueError(f"Prompt has {n_images} images; at most {self.max_images} are supported.")
        text = "".join(s for s in segments if isinstance(s, str))
        if not text.strip() and n_images == 0:
            raise ValueError("Empty prompt: give some text or at least one image.")
        tok = self.tokenizer
        ids, mask, pixels = [tok.bos_id], [False], []
        for seg in segments:
            if isinstance(seg, str):
                pieces = tok.encode(seg) if seg else []
                ids += pieces
                mask += [False] * len(pieces)
            else:
                pixels.append(preprocess_image(load_image(seg), self.image_size,
                                               self.image_mean, self.image_std))
                ids += [tok.boi_id] * (self.num_image_tokens + 1) + [tok.eoi_id]
                mask += [False] + [True] * self.num_image_tokens + [False]
        if len(ids) > self.max_length:
            raise ValueError(
                f"Prompt is {len(ids)} tokens long (images count {self.num_image_tokens + 2} each); "
                f"the model accepts at most {self.max_length}. Shorten the text or use fewer images."
            )
        return ProcessedPrompt(ids, mask, pixels)

    # ------------------------------------------------------------------ batches
    def __call__(self, prompts: Prompt | Sequence[Prompt],
                 images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
                 ) -> dict[str, torch.Tensor]:
        """Process one prompt or a batch into padded tensors.

        Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``image_mask``
        (B, T) bool (the slots), and ``pixel_values`` (N, 3, S, S) for all N images of
        the batch in prompt order (N may be 0).
        """
        if is_single_prompt(prompts):
            batch, batch_images = [prompts], [images]
        else:
            batch = list(prompts)
            if not batch:
                raise ValueError("Empty batch of prompts.")
            if images is None:
                batch_images = [None] * len(batch)
            else:
                batch_images = list(images)
                if len(batch_images) != len(batch) or any(
                        im is not None and not isinstance(im, (list, tuple)) for im in batch_images):
                    raise ValueError(
                        f"Got {len(batch)} prompts and {len(batch_images)} image entries; pass one list "
                        "of images per prompt (an empty list or None for a prompt without '<i>')."
                    )
        return self.collate([self.encode_prompt(p, im) for p, im in zip(batch, batch_images)])

    def collate(self, items: Sequence[ProcessedPrompt]) -> dict[str, torch.Tensor]:
        """Right-pad processed prompts into a batch."""
        T = max(len(it.input_ids) for it in items)
        B = len(items)
        input_ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        image_mask = torch.zeros((B, T), dtype=torch.bool)
        pixels: list[torch.Tensor] = []
        for b, it in enumerate(items):
            n = len(it.input_ids)
            input_ids[b, :n] = torch.tensor(it.input_ids)
            attention_mask[b, :n] = 1
            image_mask[b, :n] = torch.tensor(it.image_mask)
            pixels += it.pixel_values
        pixel_values = (torch.stack(pixels) if pixels
                        else torch.zeros((0, 3, self.image_size, self.image_size)))
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "image_mask": image_mask, "pixel_values": pixel_values}

    def negative(self, prompt: Prompt | None, images: Sequence[ImageLike] | None = None) -> ProcessedPrompt:
        """A negative prompt: ``<s>`` + its text (``<s>`` alone when empty), as the official model."""
        if prompt is None or (isinstance(prompt, str) and not prompt.strip() and not images):
            return ProcessedPrompt([self.tokenizer.bos_id], [False], [])
        return self.encode_prompt(prompt, images)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path / TOKENIZER_DIR)
        cfg = {"image_size": self.image_size, "num_image_tokens": self.num_image_tokens,
               "max_images": self.max_images, "max_length": self.max_length,
               "image_mean": list(self.image_mean), "image_std": list(self.image_std)}
        (path / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "KosmosGProcessor":
        path = Path(path)
        if not (path / PROCESSOR_CONFIG).is_file():
            raise FileNotFoundError(f"{path} has no {PROCESSOR_CONFIG}; is it a Kosmos-G folder?")
        cfg = json.loads((path / PROCESSOR_CONFIG).read_text())
        return cls(load_tokenizer(path / TOKENIZER_DIR), **cfg)

