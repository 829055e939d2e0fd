"""Deterministic, resumable, weighted data streams; bad samples are counted and skipped."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from kosmos_g.data.shards import ShardWriter, validate_sample
from kosmos_g.train.data import DataSourceError, MixtureStream, Source, StreamLoader, check_source
from kosmos_g.train.testing import make_tiny_shards


def _key_builder(raw, rng, source):
    """A builder that keeps what a test needs to see: which sample, with which draw."""
    validate_sample(raw)
    return (source, raw["__key__"], int(rng.integers(1 << 30)))


def _collate(examples):
    return list(examples)


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards"), n=12, per_shard=3, kinds=("text", "caption"))


def _sources(shard_dirs, weights=(1.0, 1.0)):
    return [Source.from_spec("text", shard_dirs["text"], weights[0]),
            Source.from_spec("caption", shard_dirs["caption"], weights[1])]


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_stream_is_deterministic_and_covers_each_epoch(shard_dirs):
    kw = dict(stream=0, num_streams=1, seed=3, shuffle_buffer=4)
    a = _take(MixtureStream(_sources(shard_dirs, (1, 0)), _key_builder, **kw), 24)
    b = _take(MixtureStream(_sources(shard_dirs, (1, 0)), _key_builder, **kw), 24)
    assert [x for x, _ in a] == [x for x, _ in b]
    keys = [ex[1] for ex, _ in a]
    assert sorted(keys[:12]) == sorted(keys[12:]) == [f"text-{i:05d}" for i in range(12)]
    assert keys[:12] != keys[12:], "each epoch reshuffles"
    assert keys[:12] != sorted(keys[:12]), "samples are shuffled"
    other_seed = _take(MixtureStream(_sources(shard_dirs, (1, 0)), _key_builder, **{**kw, "seed": 4}), 12)
    assert [x for x, _ in other_seed] != [x for x, _ in a[:12]]


def test_stream_resumes_exactly_from_its_state(shard_dirs):
    kw = dict(stream=1, num_streams=2, seed=0, shuffle_buffer=5)
    full = _take(MixtureStream(_sources(shard_dirs), _key_builder, **kw), 30)
    for k in (1, 7, 13):
        state = full[k - 1][1]
        resumed = _take(MixtureStream(_sources(shard_dirs), _key_builder, state=state, **kw), 30 - k)
        assert [x for x, _ in resumed] == [x for x, _ in full[k:]]
        assert resumed[-1][1] == full[-1][1]
    json.dumps(full[-1][1])  # states are plain JSON


def test_mixture_follows_weights(shard_dirs):
    got = _take(MixtureStream(_sources(shard_dirs, (1, 3)), _key_builder, stream=0, num_streams=1, seed=0,
                              shuffle_buffer=4), 400)
    share = sum(ex[0] == "caption" for ex, _ in got) / len(got)
    assert 0.68 < share < 0.82


def test_global_batch_does_not_depend_on_process_count(shard_dirs):
    """With data.streams fixed, 1 process x batch 4 sees what 2 processes x batch 2 see together."""
    common = dict(num_streams=2, seed=0, shuffle_buffer=4, num_workers=0)
    one = StreamLoader(_sources(shard_dirs), _key_builder, _collate, batch_size=4, rank=0, world_size=1, **common)
    two = [StreamLoader(_sources(shard_dirs), _key_builder, _collate, batch_size=2, rank=r, world_size=2, **common)
           for r in range(2)]
    batches = _take(one, 5)
    halves = [_take(loader, 5) for loader in two]
    for step in range(5):
        assert batches[step][0] == halves[0][step][0] + halves[1][step][0]
        assert batches[step][1] == {**halves[0][step][1], **halves[1][step][1]}


def test_workers_do_not_change_batches(shard_dirs):
    common = dict(batch_size=4, num_streams=2, rank=0, world_size=1, seed=1, shuffle_buffer=4)
    plain = _take(StreamLoader(_sources(shard_dirs), _key_builder, _collate, num_workers=0, **common), 6)
    workers = _take(StreamLoader(_sources(shard_dirs), _key_builder, _collate, num_workers=2, **common), 6)
    assert [b for b, _ in plain] == [b for b, _ in workers]
    assert [p for _, p in plain] == [p for _, p in workers]


def test_loader_resumes_from_batch_position(shard_dirs):
    common = dict(batch_size=4, num_streams=2, rank=0, world_size=1, seed=0, shuffle_buffer=4, num_workers=0)
    full = _take(StreamLoader(_sources(shard_dirs), _key_builder, _collate, **common), 8)
    resumed = _take(StreamLoader(_sources(shard_dirs), _key_builder, _collate, states=full[2][1], **common), 5)
    assert [b for b, _ in resumed] == [b for b, _ in full[3:]]


def test_loader_rejects_uneven_splits(shard_dirs):
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        StreamLoader(_sources(shard_dirs), _key_builder, _collate, batch_size=4, num_workers=0, num_streams=3,
                     rank=0, world_size=2, seed=0, shuffle_buffer=1)
    with pytest.raises(ValueError, match="batch_size"):
        StreamLoader(_sources(shard_dirs), _key_builder, _collate, batch_size=3, num_workers=0, num_streams=2,
                     rank=0, world_size=1, seed=0, shuffle_buffer=1)


def _write_dirty_source(path):
    """One shard: 4 good caption samples, then 4 bad ones (missing member, bad json, unknown kind,
    corrupt png)."""
    good = np.zeros((8, 8, 3), np.uint8)
    with ShardWriter(path, max_samples=100) as w:
        for i in range(4):
            w.write({"json": {"kind": "caption", "caption": f"good {i}"}, "png": good}, key=f"good{i}")
        w.write({"json": {"kind": "caption", "caption": "no image"}}, key="bad-missing")
        w.write({"json": b"{oops", "png": good}, key="bad-json")
        w.write({"json": {"kind": "hologram"}}, key="bad-kind")
        w.write({"json": {"kind": "caption", "caption": "x"}, "png": b"\x89PNG garbage"}, key="bad-png")


def _decoding_builder(raw, rng, source):
    from kosmos_g.data.shards import decode_image

    meta = validate_sample(raw)
    if meta["kind"] == "caption":
        decode_image(raw)
    return raw["__key__"]


def test_bad_samples_are_counted_and_skipped(tmp_path, caplog):
    _write_dirty_source(tmp_path / "dirty")
    source = Source.from_spec("dirty", tmp_path / "dirty", 1.0)
    stream = MixtureStream([source], _decoding_builder, stream=0, num_streams=1, seed=0, shuffle_buffer=1)
    with caplog.at_level("WARNING"):
        got = _take(stream, 9)  # 2 epochs of 4 good samples, then the first of epoch 3
    assert [k for k, _ in got] == [f"good{i}" for i in range(4)] * 2 + ["good0"]
    assert got[-1][1]["bad"] == 8  # every bad sample of both epochs, each counted once
    assert "skipping bad sample 'bad-png'" in caplog.text


def test_damaged_shard_keeps_complete_samples_and_is_counted(tmp_path, caplog):
    with ShardWriter(tmp_path / "cut", max_samples=100) as w:
        for i in range(3):
            w.write({"json": {"kind": "text", "text": "y" * 4000}}, key=f"cut{i}")
    cut = w.shards[0]
    cut.write_bytes(cut.read_bytes()[:6000])  # cut0 whole, cut1 torn
    source = Source.from_spec("cut", cut, 1.0)
    with caplog.at_level("WARNING"):
        got = _take(MixtureStream([source], _key_builder, stream=0, num_streams=1, seed=0, shuffle_buffer=1), 3)
    assert [ex[1] for ex, _ in got] == ["cut0"] * 3
    # counted once per epoch, when the reader meets the damage (here: reading ahead of each yield)
    assert [st["bad"] for _, st in got] == [1, 2, 3] and "damaged shard" in caplog.text
    # resuming from a state does not count the damage met while skipping again
    resumed = _take(MixtureStream([source], _key_builder, stream=0, num_streams=1, seed=0, shuffle_buffer=1,
                                  state=got[0][1]), 2)
    assert [st["bad"] for _, st in resumed] == [st["bad"] for _, st in got[1:]]


def test_a_source_with_no_usable_sample_fails_loudly(tmp_path):
    with ShardWriter(tmp_path / "bad", max_samples=10) as w:
        for i in range(3):
            w.write({"json": b"{"}, key=f"b{i}")
    source = Source.from_spec("bad", tmp_path / "bad", 1.0)
    with pytest.raises(DataSourceError, match="no usable sample.*Last error: BadSample"):
        _take(MixtureStream([source], _key_builder, stream=0, num_streams=1, seed=0, shuffle_buffer=1), 1)
    with pytest.raises(DataSourceError, match="'bad' has no usable sample: none of the 3 samples.*not valid JSON"):
        check_source(source)
    with pytest.raises(DataSourceError, match="'bad': No shards match"):
        Source.from_spec("bad", tmp_path / "bad" / "*.tgz", 1.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_without_usable_samples_raises_one_clear_error_from_any_worker(tmp_path, workers):
    """One good sample of four: stream 0 of 2 gets it, stream 1 gets only bad ones. The error
    names the source and the stream, and a DataLoader worker does not turn it into a traceback."""
    with ShardWriter(tmp_path / "thin", max_samples=10) as w:
        w.write({"json": {"kind": "text", "text": "fine"}}, key="good")
        for i in range(3):
            w.write({"json": b"{"}, key=f"bad{i}")
    source = Source.from_spec("thin", tmp_path / "thin", 1.0)
    check_source(source)  # the source as a whole is usable
    loader = StreamLoader([source], _key_builder, _collate, batch_size=2, num_workers=workers, num_streams=2,
                          rank=0, world_size=1, seed=0, shuffle_buffer=1)
    with pytest.raises(DataSourceError) as info:
        _take(loader, 1)
    message = str(info.value)
    assert message.startswith("Data source 'thin' gave no usable sample to stream 1 of 2")
    assert "(2 read: 2 bad, 0 filtered)" in message and "Traceback" not in message
