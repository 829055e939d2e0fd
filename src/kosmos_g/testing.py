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
