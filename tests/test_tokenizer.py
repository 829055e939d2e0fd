"""FairseqTokenizer: the official vocabulary layout and clear errors for bad tokenizer files."""

from __future__ import annotations

import pytest

from kosmos_g import KosmosGProcessor, get_preset
from kosmos_g.testing import make_tiny_tokenizer
from kosmos_g.tokenizer import FairseqTokenizer

RELEASE_DICT_LINES = 63_997  # lines of the released data/dict.txt (the last has no newline)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(path)
    return path


def test_release_sized_dictionary_fills_the_kosmos_g_preset(tok_dir, tmp_path):
    # A dict.txt shaped like the release's: 63,997 entries, no newline after the last one,
    # so `wc -l` counts 63,996. The SentencePiece model only matters for encoding.
    lines = [f"piece{i} {RELEASE_DICT_LINES - i}" for i in range(RELEASE_DICT_LINES)]
    (tmp_path / "dict.txt").write_text("\n".join(lines), encoding="utf-8")
    assert (tmp_path / "dict.txt").read_bytes().count(b"\n") == RELEASE_DICT_LINES - 1
    tok = FairseqTokenizer(tok_dir / "sentencepiece.bpe.model", tmp_path / "dict.txt")

    # <s> <pad> </s> <unk>, the dictionary, <mask>, then the five Kosmos specials
    assert len(tok) == 4 + RELEASE_DICT_LINES + 6 == 64_007
    assert tok.symbols[4] == "piece0" and tok.symbols[64_000] == f"piece{RELEASE_DICT_LINES - 1}"
    assert [tok.index[s] for s in ("<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>")] == \
        [64_001, 64_002, 64_003, 64_004, 64_005, 64_006]
    assert (tok.boi_id, tok.eoi_id) == (64_003, 64_004)

    preset = get_preset("kosmos-g")
    assert preset.mllm.vocab_size == len(tok)
    processor = KosmosGProcessor.from_config(tok, preset)  # refuses a tokenizer larger than the model
    assert processor("a dog")["input_ids"][0, 0].item() == tok.bos_id


@pytest.mark.parametrize("case,match", [
    ("missing spm", r"SentencePiece model not found: .*nope\.model"),
    ("missing dict", r"dictionary not found: .*nope\.txt"),
    ("spm is a directory", r"SentencePiece model .*spmdir is a directory"),
    ("dict is a directory", r"dictionary .*dictdir is a directory"),
    ("garbage spm", r"garbage\.model is not a SentencePiece model"),
    ("empty spm", r"empty\.model is not a SentencePiece model"),
    ("binary dict", r"binary\.txt is not a fairseq dictionary \(not UTF-8 text"),
    ("count missing", r"nocount\.txt:2: expected '<token> <count>'"),
    ("count not a number", r"badcount\.txt:1: expected '<token> <count>'"),
])
def test_bad_tokenizer_files_name_the_file(tok_dir, tmp_path, case, match):
    spm, dict_path = tok_dir / "sentencepiece.bpe.model", tok_dir / "dict.txt"
    (tmp_path / "spmdir").mkdir()
    (tmp_path / "dictdir").mkdir()
    (tmp_path / "garbage.model").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.model").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 12\n")
    (tmp_path / "nocount.txt").write_text("a 1\nb\n", encoding="utf-8")
    (tmp_path / "badcount.txt").write_text("a many\n", encoding="utf-8")
    spm, dict_path = {
        "missing spm": (tmp_path / "nope.model", dict_path),
        "missing dict": (spm, tmp_path / "nope.txt"),
        "spm is a directory": (tmp_path / "spmdir", dict_path),
        "dict is a directory": (spm, tmp_path / "dictdir"),
        "garbage spm": (tmp_path / "garbage.model", dict_path),
        "empty spm": (tmp_path / "empty.model", dict_path),
        "binary dict": (spm, tmp_path / "binary.txt"),
        "count missing": (spm, tmp_path / "nocount.txt"),
        "count not a number": (spm, tmp_path / "badcount.txt"),
    }[case]
    error = FileNotFoundError if case.startswith("missing") else ValueError
    with pytest.raises(error, match=match) as err:
        FairseqTokenizer(spm, dict_path)
    assert "\n" not in str(err.value)


def test_overwrite_flag_appends_a_second_entry(tok_dir, tmp_path):
    # fairseq's Dictionary: "#fairseq:overwrite" gives an existing symbol a new index
    (tmp_path / "dict.txt").write_text("a 5\nb 4\na 3 #fairseq:overwrite\n", encoding="utf-8")
    tok = FairseqTokenizer(tok_dir / "sentencepiece.bpe.model", tmp_path / "dict.txt")
    assert tok.symbols[4:7] == ["a", "b", "a"] and tok.index["a"] == 6
