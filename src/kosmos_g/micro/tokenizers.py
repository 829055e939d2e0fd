"""Tokenizers for the micro world: a word-level CLIP tokenizer and a fairseq-style SentencePiece one.

The micro world's text comes from a closed grammar (:mod:`kosmos_g.micro.world`), so its
vocabulary can be enumerated exactly (:func:`world_words`). Two tokenizers are built from it:

* :func:`build_clip_tokenizer`: a transformers ``CLIPTokenizer`` (``vocab.json`` +
  ``merges.txt``, byte-level BPE exactly as OpenAI's CLIP) whose merges build every world
  word from its characters, so each word is ONE token. Unknown words still tokenize (to
  characters, never to ``<unk>``). This is micro-CLIP's and micro-SD's ``tokenizer/``.
* :func:`build_spm_tokenizer`: a SentencePiece model trained on world text plus a fairseq
  ``dict.txt``, read by :class:`kosmos_g.tokenizer.FairseqTokenizer` exactly as the
  released Kosmos-G reads its own. This is the micro Kosmos-G MLLM's tokenizer.

Both builders are deterministic (same bytes for the same arguments) and write their
folder atomically (a temporary sibling renamed into place).

Example:
    >>> import tempfile
    >>> from transformers import CLIPTokenizer
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer(f"{d}/tokenizer"))
    ...     tok.tokenize("a small red striped circle on the left")
    ['a</w>', 'small</w>', 'red</w>', 'striped</w>', 'circle</w>', 'on</w>', 'the</w>', 'left</w>']
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..fileio import atomic_dir
from . import world

CLIP_MAX_LENGTH = 40
"""Token length of micro-CLIP's text (bos + <= 31 words of the longest caption + eos, padded).

It plays the role of CLIP's 77: the U-Net condition is (40, width) and the micro Kosmos-G
AlignerNet has 40 queries."""
SPM_VOCAB_SIZE = 200
"""SentencePiece BPE pieces: the least (measured) at which every world word is a single
piece (``"▁circle"``): 160 leaves 17 words split, unigram at any size splits ``"small"``."""
EXTRA_WORDS = ("next", "to")
"""Words of the Kosmos-G prompt templates that no caption or instruction uses
(``"<i> next to <i>, on a green background"``)."""
CAPTION_WORDS = ("a", "and", "on", "in", "at", "the", "with", "background", ",")
"""The connective words of :meth:`world.Scene.caption_with_spans`' grammar."""

_WORD_RE = re.compile(r"[a-z]+|[^\sa-z]")  # how CLIP's pre-tokenizer splits world text


def world_words() -> list[str]:
    """Every word (and punctuation mark) the micro world's captions, instructions and prompt
    templates can produce, sorted. Enumerated from :mod:`world`'s vocabularies and templates.

    Example:
        >>> words = world_words()
        >>> {"circle", "checkered", "background", ",", "remove"} <= set(words)
        True
    """
    words: set[str] = set(CAPTION_WORDS) | set(EXTRA_WORDS)
    phrases = [*world.SHAPES, *world.COLORS, *world.PATTERNS, *world.SIZES, *world.POSITIONS,
               *world.POSITION_PHRASES.values(), *world.BACKGROUNDS]
    for templates in world._INSTRUCTIONS.values():  # the instruction grammar's literal words
        phrases += [re.sub(r"\{\w+\}", " ", t) for t in templates]
    for phrase in phrases:
        words.update(_WORD_RE.findall(phrase))
    return sorted(words)


def world_text(seed: int, n: int) -> list[str]:
    """``n`` lines of world text: captions (all grammar variants, 0-3 objects) and edit
    instructions, from ``np.random.default_rng(seed)``; held-out subjects included (text
    about them is fine: only their stage-3 images are held out).

    Example:
        >>> world_text(0, 2) == world_text(0, 2), len(world_text(0, 5))
        (True, 5)
    """
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        scene = world.sample_scene(rng, None if i % 8 else int(rng.integers(0, world.MAX_OBJECTS + 1)))
        if i % 3 == 2 and scene.objects:
            lines.append(world.make_edit(rng, scene)[2])
        else:
            lines.append(scene.caption(rng))
    return lines


# ---------------------------------------------------------------------------- CLIP (BPE)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """OpenAI CLIP's BPE of one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 62), i) for i, p in enumerate(zip(parts, parts[1:]))]
        best = min(pairs)[0]
        if best == 1 << 62:
            break
        pair, merged, i = next(p for r, p in zip(pairs, zip(parts, parts[1:])) if r[0] == best), [], 0
        while i < len(parts):  # merge every occurrence, left to right, as CLIP does
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def clip_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary and merge list in which each of ``words`` (default:
    :func:`world_words`) is a single token ``word + "</w>"``.

    The vocabulary starts like CLIP's (the 256 byte characters, then the same with
    ``</w>``), so any text still tokenizes; merges are added word by word, each one
    joining the pieces the earlier merges leave, left to right. A new merge ranks after all
    earlier ones, so it can never change how an earlier word is merged.
    """
    words = world_words() if words is None else words
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(256)]  # the characters of CLIP's byte-level BPE
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(ranks)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
        if parts != [word + "</w>"]:  # pragma: no cover - the construction guarantees it
            raise RuntimeError(f"could not make {word!r} a single token: {parts}")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def build_clip_tokenizer(out_dir: str | os.PathLike, *, max_length: int = CLIP_MAX_LENGTH) -> Path:
    """Write the word-level micro-CLIP tokenizer (``vocab.json``, ``merges.txt`` and the
    transformers files of ``save_pretrained``) to ``out_dir`` and return it.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPTokenizer
        >>> with tempfile.TemporaryDirectory() as d:
        ...     tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer(f"{d}/tok"))
        ...     len(tok("a red star, on a gray background").input_ids)  # bos + 8 words + eos
        10
    """
    from transformers import CLIPTokenizer

    if max_length < 8:
        raise ValueError(f"max_length={max_length} is too short for a caption; use >= {CLIP_MAX_LENGTH}")
    vocab, merges = clip_vocab_and_merges()
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                            model_max_length=max_length)
        tok.save_pretrained(str(tmp))
    return Path(out_dir)


# ---------------------------------------------------------------------------- SentencePiece


def build_spm_tokenizer(
    out_dir: str | os.PathLike, *, vocab_size: int = SPM_VOCAB_SIZE, seed: int = 0, n_lines: int = 20000
) -> Path:
    """Train the micro MLLM's SentencePiece BPE model (BPE like the official
    ``sentencepiece.bpe.model``) on ``n_lines`` of :func:`world_text` plus every world word
    once, and write it with a fairseq ``dict.txt`` (pieces by corpus frequency), as
    :class:`kosmos_g.tokenizer.FairseqTokenizer` folders hold them.

    Deterministic: fixed corpus, seed, one thread, and no file paths inside the model.

    Example:
        >>> import tempfile
        >>> from kosmos_g.tokenizer import FairseqTokenizer
        >>> with tempfile.TemporaryDirectory() as d:
        ...     tok = FairseqTokenizer.from_pretrained(build_spm_tokenizer(f"{d}/spm", n_lines=500))
        ...     tok.decode(tok.encode("move the star to the top left"))
        'move the star to the top left'
    """
    import sentencepiece as spm

    from ..tokenizer import TOKENIZER_CONFIG, FairseqTokenizer

    if vocab_size < len(world_words()):
        raise ValueError(f"vocab_size={vocab_size} is below the {len(world_words())} world words; "
                         f"use >= {SPM_VOCAB_SIZE}")
    corpus = world_text(seed, n_lines) + [" ".join(world_words())]
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
        bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False, shuffle_input_sentence=False,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    counts = Counter(p for line in corpus for p in sp.encode(line, out_type=str))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]
    pieces.sort(key=lambda p: (-counts[p], p))  # fairseq's dict.txt: by frequency
    with atomic_dir(out_dir) as tmp:
        (tmp / FairseqTokenizer.SPM_NAME).write_bytes(model.getvalue())
        (tmp / FairseqTokenizer.DICT_NAME).write_text("".join(f"{p} {counts[p]}\n" for p in pieces),
                                                      encoding="utf-8")
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps({"kind": FairseqTokenizer.kind}))
        FairseqTokenizer.from_pretrained(tmp)  # fails loudly if the folder does not load
    return Path(out_dir)
