"""Tiny random DINO, CLIP and FID-Inception models and tiny DreamBench / COCO folders for the eval tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kosmos_g.eval.inception import FIDInceptionV3


def make_tiny_dino(path: Path) -> Path:
    """A random ViTModel at DINO's input size (224, patch 16) and a tiny width."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37), add_pooling_layer=False).save_pretrained(path)
    return path


def make_tiny_clip(path: Path) -> Path:
    """A random CLIPModel (32 px images) with the character-level test tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from kosmos_g.testing import make_tiny_clip_tokenizer

    tok = make_tiny_clip_tokenizer(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    return path


def make_random_inception(path: Path | None = None) -> FIDInceptionV3:
    """The FID Inception with He-initialised random weights (features of order one, not vanishing), at a small
    input size so a test runs in seconds; saved to ``path`` as a weights file if given."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    if path is not None:
        torch.save(net.state_dict(), path)
    net.input_size = 75
    return net


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_dreambench(root: Path, subjects: dict[str, str]) -> Path:
    """A DreamBooth-like dataset/ folder: ``subjects`` maps a subject to its reference file name."""
    for k, (subject, name) in enumerate(subjects.items()):
        (root / subject).mkdir(parents=True, exist_ok=True)
        random_image(k).save(root / subject / name)
        random_image(100 + k).save(root / subject / "99.jpg")  # another photo, never used
    return root


def make_coco(root: Path, n_captions: int = 6, n_images: int = 4) -> tuple[Path, Path]:
    """A captions_val2014.json and a val2014/ folder of random images."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        random_image(200 + k, (64, 48)).save(root / "val2014" / f"COCO_val2014_{k:012d}.jpg")
    words = ["a cat on a mat", "two dogs  running", "a red bus", "a bowl of fruit", "a man on a horse",
             "a plate with food", "a tree in a field", "a small boat"]
    annotations = [{"image_id": k // 2, "id": 1000 + k, "caption": words[k % len(words)]} for k in range(n_captions)]
    (root / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
    return root / "captions_val2014.json", root / "val2014"
