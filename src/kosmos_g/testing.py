"""Tiny random components for tests, examples and benchmarks (no downloads).

Everything here builds real classes (our models, SentencePiece, transformers and
diffusers configs) at toy size and saves them the way real checkpoints are saved, so
the code under test is the same code that loads real weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import KosmosGConfig, get_preset
from .models import KosmosG
from .processing import KosmosGProcessor
from .tokenizer import FairseqTokenizer

TINY_CORPUS = [
    "a photo of a dog on the beach", "a red hat on a wooden table", "a cat wearing sunglasses",
    "an oil painting in the style of van gogh", "a small blue circle next to a green square",
    "make it snowy", "the dog is sleeping in the grass", "a man riding a bike in the city",
    "a striped star at the top left", "remove the circle and add a yellow triangle",
]


def make_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 64) -> FairseqTokenizer:
    """Train a small SentencePiece model and write a fairseq ``dict.txt`` beside it."""
    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS * 20) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "sentencepiece.bpe"), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2,
        bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
    )
    sp = spm.SentencePieceProcessor(model_file=str(path / "sentencepiece.bpe.model"))
    # fairseq's dict.txt lists pieces by frequency; the order just has to be fixed.
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]
    (path / "dict.txt").write_text("".join(f"{p} {1000 - i}\n" for i, p in enumerate(pieces)),
                                   encoding="utf-8")
    corpus.unlink()
    return FairseqTokenizer(path / "sentencepiece.bpe.model", path / "dict.txt")


def make_tiny_kosmos_g(path: str | os.PathLike, config: KosmosGConfig | None = None,
                       seed: int = 0) -> tuple[KosmosG, KosmosGProcessor]:
    """Save a random tiny Kosmos-G folder (weights, config, tokenizer) and return it."""
    path = Path(path)
    config = config or get_preset("tiny")
    tokenizer = make_tiny_tokenizer(path / "_spm")
    torch.manual_seed(seed)
    model = KosmosG(config).eval()
    processor = KosmosGProcessor.from_config(tokenizer, config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    for f in (path / "_spm").iterdir():
        f.unlink()
    (path / "_spm").rmdir()
    return model, KosmosGProcessor.from_pretrained(path)


def make_tiny_clip_tokenizer(path: str | os.PathLike):
    """A character-level ``CLIPTokenizer`` (no merges) written to ``path``."""
    import json

    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(256)]  # the characters of CLIP's byte-level BPE
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(path))
    return tok


def make_tiny_sd(path: str | os.PathLike, *, cross_attention_dim: int = 32, sample_size: int = 16,
                 seed: int = 0) -> Path:
    """Save a random tiny SD1.5-layout diffusers folder.

    ``unet/``, ``vae/``, ``scheduler/`` (SD1.5's DPM-Solver++ settings), ``text_encoder/``
    and ``tokenizer/`` (CLIP), and ``model_index.json``, so both our loaders and
    ``StableDiffusionPipeline.from_pretrained`` read it.
    """
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", steps_offset=1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, hidden_size=cross_attention_dim, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=513,
        vocab_size=520, max_position_embeddings=77,
    ))
    tokenizer = make_tiny_clip_tokenizer(path / "_tok")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    import shutil

    shutil.rmtree(path / "_tok")
    return path


def make_tiny_controlnet(path: str | os.PathLike, sd_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a random ControlNet for the tiny SD folder's U-Net (diffusers layout).

    A fresh ControlNet's output convolutions are zero (it changes nothing until trained);
    here every weight is random so that tests can see it act. Its conditioning embedder
    downsamples by the VAE's factor (2 for :func:`make_tiny_sd`).
    """
    import json

    from diffusers import ControlNetModel, UNet2DConditionModel

    path, sd_dir = Path(path), Path(sd_dir)
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    n_vae_blocks = len(json.loads((sd_dir / "vae" / "config.json").read_text())["block_out_channels"])
    channels = (16, 32, 64, 128)[:n_vae_blocks]  # one stride-2 stage per VAE downsampling
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():  # the zero convolutions
                p.normal_(0.0, 0.05)
    net.save_pretrained(str(path))
    return path


def make_tiny_lora(path: str | os.PathLike, sd_dir: str | os.PathLike, *, fmt: str = "diffusers",
                   rank: int = 4, alpha: float = 2.0, with_text_encoder: bool = False,
                   seed: int = 0, std: float = 0.1) -> Path:
    """Write a random (non-zero) SD1.5-style LoRA ``.safetensors`` for the tiny U-Net.

    ``fmt="diffusers"`` writes diffusers/PEFT keys (``unet.<module>.lora_A.weight``),
    ``fmt="kohya"`` the community format most SD1.5 LoRA files use
    (``lora_unet_<module_with_underscores>.lora_down.weight`` + ``.alpha``); with
    ``with_text_encoder`` a CLIP text-encoder part is added (``lora_te_...`` /
    ``text_encoder.``), as many real files carry one. Targets the attention projections.
    """
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if fmt not in ("diffusers", "kohya"):
        raise ValueError(f"fmt must be 'diffusers' or 'kohya', got {fmt!r}.")
    path, sd_dir = Path(path), Path(sd_dir)
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    g = torch.Generator().manual_seed(seed)
    targets = [(name, m) for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
               and name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))]
    te_width = json.loads((sd_dir / "text_encoder" / "config.json").read_text())["hidden_size"] \
        if with_text_encoder else 0
    if with_text_encoder:
        targets.append(("text_model.encoder.layers.0.self_attn.q_proj",
                        torch.nn.Linear(te_width, te_width)))
    state: dict[str, torch.Tensor] = {}
    for name, m in targets:
        down = torch.randn(rank, m.in_features, generator=g) * std
        up = torch.randn(m.out_features, rank, generator=g) * std
        is_te = name.startswith("text_model")
        if fmt == "kohya":
            key = ("lora_te_" if is_te else "lora_unet_") + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(float(alpha))})
        else:  # diffusers' PEFT keys carry no alpha: scale = 1
            key = ("text_encoder." if is_te else "unet.") + name
            state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
