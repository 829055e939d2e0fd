"""Loading the model a stage starts from, choosing what trains, and exporting the result."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import KosmosGConfig, get_preset
from ..fileio import atomic_dir
from ..models import HFDecoder, KosmosG, init_from_causal_lm
from ..models.kosmos_g import CONFIG_NAME, WEIGHTS_NAME, resolve_dtype
from ..processing import KosmosGProcessor
from ..tokenizer import load_tokenizer
from .recipe import LoraSpec, ModelSpec

logger = logging.getLogger(__name__)

RECONSTRUCTION_PREFIX = "aligner.recon_"
RUN_FILE = "training_run.json"
"""Written into every folder a training run exports: the run's ``output_dir``, stage and step."""


def _flatten(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"resampler": {"num_queries": 64}}`` (YAML nesting, or the command line's
    ``model.config.resampler.num_queries=64``) -> ``{"resampler.num_queries": 64}``."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in _flatten(value).items()})
        else:
            flat[key] = value
    return flat


def _override(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set single config fields; a section is never replaced whole (its other fields stay)."""
    for key, value in _flatten(overrides).items():
        section, _, name = key.partition(".")
        if name:
            if section not in data or not isinstance(data[section], dict):
                raise ValueError(f"model.config override {key!r}: unknown section {section!r}.")
            if name not in data[section]:
                raise ValueError(f"model.config override {key!r}: {section} has no field {name!r}.")
            data[section][name] = value
        elif isinstance(data.get(key), dict):
            raise ValueError(f"model.config override {key!r} names a whole section; set its fields, "
                             f"e.g. {key}.<field>=value.")
        else:
            data[key] = value
    return data


def load_kosmos_g(spec: ModelSpec, *, reconstruction: bool = False) -> tuple[KosmosG, KosmosGProcessor]:
    """The model and processor a stage starts from (fp32, on the CPU, in train mode).

    ``reconstruction=True`` adds AlignerNet's N (stage 2); a folder without N gets a
    freshly initialised one (seed it first), and every other weight must be present.
    """
    spec.validate()
    overrides = dict(spec.config)
    if reconstruction:
        overrides["aligner.reconstruction"] = True
    if spec.init is not None:
        path = Path(spec.init)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"model.init={path} is not a Kosmos-G folder (no {CONFIG_NAME}).")
        data = _override(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")), overrides)
        config = KosmosGConfig.from_dict(data)
        state = load_file(str(path / WEIGHTS_NAME))
        has_recon = any(k.startswith(RECONSTRUCTION_PREFIX) for k in state)
        if config.aligner.reconstruction and not has_recon:
            model = KosmosG(config)  # N starts from its random init
            own = model.state_dict()
            missing = sorted(set(own) - set(state) - set(model._parameter_aliases()))
            unexpected = sorted(set(state) - set(own))
            if unexpected or any(not k.startswith(RECONSTRUCTION_PREFIX) for k in missing):
                model.load_state_dict_strict(state)  # raises with the full key lists
            model.load_state_dict(state, strict=False)
            logger.info("AlignerNet N is not in %s: initialised randomly.", path)
        else:
            if not config.aligner.reconstruction and has_recon:
                state = {k: v for k, v in state.items() if not k.startswith(RECONSTRUCTION_PREFIX)}
            with init_empty_weights(include_buffers=False):
                model = KosmosG(config)
            model.tie_weights()  # creating parameters on meta unties shared ones (a tied LM head)
            model.load_state_dict_strict(state, assign=True)
        processor = KosmosGProcessor.from_pretrained(path)
    elif spec.mllm_init is not None:
        config = KosmosGConfig.from_dict(_override(get_preset(spec.preset).to_dict(), overrides))
        model, tokenizer = init_from_causal_lm(spec.mllm_init, config)
        processor = KosmosGProcessor.from_config(tokenizer, model.config)
    else:
        data = _override(get_preset(spec.preset).to_dict(), overrides)
        config = KosmosGConfig.from_dict(data)
        model = KosmosG(config)
        processor = KosmosGProcessor.from_config(load_tokenizer(spec.tokenizer), config)
    if spec.vision_init is not None:
        from transformers import CLIPVisionModel

        clip = CLIPVisionModel.from_pretrained(spec.vision_init)
        missing, unexpected = model.vision.clip.load_state_dict(clip.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"model.vision_init={spec.vision_init} does not fit the vision config: missing "
                             f"{missing[:10]}, unexpected {unexpected[:10]}.")
    return model.float().train(), processor


def add_lora(model: KosmosG, spec: LoraSpec) -> None:
    """Put peft LoRA adapters on the MLLM's ``spec.target_modules`` (in place: the LM keeps its
    module names, each adapted layer gains ``base_layer`` and ``lora_A``/``lora_B``)."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(model.mllm, HFDecoder):
        raise ValueError("model.lora needs a transformers MLLM (model.mllm_init, or a folder started from one); "
                         "the Magneto MLLM trains whole: remove model.lora.")
    names = {name.rsplit(".", 1)[-1] for name, m in model.mllm.model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(spec.target_modules) - names)
    if unknown:
        raise ValueError(f"model.lora.target_modules {unknown} are not linear layers of the MLLM; "
                         f"choose among {sorted(names)}.")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules))
    inject_adapter_in_model(config, model.mllm.model)


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def merged_lora_state(model: KosmosG) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA adapter merged into its layer's weight
    (W + alpha/r x B A) and the adapter keys gone: the plain model's keys."""
    from peft.tuners.lora import LoraLayer

    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for key in [k for k in state if k.startswith(f"{name}.lora_")]:
            del state[key]
        base = module.get_base_layer()
        weight = base.weight.detach().clone()
        for adapter in module.active_adapters:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
        del state[f"{name}.base_layer.weight"]
        state[f"{name}.weight"] = weight
        if base.bias is not None:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def set_trainable(model: KosmosG, *, mllm: bool = False, resampler: bool = False, vision_last_block: bool = False,
                  aligner: bool = False, lora: bool = False) -> dict[str, int]:
    """Freeze everything, then unfreeze the named parts; returns trainable counts per part.

    ``lora``: of the MLLM only its LoRA adapters (:func:`add_lora`) train."""
    model.freeze()
    if lora:
        for name, p in model.mllm.named_parameters():
            p.requires_grad_(".lora_" in name)
    elif mllm:
        model.mllm.requires_grad_(True)
    if resampler:
        model.resampler.requires_grad_(True)
    if vision_last_block:
        model.vision.unlock_last_block()
    if aligner:
        model.aligner.requires_grad_(True)
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters() if p.requires_grad)
              for name in ("vision", "resampler", "mllm", "aligner")}
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %s of %s (%s)", f"{sum(counts.values()):,}", f"{total:,}",
                ", ".join(f"{k} {v:,}" for k, v in counts.items() if v))
    return counts


def enable_gradient_checkpointing(model: KosmosG) -> None:
    """Recompute activations in the backward pass: MLLM, vision tower and AlignerNet blocks."""
    mllm = model.mllm
    if hasattr(mllm, "gradient_checkpointing"):  # MagnetoDecoder reads this flag
        mllm.gradient_checkpointing = True
    if hasattr(mllm, "model"):  # an HF causal LM backbone
        _hf_checkpointing(mllm.model)
    _hf_checkpointing(model.vision.clip)
    aligner = model.aligner
    for name in ("encoder", "decoder", "recon_decoder", "recon_encoder"):
        checkpoint_blocks(getattr(aligner, name, []))


def _hf_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Wrap each block's forward in activation checkpointing without touching its weights' names."""
    for block in blocks:
        if getattr(block, "_kosmos_g_checkpointed", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, _block=block, **kwargs):
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        block._kosmos_g_checkpointed = True


def check_export_folder(path: Path, *, overwrite: bool) -> None:
    """Refuse to write ``path`` when it is a file, or a non-empty folder without ``overwrite``
    (as ``kosmos-g convert-official`` does)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"Export folder {path} is a file, not a folder; choose another export.dir.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"Export folder {path} already exists and is not empty; choose another folder or "
                         "set export.overwrite=true (Python: overwrite=True) to replace it.")


def write_run_info(folder: Path, run_info: Mapping[str, Any] | None) -> None:
    """Write :data:`RUN_FILE` into ``folder`` (nothing when ``run_info`` is None)."""
    if run_info is not None:
        (folder / RUN_FILE).write_text(json.dumps(dict(run_info), indent=1) + "\n", encoding="utf-8")


def export_kosmos_g(model: KosmosG, processor: KosmosGProcessor, path: str | os.PathLike, *,
                    dtype: torch.dtype | str | None = None, overwrite: bool = False,
                    run_info: Mapping[str, Any] | None = None) -> Path:
    """Write an inference folder that ``KosmosG.from_pretrained`` loads strictly.

    AlignerNet's N (stage 2) is left out and the config says ``reconstruction: false``; LoRA
    adapters (:func:`add_lora`) are merged into the MLLM's weights.
    Written to a temporary folder beside ``path``, flushed to the disk and renamed, so a crash
    never leaves a half export. An existing non-empty ``path`` is refused (``ValueError``)
    unless ``overwrite=True``; then it is replaced once the new folder is complete.
    ``run_info`` (which run wrote the folder) is saved in it as :data:`RUN_FILE`.

    Example:
        >>> export_kosmos_g(model, processor, "runs/s2/final", dtype="fp16")  # doctest: +SKIP
        PosixPath('runs/s2/final')
    """
    path = Path(path)
    check_export_folder(path, overwrite=overwrite)
    dtype = resolve_dtype(dtype)
    lora = has_lora(model)
    if model.config.aligner.reconstruction or lora:  # a new plain model: without N, adapters merged
        data = model.config.to_dict()
        data["aligner"]["reconstruction"] = False
        config = KosmosGConfig.from_dict(data)
        aliases = model._parameter_aliases()
        state = merged_lora_state(model) if lora else model.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith(RECONSTRUCTION_PREFIX) and k not in aliases}
        with init_empty_weights(include_buffers=False):
            out = KosmosG(config)
        out.tie_weights()  # creating parameters on meta unties shared ones (a tied LM head)
        out.load_state_dict_strict(state, assign=True)
    else:
        out = model
    with atomic_dir(path, replace=True, fsync=True) as tmp:  # checked above: absent, empty or overwrite
        out.save_pretrained(tmp, dtype=dtype)
        processor.save_pretrained(tmp)
        write_run_info(tmp, run_info)
    return path


def reconstruction_state(model: KosmosG) -> dict[str, torch.Tensor]:
    """AlignerNet N's weights (stage 2), to keep beside the inference export."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(RECONSTRUCTION_PREFIX)}
