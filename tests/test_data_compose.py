"""``kosmos-g data compose`` end to end on rendered images with tiny random models (CPU, no download):
the documented schema, resumption after a kill, machine splits, per-sample seeding, the failure log,
and a stage-3 training step on the result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos_g.cli import main
from kosmos_g.data.compose import ComposeConfig, EntityExtractor, compose, local_chunk_fn
from kosmos_g.data.runner import list_images, read_failures, run_chunks
from kosmos_g.data.shards import decode_image, expand_shards, iter_shards, validate_sample
from kosmos_g.data.testing import make_tiny_compose_models, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 48


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_compose_models(tmp_path_factory.mktemp("compose-models"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_image_folder(tmp_path_factory.mktemp("images") / "photos", 12)
    (folder / "set0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "set0" / "broken.txt").write_text("a red square", encoding="utf-8")
    return folder


def config(models, **kw) -> ComposeConfig:
    base = dict(lm=str(models["lm"]), segmenter_path=str(models["clipseg"]), caption_from_source=True, size=SIZE,
                workers=0, caption_batch_size=4, lm_batch_size=4, mask_batch_size=8, image_format="png")
    return ComposeConfig(**{**base, **kw})


def samples_of(out: Path) -> dict[str, dict]:
    """key -> {member: sha256} over every shard of a run folder."""
    found = {}
    for raw in iter_shards(expand_shards(out)):
        assert raw["__key__"] not in found, f"duplicate sample {raw['__key__']}"
        found[raw["__key__"]] = {k: hashlib.sha256(v).hexdigest() for k, v in raw.items() if not k.startswith("__")}
    return found


@pytest.fixture(scope="module")
def reference(models, images, tmp_path_factory):
    """One uninterrupted run, caption from source, 13 inputs in chunks of 4."""
    out = tmp_path_factory.mktemp("ref") / "comp"
    manifest = compose(images, out, config(models), chunk_size=4, progress=False)
    return out, manifest


def test_compose_writes_the_documented_schema(reference):
    out, manifest = reference
    assert manifest["chunks_done"] == manifest["chunks_total"] == 4
    assert manifest["samples"] + sum(manifest["failures"].values()) == 13
    assert manifest["samples"] >= 2 and manifest["failures"]["unreadable_image"] == 1
    assert set(manifest["failures"]) <= {"unreadable_image", "no_entity_in_caption", "empty_mask", "empty_answer"}
    assert [s["name"] for s in manifest["shards"]] == sorted(p.name for p in out.glob("*.tar"))
    assert all(s["name"].startswith("compositional-") for s in manifest["shards"])
    n = 0
    for raw in iter_shards(expand_shards(out)):
        meta = validate_sample(raw)
        n += 1
        assert meta["kind"] == "compositional" and meta["entities"]
        for i, ent in enumerate(meta["entities"]):
            assert meta["caption"][ent["start"]:ent["end"]] == ent["text"]
            for stem in (f"e{i}_square", f"e{i}_white"):
                assert decode_image(raw, stem).size == (SIZE, SIZE)
        assert decode_image(raw, "tgt").size == (SIZE, SIZE)
        assert not any(name.startswith(f"e{len(meta['entities'])}_") for name in raw)
        # the whitened crop is the square crop with white outside the entity's mask
        square = np.asarray(decode_image(raw, "e0_square"), np.int16)
        white = np.asarray(decode_image(raw, "e0_white"), np.int16)
        changed = np.any(square != white, axis=-1)
        assert (white[changed] == 255).all()
    assert n == manifest["samples"]
    failures = read_failures(out)
    assert len(failures) == sum(manifest["failures"].values())
    broken = [f for f in failures if f["reason"] == "unreadable_image"]
    assert broken[0]["source"] == "set0/broken.png" and "cannot decode" in broken[0]["detail"]
    assert all(f["reason"] != "no_entity_in_caption" or "answer" in f for f in failures)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporaries left behind"


def test_rerun_skips_finished_work_and_refuses_other_settings(models, images, reference):
    out, manifest = reference
    before = samples_of(out)
    again = compose(images, out, config(models), chunk_size=4, progress=False)
    assert again["samples"] == manifest["samples"] and samples_of(out) == before
    with pytest.raises(ValueError, match="chunk_size"):
        compose(images, out, config(models), chunk_size=5, progress=False)
    with pytest.raises(ValueError, match="seed"):
        compose(images, out, config(models, seed=1), chunk_size=4, progress=False)


class Killed(Exception):
    pass


def test_kill_anywhere_and_resume_equals_an_uninterrupted_run(models, images, reference, tmp_path):
    ref_out, _ = reference
    expected = samples_of(ref_out)
    cfg = config(models)
    items = list_images(images)
    fn = local_chunk_fn(cfg)  # one set of loaded models for every trial
    run_info = {"command": "compose", "config": cfg.fingerprint()}
    for kill_at in (1, 4, 6, 11, 13):  # the n-th input processed: mid-chunk, at chunk ends, the last one
        out = tmp_path / f"kill{kill_at}"
        seen = {"n": 0}

        def killing(chunk, update, kill_at=kill_at, seen=seen):
            def counting(*a, **kw):
                update(*a, **kw)
                seen["n"] += 1
                if seen["n"] == kill_at:
                    raise Killed()
            return fn(chunk, counting)

        with pytest.raises(Killed):
            run_chunks(items, out, killing, chunk_size=4, prefix="compositional", progress=False, run_info=run_info)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        if kill_at == 6:  # killed after publishing a shard but before its record: the shard is redone
            records = sorted((out / "_chunks").glob("*.json"))
            records[-1].unlink()
        compose(images, out, cfg, chunk_size=4, progress=False)
        assert samples_of(out) == expected, f"kill at input {kill_at}"
        assert read_failures(out) == read_failures(ref_out)


def test_machine_split_and_batch_sizes_give_the_same_samples(models, images, reference, tmp_path):
    ref_out, manifest = reference
    out = tmp_path / "split"
    for i in (1, 0):
        compose(images, out, config(models, lm_batch_size=1, mask_batch_size=3), chunk_size=4, shard=f"{i}/2",
                progress=False)
    assert samples_of(out) == samples_of(ref_out)
    assert json.loads((out / "manifest.json").read_text())["samples"] == manifest["samples"]
    partial = tmp_path / "partial"
    m = compose(images, partial, config(models), chunk_size=4, shard="1/3", progress=False)
    assert m["chunks_done"] == 1 and m["chunks_total"] == 4  # chunk 1 of 0..3


def test_each_sample_is_sampled_from_its_own_seed(models):
    ex = EntityExtractor(config(models))
    caps = ["a red square next to a blue circle", "a green circle", "a yellow square", "a dog and a hat"]
    seeds = [11, 22, 33, 44]
    together = ex.answers(caps, seeds)
    alone = [ex.answers([c], [s])[0] for c, s in zip(caps, seeds)]
    assert together == alone
    assert len({ex.answers(caps[:1], [s])[0] for s in range(5)}) > 1  # the seed does decide


def test_compose_with_the_captioner_and_grounded_sam(models, images, tmp_path):
    cfg = config(models, caption_from_source=False, captioner=str(models["captioner"]))
    m = compose(images, tmp_path / "blip", cfg, chunk_size=8, progress=False)
    assert m["samples"] + sum(m["failures"].values()) == 13
    assert all(f.get("caption") for f in read_failures(tmp_path / "blip") if f["reason"] != "unreadable_image")
    cfg = config(models, segmenter="grounded-sam", segmenter_path=None, grounding_dino=str(models["grounding_dino"]),
                 sam=str(models["sam"]), box_threshold=0.0)
    m = compose(images, tmp_path / "gsam", cfg, chunk_size=8, progress=False)
    assert m["samples"] >= 1 and m["samples"] + sum(m["failures"].values()) == 13
    for raw in iter_shards(expand_shards(tmp_path / "gsam")):
        meta = validate_sample(raw)
        assert decode_image(raw, "e0_white").size == (SIZE, SIZE)
        assert len(meta["boxes"]) == len(meta["entities"])


def test_inputs_as_list_files_and_tars(models, images, reference, tmp_path):
    from kosmos_g.data.shards import ShardWriter

    lines = [f"{p.relative_to(images).as_posix()}\t{p.with_suffix('.txt').read_text()}"
             for p in sorted(images.rglob("*.png"))]
    (images / "list.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list_images(images / "list.tsv")
    assert len(items) == 13 and items[0].caption
    with ShardWriter(tmp_path / "wds", max_samples=5) as w:
        for p in sorted(images.rglob("*.png"))[:6]:
            w.write({"jpg": p.read_bytes(), "txt": p.with_suffix(".txt").read_text()}, key=p.stem)
    tar_items = list_images(tmp_path / "wds")
    assert len(tar_items) == 6 and tar_items[0].caption
    m = compose(tmp_path / "wds", tmp_path / "from-tars", config(models), chunk_size=4, progress=False)
    assert m["samples"] + sum(m["failures"].values()) == 6


def test_cli_compose_and_one_line_errors(models, images, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "compose", str(images), "-o", str(out), "--lm", str(models["lm"]), "--clipseg",
            str(models["clipseg"]), "--caption-from-source", "--size", str(SIZE), "--workers", "0", "--chunk-size",
            "4", "-q", "--image-format", "png", "--lm-batch-size", "4", "--mask-batch-size", "8"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] >= 1 and summary["chunks_done"] == 4
    bad = {
        "--shard": (["--shard", "3/2"], "0 <= i < n"),
        "no captioner": ([a for a in args if a != "--caption-from-source"], "--captioner"),
        "missing input": (["--lm", str(tmp_path / "nope")], "does not exist"),
        "segmenter": (["--segmenter", "grounded-sam"], "--grounding-dino"),
    }
    for name, (extra, message) in bad.items():
        argv = extra if name == "no captioner" else args + extra
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
    assert main(["data", "compose", str(tmp_path / "no-such"), *args[3:]]) == 2
    assert "not found" in capsys.readouterr().err


def test_stage3_trains_one_step_on_the_composed_shards(reference, tiny_kosmos_dir, tiny_sd_dir, tmp_path, capsys):
    from accelerate.state import AcceleratorState, GradientState

    from kosmos_g.train.testing import make_tiny_shards

    out, _ = reference
    shards = make_tiny_shards(tmp_path / "shards", n=4, per_shard=4, kinds=("caption", "edit"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = ["train", "stage3", "--config", "tiny-stage3", f"model.init={tiny_kosmos_dir}",
            f"train.output_dir={tmp_path / 'run'}", "log.progress=false", "train.max_steps=1", "checkpoint.every=0",
            f"data.sources.0.shards={shards['caption']}", f"data.sources.1.shards={shards['edit']}",
            f"data.sources.2.shards={out}", "data.sources.2.weight=100", f"stage3.sd_path={tiny_sd_dir}"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary, summary
    rows = (tmp_path / "run" / "logs" / "train.csv").read_text().splitlines()
    assert len(rows) == 2 and "loss/compositional" in rows[0]
    header, values = rows[0].split(","), rows[1].split(",")
    assert float(values[header.index("loss/compositional")]) > 0


def test_decode_record_center_crops_and_resizes(tmp_path):
    from kosmos_g.data.compose import decode_record
    from kosmos_g.data.runner import InputItem

    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 200  # the centre square is all 200
    Image.fromarray(img).save(tmp_path / "a.png")
    rec = decode_record(InputItem(key="a", source="a.png", path=str(tmp_path / "a.png")), size=8, seed=0)
    assert rec["image"].shape == (8, 8, 3) and (rec["image"] == 200).all() and rec["error"] is None


def test_inspect_counts_and_draws_a_contact_sheet(reference, tmp_path, capsys):
    out, manifest = reference
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--sheet", str(sheet), "--rows", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kinds"] == {"compositional": manifest["samples"]} and report["bad"] == 0
    assert sum(report["entities"].values()) == manifest["samples"] and report["sheet"] == str(sheet)
    with Image.open(sheet) as im:
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    most = max(int(k) for k in report["entities"])
    assert width >= 96 * (1 + 2 * min(most, 1)) and height > 3 * 96
    assert (pixels < 250).any() and (pixels == 255).any()  # thumbnails and text on white
    assert main(["data", "inspect", str(out), "--sheet", str(tmp_path / "sheet.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


def test_grounding_boxes_match_labels_and_do_not_depend_on_the_batch(models):
    import torch

    from kosmos_g.data.compose import GroundedSamSegmenter, _best_boxes

    res = {"scores": torch.tensor([0.5, 0.9, 0.7, 0.6]), "text_labels": ["dog", "dog", "red hat", ""],
           "boxes": torch.tensor([[0.0, 0, 1, 1], [1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]])}
    assert _best_boxes(res, ["Dog", "hat", "cat"]) == [[1, 1, 2, 2], [3, 3, 4, 4], None]
    seg = GroundedSamSegmenter(config(models, segmenter="grounded-sam", segmenter_path=None, box_threshold=0.0,
                                      grounding_dino=str(models["grounding_dino"]), sam=str(models["sam"])))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(3)]
    texts = [["square"], ["red circle", "dog"], ["hat", "square", "circle"]]
    together = seg.boxes(images, texts)
    alone = [seg.boxes([im], [t])[0] for im, t in zip(images, texts)]
    for a, b in zip(together, alone):
        assert [x is None for x in a] == [x is None for x in b]
        assert np.allclose([x for x in a if x is not None], [x for x in b if x is not None], atol=1e-4)
    masks = seg._masks(0, images[0], [[2.0, 2.0, 20.0, 30.0], None])
    assert masks[0, 0].shape == (SIZE, SIZE) and not masks[0, 1].any()
