"""``kosmos-g data instructpix2pix`` and ``kosmos-g data captions`` on hand-made miniature releases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos_g.cli import main
from kosmos_g.data.converters import convert_captions, convert_instructpix2pix, list_instructpix2pix, resize_shorter
from kosmos_g.data.runner import read_failures
from kosmos_g.data.shards import ShardWriter, decode_image, expand_shards, iter_shards, validate_sample


def _jpg(path: Path, w: int, h: int, value: int) -> Path:
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, quality=95)
    return path


@pytest.fixture()
def ip2p(tmp_path) -> Path:
    """Three prompt folders, two seeds each; one image missing, one prompt.json broken."""
    root = tmp_path / "clip-filtered-dataset"
    listing = []
    for p in range(3):
        folder = root / f"{p:07d}"
        folder.mkdir(parents=True)
        prompt = {"input": f"a photo of a dog {p}", "edit": "make it snowy", "output": f"a dog {p} in the snow"}
        (folder / "prompt.json").write_text(json.dumps(prompt) if p != 2 else "{oops", encoding="utf-8")
        seeds = [100 + p, 200 + p]
        for s in seeds:
            _jpg(folder / f"{s}_0.jpg", 40, 20, 50)
            if not (p == 1 and s == 201):
                _jpg(folder / f"{s}_1.jpg", 40, 20, 200)
        listing.append([folder.name, seeds])
    (root / "seeds.json").write_text(json.dumps(listing), encoding="utf-8")
    return root


def test_instructpix2pix_folder_release(ip2p, tmp_path):
    out = tmp_path / "edit"
    m = convert_instructpix2pix(ip2p, out, size=16, chunk_size=4, progress=False)
    assert m["samples"] == 3 and m["failures"] == {"bad_prompt": 2, "missing_image": 1}
    samples = list(iter_shards(expand_shards(out)))
    assert [s["__key__"] for s in samples] == ["0000000_100", "0000000_200", "0000001_101"]
    meta = validate_sample(samples[0])
    assert meta == {"kind": "edit", "caption": "a photo of a dog 0", "instruction": "make it snowy",
                    "target_caption": "a dog 0 in the snow", "source": "0000000/100"}
    assert decode_image(samples[0], "src").size == (32, 16) == decode_image(samples[0], "tgt").size
    assert abs(int(np.asarray(decode_image(samples[0], "tgt")).mean()) - 200) <= 2
    missing = [f for f in read_failures(out) if f["reason"] == "missing_image"]
    assert missing[0]["source"] == "0000001/201" and "201_1.jpg" in missing[0]["detail"]
    again = convert_instructpix2pix(ip2p, out, size=16, chunk_size=4, progress=False)
    assert again == m


def test_instructpix2pix_split_across_machines_equals_one_run(ip2p, tmp_path):
    convert_instructpix2pix(ip2p, tmp_path / "one", size=16, chunk_size=2, progress=False)
    for i in range(3):
        convert_instructpix2pix(ip2p, tmp_path / "three", size=16, chunk_size=2, shard=f"{i}/3", progress=False)
    read = lambda d: [(s["__key__"], s["json"], s["src.jpg"]) for s in iter_shards(expand_shards(d))]  # noqa: E731
    assert read(tmp_path / "one") == read(tmp_path / "three")


def test_instructpix2pix_parquet_release(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet release needs pyarrow (the 'data' extra)")
    import io

    import pyarrow.parquet as pq

    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((10, 30, 3), value, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    table = pa.table({"original_prompt": ["a cat", "a car"], "original_image": [{"bytes": png(10)}, {"bytes": b"x"}],
                      "edit_prompt": ["make it red", "add a hat"], "edited_prompt": ["a red cat", "a car, hat"],
                      "edited_image": [{"bytes": png(90)}, {"bytes": png(90)}]})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    assert len(list_instructpix2pix(tmp_path / "train-00000.parquet")) == 2
    m = convert_instructpix2pix(tmp_path / "train-00000.parquet", tmp_path / "out", size=20, progress=False)
    assert m["samples"] == 1 and m["failures"] == {"unreadable_image": 1}
    sample = next(iter_shards(expand_shards(tmp_path / "out")))
    assert validate_sample(sample)["instruction"] == "make it red"
    assert decode_image(sample, "src").size == (60, 20)


def test_resize_shorter():
    assert resize_shorter(Image.new("RGB", (300, 200)), 512).size == (768, 512)
    im = Image.new("RGB", (512, 700))
    assert resize_shorter(im, 512) is im


@pytest.fixture()
def wds(tmp_path) -> Path:
    """An img2dataset-style tar: NNNNN.jpg + NNNNN.txt + NNNNN.json; one broken, one tiny, captions long and empty."""
    captions = ["a dog on the beach", "  ", "a very long caption " * 10, "a cat\twearing a hat", "a red car",
                "a tiny image"]
    with ShardWriter(tmp_path / "wds", prefix="part", max_samples=4) as w:
        for i, c in enumerate(captions):
            size = 8 if i == 5 else 32
            jpg = (tmp_path / "x.jpg")
            _jpg(jpg, size, size, 30 * i)
            data = jpg.read_bytes() if i != 4 else b"\xff\xd8 truncated"
            w.write({"jpg": data, "txt": c, "json": {"caption": c, "status": "success"}}, key=f"{i:05d}")
    return tmp_path / "wds"


def test_captions_from_img2dataset_tars_with_the_stage2_filters(wds, tmp_path):
    from kosmos_g.testing import make_tiny_clip_tokenizer

    tok = make_tiny_clip_tokenizer(tmp_path / "clip-tok")  # one token per character here
    out = tmp_path / "caption"
    m = convert_captions(wds, out, clip_tokenizer=tmp_path / "clip-tok", max_clip_tokens=30, min_side=16,
                         chunk_size=3, progress=False)
    assert len(tok("a dog on the beach", add_special_tokens=False)["input_ids"]) <= 30
    assert m["samples"] == 2
    assert m["failures"] == {"caption_too_long": 1, "empty_caption": 1, "image_too_small": 1, "unreadable_image": 1}
    samples = list(iter_shards(expand_shards(out)))
    assert [validate_sample(s)["caption"] for s in samples] == ["a dog on the beach", "a cat wearing a hat"]
    originals = {s["__key__"]: s["jpg"] for s in iter_shards(expand_shards(wds))}
    assert [s["jpg"] for s in samples] == [originals["00000"], originals["00003"]]  # not re-encoded
    m2 = convert_captions(wds, tmp_path / "words", max_words=6, progress=False)
    assert m2["failures"]["caption_too_long"] == 1


def test_captions_from_a_jsonl_list_and_cli(tmp_path, capsys):
    for i in range(3):
        _jpg(tmp_path / f"{i}.jpg", 24, 24, 60 * i)
    rows = [{"image": f"{i}.jpg", "caption": f"picture number {i}"} for i in range(3)] + [{"image": "nope.jpg",
                                                                                        "caption": "gone"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert main(["data", "captions", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "out"), "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 3 and summary["failures"] == {"unreadable_image": 1}
    assert main(["data", "captions", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "o2"), "-q",
                 "--max-clip-tokens", "75"]) == 2
    assert "--clip-tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"caption": "x"}\n', encoding="utf-8")
    assert main(["data", "captions", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o3"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0]
    assert main(["data", "instructpix2pix", str(tmp_path / "missing"), "-o", str(tmp_path / "o4"), "-q"]) == 2
    assert "not found" in capsys.readouterr().err


def test_inspect_reads_every_kind_and_reports_damage(tmp_path):
    from kosmos_g.data.inspect import inspect_shards
    from kosmos_g.train.testing import KIND_DIRS, make_tiny_shards

    dirs = make_tiny_shards(tmp_path / "shards", n=3, per_shard=3)
    paths = [str(p) for kind in KIND_DIRS for p in sorted(dirs[kind].glob("*.tar"))]
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(Path(paths[1]).read_bytes()[:3000])
    report = inspect_shards(paths + [str(damaged)], sheet=tmp_path / "all.png", rows=20)
    assert report["kinds"]["compositional"] == 3 and report["kinds"]["edit"] == 3 and report["kinds"]["text"] == 3
    assert report["kinds"]["caption"] >= 3 and report["entities"] == {"2": 3}
    assert len(report["damaged_shards"]) == 1 and "damaged.tar" in report["damaged_shards"][0]
    with Image.open(tmp_path / "all.png") as im:
        assert im.width >= 5 * 96 and im.height > 10 * 96  # 2 entities: target + 4 crops per row
    with pytest.raises(ValueError, match="rows"):
        inspect_shards(paths, rows=0)


def test_captions_from_img2dataset_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow (the 'data' extra)")
    import io

    import pyarrow.parquet as pq

    def jpg(value: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    table = pa.table({"key": ["000", "001", "002"], "caption": ["a red bus", None, "a green tree"],
                      "jpg": [jpg(10), jpg(20), b"broken"]})
    pq.write_table(table, tmp_path / "00000.parquet")
    m = convert_captions(tmp_path / "00000.parquet", tmp_path / "out", progress=False)
    assert m["samples"] == 1 and m["failures"] == {"empty_caption": 1, "unreadable_image": 1}
    sample = next(iter_shards(expand_shards(tmp_path / "out")))
    assert validate_sample(sample)["caption"] == "a red bus" and sample["jpg"] == jpg(10)


def test_an_image_over_the_pixel_limit_is_a_logged_failure(tmp_path):
    from helpers import forged_png

    _jpg(tmp_path / "ok.jpg", 24, 24, 90)
    forged_png(tmp_path / "huge.png", 8000, 6000)  # 48 MP: under PIL's own bomb limit
    rows = [{"image": "ok.jpg", "caption": "fine"}, {"image": "huge.png", "caption": "too big"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    m = convert_captions(tmp_path / "pairs.jsonl", tmp_path / "out", progress=False)
    assert m["samples"] == 1 and m["failures"] == {"unreadable_image": 1}
    assert "8000x6000 is over" in read_failures(tmp_path / "out")[0]["detail"]
