"""Tests for the micro world renderer (kosmos_g.micro.world)."""

from __future__ import annotations

import doctest
import itertools
from dataclasses import replace

import numpy as np
import pytest

from kosmos_g.micro import world as w
from kosmos_g.micro.world import ObjectSpec, Scene


def scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [w.sample_scene(rng, **kwargs) for _ in range(n)]


def rgb_set(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}


def test_same_seed_gives_same_scene_caption_and_bytes():
    def draw(seed):
        rng = np.random.default_rng(seed)
        scene = w.sample_scene(rng)
        return scene, scene.caption(rng), w.render(scene).image.tobytes(), w.edit_sample(rng)

    a, b, c = draw(123), draw(123), draw(124)
    assert a[:3] == b[:3]
    assert a[3]["json"] == b[3]["json"] and a[3]["tgt.png"].tobytes() == b[3]["tgt.png"].tobytes()
    assert (a[0], a[2]) != (c[0], c[2])


def test_global_numpy_state_is_untouched():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    w.compositional_sample(np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], before)


def test_scene_sampling_covers_the_attribute_space():
    objs = [o for s in scenes(0, 400) for o in s.objects]
    assert {len(s.objects) for s in scenes(0, 400)} == {1, 2, 3}
    for attr, values in [("shape", w.SHAPES), ("color", w.COLORS), ("pattern", w.PATTERNS),
                         ("size", w.SIZES), ("position", w.POSITIONS)]:
        assert {getattr(o, attr) for o in objs} == set(values), attr
    assert {s.background for s in scenes(0, 400)} == set(w.BACKGROUNDS)
    assert all(len({o.shape for o in s.objects}) == len(s.objects) for s in scenes(1, 200))


@pytest.mark.parametrize("size", [32, 64, 97])
def test_masks_match_pixels(size):
    for scene in scenes(size, 150):
        result = w.render(scene, size)
        image, masks = result.image, result.masks
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert len(masks) == len(scene.objects)
        union = np.zeros((size, size), dtype=bool)
        for obj, mask in zip(scene.objects, masks):
            assert mask.shape == (size, size) and mask.dtype == bool and mask.sum() > 10
            assert not (mask & union).any(), "masks must be disjoint"
            union |= mask
            colors = rgb_set(image[mask])
            main, second = tuple(w.COLORS[obj.color]), w.shade(obj.color)
            if obj.pattern == "solid":
                assert colors == {main}
            else:  # a pattern shows both its colours, and nothing else
                assert colors == {main, second}, (obj, colors)
        background = w.render_background(scene.background, size)
        assert np.array_equal(image[~union], background[~union])


def test_occlusion_gives_later_objects_the_shared_pixels():
    # Scene validation forbids overlap, so build the occluded case from a stamp by hand:
    # two objects, same cell, drawn via the painter's order of `render`.
    a = ObjectSpec("square", "red", "solid", "large", "center")
    b = ObjectSpec("circle", "blue", "solid", "small", "center")
    scene = Scene("gray", (a,))
    object.__setattr__(scene, "objects", (a, b))  # bypass the distinct-cell check on purpose
    result = w.render(scene)
    square_alone = w.render(Scene("gray", (a,))).masks[0]
    circle_alone = w.render(Scene("gray", (b,))).masks[0]
    assert np.array_equal(result.masks[1], circle_alone)
    assert np.array_equal(result.masks[0], square_alone & ~circle_alone)
    assert rgb_set(result.image[result.masks[0]]) == {w.COLORS["red"]}


def test_colours_are_well_separated_from_each_other_and_the_backgrounds():
    colors = np.array(list(w.COLORS.values()), dtype=float)
    dists = [np.linalg.norm(p - q) for p, q in itertools.combinations(colors, 2)]
    assert min(dists) > 60
    background_colors = set().union(*(rgb_set(w.render_background(b)) for b in w.BACKGROUNDS))
    object_colors = {tuple(c) for c in w.COLORS.values()} | {w.shade(c) for c in w.COLORS}
    assert len(background_colors) >= len(w.BACKGROUNDS) and not background_colors & object_colors
    assert (255, 255, 255) not in background_colors | object_colors  # white means "whitened"


def test_a_subject_looks_the_same_at_every_position():
    def white_crop(obj: ObjectSpec) -> np.ndarray:
        return w.entity_crops(w.render(Scene("tiled", (obj,))), 0)[1]

    star = ObjectSpec("star", "pink", "dotted", "large", "center")
    crops = [white_crop(replace(star, position=p)) for p in w.POSITIONS]
    assert all(np.array_equal(crops[0], c) for c in crops[1:])
    assert not np.array_equal(crops[0], white_crop(replace(star, pattern="striped")))


def test_caption_names_every_attribute():
    scene = Scene("green", (ObjectSpec("circle", "red", "striped", "large", "left"),
                            ObjectSpec("star", "blue", "dotted", "small", "top")))
    assert scene.caption() == ("a large red striped circle on the left and a small blue dotted star"
                               " at the top, on a green background")
    rng = np.random.default_rng(5)
    variants = set()
    for scene in scenes(2, 200):
        caption, spans = scene.caption_with_spans(rng)
        variants.add("bg-first" if caption.startswith("on ") else
                     "bg-with" if caption.startswith(f"a {scene.background} background with") else "bg-last")
        assert f"a {scene.background} background" in caption
        for obj, (start, end) in zip(scene.objects, spans):
            assert caption[start:end] == f"{obj.color} {obj.pattern} {obj.shape}"
            assert f"a {obj.size} {caption[start:end]} {w.POSITION_PHRASES[obj.position]}" in caption
    assert len(variants) == 3  # all grammar variants are used


def _single_difference(src: Scene, tgt: Scene) -> tuple[int, set[str]]:
    assert src.background == tgt.background and len(src.objects) == len(tgt.objects)
    fields = ("shape", "color", "pattern", "size", "position")
    diffs = [(i, {f for f in fields if getattr(a, f) != getattr(b, f)})
             for i, (a, b) in enumerate(zip(src.objects, tgt.objects)) if a != b]
    assert len(diffs) == 1, diffs
    return diffs[0]


@pytest.mark.parametrize("kind", w.EDIT_KINDS)
def test_edit_changes_exactly_the_edited_attribute(kind):
    rng = np.random.default_rng(11)
    n_objects = 1 if kind == "add" else 3 if kind == "remove" else None
    for scene in scenes(3, 60, n_objects=n_objects):
        src, tgt, text = w.make_edit(rng, scene, kind=kind)
        assert src == scene and tgt != src and w.edit_kind(src, tgt) == kind
        if kind in ("color", "pattern", "move"):
            index, fields = _single_difference(src, tgt)
            assert fields == {"position" if kind == "move" else kind}
            new = getattr(tgt.objects[index], "position" if kind == "move" else kind)
            assert text.endswith(new) and src.objects[index].shape in text
        elif kind == "background":
            assert src.objects == tgt.objects and tgt.background in text
        elif kind == "add":
            assert tgt.background == src.background and tgt.objects[:-1] == src.objects
            assert len(tgt.objects) == len(src.objects) + 1 and text == "add " + tgt.objects[-1].describe()
        else:  # remove
            removed = [o for o in src.objects if o not in tgt.objects]
            assert len(removed) == 1 and len(tgt.objects) == len(src.objects) - 1
            assert tgt.objects == tuple(o for o in src.objects if o != removed[0])
            assert text.split()[-1] == removed[0].shape
        if kind in ("color", "pattern"):  # only the edited object's pixels may change
            a, b = w.render(src), w.render(tgt)
            mask = a.masks[index]
            assert np.array_equal(mask, b.masks[index])
            assert np.array_equal(a.image[~mask], b.image[~mask])
            assert not np.array_equal(a.image[mask], b.image[mask])


def test_edit_rejects_kinds_that_do_not_apply():
    full = scenes(4, 1, n_objects=3)[0]
    with pytest.raises(ValueError, match="add"):
        w.make_edit(np.random.default_rng(0), full, kind="add")
    with pytest.raises(ValueError, match="kind"):
        w.make_edit(np.random.default_rng(0), full, kind="rotate")
    with pytest.raises(ValueError, match="same scene"):
        w.edit_kind(full, full)


def _reference_crop(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    h, wd = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    side = max(h, wd)
    top = min(max(ys.min() - (side - h) // 2, 0), mask.shape[0] - side)
    left = min(max(xs.min() - (side - wd) // 2, 0), mask.shape[1] - side)
    assert top <= ys.min() and ys.max() < top + side and left <= xs.min() and xs.max() < left + side
    n = mask.shape[0]
    nearest = [int((k + 0.5) * side / n) for k in range(n)]  # nearest-neighbour resize to n x n
    rows, cols = [top + k for k in nearest], [left + k for k in nearest]
    return image[np.ix_(rows, cols)], mask[np.ix_(rows, cols)]


def test_entity_crops_are_square_and_whitened_exactly_outside_the_mask():
    for scene in scenes(6, 40):
        result = w.render(scene)
        for i in range(len(scene.objects)):
            square, white = w.entity_crops(result, i)
            assert square.shape == white.shape == (64, 64, 3) and white.dtype == np.uint8
            expected, inside = _reference_crop(result.image, result.masks[i])
            assert np.array_equal(square, expected)
            assert (white[~inside] == 255).all()
            assert np.array_equal(white[inside], square[inside])
            assert not (white[inside] == 255).all(axis=-1).any()  # no object pixel is pure white
    square, white = w.entity_crops(result, 0, out_size=24)
    assert square.shape == white.shape == (24, 24, 3)
    with pytest.raises(ValueError, match="index"):
        w.entity_crops(result, 5)


def test_subject_image_is_the_centered_crop():
    obj = ObjectSpec("hexagon", "orange", "checkered", "small", "bottom right")
    white = w.subject_image(obj)
    on_blue = w.subject_image(obj, background="blue")
    assert white.shape == on_blue.shape == (64, 64, 3)
    is_white = (white == 255).all(axis=-1)
    assert 0 < is_white.sum() < 64 * 64 and np.array_equal(white[~is_white], on_blue[~is_white])
    assert rgb_set(on_blue[is_white]) == {(165, 195, 235)}  # the blue background shows instead


def test_held_out_subjects_are_never_sampled_when_excluded():
    held = w.held_out_subjects()
    assert held == w.held_out_subjects(0) and len(held) == 16 and held != w.held_out_subjects(1)
    assert {s for s, _, _ in held} == set(w.SHAPES)
    included = [o for s in scenes(7, 1500) for o in s.objects]
    assert any(w.is_held_out(o) for o in included)  # so the exclusion below is doing work
    excluded = [o for s in scenes(7, 1500, exclude_held_out=True) for o in s.objects]
    assert not any(w.is_held_out(o) for o in excluded)
    rng = np.random.default_rng(8)
    for scene in scenes(9, 300, exclude_held_out=True):
        _, tgt, _ = w.make_edit(rng, scene, exclude_held_out=True)
        assert not any(w.is_held_out(o) for o in tgt.objects)
    custom = {("circle", c, p) for c in w.COLORS for p in w.PATTERNS}
    assert all(o.shape != "circle" for s in scenes(10, 200, exclude=custom) for o in s.objects)


def test_sample_builders_follow_the_data_format():
    rng = np.random.default_rng(12)
    cap = w.caption_sample(rng)
    assert set(cap) == {"json", "png"} and cap["json"]["kind"] == "caption"
    assert cap["png"].shape == (64, 64, 3) and cap["png"].dtype == np.uint8
    comp = w.compositional_sample(rng, size=48)
    meta = comp["json"]
    assert meta["kind"] == "compositional" and comp["tgt.png"].shape == (48, 48, 3)
    n = len(meta["entities"])
    assert set(comp) == {"json", "tgt.png"} | {f"e{i}_{k}.png" for i in range(n) for k in ("square", "white")}
    for e in meta["entities"]:
        assert meta["caption"][e["start"]:e["end"]] == e["text"] and len(e["text"].split()) == 3
    for seed in range(20):
        edit = w.edit_sample(np.random.default_rng(seed))
        assert set(edit) == {"json", "src.png", "tgt.png"}
        meta = edit["json"]
        assert meta["kind"] == "edit" and meta["instruction"] and meta["caption"]
        assert not np.array_equal(edit["src.png"], edit["tgt.png"])
        replay = np.random.default_rng(seed)  # the scenes behind the sample, to check both captions
        src, tgt, _ = w.make_edit(replay, w.sample_scene(replay, exclude_held_out=True), exclude_held_out=True)
        assert np.array_equal(w.render(tgt).image, edit["tgt.png"])
        for scene, caption in ((src, meta["caption"]), (tgt, meta["target_caption"])):
            assert f"a {scene.background} background" in caption
            assert caption.count(" background") == 1
            assert sum(caption.count(f"a {size} ") for size in w.SIZES) == len(scene.objects)
            for obj in scene.objects:
                assert f"a {obj.size} {obj.entity_text()} {w.POSITION_PHRASES[obj.position]}" in caption
        assert meta["target_caption"] == w.canonical_caption(tgt)
        shuffled = w.Scene(tgt.background, tgt.objects[::-1])  # same picture, other drawing order
        assert w.canonical_caption(shuffled) == meta["target_caption"] and w.render(shuffled).image.tobytes() \
            == edit["tgt.png"].tobytes()
        words = [f"a {o.size} {o.entity_text()} {w.POSITION_PHRASES[o.position]}" for o in tgt.objects]
        starts = [max(meta["target_caption"].find(p + ","), meta["target_caption"].find(p + " and")) for p in words]
        reading = np.argsort([w.POSITIONS.index(o.position) for o in tgt.objects])  # top left first
        assert min(starts, default=0) >= 0 and [starts[i] for i in reading] == sorted(starts)


def test_foreground_masks_are_the_targets_objects_and_draw_nothing():
    """``with_foreground`` adds exactly the objects' pixels of the target (and, for edits, of
    the source too) and leaves every other member, and the random stream, unchanged."""
    for make, stem in ((w.caption_sample, "fg.png"), (w.compositional_sample, "tgt_fg.png"),
                       (w.edit_sample, "tgt_fg.png")):
        for seed in range(6):
            plain_rng, fg_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            plain = make(plain_rng, target_size=32)
            with_fg = make(fg_rng, target_size=32, with_foreground=True)
            assert set(with_fg) - set(plain) == {stem}
            for k, v in plain.items():
                assert (v == with_fg[k]) if k == "json" else np.array_equal(v, with_fg[k])
            assert plain_rng.random() == fg_rng.random()
            mask = with_fg[stem]
            assert mask.shape == (32, 32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            target = with_fg["png" if stem == "fg.png" else "tgt.png"]
            if make is not w.edit_sample:  # background pixels are the background colour, objects may not be
                replay = np.random.default_rng(seed)
                scene = w.sample_scene(replay, exclude_held_out=True)
                result = w.render(scene, 32)
                assert np.array_equal(result.image, target)
                assert np.array_equal(mask > 0, np.logical_or.reduce(result.masks))
            assert 0 < (mask > 0).mean() < 1


def test_caption_cell_labels_name_the_object_drawn_in_each_cell():
    """Replays the sampler's draws: each cell's labels are the attributes of the object whose
    pixels lie in that cell of the 3x3 grid, and None where no object is drawn."""
    for seed in range(30):
        sample = w.caption_sample(np.random.default_rng(seed))
        scene = w.sample_scene(np.random.default_rng(seed), exclude_held_out=True)
        labels = sample["json"]["cell_labels"]
        assert set(labels) == set(w.CELL_ATTRIBUTES) and all(len(v) == 9 for v in labels.values())
        masks = w.render(scene).masks
        drawn = set()
        for obj, mask in zip(scene.objects, masks):
            ys, xs = np.nonzero(mask)
            rows, cols = set(ys * 3 // 64), set(xs * 3 // 64)
            assert len(rows) == len(cols) == 1  # every pixel in one cell
            cell = 3 * rows.pop() + cols.pop()
            drawn.add(cell)
            assert [labels[a][cell] for a in ("shape", "color", "pattern")] == [
                w.SHAPES.index(obj.shape), list(w.COLORS).index(obj.color), w.PATTERNS.index(obj.pattern)]
        assert all(labels[a][c] is None for a in labels for c in range(9) if c not in drawn)


def test_entity_caption_sample_is_one_crop_of_the_object_it_names():
    """Replays the sampler's draws, so the caption must name the very object that was cropped."""
    kinds = set()
    for seed in range(40):
        sample = w.entity_caption_sample(np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        scene = w.sample_scene(rng, exclude_held_out=True)
        index = int(rng.integers(len(scene.objects)))
        square, white = w.entity_crops(w.render(scene), index)
        assert sample["json"] == {"kind": "caption", "caption": f"a {scene.objects[index].entity_text()}"}
        is_white = np.array_equal(sample["png"], white)
        assert is_white or np.array_equal(sample["png"], square)
        kinds.add(is_white)
    assert kinds == {True, False}  # both crops occur
    captions = {w.entity_caption_sample(np.random.default_rng(s))["json"]["caption"] for s in range(400)}
    held = {f"a {c} {p} {s}" for s, c, p in w.held_out_subjects()}
    assert len(captions) > 100 and not captions & held


def test_invalid_input_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        ObjectSpec("blob", "red", "solid", "small", "left")
    obj = ObjectSpec("circle", "red", "solid", "small", "left")
    with pytest.raises(ValueError, match="distinct positions"):
        Scene("gray", (obj, replace(obj, shape="star")))
    with pytest.raises(ValueError, match="background"):
        Scene("plaid", (obj,))
    with pytest.raises(ValueError, match="size"):
        w.render(Scene("gray", (obj,)), size=8)
    with pytest.raises(ValueError, match="n_objects"):
        w.sample_scene(np.random.default_rng(0), n_objects=9)


def test_docstring_examples_run():
    failures, attempted = doctest.testmod(w)
    assert attempted > 10 and failures == 0
