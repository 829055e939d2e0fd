"""A disk cache of VAE posteriors for stage-3 targets, keyed by source and sample key.

Encoding a 512x512 target with SD's VAE costs about as much as a U-Net step; the frozen
VAE gives the same posterior every epoch, so it is computed once and kept. The cache
stores the posterior's parameters (mean and log-variance, 2 x 4 x 64 x 64 at 512 px), not
a sample, so training still draws a fresh latent each time exactly as without the
cache. ``meta.json`` records the VAE and resolution; a cache made for other settings is
refused rather than silently reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_file, atomic_write_text

META = "meta.json"


class LatentCache:
    """``get(source, key)`` / ``put(source, key, params)`` on ``<dir>/<source>/<key>.safetensors``."""

    def __init__(self, directory: str | os.PathLike, signature: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.signature = json.loads(json.dumps(signature))
        meta = self.directory / META
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != self.signature:
                raise ValueError(
                    f"Latent cache {self.directory} was made for {found}, not {self.signature}; "
                    "use another stage3.latent_cache folder."
                )
        else:  # processes sharing the cache may all write it; each rename is whole
            atomic_write_text(meta, json.dumps(self.signature, indent=2))

    def path(self, source: str, key: str) -> Path:
        return self.directory / quote(source, safe="") / (quote(key, safe="") + ".safetensors")

    def get(self, source: str, key: str) -> torch.Tensor | None:
        path = self.path(source, key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["params"]
        except Exception:  # a damaged entry is recomputed
            return None

    def put(self, source: str, key: str, params: torch.Tensor) -> None:
        with atomic_file(self.path(source, key)) as tmp:
            save_file({"params": params.detach().float().cpu().contiguous()}, str(tmp))
