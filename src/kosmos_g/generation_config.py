"""Sampling defaults that travel with a model folder, in its ``generation_config.json``.

A model is trained for a way of sampling: the official Kosmos-G for SD1.5's 50
DPM-Solver++ steps at guidance 7.5, the micro model for far fewer steps and a lower
guidance. So the defaults live in the folder, next to ``config.json`` (as transformers
does with its ``GenerationConfig``), and :class:`kosmos_g.pipeline.KosmosGPipeline` and
``kosmos-g generate`` both read them from there. A folder without the file samples with
the defaults below, the only place they are written.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = GenerationConfig(num_inference_steps=14, guidance_scale=3.0).save_pretrained(d)
    ...     GenerationConfig.from_pretrained(d)
    GenerationConfig(num_inference_steps=14, guidance_scale=3.0, scheduler='dpm++')
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .fileio import atomic_write_text
from .schedulers import scheduler_name

__all__ = ["FILENAME", "GenerationConfig"]

FILENAME = "generation_config.json"


@dataclass
class GenerationConfig:
    """How a model samples when the caller does not say otherwise."""

    num_inference_steps: int = 50
    """Denoising steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; ``<= 1`` runs no unconditional branch."""
    scheduler: str = "dpm++"
    """A sampler name from :data:`kosmos_g.schedulers.SCHEDULERS` (DPM-Solver++ 2M is the official one)."""

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}.")
        guidance = self.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance!r}.")
        self.guidance_scale = float(guidance)
        if not isinstance(self.scheduler, str):
            raise ValueError(f"scheduler must be a scheduler name such as 'dpm++', got {self.scheduler!r}.")
        self.scheduler = scheduler_name(self.scheduler)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/generation_config.json`` atomically; returns its path."""
        return atomic_write_text(Path(folder) / FILENAME, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> GenerationConfig:
        """Read ``folder/generation_config.json``; the defaults when the folder has none.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as empty:
            ...     GenerationConfig.from_pretrained(empty)
            GenerationConfig(num_inference_steps=50, guidance_scale=7.5, scheduler='dpm++')
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"Model folder not found: {folder}")
        path = folder / FILENAME
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # bad JSON or bad UTF-8
            raise ValueError(f"{path} is not valid JSON ({e}); fix it or delete it to sample with the "
                             "defaults.") from None
        known = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object with some of the keys {known}.")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{path} has unknown key(s) {unknown}; the keys are {known}.")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
