"""The learned attribute reader that micro DreamBench scores with: exact on renders, robust
where the analytic reader is not, reproducible, and loud about bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos_g.cli import main as cli_main
from kosmos_g.micro import reader as R
from kosmos_g.micro import world
from kosmos_g.micro.world import ObjectSpec, Scene


@pytest.fixture(scope="module")
def shipped():
    return R.load_reader()


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` with its content moved by (dy, dx) pixels; the edges replicate."""
    size, pad = image.shape[0], 4
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[pad - dy:pad - dy + size, pad - dx:pad - dx + size]


def test_shipped_reader_is_exact_on_renders_at_32_and_64_px(shipped):
    rng = np.random.default_rng(123)
    scenes = [R._random_scene(rng) for _ in range(96)] + [world.sample_scene(rng) for _ in range(32)]
    for size in (32, 64):
        seen = R.read_scenes(shipped, np.stack([world.render(s, size).image for s in scenes]))
        wrong = [(a, b) for a, b in zip(seen, map(R._canonical, scenes)) if a != b]
        assert not wrong, (size, wrong[:2])


def test_empty_backgrounds_read_as_empty(shipped):
    for size in (32, 64):
        images = np.stack([world.render_background(b, size) for b in world.BACKGROUNDS])
        assert R.read_scenes(shipped, images) == [Scene(b) for b in world.BACKGROUNDS]


def test_reader_tolerates_pixel_shifts(shipped):
    """A generated object is rarely drawn exactly on its cell centre: a 1-2 px shift must not
    change what is read (matching exact templates fails most of these)."""
    rng = np.random.default_rng(7)
    scenes = [world.sample_scene(rng, 1) for _ in range(64)]
    for amount in (1, 2):
        shifts = [(int(rng.choice([-amount, amount])), int(rng.integers(-amount, amount + 1))) for _ in scenes]
        images = np.stack([_shift(world.render(s, 32).image, *d) for s, d in zip(scenes, shifts)])
        learned = np.mean([a.objects[:1] == b.objects and a.background == b.background
                           for a, b in zip(R.read_scenes(shipped, images), scenes)])
        assert learned >= 0.9, (amount, learned)


def test_reader_reads_two_objects_and_their_cells(shipped):
    scene = Scene("tiled", (ObjectSpec("heart", "cyan", "checkered", "small", "top right"),
                            ObjectSpec("cross", "orange", "striped", "large", "bottom left")))
    assert R.read_scenes(shipped, world.render(scene, 32).image[None]) == [scene]


def test_training_is_deterministic_and_the_loss_falls(tmp_path):
    config = R.ReaderConfig(width=8)
    a = R.train_reader(tmp_path / "a", steps=60, batch_scenes=8, config=config, progress=False)
    b = R.train_reader(tmp_path / "b", steps=60, batch_scenes=8, config=config, progress=False)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 2
    assert a["losses"][-1] < a["losses"][0]
    ra, rb = R.load_reader(tmp_path / "a"), R.load_reader(tmp_path / "b")
    for (k, va), vb in zip(ra.state_dict().items(), rb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ra.config == config and (tmp_path / "a" / "train.json").is_file()


def test_train_reader_command_writes_a_loadable_reader(tmp_path, capsys):
    code = cli_main(["micro", "train-reader", "-o", str(tmp_path / "r"), "--steps", "3", "--no-progress"])
    assert code == 0 and '"accuracy_on_renders"' in capsys.readouterr().out
    reader = R.load_reader(tmp_path / "r")
    assert len(R.read_scenes(reader, np.zeros((2, 32, 32, 3), np.uint8))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # written atomically, no leftovers
    stamp = (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns
    code = cli_main(["micro", "train-reader", "--output-dir", str(tmp_path / "r"), "--steps", "3", "--no-progress"])
    assert code == 2 and "already exists" in capsys.readouterr().err  # refused before training
    assert (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns == stamp


def test_match_scene_scores_each_attribute_of_the_asked_for_objects():
    asked = Scene("gray", (ObjectSpec("circle", "red", "solid", "small", "left"),
                           ObjectSpec("star", "blue", "dotted", "large", "top")))
    assert R.match_scene(asked, asked) == {"shape": 1.0, "color": 1.0, "pattern": 1.0, "size": 1.0,
                                           "position": 1.0, "subject": 1.0, "background": 1.0, "count": 1.0}
    seen = Scene("pink", (ObjectSpec("circle", "green", "solid", "small", "left"),))
    scores = R.match_scene(asked, seen)
    assert scores["color"] == scores["subject"] == 0.0  # the circle's colour is wrong; the star is missing
    assert scores["shape"] == scores["pattern"] == scores["size"] == scores["position"] == 0.5
    assert scores["background"] == scores["count"] == 0.0


def test_bad_input_fails_clearly(tmp_path, shipped):
    with pytest.raises(FileNotFoundError, match="micro train-reader"):
        R.load_reader(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"\(B, S, S, 3\)"):
        R.read_scenes(shipped, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="jitter=9"):
        R.ReaderConfig(jitter=9)
    with pytest.raises(ValueError, match="steps=0"):
        R.train_reader(tmp_path / "x", steps=0)
