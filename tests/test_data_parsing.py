"""Entity-answer parsing and mask post-processing: pure functions against hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from kosmos_g.data.entities import build_prompt, candidate_phrases, clean_caption, parse_entities
from kosmos_g.data.masks import (binarize, bounding_box, center_square, dilate, entity_crops, label_components,
                                 largest_component, postprocess_mask, square_box)

CAPTION = "A brown dog wearing a red hat sits next to two cats on a sofa"

# (LM answer, expected entity texts in caption order): what real instruct LMs write.
ANSWERS = [
    ("dog, hat, cats, sofa", ["dog", "hat", "cats", "sofa"]),
    ("Dog, Hat, Sofa", ["dog", "hat", "sofa"]),
    ("1. dog\n2. hat\n3. sofa", ["dog", "hat", "sofa"]),
    ("1) dog\n2) red hat", ["dog", "red hat"]),
    ("- dog\n- hat\n* sofa", ["dog", "hat", "sofa"]),
    ("• dog\n• cat", ["dog", "cats"]),
    ("Objects: dog, hat, sofa", ["dog", "hat", "sofa"]),
    ("The objects mentioned in the caption are: dog, hat", ["dog", "hat"]),
    ("dog, hat. These are the foreground objects of the caption, sofa excluded", ["dog", "hat"]),
    ("dogs, hats, cat", ["dog", "hat", "cats"]),
    ("dog, dog, Dog, dogs", ["dog"]),
    ("a dog, the hat, some cats", ["dog", "hat", "cats"]),
    ("dog and hat", ["dog", "hat"]),
    ("dog; hat; sofa", ["dog", "hat", "sofa"]),
    ("dog, hat\n\n### Instruction:\nList all", ["dog", "hat"]),
    ("### Response: dog", []),
    ("", []),
    ("   \n  ", []),
    ("beach, sky, tree", []),
    ("dog, ha", ["dog"]),                  # the 10-token budget cut the last word
    ("do", []),                            # a prefix of a word is no match
    ("hat, red hat", ["hat"]),             # overlaps an earlier entity: dropped
    ("red hat, hat", ["red hat"]),
    ('"dog", "hat"', ["dog", "hat"]),
    ("dog, hat, sofa, and cats.", ["dog", "hat", "cats", "sofa"]),
    ("a, the, next to", []),               # function words alone are never entities
]


@pytest.mark.parametrize("answer,expected", ANSWERS)
def test_parse_entities_on_realistic_answers(answer, expected):
    ents = parse_entities(answer, CAPTION)
    assert [e.text for e in ents] == expected
    for e in ents:
        assert CAPTION[e.start:e.end] == e.text
    assert [e.start for e in ents] == sorted(e.start for e in ents)


def test_parse_keeps_caption_spelling_and_plural_forms():
    ents = parse_entities("Puppy, boxes, bus", "two puppies near a box and a Bus")
    assert [(e.text, e.start, e.end) for e in ents] == [("puppies", 4, 11), ("box", 19, 22), ("Bus", 29, 32)]


def test_max_entities_keeps_the_first_answered():
    assert [e.text for e in parse_entities("sofa, dog, hat", CAPTION, max_entities=2)] == ["dog", "sofa"]
    with pytest.raises(ValueError, match="max_entities"):
        parse_entities("dog", CAPTION, max_entities=0)


def test_candidate_phrases_and_prompt():
    assert candidate_phrases("Entities: a cat, the dog.\nMore prose here") == ["cat", "dog", "More prose here"]
    prompt = build_prompt("a dog")
    assert "### Instruction:" in prompt and prompt.endswith("### Input:\na dog\n\n### Response:\n")
    assert clean_caption("a\tdog\n\non  grass ") == "a dog on grass"


# ----------------------------------------------------------------------------- masks

def test_binarize_is_sigmoid_threshold():
    logits = np.array([[-10.0, np.log(0.3 / 0.7) - 1e-6, np.log(0.3 / 0.7) + 1e-6, 5.0]])
    assert binarize(logits).tolist() == [[False, False, True, True]]


def test_dilate_matches_scipy_centering():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    assert np.array_equal(np.argwhere(dilate(m, 3)).min(0), [2, 2])
    assert np.array_equal(np.argwhere(dilate(m, 3)).max(0), [4, 4])
    # an even window grows the mask one pixel more up/left, as scipy's grey_dilation does
    d = dilate(m, 4)
    assert np.array_equal(np.argwhere(d).min(0), [1, 1]) and np.array_equal(np.argwhere(d).max(0), [4, 4])
    assert dilate(m, 1).sum() == 1
    edge = np.zeros((5, 5), bool)
    edge[0, 0] = True
    assert dilate(edge, 3).sum() == 4  # clipped at the border
    with pytest.raises(ValueError, match="Dilation size"):
        dilate(m, 0)


def test_components_are_four_connected_and_the_largest_wins():
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = True          # 4 px
    m[2, 2] = True              # diagonal neighbour only: its own component
    m[4:7, 4:7] = True          # 9 px
    m[5, 0:3] = True            # 3 px
    labels, n = label_components(m)
    assert n == 4
    assert np.array_equal(largest_component(m), np.pad(np.ones((3, 3), bool), ((4, 1), (4, 1))))
    # a U shape whose arms meet only at the bottom is one component (labels merged late)
    u = np.zeros((5, 5), bool)
    u[0:4, 0], u[0:4, 4], u[4, :] = True, True, True
    assert label_components(u)[1] == 1
    assert not largest_component(np.zeros((3, 3), bool)).any()


def test_postprocess_dilates_then_keeps_one_component():
    m = np.zeros((200, 200), bool)
    m[10:20, 10:20] = True
    m[100:150, 100:150] = True
    out = postprocess_mask(m)  # window 2 joins nothing here: the big square wins, grown by one pixel up/left
    assert bounding_box(out) == (99, 99, 150, 150)
    # two blobs one pixel apart are joined by the dilation
    m2 = np.zeros((200, 200), bool)
    m2[10:20, 10:20] = True
    m2[10:20, 21:40] = True
    assert bounding_box(postprocess_mask(m2, dilation=3)) == (9, 9, 21, 41)
    assert not postprocess_mask(np.zeros((4, 4), bool)).any()


@pytest.mark.parametrize("box,expected", [
    ((40, 40, 60, 50), (40, 35, 60, 55)),        # centred, no shift
    ((0, 0, 10, 4), (0, 0, 10, 10)),             # top-left corner: shifted right
    ((90, 95, 100, 100), (90, 90, 100, 100)),    # bottom-right: shifted left
    ((2, 45, 6, 55), (0, 45, 10, 55)),           # top border: shifted down
    ((96, 45, 100, 55), (90, 45, 100, 55)),      # bottom border: shifted up
    ((45, 1, 55, 3), (45, 0, 55, 10)),           # left border
    ((45, 98, 55, 100), (45, 90, 55, 100)),      # right border
    ((0, 0, 100, 100), (0, 0, 100, 100)),        # the whole image
])
def test_square_box_shifts_at_each_border(box, expected):
    assert square_box(box, (100, 100)) == expected


def test_square_box_caps_at_the_shorter_side():
    assert square_box((0, 0, 40, 100), (40, 100)) == (0, 30, 40, 70)


def test_crops_are_square_inside_the_image_property():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = rng.integers(1, 80, 2)
        top, bottom = sorted(rng.integers(0, h + 1, 2))
        left, right = sorted(rng.integers(0, w + 1, 2))
        bottom, right = max(bottom, top + 1), max(right, left + 1)
        if bottom > h or right > w:
            continue
        t, l, b, r = square_box((top, left, bottom, right), (h, w))
        assert b - t == r - l > 0
        assert 0 <= t and 0 <= l and b <= h and r <= w
        if max(bottom - top, right - left) <= min(h, w):  # never shrunk: the box lies inside the square
            assert t <= top and l <= left and bottom <= b and right <= r


def test_entity_crops_whiten_outside_the_mask():
    img = np.full((20, 20, 3), 7, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[0:4, 16:20] = True
    mask[4:6, 18:20] = True
    crop, white, box = entity_crops(img, mask)
    assert box == (0, 14, 6, 20) and crop.shape == (6, 6, 3) == white.shape
    assert (crop == 7).all()
    inside = mask[0:6, 14:20]
    assert (white[inside] == 7).all() and (white[~inside] == 255).all()
    with pytest.raises(ValueError, match="sizes differ"):
        entity_crops(img, mask[:10])
    assert center_square(30, 20) == (5, 0, 25, 20)


def _bfs_labels(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Reference 4-connected labelling, pixel by pixel, numbered in row-major order of first pixels."""
    from collections import deque

    h, w = m.shape
    lab, n = np.zeros((h, w), int), 0
    for y in range(h):
        for x in range(w):
            if m[y, x] and not lab[y, x]:
                n += 1
                lab[y, x] = n
                queue = deque([(y, x)])
                while queue:
                    a, b = queue.popleft()
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < h and 0 <= d < w and m[c, d] and not lab[c, d]:
                            lab[c, d] = n
                            queue.append((c, d))
    return lab, n


def test_labels_equal_a_pixel_by_pixel_reference_property():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = rng.random(tuple(rng.integers(1, 25, 2))) > rng.random()
        labels, n = label_components(m)
        ref, n_ref = _bfs_labels(m)
        assert n == n_ref and np.array_equal(labels, ref)


def test_dilate_equals_a_window_maximum_property():
    rng = np.random.default_rng(2)
    for size in (1, 2, 3, 4, 5, 6):
        for _ in range(10):
            m = rng.random(tuple(rng.integers(1, 20, 2))) > 0.85
            lo = size - 1 - size // 2
            ref = np.array([[m[max(0, y - lo):y - lo + size, max(0, x - lo):x - lo + size].any()
                             for x in range(m.shape[1])] for y in range(m.shape[0])])
            assert np.array_equal(dilate(m, size), ref)
