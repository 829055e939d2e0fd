"""Prompt parsing, tokenisation, image preprocessing and the errors users see."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import forged_png

from kosmos_g import KosmosGProcessor
from kosmos_g.processing import load_image, preprocess_image, split_prompt
from kosmos_g.testing import make_tiny_tokenizer
from kosmos_g.tokenizer import FairseqTokenizer

RED = Image.new("RGB", (40, 30), (220, 20, 20))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture()
def proc(tok):
    return KosmosGProcessor(tok, image_size=28, num_image_tokens=4, max_images=3, max_length=64)


# ----------------------------------------------------------------------------- tokenizer

def test_fairseq_dictionary_layout(tok):
    pieces = [line.rsplit(" ", 1)[0] for line in tok.dict_path.read_text().splitlines()]
    assert tok.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.symbols[4:4 + len(pieces)] == pieces  # dict.txt in file order
    assert tok.symbols[4 + len(pieces):] == ["<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>"]
    assert tok.boi_id == 4 + len(pieces) + 2 and tok.eoi_id == tok.boi_id + 1
    # A piece's id is its dictionary index, not its SentencePiece id.
    piece = tok.sp.encode("dog", out_type=str)[-1]
    assert tok.encode("dog")[-1] == 4 + pieces.index(piece)
    assert tok.decode(tok.encode("a dog on the beach")) == "a dog on the beach"


def test_unknown_piece_maps_to_unk(tmp_path, tok):
    short = tmp_path / "dict.txt"
    short.write_text("".join(l + "\n" for l in tok.dict_path.read_text().splitlines()[:5]))
    small = FairseqTokenizer(tok.spm_path, short)
    assert 3 in small.encode("zebra xylophone")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        FairseqTokenizer(tmp_path / "nope.model", tmp_path / "dict.txt")


# ----------------------------------------------------------------------------- prompts

def test_placeholder_and_list_forms_agree(proc):
    a = proc("A photo of <i> on the beach", images=[RED])
    b = proc(["A photo of ", RED, " on the beach"])
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sequence_layout(proc, tok):
    ids = proc("<i> wearing <i>", images=[RED, RED])["input_ids"][0].tolist()
    q = 4
    expected = [tok.bos_id] + [tok.boi_id] * (q + 1) + [tok.eoi_id] + tok.encode(" wearing ") + \
        [tok.boi_id] * (q + 1) + [tok.eoi_id]
    assert ids == expected  # starts with <s>, no </s>
    assert tok.eos_id not in ids


def test_batch_padding(proc, tok):
    batch = proc(["<i> wearing <i>", "a dog"], images=[[RED, RED], []])
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] > lengths[1]
    assert (batch["input_ids"][1, lengths[1]:] == tok.pad_id).all()
    assert not batch["image_mask"][1].any()
    assert int(batch["image_mask"].sum()) == 8


@pytest.mark.parametrize("prompt,images,match", [
    ("<i> wearing <i>", [RED], r"2 '<i>' placeholder\(s\) but 1 image"),
    ("a dog", [RED], r"0 '<i>' placeholder\(s\) but 1 image"),
    ("<i><i><i><i>", [RED] * 4, "at most 3"),
    ("   ", [], "Empty prompt"),
    ("dog " * 80, [], "at most 64"),
])
def test_prompt_errors(proc, prompt, images, match):
    with pytest.raises(ValueError, match=match):
        proc(prompt, images=images)


def test_list_prompt_with_placeholder_is_rejected(proc):
    with pytest.raises(ValueError, match="List prompts place images directly"):
        proc(["<i> on the beach", RED])


def test_literal_text_keeps_a_placeholder_as_text(proc):
    text = "the <i>Mona Lisa</i> by"
    item = proc.encode_prompt([text, RED], literal_text=True)
    n = proc.num_image_tokens
    assert item.input_ids[:-(n + 2)] == [proc.tokenizer.bos_id, *proc.tokenizer.encode(text)]
    assert sum(item.image_mask) == n and len(item.pixel_values) == 1  # one image, the real one


def test_batch_image_lists_must_match(proc):
    with pytest.raises(ValueError, match="2 prompts and 1 image entries"):
        proc(["<i>", "<i>"], images=[[RED]])


def test_split_prompt_keeps_order():
    assert split_prompt("x<i>y<i>", ["a", "b"]) == ["x", Path("a"), "y", Path("b"), ""]


def test_an_image_given_as_a_str_path_is_an_image_not_text():
    """A ``str`` path (what the CLI passes) must be read as the image, exactly as the PIL image
    or a Path would be, never tokenized as text."""
    from kosmos_g.micro import evaluate as E

    proc = KosmosGProcessor.from_pretrained(E.embedded_models() / "kosmos-g")
    path = E.embedded_models() / "examples" / "purple-dotted-star.png"
    want = proc.encode_prompt("a large <i> on the left", [Image.open(path)])
    for given in (str(path), path):
        got = proc.encode_prompt("a large <i> on the left", [given])
        assert got.input_ids == want.input_ids and got.image_mask == want.image_mask
        assert len(got.pixel_values) == 1 and torch.equal(got.pixel_values[0], want.pixel_values[0])


# ----------------------------------------------------------------------------- images

def test_unreadable_and_truncated_files_are_named(tmp_path, proc):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not_an_image.png"):
        proc("<i>", images=[bad])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.jpg"):
        proc("<i>", images=[cut])
    with pytest.raises(ValueError, match="Image file not found: .*missing.png"):
        proc("<i>", images=[tmp_path / "missing.png"])


def test_image_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 255] * 256)
    assert load_image(pal).getpixel((0, 0)) == (0, 0, 255)
    gray = Image.new("L", (8, 8), 100)
    assert load_image(gray).getpixel((0, 0)) == (100, 100, 100)
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    path = tmp_path / "deep.png"
    deep.save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert loaded.getpixel((10, 5))[0] > 200  # red now on top


def test_preprocess_matches_resize_and_center_crop():
    arr = np.zeros((30, 60, 3), dtype=np.uint8)
    arr[:, 15:45] = 255  # a white band exactly in the center crop region after resize
    out = preprocess_image(Image.fromarray(arr), 28, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (3, 28, 28)
    # short side 30 -> 28, long side int(28 * 60 / 30) = 56; crop columns 14..42
    assert out[:, :, 4:24].min() > 0.95
    assert out.mean() > 0.85


def test_processor_roundtrip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    again = KosmosGProcessor.from_pretrained(tmp_path)
    a, b = proc("<i> wearing a hat", images=[RED]), again("<i> wearing a hat", images=[RED])
    for k in a:
        assert torch.equal(a[k], b[k])


def test_negative_prompt_defaults_to_bos(proc, tok):
    assert proc.negative("").input_ids == [tok.bos_id]
    assert proc.negative(None).input_ids == [tok.bos_id]
    assert proc.negative("blurry").input_ids == [tok.bos_id] + tok.encode("blurry")


# ----------------------------------------------------------------------------- the list form

DOG = Path(__file__).resolve().parents[1] / "src/kosmos_g/assets/examples/dog.png"


@pytest.mark.parametrize("image", [DOG, Image.open(DOG), np.asarray(Image.open(DOG).convert("RGB"))],
                         ids=["Path", "PIL", "array"])
def test_a_list_with_an_image_is_one_prompt(proc, image):
    batch = proc(["A photo of", image, "on the beach"])
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    want = proc("A photo of<i>on the beach", images=[Image.open(DOG)])
    for k in want:
        assert torch.equal(batch[k], want[k]), k


def test_a_list_of_only_str_is_a_batch_of_text_prompts(proc):
    batch = proc(["a", "b"])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 0
    assert split_prompt(["a ", "b"]) == ["a ", "b"]  # one prompt's segments: both text


@pytest.mark.parametrize("prompt", [["A photo of", "dog.png", "on the beach"],
                                    ["A photo of", "photos/dog.JPG", Path("hat.png")],
                                    "dog.png"])
def test_a_str_that_names_an_image_file_is_refused_not_read_as_text(proc, prompt):
    """Every str in a prompt is text, so an image file name given as a str would silently become a
    prompt of its own (a batch of three above) or the words 'dog.png': it is refused instead."""
    with pytest.raises(ValueError, match=r"looks like an image file.*Path\("):
        proc(prompt)


def test_literal_text_keeps_a_file_name_as_text(proc):
    item = proc.encode_prompt(["see dog.png", "dog.png", RED], literal_text=True)
    assert len(item.pixel_values) == 1


@pytest.mark.parametrize("prompt,match", [
    ([["a", RED], RED], r"position 0 is a list.*str or a list"),
    (["a", RED, None], r"text \(str\) or an image.*position 2 is NoneType"),
    (["a", RED, 3], r"position 2 is int"),
])
def test_a_list_prompt_holds_only_text_and_images(proc, prompt, match):
    with pytest.raises(ValueError, match=match):
        proc(prompt)


@pytest.mark.parametrize("prompt", [DOG, RED, 3])
def test_a_prompt_is_a_str_or_a_list(proc, prompt):
    with pytest.raises(ValueError, match=r"a str .* or a list"):
        proc(prompt)


def test_batch_images_are_one_list_per_prompt(proc):
    with pytest.raises(ValueError, match="one list of images per prompt"):
        proc(["<i> a", "<i> b"], images=["x.png", "y.png"])


def test_one_image_for_one_placeholder_need_not_be_in_a_list(proc):
    for image in (RED, DOG, str(DOG)):
        batch = proc("<i> on the beach", images=image)
        assert batch["pixel_values"].shape[0] == 1


def test_docstring_examples_run():
    import doctest

    import kosmos_g.processing as P

    result = doctest.testmod(P, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 2


# ----------------------------------------------------------------------------- image size limit

@pytest.mark.parametrize("width,height", [(30000, 30000), (10000, 10000), (8000, 5001)])
def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, width, height):
    import kosmos_g.processing as P

    assert P.MAX_IMAGE_PIXELS == 40_000_000
    assert Image.open(forged_png(tmp_path / "forged.png", 300, 200)).size == (300, 200)
    path = forged_png(tmp_path / "huge.png", width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning/Error from PIL: our message instead
        for check in (load_image, P.check_image_file):
            with pytest.raises(ValueError) as info:
                check(path)
            message = str(info.value)
            assert "\n" not in message and str(path) in message
            assert f"{width}x{height}" in message and "40 megapixels" in message


def test_the_pixel_limit_is_inclusive(tmp_path, monkeypatch):
    import kosmos_g.processing as P

    monkeypatch.setattr(P, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    Image.new("RGB", (10, 11)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "ok.png").size == P.check_image_file(tmp_path / "ok.png") == (10, 10)
    with pytest.raises(ValueError, match=r"10x11"):
        load_image(tmp_path / "big.png")
    assert load_image(Image.new("RGB", (10, 11))).size == (10, 11)  # images in memory are the caller's


def test_a_folder_given_as_an_image_is_named_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory"):
        load_image(tmp_path)
