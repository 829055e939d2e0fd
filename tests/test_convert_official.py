"""The official-checkpoint converter.

A tiny state dict in the OFFICIAL key layout (fairseq/torchscale/open_clip names) is
pickled the way the release's fairseq trainer saves it (``cfg`` a plain dict, ``args``
None, every tensor fp32 holding fp16 training values, ``output_projection`` a separate copy
of ``embed_tokens``, frozen U-Net/VAE copies, optimizer and metrics state), converted
through the CLI and the Python API, and our
``KosmosG.encode`` is checked against a reference forward written below in plain torch
ops, directly on the official tensors, from the official semantics: fairseq sinusoidal
positions from padding_idx + 1 with [sin | cos] halves, sqrt(d) scaling of tokens and
spliced image features, sub-LN attention/FFN, a QuickGELU ViT with L2-normalised
``ln_post`` tokens, the resampler over concat(image tokens, queries), AlignerNet M with
learned positions from index 2, and padding masks.
"""

from __future__ import annotations

import argparse
import math
import re
import os
import subprocess
import sys
import types
import typing
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from kosmos_g import KosmosG, KosmosGProcessor
from kosmos_g.cli import main
from kosmos_g.convert import (UnsafeCheckpointError, convert_official, convert_official_state_dict,
                              load_official_checkpoint)
from kosmos_g.convert.official import PickledObject, to_plain
from kosmos_g.testing import make_tiny_tokenizer

# Tiny official-layout sizes (they equal the `tiny` preset, except the vocabulary, which is
# the dictionary's size as in the release).
PAD, BOS = 1, 0
D, LAYERS, HEADS, FFN = 64, 2, 4, 128  # MLLM
VW, VLAYERS, VHEADS, VFFN, IMG, PATCH = 32, 2, 4, 64, 28, 14  # ViT
QUERIES = 4  # resampler slots per image
AW, AHEADS, AFFN, AENC, ADEC, ACOND, APOS = 32, 4, 64, 2, 2, 77, 512  # AlignerNet M


# ----------------------------------------------------------------------------- official-layout weights

@dataclass(frozen=True)
class Sizes:
    d: int = D
    layers: int = LAYERS
    heads: int = HEADS
    ffn: int = FFN
    vw: int = VW
    vlayers: int = VLAYERS
    vffn: int = VFFN
    img: int = IMG
    queries: int = QUERIES
    aw: int = AW
    affn: int = AFFN
    aenc: int = AENC
    adec: int = ADEC
    apos: int = APOS


# The release's sizes (kosmosg_xl + ViT-L/14 + AlignerNet), for a shapes-only check.
OFFICIAL_SIZES = Sizes(d=2048, layers=24, heads=32, ffn=8192, vw=1024, vlayers=24, vffn=4096, img=224,
                       queries=64, aw=768, affn=3072, aenc=12, adec=12, apos=32768)


def official_state_dict(vocab: int, seed: int = 0, s: Sizes = Sizes(), device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape: int, std: float) -> torch.Tensor:
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * std

    def linear(name: str, n_out: int, n_in: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(n_out, n_in, std=n_in ** -0.5), rand(n_out, std=0.1)

    def norm(name: str, d: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rand(d, std=0.2), rand(d, std=0.2)

    def torchscale_layer(p: str, d: int, ffn: int, cross: bool = False) -> None:
        norm(f"{p}.self_attn_layer_norm", d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{p}.self_attn.{proj}", d, d)
        norm(f"{p}.self_attn.inner_attn_ln", d)
        if cross:
            norm(f"{p}.encoder_attn_layer_norm", d)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{p}.encoder_attn.{proj}", d, d)
        norm(f"{p}.final_layer_norm", d)
        linear(f"{p}.ffn.fc1", ffn, d)
        norm(f"{p}.ffn.ffn_layernorm", ffn)
        linear(f"{p}.ffn.fc2", d, ffn)

    # MLLM (fairseq LMDecoder over a torchscale Decoder)
    sd["gpt_model.decoder.embed_tokens.weight"] = rand(vocab, s.d, std=s.d ** -0.5)
    for i in range(s.layers):
        torchscale_layer(f"gpt_model.decoder.layers.{i}", s.d, s.ffn)
    norm("gpt_model.decoder.layer_norm", s.d)
    # open_clip ViT with torchscale ts_attn, no proj
    v = "img_model.visual"
    sd[f"{v}.conv1.weight"] = rand(s.vw, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5)
    sd[f"{v}.class_embedding"] = rand(s.vw, std=s.vw ** -0.5)
    sd[f"{v}.positional_embedding"] = rand((s.img // PATCH) ** 2 + 1, s.vw, std=s.vw ** -0.5)
    norm(f"{v}.ln_pre", s.vw)
    for i in range(s.vlayers):
        p = f"{v}.transformer.resblocks.{i}"
        norm(f"{p}.ln_1", s.vw)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{p}.ts_attn.{proj}", s.vw, s.vw)
        norm(f"{p}.ln_2", s.vw)
        linear(f"{p}.mlp.c_fc", s.vffn, s.vw)
        linear(f"{p}.mlp.c_proj", s.vw, s.vffn)
    norm(f"{v}.ln_post", s.vw)
    # xconnector
    linear("img_connector.dense", s.d, s.vw)
    sd["img_connector.latent_query"] = rand(s.queries, s.d, std=1.0)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        linear(f"img_connector.x_attn.{proj}", s.d, s.d)
    # AlignerNet M
    linear("aligner.encoder_proj.embed_tokens", s.aw, s.d)
    sd["aligner.encoder_proj.embed_positions.weight"] = rand(s.apos, s.aw, std=0.5)
    for i in range(s.aenc):
        torchscale_layer(f"aligner.encoder_proj.layers.{i}", s.aw, s.affn)
    norm("aligner.encoder_proj.layer_norm", s.aw)
    sd["aligner.encoder_query"] = rand(ACOND, s.aw, std=1.0)
    for i in range(s.adec):
        torchscale_layer(f"aligner.encoder.layers.{i}", s.aw, s.affn, cross=True)
    norm("aligner.encoder.layer_norm", s.aw)
    # what inference ignores; fairseq's save casts each tensor on its own, so the tied head is a copy
    sd["gpt_model.decoder.output_projection.weight"] = sd["gpt_model.decoder.embed_tokens.weight"].clone()
    sd["gpt_model.decoder.embed_positions._float_tensor"] = rand(1, std=0.0)
    sd["gpt_model.decoder.self_attn_sope.scale"] = rand(s.d // s.heads // 2, std=1.0)
    sd["aligner.decoder_query"] = rand(s.apos, s.aw, std=1.0)
    sd["aligner.decoder.layers.0.self_attn.q_proj.weight"] = rand(s.aw, s.aw, std=1.0)
    sd["aligner.decoder_proj.embed_positions.weight"] = rand(s.apos, s.aw, std=1.0)
    sd["aligner.clip_encoder.text_model.final_layer_norm.weight"] = rand(s.aw, std=1.0)
    sd["diffusion_unet.unet.x"] = rand(3, std=1.0)
    sd["vae.vae.y"] = rand(3, std=1.0)
    # fp32 holding fp16 values: the release trained in fp16 and fairseq saves fp32 copies
    return sd if device == "meta" else {k: v.half().float() for k, v in sd.items()}


# ----------------------------------------------------------------------------- a fairseq-like pickle

def _fake_class(module: str, name: str, base: type = object) -> type:
    cls = type(name, (base,), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


class _Node:
    """Pickles like omegaconf's Node: __dict__ minus the flags cache, via BUILD."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_flags_cache", None)
        return state


OMEGACONF = {name: _fake_class(f"omegaconf.{mod}", name, _Node) for mod, name in
             (("dictconfig", "DictConfig"), ("listconfig", "ListConfig"), ("base", "Metadata"),
              ("base", "ContainerMetadata"), ("nodes", "AnyNode"), ("nodes", "StringNode"),
              ("nodes", "IntegerNode"))}


def _metadata(cls_name: str, **fields) -> object:
    meta = OMEGACONF[cls_name]()
    meta.__dict__.update({"optional": True, "key": None, "flags": {}, "flags_root": False,
                          "resolver_cache": defaultdict(dict), **fields})
    return meta


def _node(kind: str, value, key: str, parent) -> object:
    node = OMEGACONF[kind]()
    node.__dict__.update(_metadata=_metadata("Metadata", ref_type=typing.Optional[int], object_type=int if
                                             isinstance(value, int) else str, key=key),
                         _parent=parent, _val=value, _flags_cache=None)
    return node


def fake_dictconfig(content: dict, parent=None) -> object:
    """An object that pickles as ``omegaconf.dictconfig.DictConfig`` with omegaconf's state layout."""
    cfg = OMEGACONF["DictConfig"]()
    cfg.__dict__.update(_metadata=_metadata("ContainerMetadata", ref_type=typing.Any, object_type=dict,
                                            key_type=typing.Any, element_type=typing.Any),
                        _parent=parent, _flags_cache=None)
    nodes = {}
    for key, value in content.items():
        if isinstance(value, dict):
            nodes[key] = fake_dictconfig(value, parent=cfg)
        elif isinstance(value, list):
            lst = OMEGACONF["ListConfig"]()
            lst.__dict__.update(_metadata=_metadata("ContainerMetadata", ref_type=typing.List, object_type=list,
                                                    key_type=int, element_type=typing.Any),
                                _parent=cfg, _content=[_node("AnyNode", x, i, None) for i, x in enumerate(value)])
            nodes[key] = lst
        else:
            nodes[key] = _node("IntegerNode" if isinstance(value, int) else "StringNode", value, key, cfg)
    cfg.__dict__["_content"] = nodes
    return cfg


@contextmanager
def fake_omegaconf_importable():
    """Register the fake classes as omegaconf modules only while pickling."""
    saved = {m: sys.modules.get(m) for m in ("omegaconf", "omegaconf.dictconfig", "omegaconf.listconfig",
                                             "omegaconf.base", "omegaconf.nodes")}
    for module in saved:
        sys.modules[module] = types.ModuleType(module)
    for cls in OMEGACONF.values():
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        yield
    finally:
        for module, old in saved.items():
            if old is None:
                sys.modules.pop(module, None)
            else:
                sys.modules[module] = old


def _trainer_state(model: dict) -> dict:
    """Everything but args/cfg, as fairseq's Trainer.state_dict() and save_checkpoint() write it."""
    weights = OrderedDict(model)  # nn.Module.state_dict(): an OrderedDict with version metadata
    weights._metadata = OrderedDict([("", {"version": 1}), ("gpt_model", {"version": 1})])
    return {
        "model": weights,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "KosmosGLoss", "optimizer_name": "MemoryEfficientFP16Optimizer",
                               "lr_scheduler_state": {"best": None}, "num_updates": 7}],
        "task_state": {},
        "extra_state": {"metrics": OrderedDict(train=[(0, "loss", "AverageMeter",
                                                       {"val": np.float64(2.5), "sum": 5.0, "count": 2,
                                                        "round": 3})]),
                        "previous_training_time": 12.5, "val_loss": None,
                        "train_iterator": {"epoch": 1, "iterations_in_epoch": 7, "shuffle": True,
                                           "random_state": np.arange(4, dtype=np.uint32)}},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                 "param_groups": [{"lr": [1e-3], "betas": (0.9, 0.98)}], "loss_scale": 4.0},
    }


def fairseq_checkpoint(model: dict, heads: int = HEADS) -> dict:
    """The release's format: fairseq's Trainer.state_dict() stores ``cfg`` as
    OmegaConf.to_container(...) (plain dicts and lists) and ``args`` as None."""
    cfg = {"_name": None,
           "common": {"seed": 0, "memory_efficient_fp16": True, "fp16": True, "user_dir": None},
           "model": {"_name": "kosmosg_xl", "decoder_attention_heads": heads, "decoder_layers": LAYERS,
                     "decoder_embed_dim": D, "tokens_per_sample": 2048, "max_target_positions": None,
                     "subln": True, "flash_attention": True, "latent_query_num": QUERIES,
                     "no_freeze_layer": "resblocks.1,ln_post", "adam_betas": [0.9, 0.98]},
           "task": {"_name": "kosmosg", "tokens_per_sample": 2048, "required_batch_size_multiple": 1,
                    "dict_path": "data/dict.txt", "image_token_length": QUERIES},
           "dataset": {"required_batch_size_multiple": 1, "batch_size": 2}}
    return {"args": None, "cfg": cfg, **_trainer_state(model)}


def omegaconf_fairseq_checkpoint(model: dict, heads: int = HEADS) -> dict:
    """What other fairseq versions write: an argparse ``args`` and the omegaconf DictConfig itself."""
    return {
        "args": argparse.Namespace(arch="kosmosg_xl", decoder_attention_heads=heads, tokens_per_sample=2048,
                                   subln=True, flash_attention=True, latent_query_num=QUERIES),
        "cfg": fake_dictconfig({"model": {"_name": "kosmosg", "decoder_attention_heads": heads,
                                          "decoder_layers": LAYERS, "no_freeze_layer": "resblocks.1,ln_post"},
                                "task": {"_name": "kosmosg", "image_token_length": QUERIES},
                                "common": {"seed": 0, "user_dir": ["unilm"]}}),
        **_trainer_state(model),
    }


def save_checkpoint(obj: dict, path: Path) -> Path:
    with fake_omegaconf_importable():
        torch.save(obj, path)
    return path


class Sneaky:
    """A class no allow-list knows: its presence must stop a safe load."""


class TypeOfOne:
    """Pickles as builtins.type(1): an allowed global called with arguments it refuses."""

    def __reduce__(self):
        return (type, (1,))


# ----------------------------------------------------------------------------- the reference forward

def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _lin(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def _attention(x, context, sd, p, heads, *, causal=False, key_padding=None, inner_ln=False):
    B, Tq, C = x.shape
    Tk, d = context.shape[1], C // heads
    q = (_lin(x, sd, f"{p}.q_proj") * d ** -0.5).view(B, Tq, heads, d).transpose(1, 2)
    k = _lin(context, sd, f"{p}.k_proj").view(B, Tk, heads, d).transpose(1, 2)
    v = _lin(context, sd, f"{p}.v_proj").view(B, Tk, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2)  # (B, heads, Tq, Tk)
    if causal:
        scores = scores + torch.full((Tq, Tk), float("-inf"), dtype=scores.dtype).triu(1)
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, C)
    if inner_ln:
        out = _ln(out, sd, f"{p}.inner_attn_ln")
    return _lin(out, sd, f"{p}.out_proj")


def _torchscale_layer(x, sd, p, heads, *, causal=False, key_padding=None, memory=None, memory_padding=None):
    h = _ln(x, sd, f"{p}.self_attn_layer_norm")
    x = x + _attention(h, h, sd, f"{p}.self_attn", heads, causal=causal, key_padding=key_padding, inner_ln=True)
    if memory is not None:
        h = _ln(x, sd, f"{p}.encoder_attn_layer_norm")
        x = x + _attention(h, memory, sd, f"{p}.encoder_attn", heads, key_padding=memory_padding)
    h = F.gelu(_lin(_ln(x, sd, f"{p}.final_layer_norm"), sd, f"{p}.ffn.fc1"))
    return x + _lin(_ln(h, sd, f"{p}.ffn.ffn_layernorm"), sd, f"{p}.ffn.fc2")


def _reference_vision(pixels, sd):
    v = "img_model.visual"
    x = F.conv2d(pixels, sd[f"{v}.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (N, g*g, W)
    cls = sd[f"{v}.class_embedding"].expand(x.shape[0], 1, -1)
    x = _ln(torch.cat([cls, x], dim=1) + sd[f"{v}.positional_embedding"], sd, f"{v}.ln_pre")
    for i in range(VLAYERS):
        p = f"{v}.transformer.resblocks.{i}"
        h = _ln(x, sd, f"{p}.ln_1")
        x = x + _attention(h, h, sd, f"{p}.ts_attn", VHEADS)
        h = _lin(_ln(x, sd, f"{p}.ln_2"), sd, f"{p}.mlp.c_fc")
        x = x + _lin(h * torch.sigmoid(1.702 * h), sd, f"{p}.mlp.c_proj")  # QuickGELU
    x = _ln(x, sd, f"{v}.ln_post")
    return x / x.norm(dim=-1, keepdim=True)


def _reference_resampler(tokens, sd):
    x = _lin(tokens, sd, "img_connector.dense")
    latents = sd["img_connector.latent_query"].expand(x.shape[0], -1, -1)
    return _attention(latents, torch.cat([x, latents], dim=1), sd, "img_connector.x_attn", HEADS)


def _sinusoidal(num: int, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num, dtype=torch.float64)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    table[PAD] = 0
    return table


def _reference_mllm(ids, image_mask, image_features, sd):
    nonpad = ids.ne(PAD).long()
    positions = torch.cumsum(nonpad, dim=1) * nonpad + PAD  # fairseq make_positions
    embeds = sd["gpt_model.decoder.embed_tokens.weight"][ids].clone()
    embeds[image_mask] = image_features.reshape(-1, D)
    x = math.sqrt(D) * embeds + _sinusoidal(int(positions.max()) + 1, D)[positions]
    for i in range(LAYERS):  # the official (flash) path: causal mask only
        x = _torchscale_layer(x, sd, f"gpt_model.decoder.layers.{i}", HEADS, causal=True)
    return _ln(x, sd, "gpt_model.decoder.layer_norm")


def _reference_aligner(hidden, padding, sd):
    e = "aligner.encoder_proj"
    T = hidden.shape[1]
    x = _lin(hidden, sd, f"{e}.embed_tokens") + sd[f"{e}.embed_positions.weight"][2:T + 2]
    x = x * (1 - padding[..., None].to(x.dtype))
    for i in range(AENC):
        x = _torchscale_layer(x, sd, f"{e}.layers.{i}", AHEADS, key_padding=padding)
    memory = _ln(x, sd, f"{e}.layer_norm")
    q = sd["aligner.encoder_query"].expand(hidden.shape[0], -1, -1)
    for i in range(ADEC):
        q = _torchscale_layer(q, sd, f"aligner.encoder.layers.{i}", AHEADS, memory=memory, memory_padding=padding)
    return _ln(q, sd, "aligner.encoder.layer_norm")


def reference_encode(sd, input_ids, image_mask, pixel_values):
    sd = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
    features = _reference_resampler(_reference_vision(pixel_values.double(), sd), sd)
    hidden = _reference_mllm(input_ids, image_mask, features, sd)
    return _reference_aligner(hidden, input_ids.eq(PAD), sd)


def reference_inputs(tok_dir: Path, prompts):
    """Token ids as the official demo builds them (kosmosg_preprocess), right-padded with <pad>."""
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sentencepiece.bpe.model"))
    symbols = ["<s>", "<pad>", "</s>", "<unk>"]
    symbols += [line.rsplit(" ", 1)[0] for line in (tok_dir / "dict.txt").read_text(encoding="utf-8").splitlines()]
    symbols += ["<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>"]
    index = {s: i for i, s in reversed(list(enumerate(symbols)))}
    boi, eoi = index["<image>"], index["</image>"]

    def text(t):
        return [index.get(piece, 3) for piece in sp.encode(t, out_type=str)]

    rows, masks = [], []
    for prompt in prompts:
        ids, mask = [BOS], [False]
        *snippets, tail = prompt.split("<i>")
        for snippet in snippets:
            ids += text(snippet) + [boi] * (QUERIES + 1) + [eoi]
            mask += [False] * len(text(snippet)) + [False] + [True] * QUERIES + [False]
        ids += text(tail)
        mask += [False] * len(text(tail))
        rows.append(ids)
        masks.append(mask)
    T = max(map(len, rows))
    input_ids = torch.tensor([r + [PAD] * (T - len(r)) for r in rows])
    image_mask = torch.tensor([m + [False] * (T - len(m)) for m in masks])
    return input_ids, image_mask, len(symbols)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    tokenizer = make_tiny_tokenizer(root / "tok")
    sd = official_state_dict(len(tokenizer))
    ckpt = save_checkpoint(fairseq_checkpoint(sd), root / "checkpoint_final.pt")
    return types.SimpleNamespace(root=root, sd=sd, ckpt=ckpt, tok=root / "tok", vocab=len(tokenizer),
                                 dict=root / "tok" / "dict.txt", spm=root / "tok" / "sentencepiece.bpe.model")


@pytest.fixture(scope="module")
def converted(official):
    """The checkpoint converted once through the CLI entry point (fp32)."""
    out = official.root / "converted-cli"
    rc = main(["convert-official", str(official.ckpt), "--dict", str(official.dict), "--spm", str(official.spm),
               "-o", str(out), "--dtype", "fp32"])
    assert rc == 0
    return out


PROMPTS = ["<i> on the beach", "a cat wearing <i> in the style of <i> next to a dog"]


def _images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


# ----------------------------------------------------------------------------- tests

def test_parity_with_reference_forward(official, converted, tmp_path):
    api_out = convert_official(official.ckpt, official.dict, official.spm, tmp_path / "api", dtype="fp32")
    images = _images(3)
    expected_ids, expected_mask, n_symbols = reference_inputs(official.tok, PROMPTS)
    assert n_symbols == official.vocab
    for folder in (converted, api_out):
        model, processor = KosmosG.from_pretrained(folder), KosmosGProcessor.from_pretrained(folder)
        batch = processor(PROMPTS, images=[images[:1], images[1:]])
        # the processor tokenises exactly like the official demo (fairseq ids, slots, padding)
        assert torch.equal(batch["input_ids"], expected_ids)
        assert torch.equal(batch["image_mask"], expected_mask)
        assert torch.equal(batch["attention_mask"], expected_ids.ne(PAD).long())
        assert batch["input_ids"].eq(PAD).any(), "the batch must exercise padding"
        with torch.no_grad():
            ours = model.encode(**batch)
        ref = reference_encode(official.sd, expected_ids, expected_mask, batch["pixel_values"])
        assert ours.shape == (2, ACOND, AW)
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    weights = "model.safetensors"
    assert load_file(str(converted / weights)).keys() == load_file(str(api_out / weights)).keys()


def test_converted_config_and_round_trip(official, converted, tmp_path):
    model = KosmosG.from_pretrained(converted)
    cfg = model.config
    assert (cfg.mllm.vocab_size, cfg.mllm.hidden_size, cfg.mllm.num_layers, cfg.mllm.num_heads) == \
        (official.vocab, D, LAYERS, HEADS)
    assert cfg.mllm.max_positions == 2048  # the checkpoint's tokens_per_sample
    assert (cfg.vision.image_size, cfg.vision.hidden_size, cfg.vision.num_heads) == (IMG, VW, VHEADS)
    assert (cfg.resampler.num_queries, cfg.resampler.num_heads) == (QUERIES, HEADS)
    assert (cfg.aligner.hidden_size, cfg.aligner.num_heads, cfg.aligner.max_positions) == (AW, AHEADS, APOS)
    model.save_pretrained(tmp_path / "again")
    KosmosGProcessor.from_pretrained(converted).save_pretrained(tmp_path / "again")
    again = KosmosG.from_pretrained(tmp_path / "again")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert again.config == cfg
    proc = KosmosGProcessor.from_pretrained(tmp_path / "again")
    assert proc("a dog on the beach")["input_ids"].tolist() == \
        KosmosGProcessor.from_pretrained(converted)("a dog on the beach")["input_ids"].tolist()
    # the converted weights are the official tensors, bit for bit
    ours = load_file(str(converted / "model.safetensors"))
    assert torch.equal(ours["mllm.layers.1.attn.sub_norm.weight"],
                       official.sd["gpt_model.decoder.layers.1.self_attn.inner_attn_ln.weight"])
    assert torch.equal(ours["aligner.decoder.0.cross_attn.k_proj.weight"],
                       official.sd["aligner.encoder.layers.0.encoder_attn.k_proj.weight"])


def test_dtype_and_overwrite(official, tmp_path):
    out = convert_official(official.ckpt, official.dict, official.spm, tmp_path / "half")  # fp16 by default
    assert all(t.dtype == torch.float16 for t in load_file(str(out / "model.safetensors")).values())
    assert KosmosG.from_pretrained(out, dtype="fp32").dtype == torch.float32
    with pytest.raises(ValueError, match="not empty"):
        convert_official(official.ckpt, official.dict, official.spm, out)
    convert_official(official.ckpt, official.dict, official.spm, out, dtype="bf16", overwrite=True)
    assert next(iter(load_file(str(out / "model.safetensors")).values())).dtype == torch.bfloat16
    (tmp_path / "empty").mkdir()  # an existing empty folder is filled without overwrite=True
    assert (convert_official(official.ckpt, official.dict, official.spm, tmp_path / "empty") / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_fixture_is_in_the_release_format(official):
    ckpt = load_official_checkpoint(official.ckpt)
    assert ckpt["args"] is None and type(ckpt["cfg"]) is dict
    assert ckpt["cfg"]["model"]["decoder_attention_heads"] == HEADS
    model = ckpt["model"]
    assert all(t.dtype == torch.float32 for t in model.values())
    embed, head = model["gpt_model.decoder.embed_tokens.weight"], model["gpt_model.decoder.output_projection.weight"]
    assert torch.equal(embed, head) and embed.untyped_storage().data_ptr() != head.untyped_storage().data_ptr()
    assert any(k.startswith("diffusion_unet.unet.") for k in model) and any(k.startswith("vae.vae.") for k in model)
    assert ckpt["extra_state"]["metrics"]["train"][0][3]["val"] == 2.5


def test_the_copied_lm_head_is_dropped_quietly(official, caplog):
    with caplog.at_level("INFO", logger="kosmos_g.convert.official"):
        ours, _ = convert_official_state_dict(fairseq_checkpoint(official.sd))
    assert "differs" not in caplog.text and "a saved copy of embed_tokens" in caplog.text
    assert not any("diffusion_unet" in k or "vae" in k or "output_projection" in k for k in ours)
    head = {**official.sd, "gpt_model.decoder.output_projection.weight": torch.zeros(official.vocab, D)}
    convert_official_state_dict(fairseq_checkpoint(head))
    assert "output_projection differs from embed_tokens" in caplog.text


def test_older_fairseq_omegaconf_cfg_loads_safely(official, tmp_path):
    path = save_checkpoint(omegaconf_fairseq_checkpoint(official.sd), tmp_path / "omegaconf.pt")
    ckpt = load_official_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].decoder_attention_heads == HEADS
    assert isinstance(ckpt["cfg"], PickledObject)
    plain = to_plain(ckpt["cfg"])
    assert plain["model"]["decoder_attention_heads"] == HEADS and plain["common"]["user_dir"] == ["unilm"]
    assert torch.equal(ckpt["model"]["vae.vae.y"], official.sd["vae.vae.y"])
    ours, cfg = convert_official_state_dict(ckpt)
    reference, reference_cfg = convert_official_state_dict(fairseq_checkpoint(official.sd))
    assert cfg == reference_cfg and ours.keys() == reference.keys()


def test_unexpected_global_is_refused_unless_trusted(official, tmp_path, capsys):
    path = save_checkpoint({**fairseq_checkpoint(official.sd), "extra_state": {"hook": Sneaky()}},
                           tmp_path / "sneaky.pt")
    with pytest.raises(UnsafeCheckpointError, match="Sneaky") as err:
        load_official_checkpoint(path)
    assert "--trust-pickle" in str(err.value)
    rc = main(["convert-official", str(path), "--dict", str(official.dict), "--spm", str(official.spm),
               "-o", str(tmp_path / "out")])
    assert rc == 2 and "Sneaky" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format: no static scan, the loader refuses it
    with fake_omegaconf_importable():
        torch.save({"model": {}, "hook": Sneaky()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"Sneaky.*--trust-pickle"):
        load_official_checkpoint(legacy)
    odd = tmp_path / "odd.pt"
    torch.save({"model": {}, "x": TypeOfOne()}, odd)
    with pytest.raises(UnsafeCheckpointError, match=r"failed \(refusing builtins\.type\(1\).*--trust-pickle"):
        load_official_checkpoint(odd)
    with pytest.warns(UserWarning, match="arbitrary code"):
        ckpt = load_official_checkpoint(path, trust_pickle=True)
    assert isinstance(ckpt["extra_state"]["hook"], Sneaky)
    with pytest.warns(UserWarning, match="arbitrary code"):
        out = convert_official(path, official.dict, official.spm, tmp_path / "trusted", trust_pickle=True)
    assert (out / "model.safetensors").is_file()


def test_unknown_layouts_fail_clearly(official, tmp_path, capsys):
    sd = official.sd
    with pytest.raises(ValueError, match=r"Unrecognised.*text_model\.encoder\.N\.w"):
        convert_official_state_dict({**sd, "text_model.encoder.0.w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no MLLM layers \(gpt_model\.decoder\.layers\.0"):
        convert_official_state_dict({k: v for k, v in sd.items() if ".decoder.layers." not in k
                                     or not k.startswith("gpt_model")})
    with pytest.raises(ValueError, match="checkpoint_stage1"):
        convert_official_state_dict({k: v for k, v in sd.items() if not k.startswith("aligner.")})
    with pytest.raises(ValueError, match=r"Missing.*gpt_model\.decoder\.layers\.N\.ffn\.ffn_layernorm"):
        convert_official_state_dict({k: v for k, v in sd.items() if "ffn_layernorm" not in k})
    with pytest.raises(ValueError, match="top-level keys"):
        convert_official_state_dict({"state_dict": sd, "epoch": 3})
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    rc = main(["convert-official", str(path), "--dict", str(official.dict), "--spm", str(official.spm),
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "top-level keys" in err and len(err.strip().splitlines()) == 1


def test_head_counts(official):
    # the checkpoint's own decoder_attention_heads wins (MLLM and the resampler share it)
    _, cfg = convert_official_state_dict(fairseq_checkpoint(official.sd, heads=2))
    assert cfg.mllm.num_heads == 2 and cfg.resampler.num_heads == 2 and cfg.vision.num_heads == VHEADS
    # a bare state dict records no head count: the config must say it
    with pytest.raises(ValueError, match=r"no MLLM head count.*--config PRESET_OR_CONFIG_JSON"):
        convert_official_state_dict(official.sd)
    # an explicit config is checked against the shapes and the recorded head count
    _, cfg = convert_official_state_dict(fairseq_checkpoint(official.sd))
    assert convert_official_state_dict(official.sd, cfg)[1] == cfg
    assert convert_official_state_dict(fairseq_checkpoint(official.sd), cfg)[1] == cfg
    with pytest.raises(ValueError, match="mllm.vocab_size"):
        convert_official_state_dict(official.sd, "tiny")
    with pytest.raises(ValueError, match=r"mllm\.num_heads: checkpoint decoder_attention_heads 2, config 4"):
        convert_official_state_dict(fairseq_checkpoint(official.sd, heads=2), cfg)


def test_vit_attention_sources(official):
    ts, _ = convert_official_state_dict(fairseq_checkpoint(official.sd))
    block = "img_model.visual.transformer.resblocks.0"
    # only open_clip's fused attention: split in_proj into q, k, v
    fused = {k: v for k, v in official.sd.items() if not k.startswith(block + ".ts_attn.")}
    fused[block + ".attn.in_proj_weight"] = torch.cat([official.sd[f"{block}.ts_attn.{p}_proj.weight"] for p in "qkv"])
    fused[block + ".attn.in_proj_bias"] = torch.cat([official.sd[f"{block}.ts_attn.{p}_proj.bias"] for p in "qkv"])
    for part in ("weight", "bias"):
        fused[f"{block}.attn.out_proj.{part}"] = official.sd[f"{block}.ts_attn.out_proj.{part}"]
    # both present: ts_attn is what the official forward runs; attn is ignored
    both = {**official.sd, block + ".attn.in_proj_weight": torch.randn(3 * VW, VW),
            block + ".attn.in_proj_bias": torch.randn(3 * VW), block + ".attn.out_proj.weight": torch.randn(VW, VW),
            block + ".attn.out_proj.bias": torch.randn(VW)}
    for sd in (fused, both):
        converted, _ = convert_official_state_dict(fairseq_checkpoint(sd))
        assert converted.keys() == ts.keys()
        for k in ts:
            assert torch.equal(converted[k], ts[k]), k


def test_wrapper_prefixes_are_stripped(official):
    plain, _ = convert_official_state_dict(fairseq_checkpoint(official.sd))
    wrapped = {("module._orig_mod." if i % 2 else "module.") + k: v for i, (k, v) in enumerate(official.sd.items())}
    converted, _ = convert_official_state_dict(fairseq_checkpoint(wrapped))
    assert converted.keys() == plain.keys()
    assert all(torch.equal(converted[k], plain[k]) for k in plain)


def test_bad_paths_and_values(official, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        convert_official(official.ckpt, tmp_path / "nope.txt", official.spm, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_official(tmp_path / "missing.pt", official.dict, official.spm, tmp_path / "o")
    with pytest.raises(ValueError, match="fp8"):
        convert_official(official.ckpt, official.dict, official.spm, tmp_path / "o", dtype="fp8")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        convert_official(official.ckpt, official.dict, official.spm, tmp_path / "o", config=tmp_path / "c.json")
    (tmp_path / "bad.json").write_text("{\"mllm\": ", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json is not a kosmos-g config\.json"):
        convert_official(official.ckpt, official.dict, official.spm, tmp_path / "o", config=tmp_path / "bad.json")
    assert not (tmp_path / "o").exists()


def test_fp16_is_checked_against_the_fp32_weights(official, tmp_path, caplog):
    with caplog.at_level("INFO", logger="kosmos_g.convert.official"):
        convert_official(official.ckpt, official.dict, official.spm, tmp_path / "exact")
    assert "hold exactly the same values in float16" in caplog.text
    key = "img_connector.latent_query"
    finer = {**official.sd, key: official.sd[key] + 1e-6}  # not fp16 values any more
    with caplog.at_level("WARNING", logger="kosmos_g.convert.official"):
        out = convert_official(fairseq_checkpoint(finer), official.dict, official.spm, tmp_path / "finer")
    assert "1 of " in caplog.text and "resampler.latents" in caplog.text and "--dtype fp32" in caplog.text
    assert load_file(str(out / "model.safetensors"))["resampler.latents"].dtype == torch.float16
    huge = {**official.sd, key: official.sd[key] * 1e6}  # beyond fp16's 65,504
    with pytest.raises(ValueError, match=r"beyond float16's range, e\.g\. resampler\.latents.*--dtype bf16 or fp32"):
        convert_official(fairseq_checkpoint(huge), official.dict, official.spm, tmp_path / "huge")
    out = convert_official(fairseq_checkpoint(huge), official.dict, official.spm, tmp_path / "huge", dtype="fp32")
    assert torch.equal(load_file(str(out / "model.safetensors"))["resampler.latents"], huge[key])
    assert not (tmp_path / "huge-fp16").exists()


def test_bare_model_state_dict_needs_a_config(official, converted, tmp_path, capsys):
    bare = tmp_path / "weights-only.pt"
    torch.save(OrderedDict(official.sd), bare)  # a file of the model's tensors alone, no cfg
    argv = ["convert-official", str(bare), "--dict", str(official.dict), "--spm", str(official.spm)]
    assert main([*argv, "-o", str(tmp_path / "no-config")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bare) in err[0] and "no MLLM head count" in err[0] and "--config" in err[0]
    assert not (tmp_path / "no-config").exists()

    assert main([*argv, "-o", str(tmp_path / "out"), "--config", str(converted / "config.json"),
                 "--dtype", "fp32"]) == 0
    assert KosmosG.from_pretrained(tmp_path / "out").config == KosmosG.from_pretrained(converted).config
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = load_file(str(converted / "model.safetensors"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    # a config that does not fit the tensors is refused before anything is written
    assert main([*argv, "-o", str(tmp_path / "tiny"), "--config", "tiny"]) == 2
    assert "mllm.vocab_size" in capsys.readouterr().err and not (tmp_path / "tiny").exists()


def _cli_error_cases(official, tmp: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (convert-official arguments, the file the error must name, what it must say)."""
    data = official.ckpt.read_bytes()
    files = {"empty.pt": b"", "head30.pt": data[:30], "half.pt": data[:len(data) // 2],
             "no-tail.pt": data[:-10], "text.pt": b"not a checkpoint\n", "garbage.model": bytes(range(256)) * 4,
             "binary-dict.txt": b"\xff\xfe\x00\x81 12\n"}
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    legacy = tmp / "legacy.pt"
    torch.save({"model": {"w": torch.zeros(8)}}, legacy, _use_new_zipfile_serialization=False)
    (tmp / "legacy30.pt").write_bytes(legacy.read_bytes()[:30])
    (tmp / "ckpt-dir").mkdir()
    (tmp / "dict-dir").mkdir()

    def ckpt(path: Path, expect: str) -> tuple[list[str], Path, str]:
        return [str(path), "--dict", str(official.dict), "--spm", str(official.spm)], path, expect

    def tok(dict_path: Path, spm_path: Path, named: Path, expect: str) -> tuple[list[str], Path, str]:
        return [str(official.ckpt), "--dict", str(dict_path), "--spm", str(spm_path)], named, expect

    return {
        "0-byte checkpoint": ckpt(tmp / "empty.pt", "is empty (0 bytes)"),
        "30-byte checkpoint": ckpt(tmp / "head30.pt", "is truncated"),
        "half a checkpoint": ckpt(tmp / "half.pt", "is truncated"),
        "checkpoint without its last bytes": ckpt(tmp / "no-tail.pt", "is truncated"),
        "30 bytes of a legacy-format checkpoint": ckpt(tmp / "legacy30.pt", "not a readable torch checkpoint"),
        "text file as checkpoint": ckpt(tmp / "text.pt", "is not a torch checkpoint"),
        "directory as checkpoint": ckpt(tmp / "ckpt-dir", "is a directory"),
        "missing checkpoint": ckpt(tmp / "missing.pt", "not found"),
        "missing --dict": tok(tmp / "nope.txt", official.spm, tmp / "nope.txt", "dictionary not found"),
        "directory as --dict": tok(tmp / "dict-dir", official.spm, tmp / "dict-dir", "is a directory"),
        "binary --dict": tok(tmp / "binary-dict.txt", official.spm, tmp / "binary-dict.txt",
                             "not a fairseq dictionary"),
        "garbage --spm": tok(official.dict, tmp / "garbage.model", tmp / "garbage.model",
                             "is not a SentencePiece model"),
        "missing --spm": tok(official.dict, tmp / "nope.model", tmp / "nope.model", "SentencePiece model not found"),
    }


CLI_ERROR_CASES = ["0-byte checkpoint", "30-byte checkpoint", "half a checkpoint", "checkpoint without its last bytes",
                   "30 bytes of a legacy-format checkpoint", "text file as checkpoint", "directory as checkpoint",
                   "missing checkpoint", "missing --dict", "directory as --dict", "binary --dict", "garbage --spm",
                   "missing --spm"]


@pytest.mark.parametrize("case", CLI_ERROR_CASES)
def test_cli_errors_are_one_line(official, tmp_path, capsys, monkeypatch, case):
    cases = _cli_error_cases(official, tmp_path)
    assert sorted(cases) == sorted(CLI_ERROR_CASES)
    args, named, expect = cases[case]
    out = tmp_path / "out"
    monkeypatch.delenv("KOSMOS_G_DEBUG", raising=False)
    assert main(["convert-official", *args, "-o", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kosmos-g convert-official: error: ") and str(named) in lines[0]
    assert expect in lines[0] and "Traceback" not in captured.err and not captured.out
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setenv("KOSMOS_G_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(expect)):
        main(["convert-official", *args, "-o", str(out)])


def test_cli_without_dict_option_is_a_usage_error(official, tmp_path, capsys):
    # argparse's own report: the usage, then one error line naming the option
    with pytest.raises(SystemExit) as exit_:
        main(["convert-official", str(official.ckpt), "--spm", str(official.spm), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err[0].startswith("usage: kosmos-g convert-official")
    assert err[-1] == "kosmos-g convert-official: error: the following arguments are required: --dict"
    assert not (tmp_path / "out").exists()


def test_cli_error_in_a_fresh_process_is_one_stderr_line(official, tmp_path):
    # the real entry point configures logging and warnings itself: still nothing but the error
    half = tmp_path / "half.pt"
    data = official.ckpt.read_bytes()
    half.write_bytes(data[:len(data) // 2])
    env = {k: v for k, v in os.environ.items() if k != "KOSMOS_G_DEBUG"}
    run = subprocess.run([sys.executable, "-m", "kosmos_g.cli", "convert-official", str(half), "--dict",
                          str(official.dict), "--spm", str(official.spm), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [f"kosmos-g convert-official: error: Checkpoint {half} is truncated: a torch "
                                       f"zip archive without its end ({half.stat().st_size:,} bytes); download or "
                                       "copy it again."]


def test_official_sizes_give_the_kosmos_g_preset():
    # shapes only (meta tensors): the release's layout converts to exactly the paper's config
    from kosmos_g import get_preset

    sd = official_state_dict(64007, s=OFFICIAL_SIZES, device="meta")
    state, cfg = convert_official_state_dict(fairseq_checkpoint(sd, heads=32))
    assert cfg == get_preset("kosmos-g")
    assert state["aligner.in_positions"].shape == (32768, 768)
    # model tensors alone: --config kosmos-g, which the error names, says the architecture
    with pytest.raises(ValueError, match="--config kosmos-g, the preset these sizes match"):
        convert_official_state_dict(sd)
    assert convert_official_state_dict(sd, "kosmos-g")[1] == cfg
