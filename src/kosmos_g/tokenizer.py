"""Text tokenizers for the MLLM.

:class:`FairseqTokenizer` reproduces the official one exactly: SentencePiece splits a
string into pieces, and each piece's id is its index in the fairseq dictionary
(``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``dict.txt`` in file order, then
``<mask>``, ``</doc>``, ``<image>``, ``</image>``, ``</chunk>``, ``</line>``), not its
SentencePiece id. :class:`HFTokenizer` wraps any transformers tokenizer (for an
``hf`` MLLM backbone). Both expose the same small interface.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
FAIRSEQ_EXTRA = ("<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>")
BOI, EOI = "<image>", "</image>"
TOKENIZER_CONFIG = "tokenizer_config.json"


def require_file(path: str | os.PathLike, label: str) -> Path:
    """``path`` as a :class:`Path` if it is a file; a one-line error naming it otherwise.

    Example:
        >>> require_file("/", "dictionary")
        Traceback (most recent call last):
        ...
        ValueError: dictionary / is a directory; pass the file itself.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label} {path} is a directory; pass the file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"{label} not found: {path}")
    return path


def _dictionary_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split("\n")  # not splitlines(): pieces may hold U+2028 etc.
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a fairseq dictionary (not UTF-8 text: byte {e.start} "
                         f"is 0x{e.object[e.start]:02x}).") from None


def _is_int(text: str) -> bool:
    try:
        int(text)  # what fairseq's Dictionary.add_from_file requires of the count
    except ValueError:
        return False
    return True


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class FairseqTokenizer:
    """SentencePiece + fairseq ``dict.txt``, as the released Kosmos-G reads text.

    Example:
        >>> tok = FairseqTokenizer("data/sentencepiece.bpe.model", "data/dict.txt")  # doctest: +SKIP
        >>> tok.encode("a dog")  # doctest: +SKIP
        [12, 2441]
    """

    kind = "fairseq"
    SPM_NAME = "sentencepiece.bpe.model"
    DICT_NAME = "dict.txt"

    def __init__(self, spm_path: str | os.PathLike, dict_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        for label, p in (("SentencePiece model", spm_path), ("dictionary", dict_path)):
            require_file(p, label)
        self.spm_path, self.dict_path = Path(spm_path), Path(dict_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        except RuntimeError as e:  # sentencepiece reports a bad file as RuntimeError("INTERNAL: ...")
            raise ValueError(f"{spm_path} is not a SentencePiece model ({_one_line(e)}); pass the "
                             f"{self.SPM_NAME} that belongs to {self.DICT_NAME}.") from None
        self.symbols: list[str] = []
        self.index: dict[str, int] = {}
        for sym in FAIRSEQ_SPECIALS:
            self._add(sym)
        for lineno, line in enumerate(_dictionary_lines(self.dict_path), 1):
            if not line.strip():
                continue
            # "<piece> <count> [#fairseq:overwrite]"; the piece itself has no spaces.
            overwrite = line.endswith(" #fairseq:overwrite")
            parts = line.rsplit(" ", 2 if overwrite else 1)
            if len(parts) < 2 or not _is_int(parts[1]):
                raise ValueError(f"{dict_path}:{lineno}: expected '<token> <count>', got {line[:80]!r}; "
                                 f"is {Path(dict_path).name} a fairseq dictionary?")
            self._add(parts[0], overwrite=overwrite)
        for sym in FAIRSEQ_EXTRA:
            self._add(sym)
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.boi_id, self.eoi_id = self.index[BOI], self.index[EOI]

    def _add(self, symbol: str, overwrite: bool = False) -> None:
        # fairseq's add_symbol: an existing symbol keeps its first index.
        if symbol in self.index and not overwrite:
            return
        self.index[symbol] = len(self.symbols)
        self.symbols.append(symbol)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """Text -> fairseq ids (no ``<s>``/``</s>``)."""
        pieces = self.sp.encode(text, out_type=str)
        return [self.index.get(p, self.unk_id) for p in pieces]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.symbols[i] for i in ids if i not in (self.bos_id, self.pad_id, self.eos_id)]
        return self.sp.decode_pieces(pieces)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.spm_path, path / self.SPM_NAME)
        shutil.copyfile(self.dict_path, path / self.DICT_NAME)
        (path / TOKENIZER_CONFIG).write_text(json.dumps({"kind": self.kind}))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "FairseqTokenizer":
        path = Path(path)
        return cls(path / cls.SPM_NAME, path / cls.DICT_NAME)


class HFTokenizer:
    """Any transformers tokenizer, with ``<image>``/``</image>`` added as special tokens.

    ``bos_token``: the token every sequence starts with, for a tokenizer without a BOS
    token (Qwen2's base models start documents after ``<|endoftext|>``); saved with the
    tokenizer. Without it a tokenizer's own BOS is used (``<image>`` if it has none).
    """

    kind = "hf"
    CONFIG_NAME = "kosmos_g_tokenizer.json"

    def __init__(self, tokenizer, *, bos_token: str | None = None) -> None:  # a PreTrainedTokenizerBase
        missing = [t for t in (BOI, EOI) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        self.tok = tokenizer
        self.added_tokens = tuple(missing)
        """The image tokens this wrapper added to the vocabulary (their embeddings are new)."""
        vocab = tokenizer.get_vocab()
        self.boi_id, self.eoi_id = vocab[BOI], vocab[EOI]
        self.bos_token = bos_token
        if bos_token is not None:
            if bos_token not in vocab:
                raise ValueError(f"bos_token {bos_token!r} is not in the tokenizer's vocabulary; "
                                 "pass one of its tokens.")
            self.bos_id = vocab[bos_token]
        else:
            self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.boi_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id
        self.unk_id = tokenizer.unk_token_id

    @classmethod
    def for_causal_lm(cls, tokenizer) -> "HFTokenizer":
        """A pretrained LM's tokenizer: sequences start with its BOS token, or, where it has
        none, with its EOS token (the document separator such LMs were trained on)."""
        bos = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
        if bos is None:
            raise ValueError(f"Tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a BOS nor an "
                             "EOS token; set bos_token in its tokenizer_config.json.")
        return cls(tokenizer, bos_token=str(bos))

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.tok.save_pretrained(path)
        cfg = {"kind": self.kind}
        if self.bos_token is not None:
            cfg["bos_token"] = self.bos_token
        (path / self.CONFIG_NAME).write_text(json.dumps(cfg))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HFTokenizer":
        from transformers import AutoTokenizer

        path = Path(path)
        cfg_path = path / cls.CONFIG_NAME
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(AutoTokenizer.from_pretrained(str(path)), bos_token=cfg.get("bos_token"))


def load_tokenizer(path: str | os.PathLike) -> FairseqTokenizer | HFTokenizer:
    """Load whichever tokenizer a folder holds."""
    path = Path(path)
    if (path / FairseqTokenizer.DICT_NAME).is_file() and (path / FairseqTokenizer.SPM_NAME).is_file():
        return FairseqTokenizer.from_pretrained(path)
    if (path / "kosmos_g_tokenizer.json").is_file() or (path / TOKENIZER_CONFIG).is_file():
        return HFTokenizer.from_pretrained(path)
    raise FileNotFoundError(
        f"No tokenizer in {path}: expected {FairseqTokenizer.SPM_NAME} + {FairseqTokenizer.DICT_NAME} "
        "or a transformers tokenizer."
    )
