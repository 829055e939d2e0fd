"""WebDataset shards: atomic writing, listing, streaming, validation (docs/data-format.md)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from kosmos_g.data.shards import (BadSample, ShardWriter, decode_image, encode_member, expand_shards, iter_shard,
                                  iter_shards, split_member_name, validate_sample)
from kosmos_g.train.testing import KIND_DIRS, make_tiny_shards, tiny_samples


def _png(size=8, value=0) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def test_writer_rotates_shards_and_publishes_atomically(tmp_path):
    w = ShardWriter(tmp_path, prefix="caps", max_samples=2)
    w.write({"json": {"kind": "caption", "caption": "a"}, "png": _png()})
    # the shard being written is a hidden temporary, invisible as a shard
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".caps-000000.tar.tmp-")
    with pytest.raises(FileNotFoundError):
        expand_shards(tmp_path)
    for i in range(4):
        w.write({"json": {"kind": "caption", "caption": str(i)}, "png": _png()})
    shards = w.close()
    assert [p.name for p in shards] == ["caps-000000.tar", "caps-000001.tar", "caps-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in shards]
    assert [len(list(iter_shard(p))) for p in shards] == [2, 2, 1]


def test_crashed_writer_keeps_only_its_complete_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_samples=1) as w:
            w.write({"json": {"kind": "text", "text": "x"}})
            w.write({"json": {"kind": "text", "text": "y"}})  # publishes shard 0, starts shard 1
            raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
    assert [json.loads(s["json"])["text"] for s in iter_shard(tmp_path / "shard-000000.tar")] == ["x"]


def test_writer_never_replaces_existing_shards_unless_asked(tmp_path):
    with ShardWriter(tmp_path, max_samples=1) as w:
        for text in ("a", "b"):
            w.write({"json": {"kind": "text", "text": text}})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"shard-000000\.tar.*start_index=2.*overwrite=True"):
        ShardWriter(tmp_path, max_samples=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with ShardWriter(tmp_path, max_samples=1, start_index=2) as w:  # appending to the set
        w.write({"json": {"kind": "text", "text": "c"}})
    with ShardWriter(tmp_path, prefix="other") as w:  # another prefix is another set
        w.write({"json": {"kind": "text", "text": "d"}})
    with ShardWriter(tmp_path, max_samples=1, overwrite=True) as w:
        w.write({"json": {"kind": "text", "text": "e"}})
    texts = [json.loads(s["json"])["text"] for s in iter_shards(expand_shards(str(tmp_path / "shard-*.tar")))]
    assert texts == ["e", "b", "c"]


def test_round_trip_all_kinds_and_webdataset_interop(tmp_path):
    import webdataset as wds

    dirs = make_tiny_shards(tmp_path, n=5, per_shard=2)
    for kind in KIND_DIRS:
        expected = tiny_samples(kind, 5)
        raws = list(iter_shards(expand_shards(dirs[kind])))
        assert [r["__key__"] for r in raws] == [f"{kind}-{i:05d}" for i in range(5)]
        for raw, sample in zip(raws, expected):
            assert validate_sample(raw) == sample["json"]
            for name, value in sample.items():
                if name.endswith("png"):
                    stem = name[:-4] if name != "png" else ""
                    np.testing.assert_array_equal(np.asarray(decode_image(raw, stem)), value)
        # plain webdataset reads the same samples
        ds = wds.WebDataset(expand_shards(dirs[kind]), shardshuffle=False)
        assert [s["__key__"] for s in ds] == [r["__key__"] for r in raws]


def test_same_samples_give_identical_bytes(tmp_path):
    a = make_tiny_shards(tmp_path / "a", n=3, kinds=("caption",))["caption"]
    b = make_tiny_shards(tmp_path / "b", n=3, kinds=("caption",))["caption"]
    assert [p.read_bytes() for p in sorted(a.iterdir())] == [p.read_bytes() for p in sorted(b.iterdir())]


def test_writer_rejects_bad_keys_and_values(tmp_path):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="key"):
            w.write({"json": {}}, key="a.b")
        with pytest.raises(ValueError, match="Duplicate"):
            w.write({"json": {}}, key="k")
            w.write({"json": {}}, key="k")
        with pytest.raises(ValueError, match="cannot encode"):
            w.write({"npy": object()}, key="z")
    with pytest.raises(ValueError, match="uint8"):
        encode_member("png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="max_samples"):
        ShardWriter(tmp_path, max_samples=0)


def test_expand_shards_patterns(tmp_path):
    w = ShardWriter(tmp_path, max_samples=1)
    for i in range(3):
        w.write({"json": {"kind": "text", "text": str(i)}})
    w.close()
    names = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_shards(tmp_path) == names
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == names
    assert expand_shards(str(tmp_path / "shard-00000[01].tar")) == names[:2]
    assert expand_shards([names[2], names[0]]) == [names[2], names[0]]
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "shard-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_member_names_split_like_webdataset():
    assert split_member_name("dir/abc.0.png") == ("dir/abc", "0.png")
    assert split_member_name("k.E0_SQUARE.PNG") == ("k", "e0_square.png")
    assert split_member_name("noext") == (None, None)


@pytest.mark.parametrize("raw, match", [
    ({"__key__": "k"}, "no json"),
    ({"__key__": "k", "json": b"{not json"}, "not valid JSON"),
    ({"__key__": "k", "json": b"[1]"}, "object"),
    ({"__key__": "k", "json": b'{"kind": "video"}'}, "unknown kind"),
    ({"__key__": "k", "json": b'{"kind": "caption", "caption": "x"}'}, "no png"),
    ({"__key__": "k", "json": b'{"kind": "caption", "caption": 3}', "png": b""}, "caption"),
    ({"__key__": "k", "json": b'{"kind": "edit", "caption": "x", "instruction": "y", "src.png": 1}',
      "src.png": b""}, "tgt.png"),
    ({"__key__": "k", "json": b'{"kind": "edit", "caption": "x", "instruction": "y", "target_caption": 1}',
      "src.png": b"", "tgt.png": b""}, "target_caption"),
    ({"__key__": "k", "json": b'{"kind": "interleaved", "segments": [{"image": 0}]}'}, "0.png"),
    ({"__key__": "k", "json": b'{"kind": "interleaved", "segments": [{"video": 0}]}'}, "bad segment"),
    ({"__key__": "k", "json": json.dumps({"kind": "compositional", "caption": "a cat",
                                         "entities": [{"start": 2, "end": 9}]}).encode(), "tgt.png": b""},
     "start < end"),
])
def test_validate_sample_names_the_problem(raw, match):
    with pytest.raises(BadSample, match=match):
        validate_sample(raw)


def test_corrupt_image_is_a_bad_sample():
    raw = {"__key__": "k", "png": b"\x89PNG\r\n\x1a\n garbage"}
    with pytest.raises(BadSample, match="cannot decode"):
        decode_image(raw)
    buf = io.BytesIO()
    Image.fromarray(_png(16, 200)).save(buf, format="PNG")
    truncated = {"__key__": "k", "png": buf.getvalue()[:-30]}
    with pytest.raises(BadSample):
        decode_image(truncated)


def test_truncated_shard_reports_and_keeps_complete_samples(tmp_path):
    with ShardWriter(tmp_path, max_samples=10) as w:
        for i in range(4):
            w.write({"json": {"kind": "text", "text": "x" * 3000}}, key=f"s{i}")
    path = w.shards[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    errors = []
    got = [r["__key__"] for r in iter_shard(path, on_error=lambda p, e: errors.append(p))]
    assert errors == [str(path)]
    assert got and got == [f"s{i}" for i in range(len(got))] and len(got) < 4
    with pytest.raises((tarfile.TarError, OSError, EOFError)):
        list(iter_shard(path))
