"""Stage 2: image-decoder aligning, on captions only.

The frozen MLLM reads ``<s> caption``; AlignerNet M maps its states s to a 77-token
condition trained to match the CLIP text encoder's ``last_hidden_state`` of the caption
(padded to 77), and N maps that condition back to s:

    loss = MSE(M(s), CLIP(caption)) + w * MSE(N(M(s)), s) * (77 / T)

Only AlignerNet trains. Captions over 75 CLIP tokens or 85 MLLM tokens are filtered (as
the official loader does) and counted.

Deviation from the release: the reconstruction MSE averages over the caption's real
tokens and uses each caption's own length T, where the official averages over the
padded batch (pads included) and uses the padded length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..data.shards import BadSample, validate_sample
from ..fileio import atomic_dir
from ..processing import KosmosGProcessor, ProcessedPrompt
from .base import Stage
from .data import SampleFiltered
from .modeling import (check_export_folder, checkpoint_blocks, load_kosmos_g, reconstruction_state, set_trainable,
                       write_run_info)

RECONSTRUCTION_FILE = "aligner_reconstruction.safetensors"


def reconstruction_dir(export_dir: Path) -> Path:
    """Where N's weights go beside the export: ``<export.dir>-reconstruction``."""
    return export_dir.with_name(export_dir.name + "-reconstruction")


def _subfolder(path: Path, name: str) -> str:
    return str(path / name) if (path / name).is_dir() else str(path)


def load_clip_text(path: str):
    """(CLIPTextModel, tokenizer) from an SD folder (text_encoder/ + tokenizer/) or one CLIP folder."""
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"stage2.clip_path={path} is not a folder.")
    encoder = CLIPTextModel.from_pretrained(_subfolder(root, "text_encoder"))
    tokenizer = AutoTokenizer.from_pretrained(_subfolder(root, "tokenizer"))
    return encoder, tokenizer


def check_clip_text(clip, aligner_config, path) -> None:
    """Refuse a CLIP text encoder whose states AlignerNet's condition cannot be compared with."""
    length = aligner_config.num_queries
    if clip.config.max_position_embeddings < length or clip.config.hidden_size != aligner_config.output_dim:
        raise ValueError(
            f"CLIP text encoder at {path} gives width {clip.config.hidden_size} and at most "
            f"{clip.config.max_position_embeddings} tokens; AlignerNet outputs "
            f"{length} x {aligner_config.output_dim}."
        )


def clip_ids(clip_tokenizer, text: str, length: int) -> list[int]:
    """The CLIP ids of ``text`` padded (or cut) to ``length``: what SD pipelines feed the text encoder."""
    return clip_tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids


class Stage2Builder:
    """Caption -> MLLM prompt + CLIP ids, with the paper's length filters (DataLoader workers)."""

    def __init__(self, processor: KosmosGProcessor, clip_tokenizer, *, length: int, max_clip_tokens: int,
                 max_mllm_tokens: int) -> None:
        self.processor = processor
        self.clip_tokenizer = clip_tokenizer
        self.length = length
        self.max_clip_tokens = max_clip_tokens
        self.max_mllm_tokens = max_mllm_tokens

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator, source: str) -> dict[str, Any]:
        meta = validate_sample(raw)
        text = meta.get("text") if meta["kind"] == "text" else meta.get("caption")
        if meta["kind"] == "interleaved" or not isinstance(text, str) or not text.strip():
            raise BadSample(f"stage 2 needs a caption or text; sample {raw.get('__key__')!r} has none.")
        if len(self.clip_tokenizer.tokenize(text)) > self.max_clip_tokens:
            raise SampleFiltered
        pieces = self.processor.tokenizer.encode(text)
        if len(pieces) > self.max_mllm_tokens:
            raise SampleFiltered
        ids = [self.processor.tokenizer.bos_id] + pieces
        return {"prompt": ProcessedPrompt(ids, [False] * len(ids), []),
                "clip_ids": clip_ids(self.clip_tokenizer, text, self.length)}


class AlignModule(nn.Module):
    """AlignerNet's loss from precomputed MLLM states and CLIP targets."""

    def __init__(self, aligner, reconstruction_weight: float) -> None:
        super().__init__()
        self.aligner = aligner
        self.reconstruction_weight = reconstruction_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        hidden, mask, target = batch["hidden"], batch["attention_mask"], batch["clip_target"]
        B, T, _ = hidden.shape
        cond = self.aligner(hidden, mask)  # (B, 77, D)
        mse = (cond.float() - target.float()).pow(2).mean(dim=(1, 2))  # (B,)
        recon = self.aligner.reconstruct(cond, T)  # (B, T, C)
        err = (recon.float() - hidden.float()).pow(2).mean(dim=-1)  # (B, T)
        real = mask.float()
        lengths = real.sum(dim=1).clamp(min=1)  # (B,)
        rec = (err * real).sum(dim=1) / lengths * (cond.shape[1] / lengths)  # masked MSE x (77 / T)
        loss = mse + self.reconstruction_weight * rec
        n = torch.tensor(B, device=hidden.device)
        return {"loss": (loss.sum(), n), "mse": (mse.sum(), n), "rec": (rec.sum(), n)}


class Stage2(Stage):
    name = "stage2"
    module_prefix = ""
    metric_names = ("mse", "rec")

    def __init__(self, recipe, accelerator) -> None:
        super().__init__(recipe, accelerator)
        spec = recipe.stage2
        self.model, self.processor = load_kosmos_g(recipe.model, reconstruction=True)
        self.trainable = set_trainable(self.model, aligner=True)
        if recipe.train.gradient_checkpointing:
            for name in ("encoder", "decoder", "recon_decoder", "recon_encoder"):
                checkpoint_blocks(getattr(self.model.aligner, name))
        self.clip, clip_tokenizer = load_clip_text(spec.clip_path)
        check_clip_text(self.clip, self.model.config.aligner, spec.clip_path)
        self.clip.requires_grad_(False).eval().to(self.device, dtype=self.weight_dtype)
        length = self.model.config.aligner.num_queries
        self.model.to(self.device)  # the frozen MLLM runs in prepare_batch; the module holds the aligner
        self.module = AlignModule(self.model.aligner, spec.reconstruction_weight)
        self.builder = Stage2Builder(self.processor, clip_tokenizer, length=length,
                                     max_clip_tokens=spec.max_clip_tokens, max_mllm_tokens=spec.max_mllm_tokens)

    def train_mode(self) -> None:
        self.model.eval()  # frozen MLLM: deterministic targets for the aligner
        self.model.aligner.train()

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.collate([ex["prompt"] for ex in examples])
        batch["clip_ids"] = torch.tensor([ex["clip_ids"] for ex in examples], dtype=torch.long)
        return batch

    @torch.no_grad()
    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.accelerator.autocast():
            hidden = self.model.hidden_states(batch["input_ids"], batch["attention_mask"])  # (B, T, C)
            target = self.clip(input_ids=batch["clip_ids"]).last_hidden_state  # (B, 77, D)
        return {"hidden": hidden, "attention_mask": batch["attention_mask"], "clip_target": target}

    @classmethod
    def export_dirs(cls, recipe, path: Path) -> list[Path]:
        return [path, reconstruction_dir(path)] if recipe.stage2.keep_reconstruction else [path]

    def export(self, state: dict[str, torch.Tensor], path: Path, *, overwrite: bool = False,
               run_info: Mapping[str, Any] | None = None) -> Path:
        if self.recipe.stage2.keep_reconstruction:
            check_export_folder(reconstruction_dir(path), overwrite=overwrite)  # before either is written
        out = super().export(state, path, overwrite=overwrite, run_info=run_info)
        if self.recipe.stage2.keep_reconstruction:
            with atomic_dir(reconstruction_dir(path), replace=True, fsync=True) as tmp:
                save_file(reconstruction_state(self.model), str(tmp / RECONSTRUCTION_FILE))
                write_run_info(tmp, run_info)
        return out
