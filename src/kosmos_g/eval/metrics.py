"""Scores, as the protocols define them: DINO, CLIP-I, CLIP-T, FID and the tables they go in.

* :func:`cosine` is the one cosine every score uses (rows of two embedding matrices).
* :func:`protocol_mean` is DreamBench's aggregation: the mean over ALL images of
  ``100 * max(cos, 0)`` (one global mean, not a mean of per-subject means); papers print it / 100.
* :class:`DinoScorer`: DINO ViT-S/16 (a local transformers ``ViTModel`` folder), resize 256 bicubic,
  centre crop 224, ImageNet mean/std, the CLS feature.
* :class:`ClipScorer`: CLIP ViT-B/32 (a local transformers ``CLIPModel`` folder) image and text embeddings,
  CLIP's resize/crop to its image size and its mean/std.
* :class:`FeatureStats` + :func:`fid`: torchmetrics' ``FrechetInceptionDistance`` on the features of our
  own Inception (:mod:`.inception`), with the reference statistics saved once and reloaded.

Example:
    >>> protocol_mean([0.5, -0.2, 1.0])        # (50 + 0 + 100) / 3
    50.0
    >>> print(markdown_table(["model", "DINO"], [["ours", "0.694"]]))
    | model | DINO |
    |---|---|
    | ours | 0.694 |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..fileio import atomic_file

__all__ = ["cosine", "protocol_mean", "markdown_table", "resize_center_crop", "DinoScorer", "ClipScorer",
           "FeatureStats", "fid", "load_rgb"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (N, D) and (N, D) (or (1, D), broadcast) -> (N,)."""
    return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)


def protocol_mean(cosines: Iterable[float]) -> float:
    """DreamBench's score of a set of images: mean over all of them of ``100 * max(cos, 0)``."""
    values = np.asarray(list(cosines), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no images to score.")
    return float(np.mean(100.0 * np.clip(values, 0.0, None)))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_rgb(path: str | os.PathLike):
    """An image file as an RGB PIL image, refused past the package's pixel limit."""
    from ..processing import load_image

    return load_image(path).convert("RGB")


def resize_center_crop(image, resize: int, crop: int) -> np.ndarray:
    """torchvision's ``Resize(resize, BICUBIC)`` (shorter side) + ``CenterCrop(crop)`` on a PIL image ->
    (crop, crop, 3) uint8."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def _normalized(arrays: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _require_model_dir(what: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder not found or without config.json: {path}; pass a local "
                                "transformers folder (save_pretrained layout).")
    return path


class DinoScorer:
    """DINO ViT-S/16 CLS features (a transformers ``ViTModel`` folder, e.g. ``facebook/dino-vits16`` saved locally).

    Example:
        >>> dino = DinoScorer("ckpt/dino-vits16")  # doctest: +SKIP
        >>> dino.features([load_rgb("a.png")]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """

    resize, crop = 256, 224

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
        from transformers import ViTModel

        self.model = ViTModel.from_pretrained(_require_model_dir("DINO", path), add_pooling_layer=False,
                                              dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> (B, D) CLS features (float32, CPU)."""
        x = _normalized([resize_center_crop(im, self.resize, self.crop) for im in images], IMAGENET_MEAN,
                        IMAGENET_STD)
        out = self.model(pixel_values=x.to(self.device), interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0].float().cpu()  # (B, D): the CLS token


class ClipScorer:
    """CLIP image and text embeddings (a transformers ``CLIPModel`` folder with its tokenizer).

    Example:
        >>> clip = ClipScorer("ckpt/clip-vit-base-patch32")  # doctest: +SKIP
        >>> cosine(clip.image_features([im]), clip.text_features(["a dog"]))  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        path = _require_model_dir("CLIP", path)
        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.size = int(self.model.config.vision_config.image_size)
        self.device = torch.device(device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> (B, D) projected image embeddings (CLIP's bicubic resize + centre crop, mean/std)."""
        x = _normalized([resize_center_crop(im, self.size, self.size) for im in images], CLIP_MEAN, CLIP_STD)
        out = self.model.vision_model(pixel_values=x.to(self.device))
        return self.model.visual_projection(out.pooler_output).float().cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (B, D) projected text embeddings (truncated to CLIP's 77 tokens)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return self.model.text_projection(out.pooler_output).float().cpu()


# ----------------------------------------------------------------------------- FID


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of Inception features, in float64, exactly as torchmetrics' FID keeps
    them: the sum, the sum of outer products and the count. Sums of parts add up (processes, resumed runs)."""

    sum: torch.Tensor
    cov_sum: torch.Tensor
    n: int

    @classmethod
    def empty(cls, dim: int = 2048) -> "FeatureStats":
        return cls(torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64), 0)

    @classmethod
    def of(cls, features: torch.Tensor) -> "FeatureStats":
        """Statistics of (N, D) features."""
        f = features.double()
        return cls(f.sum(0), f.t().mm(f), int(f.shape[0]))

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.sum + other.sum, self.cov_sum + other.cov_sum, self.n + other.n)

    def save(self, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
        """Write to a ``.safetensors`` file (atomically), with ``metadata`` (what the statistics are of)."""
        from safetensors.torch import save_file

        with atomic_file(path) as tmp:
            save_file({"sum": self.sum, "cov_sum": self.cov_sum, "n": torch.tensor([self.n])}, str(tmp),
                      metadata={"kosmos_g": json.dumps(metadata, sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["FeatureStats", dict[str, Any]]:
        """The statistics and metadata :meth:`save` wrote."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kosmos_g", "{}"))
                stats = cls(f.get_tensor("sum"), f.get_tensor("cov_sum"), int(f.get_tensor("n")[0]))
        except Exception as e:  # damaged, or another file
            raise ValueError(f"{path} is not a reference statistics file written by kosmos-g eval "
                             f"({type(e).__name__}); delete it to recompute it.") from None
        return stats, meta


class _Features(torch.nn.Module):
    """Hands precomputed features to torchmetrics' FID unchanged (the Inception ran before, per process)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: FeatureStats, fake: FeatureStats) -> float:
    """FID between two feature sets: torchmetrics' ``FrechetInceptionDistance`` on their statistics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.n < 2 or fake.n < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {real.n} reference and {fake.n} generated.")
    metric = FrechetInceptionDistance(feature=_Features(real.sum.shape[0]), sync_on_compute=False)
    metric.update(torch.zeros(0, real.sum.shape[0], dtype=torch.float64), real=True)  # sets the output dtype
    metric.real_features_sum, metric.real_features_cov_sum = real.sum.clone(), real.cov_sum.clone()
    metric.real_features_num_samples = torch.tensor(real.n)
    metric.fake_features_sum, metric.fake_features_cov_sum = fake.sum.clone(), fake.cov_sum.clone()
    metric.fake_features_num_samples = torch.tensor(fake.n)
    return float(metric.compute())
