"""Convert the released Kosmos-G checkpoint (a fairseq trainer state) to a kosmos-g folder.

The official ``checkpoint_final.pt`` is a pickle (torch's zip format): besides the weights
(``model``, every tensor fp32: fairseq casts the fp16 training weights up when it saves) it
holds the training ``cfg`` (a plain dict; ``args`` is None), optimizer history and metrics.
Loading it needs neither fairseq, torchscale nor omegaconf here:

- :func:`load_official_checkpoint` runs ``torch.load(weights_only=True)`` with an
  allow-list of exactly the non-tensor globals a fairseq checkpoint may hold. Classes that
  are not importable here (omegaconf containers and nodes, which other fairseq versions
  pickle as ``cfg``, and typing annotations) are replaced by inert stand-ins
  (:class:`PickledObject`, :class:`TypeRef`) that only store the pickled state, so no code
  from those packages runs. Anything else is refused, naming the global;
  ``trust_pickle=True`` (CLI ``--trust-pickle``) does a full, unsafe load instead. An
  empty, truncated or non-torch file is reported as such, naming it.
- :func:`convert_official_state_dict` maps every official key to ours (torchscale
  ``self_attn``/``ffn``/sub-LN names -> our ``Block``; open_clip ViT -> transformers CLIP;
  the "xconnector" -> :class:`~kosmos_g.models.resampler.Resampler`; AlignerNet M), infers
  the sizes from tensor shapes, ignores what inference does not need and fails on any key
  it does not recognise.
- :func:`convert_official` writes a folder that ``KosmosG.from_pretrained`` and
  ``KosmosGProcessor.from_pretrained`` read, atomically.

Example:
    >>> from kosmos_g.convert import convert_official
    >>> convert_official("checkpoint_final.pt", "data/dict.txt", "data/sentencepiece.bpe.model",
    ...                  "checkpoints/kosmos-g")  # doctest: +SKIP
    PosixPath('checkpoints/kosmos-g')
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import pickle
import re
import types
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm

from ..config import KosmosGConfig, get_preset, list_presets
from ..fileio import atomic_dir
from ..models.kosmos_g import KosmosG, resolve_dtype
from ..processing import KosmosGProcessor
from ..tokenizer import FairseqTokenizer, require_file

logger = logging.getLogger(__name__)

__all__ = ["PickledObject", "TypeRef", "UnsafeCheckpointError", "check_checkpoint_file", "convert_official",
           "convert_official_state_dict", "load_official_checkpoint", "strip_wrapper_prefixes"]


# ============================================================================ safe loading

class UnsafeCheckpointError(ValueError):
    """The checkpoint pickles something outside the allow-list."""


class PickledObject:
    """Inert stand-in for a class the checkpoint pickles but kosmos-g never imports.

    It records what the pickle gives it (constructor arguments in ``_pickle_args``, state in
    ``__dict__``) and does nothing else, so an omegaconf ``DictConfig`` comes back as an
    object whose ``_content`` holds its values. Use :func:`to_plain` to read it as dicts.
    """

    pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledObject":
        obj = object.__new__(cls)
        obj.__dict__["_pickle_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # REDUCE(cls, args): the arguments are already recorded by __new__

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD: a dict, or (dict, slots dict) for classes with __slots__.
        if isinstance(state, tuple) and len(state) == 2 and all(
                s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_pickle_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


@dataclasses.dataclass(frozen=True)
class TypeRef:
    """A type recorded in a pickled config (``typing.Any``, ``dict``, ``Optional[int]``), by name."""

    name: str

    def __repr__(self) -> str:
        return self.name


def _stand_in(name: str) -> type[PickledObject]:
    return type(name.rsplit(".", 1)[1], (PickledObject,), {"pickled_name": name, "__module__": __name__})


def _plain_defaultdict(default_factory: Any = None, *items: Any) -> dict:
    # SETITEMS in torch's unpickler only fills exact dicts, so a defaultdict (omegaconf's
    # resolver cache) is read back as a plain dict.
    return dict(*items)


def _subscript(origin: Any, params: Any) -> TypeRef:
    # ``Optional[int]`` pickles as operator.getitem(typing.Union, (int, NoneType)).
    params = params if isinstance(params, tuple) else (params,)
    return TypeRef(f"{origin!r}[{', '.join(map(repr, params))}]")


def _type_of(obj: Any) -> TypeRef:
    # ``type(None)`` pickles as builtins.type(None); nothing else may call type().
    if obj is not None:
        raise pickle.UnpicklingError(f"refusing builtins.type({obj!r}); only type(None) is allowed")
    return TypeRef("NoneType")


# Classes omegaconf pickles for a DictConfig (omegaconf 2.0-2.3).
_OMEGACONF_CLASSES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata", "omegaconf.base.UnionNode",
    "omegaconf.nodes.ValueNode", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.PathNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode", "omegaconf.nodes.EnumNode", "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.InterpolationResultNode",
)
# Annotations omegaconf metadata records (ref_type, key_type, element_type, object_type).
_TYPE_NAMES = (
    "typing.Any", "typing.Dict", "typing.List", "typing.Tuple", "typing.Optional", "typing.Union",
    "typing.Type", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int",
    "builtins.float", "builtins.bool", "builtins.bytes", "builtins.object",
)


@functools.lru_cache(maxsize=1)
def _omegaconf_stand_ins() -> dict[str, type[PickledObject]]:
    return {name: _stand_in(name) for name in _OMEGACONF_CLASSES}


class _StandInUnpickler(pickle.Unpickler):
    """Full unpickler (``trust_pickle``) that still reads omegaconf objects as stand-ins,
    so a trusted checkpoint loads without omegaconf installed."""

    def find_class(self, module: str, name: str) -> Any:
        return _omegaconf_stand_ins().get(f"{module}.{name}") or super().find_class(module, name)


# torch.load(pickle_module=...) wants a module: pickle itself with our Unpickler.
_trusting_pickle = types.ModuleType("kosmos_g_trusting_pickle")
_trusting_pickle.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
_trusting_pickle.Unpickler = _StandInUnpickler


@functools.lru_cache(maxsize=1)
def official_safe_globals() -> tuple[Any, ...]:
    """The allow-list passed to ``torch.serialization.safe_globals`` (see docs/convert.md).

    Real classes only where constructing them is harmless (``argparse.Namespace``, numpy
    scalars/arrays/dtypes as used in fairseq metrics); stand-ins for everything else.
    """
    allowed: list[Any] = [argparse.Namespace]
    allowed += [(cls, name) for name, cls in _omegaconf_stand_ins().items()]
    allowed += [(TypeRef(name), name) for name in _TYPE_NAMES]
    allowed += [(_plain_defaultdict, "collections.defaultdict"), (_subscript, "_operator.getitem"),
                (_subscript, "operator.getitem"), (_type_of, "builtins.type")]
    # numpy scalars and arrays (fairseq meters and iterator states may hold them).
    multiarray = getattr(np, "_core", np).multiarray
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    allowed += [(cls, f"numpy.dtypes.{name}") for name, cls in vars(np.dtypes).items()
                if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return tuple(allowed)


def _refusal_message(path: Path, refused: list[str]) -> str:
    return (
        f"{path} contains pickled objects outside kosmos-g's allow-list: {', '.join(sorted(refused))}. "
        "The safe loader (torch.load with weights_only=True) accepts tensors plus the argparse/omegaconf/"
        "numpy metadata a fairseq checkpoint holds. If you trust this file (e.g. the official release with "
        "a verified checksum), re-run with --trust-pickle (Python: trust_pickle=True) for a full pickle "
        "load, which can execute arbitrary code from the file."
    )


def load_official_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """Load a fairseq checkpoint without running code from it (unless ``trust_pickle``).

    Tensors come back memory-mapped when the file is in torch's zip format, so a
    checkpoint larger than RAM still loads. A file that is missing, a directory, empty,
    truncated or not a torch file raises a one-line error naming it.

    Example:
        >>> ckpt = load_official_checkpoint("checkpoint_final.pt")  # doctest: +SKIP
        >>> sorted(ckpt)  # doctest: +SKIP
        ['args', 'cfg', 'criterion', 'extra_state', 'last_optimizer_state', 'model', 'optimizer_history', 'task_state']
    """
    path = Path(path)
    mmap = check_checkpoint_file(path)  # torch can only memory-map its zip format
    if trust_pickle:
        warnings.warn(
            f"Fully unpickling {path} (trust_pickle=True): a pickle can execute arbitrary code. "
            "Only do this for a file you trust.", UserWarning, stacklevel=2)
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap,
                              pickle_module=_trusting_pickle)
        except MemoryError:
            raise
        except Exception as e:  # a full unpickle fails in many ways on a damaged file
            raise _unreadable(path, e) from e
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        # safe_globals with (object, "module.Name") entries, which the stand-ins need, is torch 2.6+.
        raise UnsafeCheckpointError(
            f"Safe loading of {path} needs torch >= 2.6 (this is {torch.__version__}); upgrade torch, or "
            "use --trust-pickle for a full, unsafe load of a file you trust.")
    with torch.serialization.safe_globals(list(official_safe_globals())):
        if mmap:
            try:  # static scan first, so the error names every refused global at once
                refused = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # unusual pickle opcodes or a damaged archive: let the loader itself decide
                refused = []
            if refused:
                raise UnsafeCheckpointError(_refusal_message(path, refused))
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            refused = re.findall(r"GLOBAL (\S+) was not an allowed global", str(e))
            if refused:
                raise UnsafeCheckpointError(_refusal_message(path, refused)) from None
            # torch wraps the unpickler's own message in advice about weights_only; keep the message.
            found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e), re.S)
            if not found:  # not the weights-only unpickler refusing: the pickle itself is broken
                raise _unreadable(path, e) from e
            raise UnsafeCheckpointError(
                f"Safe loading of {path} failed ({_one_line(found.group(1))}). If it is a torch checkpoint you "
                "trust, re-run with --trust-pickle (Python: trust_pickle=True) for a full pickle load, which can "
                "execute arbitrary code.") from e
        except MemoryError:
            raise
        except Exception as e:  # EOFError, struct.error, OSError, RuntimeError (miniz), ...: a damaged file
            raise _unreadable(path, e) from e


def check_checkpoint_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is in torch's zip format (else its legacy pickle format); a one-line
    error naming the file when it is missing, a directory, empty, or visibly not a whole
    torch checkpoint. Reads only the file's first and last bytes.

    Example:
        >>> check_checkpoint_file("checkpoint_final.pt")  # doctest: +SKIP
        True
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ValueError(f"Checkpoint {path} is a directory; pass the checkpoint file itself{hint}.")
    require_file(path, "Checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"Checkpoint {path} is empty (0 bytes); the download or copy did not finish.")
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # a zip whose end-of-archive record is gone: cut off
        raise ValueError(f"Checkpoint {path} is truncated: a torch zip archive without its end ({size:,} bytes); "
                         "download or copy it again.")
    if not head.startswith(b"\x80"):  # torch's legacy format starts with a pickle PROTO opcode
        raise ValueError(f"{path} is not a torch checkpoint: it starts with {head!r}, neither a zip archive (PK) "
                         "nor a pickle.")
    return False


def _unreadable(path: Path, error: BaseException) -> ValueError:
    reason = _one_line(error).split(" This is an internal miniz error")[0] or type(error).__name__  # drop the advice
    return ValueError(f"Checkpoint {path} is not a readable torch checkpoint ({path.stat().st_size:,} bytes; "
                      f"{reason[:200]}); it is probably truncated or damaged: download or copy it again.")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def to_plain(obj: Any) -> Any:
    """Stand-in omegaconf containers, ``Namespace`` and nested dicts -> plain dicts/lists.

    Example:
        >>> to_plain(argparse.Namespace(decoder_attention_heads=32))
        {'decoder_attention_heads': 32}
    """
    if isinstance(obj, PickledObject):
        state = obj.__dict__
        if "_content" in state:  # DictConfig / ListConfig
            return to_plain(state["_content"])
        if "_val" in state:  # a value node
            return to_plain(state["_val"])
        return {k: to_plain(v) for k, v in state.items() if not k.startswith("_")}
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def _checkpoint_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar training settings from ``cfg.model`` (new fairseq) and ``args`` (legacy)."""
    cfg = to_plain(checkpoint.get("cfg"))
    sources = [cfg.get("model") if isinstance(cfg, dict) else None, to_plain(checkpoint.get("args"))]
    settings: dict[str, Any] = {}
    for source in sources:
        if isinstance(source, dict):
            for key, value in source.items():
                if isinstance(value, (int, float, str, bool)):
                    settings.setdefault(key, value)
    return settings


# ============================================================================ key mapping

# Wrappers that prefix or interleave module paths: DDP, torch.compile, activation
# checkpointing, FSDP. Stripped here, in one place.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_fpw_module.")


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes and wrapper path parts from every key.

    Example:
        >>> strip_wrapper_prefixes({"module._orig_mod.aligner.encoder_query": 1})
        {'aligner.encoder_query': 1}
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key
        while new.startswith(_WRAPPER_PREFIXES):
            new = new.split(".", 1)[1]
        for part in _WRAPPER_PARTS:
            new = new.replace("." + part, ".")
        if new in out:
            raise ValueError(f"Checkpoint key {key!r} duplicates another key once wrapper prefixes are removed.")
        out[new] = value
    return out


# torchscale DecoderLayer / EncoderLayer -> our Block (modules; ".weight"/".bias" appended).
_BLOCK = {
    "self_attn_layer_norm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.out_proj",
    "self_attn.inner_attn_ln": "attn.sub_norm",  # Magneto sub-LN before out_proj
    "final_layer_norm": "ffn_norm",
    "ffn.fc1": "ffn.fc1", "ffn.ffn_layernorm": "ffn.sub_norm", "ffn.fc2": "ffn.fc2",
}
# torchscale builds no sub-LN for cross-attention (inner_attn_ln needs self_attention).
_CROSS = {
    "encoder_attn_layer_norm": "cross_norm",
    "encoder_attn.q_proj": "cross_attn.q_proj", "encoder_attn.k_proj": "cross_attn.k_proj",
    "encoder_attn.v_proj": "cross_attn.v_proj", "encoder_attn.out_proj": "cross_attn.out_proj",
}
# open_clip ResidualAttentionBlock (torchscale ``ts_attn``) -> transformers CLIPEncoderLayer.
_VIT_BLOCK = {
    "ln_1": "layer_norm1",
    "ts_attn.q_proj": "self_attn.q_proj", "ts_attn.k_proj": "self_attn.k_proj",
    "ts_attn.v_proj": "self_attn.v_proj", "ts_attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}

MLLM, VIT = "gpt_model.decoder", "img_model.visual"
MLLM_LAYERS, VIT_BLOCKS = f"{MLLM}.layers", f"{VIT}.transformer.resblocks"
ALIGNER_ENCODER, ALIGNER_DECODER = "aligner.encoder_proj.layers", "aligner.encoder.layers"

# Keys inference does not need, with the reason (logged).
_IGNORED_KEYS = {
    f"{MLLM}.output_projection.weight": "LM head (a saved copy of embed_tokens; kosmos-g ties them)",
    f"{MLLM}.embed_positions._float_tensor": "fairseq dtype marker of the sinusoidal table",
    f"{MLLM}.self_attn_sope.scale": "xPos buffer the official decoder never applies",
    f"{MLLM}.version": "fairseq version marker",
}
_IGNORED_PREFIXES = {
    "aligner.decoder_query": "AlignerNet N (stage-2 reconstruction)",
    "aligner.decoder.": "AlignerNet N (stage-2 reconstruction)",
    "aligner.decoder_proj.": "AlignerNet N (stage-2 reconstruction)",
    "aligner.clip_encoder.": "frozen CLIP text encoder (stage-2 target)",
    "diffusion_unet.": "frozen Stable Diffusion U-Net copy (use a diffusers folder)",
    "vae.": "frozen Stable Diffusion VAE copy (use a diffusers folder)",
}


def _ignored_reason(key: str) -> str | None:
    if key in _IGNORED_KEYS:
        return _IGNORED_KEYS[key]
    for prefix, reason in _IGNORED_PREFIXES.items():
        if key == prefix or key.startswith(prefix):
            return reason
    return None


def _count_layers(keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _key_map(n_mllm: int, n_vit: int, n_enc: int, n_dec: int) -> dict[str, str]:
    """Every official key of a model with these layer counts -> our key."""
    m: dict[str, str] = {}

    def module(official: str, ours: str) -> None:
        m[f"{official}.weight"], m[f"{official}.bias"] = f"{ours}.weight", f"{ours}.bias"

    def blocks(official: str, ours: str, count: int, table: dict[str, str]) -> None:
        for i in range(count):
            for o, u in table.items():
                module(f"{official}.{i}.{o}", f"{ours}.{i}.{u}")

    # MLLM (positions are sinusoidal: nothing to load)
    m[f"{MLLM}.embed_tokens.weight"] = "mllm.embed_tokens.weight"
    blocks(MLLM_LAYERS, "mllm.layers", n_mllm, _BLOCK)
    module(f"{MLLM}.layer_norm", "mllm.final_norm")
    # vision tower
    clip = "vision.clip"
    m[f"{VIT}.conv1.weight"] = f"{clip}.embeddings.patch_embedding.weight"
    m[f"{VIT}.class_embedding"] = f"{clip}.embeddings.class_embedding"
    m[f"{VIT}.positional_embedding"] = f"{clip}.embeddings.position_embedding.weight"
    module(f"{VIT}.ln_pre", f"{clip}.pre_layrnorm")
    blocks(VIT_BLOCKS, f"{clip}.encoder.layers", n_vit, _VIT_BLOCK)
    module(f"{VIT}.ln_post", f"{clip}.post_layernorm")
    # resampler ("xconnector")
    module("img_connector.dense", "resampler.dense")
    m["img_connector.latent_query"] = "resampler.latents"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        module(f"img_connector.x_attn.{proj}", f"resampler.attn.{proj}")
    # AlignerNet M: torchscale Encoder (encoder_proj) -> queries -> Decoder (encoder)
    module("aligner.encoder_proj.embed_tokens", "aligner.in_proj")
    m["aligner.encoder_proj.embed_positions.weight"] = "aligner.in_positions"
    blocks(ALIGNER_ENCODER, "aligner.encoder", n_enc, _BLOCK)
    module("aligner.encoder_proj.layer_norm", "aligner.encoder_norm")
    m["aligner.encoder_query"] = "aligner.queries"
    blocks(ALIGNER_DECODER, "aligner.decoder", n_dec, {**_BLOCK, **_CROSS})
    module("aligner.encoder.layer_norm", "aligner.decoder_norm")
    return m


def _resolve_vit_attention(state: dict[str, Any], n_vit: int) -> dict[str, Any]:
    """Use each ViT block's ``ts_attn`` (what the official forward runs); split open_clip's
    fused ``attn.in_proj_*`` into q/k/v only for a block that has no ``ts_attn``."""
    state = dict(state)
    for i in range(n_vit):
        block = f"{VIT_BLOCKS}.{i}."
        fused = {k for k in state if k.startswith(block + "attn.")}
        has_ts = any(k.startswith(block + "ts_attn.") for k in state)
        if fused and not has_ts and block + "attn.in_proj_weight" in state:
            w, b = state[block + "attn.in_proj_weight"], state.get(block + "attn.in_proj_bias")
            d = w.shape[0] // 3
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                # clone: rows of one tensor would share storage, which safetensors refuses
                state[f"{block}ts_attn.{proj}.weight"] = w[j * d:(j + 1) * d].clone()
                if b is not None:
                    state[f"{block}ts_attn.{proj}.bias"] = b[j * d:(j + 1) * d].clone()
            for part in ("weight", "bias"):
                if f"{block}attn.out_proj.{part}" in state:
                    state[f"{block}ts_attn.out_proj.{part}"] = state[f"{block}attn.out_proj.{part}"]
        elif fused and not has_ts:
            continue  # incomplete: reported as missing ts_attn keys / unknown attn keys
        for k in fused:
            del state[k]
    return state


def _group(keys: list[str], limit: int = 20) -> str:
    """Keys summarised by pattern (layer numbers -> N), with counts."""
    groups: dict[str, int] = {}
    for k in keys:
        pattern = re.sub(r"\.\d+\.", ".N.", k)
        groups[pattern] = groups.get(pattern, 0) + 1
    items = [f"{p} (x{n})" if n > 1 else p for p, n in sorted(groups.items())]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _model_state(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, settings) of a fairseq checkpoint dict, or of a bare ``model`` state dict."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected a checkpoint dict, got {type(checkpoint).__name__}.")
    if isinstance(checkpoint.get("model"), Mapping):
        return strip_wrapper_prefixes(checkpoint["model"]), _checkpoint_settings(checkpoint)
    state = strip_wrapper_prefixes(checkpoint)
    if any(k.startswith(MLLM + ".") for k in state) and all(torch.is_tensor(v) for v in state.values()):
        return state, {}  # the bare `model` dict of a checkpoint
    raise ValueError(
        "Not an official Kosmos-G checkpoint: expected a fairseq checkpoint dict with a 'model' entry "
        f"(keys args, cfg, model, ...); found top-level keys {sorted(map(str, checkpoint))[:20]}."
    )


def _check_layout(state: dict[str, Any]) -> None:
    """Fail early, and clearly, when whole components are absent."""
    top = sorted({".".join(k.split(".")[:2]) for k in state})
    problems = []
    if not any(k.startswith(MLLM_LAYERS + ".0.") for k in state):
        problems.append(f"no MLLM layers ({MLLM_LAYERS}.0.*)")
    if not any(k.startswith(VIT + ".") for k in state):
        problems.append(f"no vision tower ({VIT}.*)")
    if not any(k.startswith("img_connector.") for k in state):
        problems.append("no resampler (img_connector.*)")
    if not any(k.startswith("aligner.encoder_proj.") for k in state):
        problems.append("no AlignerNet M (aligner.encoder_proj.*, aligner.encoder_query, aligner.encoder.*); "
                        "checkpoint_stage1.pt holds only the MLLM: convert checkpoint_final.pt instead")
    if problems:
        raise ValueError("Not the official Kosmos-G layout: " + "; ".join(problems)
                         + f". The checkpoint's weights have these prefixes: {top[:30]}.")


# ============================================================================ sizes -> config

def _infer_sizes(state: dict[str, Any], n_mllm: int, n_vit: int, n_enc: int, n_dec: int) -> dict[str, dict[str, int]]:
    """Every size that tensor shapes determine (head counts are not among them)."""
    vocab, width = state[f"{MLLM}.embed_tokens.weight"].shape
    vit_width, _, patch, _ = state[f"{VIT}.conv1.weight"].shape
    n_pos = state[f"{VIT}.positional_embedding"].shape[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{VIT}.positional_embedding has {n_pos} rows; expected a square grid + 1 class token.")
    res_out, res_in = state["img_connector.dense.weight"].shape
    al_hidden, al_in = state["aligner.encoder_proj.embed_tokens.weight"].shape
    al_fc1 = next((state[f"{p}.0.ffn.fc1.weight"] for p, n in ((ALIGNER_ENCODER, n_enc), (ALIGNER_DECODER, n_dec))
                   if n), None)
    aligner = dict(input_dim=al_in, hidden_size=al_hidden, output_dim=al_hidden, encoder_layers=n_enc,
                   decoder_layers=n_dec, num_queries=state["aligner.encoder_query"].shape[0],
                   max_positions=state["aligner.encoder_proj.embed_positions.weight"].shape[0])
    if al_fc1 is not None:
        aligner["ffn_dim"] = al_fc1.shape[0]
    return {
        "vision": dict(image_size=grid * patch, patch_size=patch, hidden_size=vit_width, num_layers=n_vit,
                       intermediate_size=state[f"{VIT_BLOCKS}.0.mlp.c_fc.weight"].shape[0]),
        "resampler": dict(input_dim=res_in, output_dim=res_out,
                          num_queries=state["img_connector.latent_query"].shape[0]),
        "mllm": dict(vocab_size=vocab, hidden_size=width, num_layers=n_mllm,
                     ffn_dim=state[f"{MLLM_LAYERS}.0.ffn.fc1.weight"].shape[0]),
        "aligner": aligner,
    }


def _as_config(config: KosmosGConfig | str | os.PathLike) -> KosmosGConfig:
    if isinstance(config, KosmosGConfig):
        return config
    if isinstance(config, str) and config in list_presets():
        return get_preset(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"Config {config!r} is neither a preset ({list_presets()}) nor a config.json file.")
    try:
        return KosmosGConfig.load(path)
    except (ValueError, TypeError) as e:  # bad JSON, unknown or mistyped fields
        raise ValueError(f"{path} is not a kosmos-g config.json: {_one_line(e)}") from e


def _fmt(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _resolve_config(sizes: dict[str, dict[str, int]], settings: dict[str, Any],
                    config: KosmosGConfig | str | os.PathLike | None) -> KosmosGConfig:
    """A config with the checkpoint's sizes. The MLLM's (and the resampler's) head count is
    the checkpoint's own ``decoder_attention_heads`` or ``config``'s, which must then agree;
    the vision tower's and AlignerNet's come from the preset whose sizes match (the
    official code fixes them; tensor shapes cannot tell them)."""
    heads = settings.get("decoder_attention_heads")  # what the checkpoint was trained with
    if config is not None:
        config = _as_config(config)
        wrong = [f"{comp}.{k}: checkpoint {v}, config {getattr(getattr(config, comp), k)}"
                 for comp, values in sizes.items() for k, v in values.items()
                 if getattr(getattr(config, comp), k) != v]
        if heads is not None:
            wrong += [f"{comp}.num_heads: checkpoint decoder_attention_heads {heads}, config {part.num_heads}"
                      for comp, part in (("mllm", config.mllm), ("resampler", config.resampler))
                      if part.num_heads != int(heads)]
        if wrong:
            raise ValueError("The checkpoint does not match the given config:\n  " + "\n  ".join(wrong))
        return config

    presets = sorted(list_presets(), key=lambda name: name != "kosmos-g")  # the paper's first

    def matches(preset: KosmosGConfig, comp: str) -> bool:
        part = getattr(preset, comp)
        if comp == "mllm" and part.backbone != "magneto":
            return False
        return all(getattr(part, k) == v for k, v in sizes[comp].items())

    def matching(comp: str) -> str | None:
        return next((n for n in presets if matches(get_preset(n), comp)), None)

    whole = next((n for n in presets if all(matches(get_preset(n), c) for c in sizes)), None)
    parts: dict[str, Any] = {}
    problems = []
    if heads is None:
        problems.append("it records no MLLM head count (cfg.model.decoder_attention_heads or "
                        "args.decoder_attention_heads; a file of model weights alone has neither)")
    for comp in ("vision", "aligner"):
        name = matching(comp)
        if name is None:
            problems.append(f"{comp} ({_fmt(sizes[comp])}) matches no preset, so its head count is unknown")
        else:
            parts[comp] = dataclasses.replace(getattr(get_preset(name), comp), **sizes[comp])
    if problems:
        fix = f"{whole}, the preset these sizes match" if whole else "PRESET_OR_CONFIG_JSON"
        raise ValueError("Cannot build a config from the checkpoint alone: " + "; ".join(problems)
                         + f". Pass config= (CLI: --config {fix}) to say the architecture.")
    heads = int(heads)
    reference = get_preset("kosmos-g")
    mllm_name = matching("mllm")
    base_mllm = get_preset(mllm_name).mllm if mllm_name is not None else reference.mllm
    max_positions = base_mllm.max_positions if mllm_name is not None else int(
        settings.get("max_target_positions") or settings.get("tokens_per_sample") or base_mllm.max_positions)
    parts["mllm"] = dataclasses.replace(base_mllm, **sizes["mllm"], num_heads=heads, max_positions=max_positions)
    # The official connector's attention uses the MLLM's head count (decoder_attention_heads).
    res_name = matching("resampler")
    base_res = get_preset(res_name).resampler if res_name is not None else reference.resampler
    parts["resampler"] = dataclasses.replace(base_res, **sizes["resampler"], num_heads=heads)
    # Top-level fields (max_images, image statistics) from a preset matching throughout.
    return dataclasses.replace(get_preset(whole) if whole else reference, **parts)


# ============================================================================ conversion

def convert_official_state_dict(
    checkpoint: Mapping[str, Any], config: KosmosGConfig | str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], KosmosGConfig]:
    """Official weights -> (our state dict, our config).

    ``checkpoint`` is the loaded checkpoint (its ``cfg``/``args`` supply the MLLM head
    count) or just its ``model`` dict. Sizes come from tensor shapes; ``config`` (a
    :class:`KosmosGConfig`, preset name or ``config.json``) is needed when the checkpoint
    records no head count (a bare ``model`` dict) or its sizes match no preset, and is
    then checked against the shapes and the recorded head count.

    Example:
        >>> ckpt = load_official_checkpoint("checkpoint_final.pt")  # doctest: +SKIP
        >>> state, config = convert_official_state_dict(ckpt)  # doctest: +SKIP
        >>> config == get_preset("kosmos-g")  # doctest: +SKIP
        True
    """
    state, settings = _model_state(checkpoint)
    _check_layout(state)
    keys = list(state)
    counts = dict(n_mllm=_count_layers(keys, MLLM_LAYERS), n_vit=_count_layers(keys, VIT_BLOCKS),
                  n_enc=_count_layers(keys, ALIGNER_ENCODER), n_dec=_count_layers(keys, ALIGNER_DECODER))
    state = _resolve_vit_attention(state, counts["n_vit"])
    key_map = _key_map(**counts)

    missing = [k for k in key_map if k not in state]
    ignored: dict[str, int] = {}
    unknown = []
    for k in state:
        if k in key_map:
            continue
        reason = _ignored_reason(k)
        if reason is None:
            unknown.append(k)
        else:
            ignored[reason] = ignored.get(reason, 0) + 1
    if missing or unknown:
        lines = ["The checkpoint's weights are not in the official Kosmos-G layout."]
        if missing:
            lines.append(f"Missing ({len(missing)}): {_group(missing)}")
        if unknown:
            lines.append(f"Unrecognised ({len(unknown)}): {_group(unknown)}")
        raise ValueError("\n".join(lines))

    sizes = _infer_sizes(state, **counts)
    config = _resolve_config(sizes, settings, config)
    ours = {key_map[k]: state[k] for k in key_map}
    _check_shapes(ours, config, {v: k for k, v in key_map.items()})

    embed, head = state[f"{MLLM}.embed_tokens.weight"], state.get(f"{MLLM}.output_projection.weight")
    if head is not None and head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
        logger.warning("output_projection differs from embed_tokens; kosmos-g ties them, so the stage-1 LM "
                       "head will use embed_tokens (the diffusion condition does not depend on it).")
    for reason, n in sorted(ignored.items()):
        logger.info("Ignored %d tensor(s): %s", n, reason)
    logger.info("Mapped %d tensors; MLLM %d layers x %d wide, %d heads.", len(ours),
                config.mllm.num_layers, config.mllm.hidden_size, config.mllm.num_heads)
    return ours, config


def _check_shapes(state: dict[str, torch.Tensor], config: KosmosGConfig, official: dict[str, str]) -> None:
    with init_empty_weights(include_buffers=False):
        expected = KosmosG(config).state_dict()
    wrong = [f"{official.get(k, k)}: {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    extra = sorted(set(expected) - set(state))
    if wrong or extra:
        raise ValueError("The checkpoint's tensor shapes do not fit one model:\n  "
                         + "\n  ".join(wrong[:20] + [f"no weight for {k}" for k in extra[:20]]))


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors (to the checkpoint's dominant float dtype when ``dtype`` is None).

    A narrowing cast is checked: a value beyond the new dtype's range is an error, and
    weights the cast changes are reported. The release's fp32 tensors are fp16 values cast
    up (it trained with ``--memory-efficient-fp16``, which keeps no fp32 master copy, and
    fairseq saves fp16 tensors as fp32), so fp16 keeps every one of them exactly.
    """
    if dtype is None:
        totals: dict[torch.dtype, int] = {}
        for t in state.values():
            if t.is_floating_point():
                totals[t.dtype] = totals.get(t.dtype, 0) + t.numel()
        dtype = max(totals, key=totals.get) if totals else torch.float32
    out, storages = {}, set()
    overflow, changed, narrowed = [], [], 0
    for key, tensor in tqdm(state.items(), desc="Converting weights", unit="tensor", disable=None):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            cast = tensor.to(dtype)
            if torch.finfo(dtype).bits <= torch.finfo(tensor.dtype).bits:  # widening casts are exact
                narrowed += 1
                back = cast.to(tensor.dtype)
                if bool((torch.isinf(cast) & torch.isfinite(tensor)).any()):
                    overflow.append(f"{key} (max |x| {tensor.abs().max().item():.4g})")
                elif not torch.equal(back, tensor):
                    changed.append((float((back - tensor).abs().max()), key))
            tensor = cast
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages:  # shared storage in the pickle: safetensors needs separate tensors
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    name = str(dtype).removeprefix("torch.")
    if overflow:
        raise ValueError(f"{len(overflow)} tensor(s) hold values beyond {name}'s range, e.g. {overflow[0]}; "
                         "convert with --dtype bf16 or fp32 (Python: dtype=).")
    if changed:
        worst, key = max(changed)
        logger.warning("%d of %d tensors change when cast to %s (largest change %.3g, in %s); this checkpoint "
                       "was not trained in %s. Pass --dtype fp32 (Python: dtype='fp32') to keep them exactly.",
                       len(changed), narrowed, name, worst, key, name)
    elif narrowed:
        logger.info("All %d cast tensors hold exactly the same values in %s.", narrowed, name)
    return out


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"Output path {out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"Output folder {out_dir} already exists and is not empty; choose another -o "
                         "or pass --overwrite (Python: overwrite=True).")


def convert_official(
    ckpt: str | os.PathLike | Mapping[str, Any],
    dict_path: str | os.PathLike,
    spm_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    trust_pickle: bool = False,
    dtype: torch.dtype | str | None = "fp16",
    *,
    config: KosmosGConfig | str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an official checkpoint + tokenizer files into a kosmos-g folder.

    The folder (``config.json``, ``model.safetensors``, ``processor_config.json``,
    ``tokenizer/``) is written to a temporary folder beside ``out_dir`` and renamed into
    place, so an interrupted run never leaves a half-written model. ``dtype`` ("fp16",
    "bf16", "fp32"; None keeps the checkpoint's own) defaults to fp16, which holds the
    release's fp32 tensors exactly (they are fp16 training weights cast up); a weight the
    cast would change is reported, one it would overflow is an error. ``ckpt`` may also be
    a file holding only the ``model`` tensors; ``config`` then says the architecture.

    Example:
        >>> out = convert_official("checkpoint_final.pt", "dict.txt", "sentencepiece.bpe.model",
        ...                        "checkpoints/kosmos-g")  # doctest: +SKIP
        >>> model = KosmosG.from_pretrained(out, dtype="fp16", device="cuda")  # doctest: +SKIP
    """
    # Every argument is checked before the (multi-GB) checkpoint is read.
    out_dir = Path(out_dir)
    dtype = resolve_dtype(dtype)
    is_path = isinstance(ckpt, (str, os.PathLike))
    if is_path:
        check_checkpoint_file(ckpt)
    tokenizer = FairseqTokenizer(spm_path, dict_path)
    if config is not None:
        config = _as_config(config)
    _check_out_dir(out_dir, overwrite)

    if is_path:
        logger.info("Loading %s (%.2f GB)", ckpt, Path(ckpt).stat().st_size / 1e9)
        checkpoint = load_official_checkpoint(ckpt, trust_pickle=trust_pickle)
    else:
        checkpoint = ckpt
    try:
        state, config = convert_official_state_dict(checkpoint, config)
    except ValueError as e:
        if not is_path:
            raise
        raise ValueError(f"{ckpt}: {e}") from e
    if len(tokenizer) > config.mllm.vocab_size:
        raise ValueError(f"The dictionary {dict_path} gives {len(tokenizer):,} symbols but the checkpoint embeds "
                         f"only {config.mllm.vocab_size:,}: they do not belong together (the release's dict.txt "
                         "gives 64,007).")
    if len(tokenizer) < config.mllm.vocab_size:
        logger.warning("The dictionary %s gives %d symbols but the checkpoint embeds %d; check that it belongs to "
                       "this checkpoint (the release's gives 64,007).", dict_path, len(tokenizer),
                       config.mllm.vocab_size)
    processor = KosmosGProcessor.from_config(tokenizer, config)
    state = _cast(state, dtype)
    with init_empty_weights(include_buffers=False):
        model = KosmosG(config)
    model.load_state_dict_strict(state, assign=True)

    logger.info("Writing %s", out_dir)
    with atomic_dir(out_dir, replace=True) as tmp:  # checked above: absent, empty, or overwrite=True
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir
