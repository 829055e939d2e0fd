"""KosmosG: interleaved text + images -> a (B, 77, 768) Stable-Diffusion condition.

vision tower -> resampler -> image slots spliced into the token embeddings -> causal
MLLM -> AlignerNet M. The unconditional condition is the MLLM reading ``<s>`` alone,
as in the official release (not CLIP's empty prompt).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import KosmosGConfig, MLLMConfig, get_preset
from ..fileio import atomic_file
from .aligner import AlignerNet
from .mllm import HFDecoder, build_mllm
from .resampler import Resampler
from .vision import VisionTower

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"fp16"``/``"bfloat16"``/``torch.float16``... -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


class KosmosG(nn.Module):
    """The Kosmos-G encoder.

    Example:
        >>> from kosmos_g import KosmosG, get_preset
        >>> model = KosmosG(get_preset("tiny")).eval()
        >>> ids = torch.tensor([[0, 5, 6, 7]])
        >>> model.encode(ids, torch.ones_like(ids)).shape
        torch.Size([1, 77, 32])
    """

    def __init__(self, config: KosmosGConfig, *, mllm: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.resampler = Resampler(config.resampler)
        self.mllm = build_mllm(config.mllm) if mllm is None else mllm  # given: a loaded pretrained LM
        self.aligner = AlignerNet(config.aligner)

    # ------------------------------------------------------------------ forward pieces
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 64, 2048) slot embeddings."""
        return self.resampler(self.vision(pixel_values.to(self.dtype)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None, *, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's slots overwritten by its features: (B, T, C).

        ``features``: ``image_features(pixel_values)`` when the caller already has it (a
        training loss that also reads the resampler's output), so it is not computed twice.
        """
        embeds = self.mllm.embed(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:
            if image_mask is not None and image_mask.any():
                raise ValueError("image_mask marks image slots but no pixel_values were given.")
            return embeds
        if image_mask is None:
            raise ValueError("pixel_values given without image_mask; build inputs with KosmosGProcessor.")
        feats = (self.image_features(pixel_values) if features is None else features).to(embeds.dtype)  # (N, Q, C)
        n_slots = int(image_mask.sum())
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise ValueError(
                f"image_mask has {n_slots} slots but {feats.shape[0]} images x "
                f"{feats.shape[1]} slots were encoded; processor and model disagree."
            )
        # masked_scatter fills True positions in row-major order, i.e. image by image.
        return embeds.masked_scatter(image_mask[..., None], feats.reshape(-1, feats.shape[-1]))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None,
                      image_mask: torch.Tensor | None = None, *,
                      features: torch.Tensor | None = None) -> torch.Tensor:
        """MLLM final-LayerNorm states of every token: (B, T, C) (``features``: see :meth:`embed`)."""
        embeds = self.embed(input_ids, pixel_values, image_mask, features=features)
        return self.mllm(embeds, attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pixel_values: torch.Tensor | None = None,
               image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion condition (B, 77, 768) of a processed batch."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_mask)
        return self.aligner(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(input_ids, attention_mask, pixel_values, image_mask)

    def unconditional(self, batch_size: int = 1) -> torch.Tensor:
        """The null condition: ``<s>`` alone through MLLM + AlignerNet, (B, 77, 768)."""
        ids = torch.full((1, 1), self.config.mllm.bos_token_id, dtype=torch.long, device=self.device)
        cond = self.encode(ids, torch.ones_like(ids))
        return cond.expand(batch_size, -1, -1)

    # ------------------------------------------------------------------ freezing
    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` to a folder.

        ``dtype`` casts the saved floating-point weights (e.g. ``"fp16"`` to halve a
        shipped checkpoint). The weights file appears whole or not at all.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / CONFIG_NAME)
        dtype = resolve_dtype(dtype)
        aliases = self._parameter_aliases()
        state = {}
        for name, tensor in self.state_dict().items():
            if name in aliases:  # a tied weight is stored once
                continue
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[name] = tensor.contiguous().cpu()
        with atomic_file(path / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "library": "kosmos-g"})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None,
                        config_overrides: dict[str, Any] | None = None) -> "KosmosG":
        """Load a folder written by :meth:`save_pretrained` (strict: every key must match).

        Example:
            >>> model = KosmosG.from_pretrained("checkpoints/kosmos-g", dtype="fp16", device="cuda")  # doctest: +SKIP
        """
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_NAME}; pass a folder written by KosmosG.save_pretrained "
                "or `kosmos-g convert-official`."
            )
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}.")
        with open(path / CONFIG_NAME, encoding="utf-8") as f:
            data = json.load(f)
        for key, value in (config_overrides or {}).items():
            section, _, field = key.partition(".")
            if field:
                data[section][field] = value
            else:
                data[key] = value
        config = KosmosGConfig.from_dict(data)
        # Parameters start on the meta device (no memory, no random init); buffers that
        # are not saved (sinusoidal table, rotary tables) are built for real.
        with init_empty_weights(include_buffers=False):
            model = cls(config)
        model.tie_weights()  # creating parameters on meta unties shared ones
        try:
            state = load_file(str(path / WEIGHTS_NAME))
        except SafetensorError as e:  # an empty, cut or overwritten file: say which, not a Rust parse error
            raise ValueError(f"{path / WEIGHTS_NAME} is damaged or incomplete ({e}); copy it again, "
                             "or save or convert the folder again.") from e
        model.load_state_dict_strict(state, assign=True)
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()

    def tie_weights(self) -> None:
        """Re-tie shared weights (a transformers LM's tied output embedding)."""
        if hasattr(self.mllm, "model") and hasattr(self.mllm.model, "tie_weights"):
            self.mllm.model.tie_weights()

    def _parameter_aliases(self) -> dict[str, str]:
        """Tied parameters: {alias name: canonical name} (e.g. an HF LM's tied lm_head)."""
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        return aliases

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """``load_state_dict`` whose error lists every missing and unexpected key."""
        aliases = self._parameter_aliases()
        own = {k: v for k, v in self.state_dict().items() if k not in aliases}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                "Checkpoint does not match the model.\n"
                f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}"
                f"{' ...' if len(unexpected) > 20 else ''}"
            )
        mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                      for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
        if mismatched:
            raise ValueError("Checkpoint shapes do not match the config:\n  " + "\n  ".join(mismatched[:20]))
        self.load_state_dict(state, strict=False, assign=assign)
        for alias, canonical in aliases.items():  # re-tie what assign=True untied
            module_name, _, attr = alias.rpartition(".")
            setattr(self.get_submodule(module_name), attr, self.get_parameter(canonical))


def build_model(preset_or_config: str | KosmosGConfig) -> KosmosG:
    """A randomly initialised model from a preset name or a config."""
    config = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    return KosmosG(config)


def init_from_causal_lm(lm_path: str | os.PathLike,
                        config: str | KosmosGConfig = "kosmos-g") -> tuple[KosmosG, Any]:
    """A Kosmos-G whose MLLM is a pretrained transformers causal LM, and that LM's tokenizer.

    ``lm_path`` is a local folder ``AutoModelForCausalLM`` and ``AutoTokenizer`` load (Llama,
    Qwen2, Mistral...). The LM keeps its weights; ``<image>`` and ``</image>`` are added to
    its tokenizer as special tokens and their embedding rows (input and, if untied, output)
    start at the mean of the rows of the tokens before them. ``config`` (a preset name or
    config) gives the vision tower, resampler and AlignerNet; the resampler's output and
    AlignerNet's input take the LM's width; vision, resampler and AlignerNet start random.
    The returned config records ``lm_path`` (``mllm.init_from``); a folder saved from the
    model reloads without it.

    Returns ``(model, tokenizer)``, the tokenizer a :class:`~kosmos_g.tokenizer.HFTokenizer`;
    ``KosmosGProcessor.from_config(tokenizer, model.config)`` is the matching processor.

    Example:
        >>> model, tok = init_from_causal_lm("models/Qwen2.5-0.5B", "kosmos-g")  # doctest: +SKIP
        >>> model.config.resampler.output_dim, tok.boi_id  # doctest: +SKIP
        (896, 151665)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..tokenizer import HFTokenizer

    path = Path(lm_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"mllm_init={path} is not a transformers causal-LM folder (no config.json); "
                                "pass a local folder written by save_pretrained (e.g. a downloaded snapshot).")
    base = get_preset(config) if isinstance(config, str) else config
    tokenizer = HFTokenizer.for_causal_lm(AutoTokenizer.from_pretrained(str(path)))
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    _add_token_rows(lm, [tokenizer.tok.convert_tokens_to_ids(t) for t in tokenizer.added_tokens], len(tokenizer))
    hf = lm.config
    width = hf.hidden_size
    mllm = MLLMConfig(
        backbone="hf", hf_config=hf.to_dict(), vocab_size=lm.get_input_embeddings().weight.shape[0],
        hidden_size=width, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        ffn_dim=getattr(hf, "intermediate_size", None) or 4 * width,
        max_positions=getattr(hf, "max_position_embeddings", None) or base.mllm.max_positions,
        dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, init_from=str(path.resolve()),
        gradient_checkpointing=base.mllm.gradient_checkpointing)
    data = base.to_dict()
    data["mllm"] = dataclasses.asdict(mllm)
    data["resampler"]["output_dim"] = width
    data["aligner"]["input_dim"] = width
    full = KosmosGConfig.from_dict(data)
    model = KosmosG(full, mllm=HFDecoder(full.mllm, model=lm))
    logger.info("MLLM from %s: %s parameters, width %d, %d tokens (%s added)", path,
                f"{sum(p.numel() for p in lm.parameters()):,}", width, len(tokenizer),
                ", ".join(tokenizer.added_tokens) or "none")
    return model, tokenizer


@torch.no_grad()
def _add_token_rows(lm: nn.Module, new_ids: list[int], num_tokens: int) -> None:
    """Make room for ``num_tokens`` tokens and start the rows of ``new_ids`` at the mean of the
    rows before them (the LM's real tokens; Qwen2 pads its matrix with unused rows after them).
    A matrix already larger than the tokenizer is never shrunk."""
    rows = lm.get_input_embeddings().weight.shape[0]
    if num_tokens > rows:
        lm.resize_token_embeddings(num_tokens, mean_resizing=False)
    if not new_ids:
        return
    known = min(new_ids)
    layers = [lm.get_input_embeddings()]
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not layers[0].weight:
        layers.append(out)
    for layer in layers:
        weight = layer.weight
        weight[new_ids] = weight[:known].mean(dim=0)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias[new_ids] = bias[:known].mean()
