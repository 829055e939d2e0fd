"""Tiny random models of the data-construction classes, and images to run them on (no downloads).

Each builder saves a real transformers class with ``save_pretrained`` (model and processor)
at toy size, so that the code under test loads them exactly like the released weights:
BLIP-2 OPT, a Llama-layout causal LM, CLIPSeg, Grounding-DINO and SAM. Their tokenizers are
word-level over :data:`WORDS`, so that even random weights write captions and answers made of
real words, and some answers name words of the caption: a random pipeline keeps some images
and drops others, as a real one does.

Example:
    >>> import tempfile
    >>> paths = make_tiny_compose_models(tempfile.mkdtemp())  # doctest: +SKIP
    >>> sorted(paths)                                          # doctest: +SKIP
    ['captioner', 'clipseg', 'grounding_dino', 'lm', 'sam']
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Nouns also come with a comma attached, so that random answers often are comma lists.
WORDS = ("a", "red", "blue", "green", "yellow", "square", "circle", "dog", "hat", "square,", "circle,", "dog,", "hat,",
         "and", "next", "to")
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (240, 215, 40)}


def word_tokenizer(*, image_token: str | None = None, bos: bool = False):
    """A word-level fast tokenizer over :data:`WORDS` (whitespace-split, joined with spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS + WORDS)}
    if image_token:
        vocab[image_token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", add_bos_token=bos)
    if image_token:
        fast.add_special_tokens({"additional_special_tokens": [image_token]})
        fast.image_token = image_token
    return fast


def make_tiny_blip2(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny ``Blip2ForConditionalGeneration`` (OPT text model) and its ``Blip2Processor``."""
    import torch
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              OPTConfig)

    path = Path(path)
    tok = word_tokenizer(image_token="<image>", bos=True)
    image_token = tok.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                     word_embed_proj_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=16, vocab_size=len(tok)),
        text_config=text.to_dict(), num_query_tokens=4, image_token_index=image_token)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(path)
    return path


def make_tiny_lm(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny Llama-layout causal LM and its tokenizer (the instruct LM's stand-in)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = word_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _clip_tokenizer(path: Path):
    from ..testing import make_tiny_clip_tokenizer

    return make_tiny_clip_tokenizer(path)


def make_tiny_clipseg(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny ``CLIPSegForImageSegmentation`` and its ``CLIPSegProcessor`` (32x32 input)."""
    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor)

    path = Path(path)
    tok = _clip_tokenizer(path)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, extract_layers=[1], reduce_dim=8, decoder_num_attention_heads=2,
        decoder_intermediate_size=16)
    torch.manual_seed(seed)
    CLIPSegForImageSegmentation(cfg).eval().save_pretrained(path)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4815, 0.4578, 0.4082],
                                  image_std=[0.2686, 0.2613, 0.2758])
    CLIPSegProcessor(image_processor=processor, tokenizer=tok).save_pretrained(path)
    return path


def make_tiny_grounding_dino(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny ``GroundingDinoForObjectDetection`` (transformers' Swin + a BERT text backbone) and processor."""
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    path = Path(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[w for w in WORDS if w.isalpha()], ".", ","]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4,
                          out_features=["stage1", "stage2"])
    text = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                              decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                              encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=2,
                              encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(cfg).eval().save_pretrained(path)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                           tokenizer=tok).save_pretrained(path)
    return path


def make_tiny_sam(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny ``SamModel`` and ``SamProcessor`` (box prompts)."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    path = Path(path)
    cfg = SamConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16, output_channels=8, window_size=2, global_attn_indexes=[0],
                           num_pos_feats=4, mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16, num_multimask_outputs=3))
    torch.manual_seed(seed)
    SamModel(cfg).eval().save_pretrained(path)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                                   mask_size={"height": 16, "width": 16})).save_pretrained(path)
    return path


def make_tiny_compose_models(root: str | os.PathLike, *, grounded_sam: bool = True) -> dict[str, Path]:
    """All the tiny data-construction models under ``root``; returns their folders by role."""
    root = Path(root)
    out = {"captioner": make_tiny_blip2(root / "blip2"), "lm": make_tiny_lm(root / "lm"),
           "clipseg": make_tiny_clipseg(root / "clipseg")}
    if grounded_sam:
        out["grounding_dino"] = make_tiny_grounding_dino(root / "grounding-dino")
        out["sam"] = make_tiny_sam(root / "sam")
    return out


def render_scene(seed: int, size: int = 64) -> tuple[np.ndarray, str]:
    """A coloured shape or two on a plain background, and a caption naming them."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size + int(rng.integers(0, size // 2)), 3), np.uint8)
    img[:] = rng.integers(150, 256, 3, dtype=np.uint8)
    names = []
    for _ in range(int(rng.integers(1, 3))):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = ("square", "circle")[int(rng.integers(2))]
        s = int(rng.integers(size // 6, size // 3))
        y, x = (int(v) for v in rng.integers(0, size - s, 2))
        if shape == "square":
            img[y:y + s, x:x + s] = COLORS[color]
        else:
            yy, xx = np.mgrid[:s, :s]
            disc = (yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 <= (s / 2) ** 2
            img[y:y + s, x:x + s][disc] = COLORS[color]
        names.append(f"a {color} {shape}")
    return img, " next to ".join(names)


def write_image_folder(folder: str | os.PathLike, n: int = 12, *, size: int = 64, captions: bool = True) -> Path:
    """``n`` rendered PNGs in ``folder`` (two levels), each with its caption in ``NAME.txt`` when ``captions``."""
    from PIL import Image

    folder = Path(folder)
    for i in range(n):
        img, caption = render_scene(i, size)
        path = folder / f"set{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        if captions:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder
