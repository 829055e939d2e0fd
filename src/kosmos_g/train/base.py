"""What every training stage provides to the shared :class:`~kosmos_g.train.trainer.Trainer`.

A stage owns the :class:`~kosmos_g.models.KosmosG` being trained, the frozen helpers
it needs (CLIP text encoder, U-Net, VAE), and:

- ``module``: the ``nn.Module`` accelerate wraps (DDP/FSDP/DeepSpeed). Its
  ``forward(batch)`` returns ``{name: (sum, count)}``; ``"loss"`` is the objective, the
  trainer divides its sum by the count summed over all processes (so a token-level mean
  is exact under data parallelism), other names are logged as means.
- ``module_prefix``: the module's state-dict keys are the KosmosG keys with this prefix,
  which is how the export maps trained weights back.
- ``builder`` (runs in DataLoader workers, must pickle): raw shard sample + its own
  ``numpy`` generator + source name -> example; ``collate(examples) -> batch``;
  ``prepare_batch(batch)`` on the device, for frozen, no-grad work (targets, latents).
- ``export_dirs(recipe, path)``: every folder ``export`` writes, so the trainer can check
  them before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..models import KosmosG
from ..processing import KosmosGProcessor
from .data import Source, check_source
from .modeling import export_kosmos_g
from .recipe import Recipe


class Stage:
    name = ""
    module_prefix = ""
    metric_names: tuple[str, ...] = ()

    model: KosmosG
    processor: KosmosGProcessor
    module: nn.Module
    builder: Callable[..., Any]

    def __init__(self, recipe: Recipe, accelerator) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        # sources first: a glob that matches nothing or shards of broken samples fail before any model loads
        self.sources = [Source.from_spec(s.name, s.shards, s.weight) for s in recipe.data.sources]
        for source in self.sources:
            if source.weight > 0:
                check_source(source)

    # ------------------------------------------------------------------ hooks
    def collate(self, examples: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def before_training(self) -> None:
        """Work done once before the first step (e.g. filling the latent cache)."""

    def before_step(self, step: int) -> None:
        """Called before each optimizer step (``step`` = steps done so far), e.g. to unfreeze a part."""

    def train_mode(self) -> None:
        """Put trained parts in train mode and frozen ones in eval mode."""
        self.model.train()

    @classmethod
    def export_dirs(cls, recipe: Recipe, path: Path) -> list[Path]:
        """The folders :meth:`export` writes for the export folder ``path``."""
        return [path]

    def export(self, state: dict[str, torch.Tensor], path: Path, *, overwrite: bool = False,
               run_info: Mapping[str, Any] | None = None) -> Path:
        """Write the inference folder from the trained module's full state dict (``overwrite`` and
        ``run_info``: see :func:`~kosmos_g.train.modeling.export_kosmos_g`)."""
        prefix = self.module_prefix
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            missing, unexpected = self.model.load_state_dict(own, strict=False)
            if unexpected:
                raise ValueError(f"Trained weights do not fit the model: {unexpected[:10]}")
        return export_kosmos_g(self.model.cpu(), self.processor, path, dtype=self.recipe.export.dtype,
                               overwrite=overwrite, run_info=run_info)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype for frozen helpers that are never exported (U-Net, VAE, CLIP text encoder)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)


def keep_image_weights_in_graph(model: KosmosG, out: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Add 0 x (a blank image through the vision tower + resampler) when a batch has no image.

    Data-parallel wrappers require every trainable weight to get a gradient each step; a
    text-only batch would leave the trainable vision block and resampler out.
    """
    if pixel_values.shape[0] > 0:
        return out
    if not any(p.requires_grad for p in [*model.resampler.parameters(), *model.vision.parameters()]):
        return out
    size = model.config.vision.image_size
    blank = torch.zeros(1, 3, size, size, device=out.device, dtype=model.dtype)
    return out + 0.0 * model.image_features(blank).sum().to(out.dtype)
