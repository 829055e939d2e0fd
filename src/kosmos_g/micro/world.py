"""The micro world: coloured shapes on simple backgrounds, small enough to train Kosmos-G on a CPU.

A :class:`Scene` is a background and a few objects; each :class:`ObjectSpec` has a shape,
a colour, a surface pattern, a size and a named position on a 3x3 grid. :func:`render`
rasterises a scene with hard masks computed analytically on the pixel grid (no
anti-aliasing), so ``RenderResult.masks`` are exactly the pixels each object covers.
Object centres sit on pixel centres, so a subject looks identical (up to a shift) at
every position: what the model must learn as "the same subject" is pixel-exact.

Everything is a pure function of its arguments and an explicit ``numpy.random.Generator``;
no global random state is read or written.

The sample builders (:func:`caption_sample`, :func:`compositional_sample`,
:func:`edit_sample`) return dicts keyed by the WebDataset member names of
``docs/data-format.md`` (``"json"``, ``"png"``, ``"tgt.png"``, ``"e0_square.png"``, ...).
Images are ``np.ndarray`` of shape (H, W, 3), dtype uint8; the shard writer encodes them.

Example:
    >>> import numpy as np
    >>> from kosmos_g.micro.world import render, sample_scene
    >>> scene = sample_scene(np.random.default_rng(0))
    >>> result = render(scene)
    >>> result.image.shape, result.image.dtype.name, len(result.masks) == len(scene.objects)
    ((64, 64, 3), 'uint8', True)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np

Subject = tuple[str, str, str]
"""(shape, color, pattern): the identity of a subject; size and position are not part of it."""

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "heart", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 170, 70),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (240, 110, 190),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
SIZES: dict[str, float] = {"small": 0.30, "large": 0.46}
"""Object radius as a fraction of a grid cell (a third of the image side); < 0.5 keeps cells apart."""
POSITIONS = (  # row-major over the 3x3 grid
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: dict[str, str] = {  # "on the left", "in the center", "at the top left", ...
    p: ("on" if p in ("left", "right") else "in" if p == "center" else "at") + " the " + p for p in POSITIONS
}
# Backgrounds are pale (or textured) so that every object colour stands out on every one.
_FLAT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (150, 150, 150), "beige": (225, 205, 165), "green": (170, 215, 165),
    "blue": (165, 195, 235), "yellow": (245, 235, 165), "pink": (240, 205, 220),
}
_TILED = ((235, 225, 205), (200, 185, 160))  # two-tone checkerboard of large tiles
_GRID = ((225, 230, 235), (150, 160, 175))  # light paper with thin darker lines
BACKGROUNDS = (*_FLAT_BACKGROUNDS, "tiled", "grid")
MAX_OBJECTS = 3
EDIT_KINDS = ("color", "pattern", "background", "move", "add", "remove")
HELD_OUT_SEED = 0
EVAL_SEED = 10_000_019
"""Seed of the evaluation scenes; training seeds are small integers, so they never meet."""

_T = TypeVar("_T")


def _pick(rng: np.random.Generator, seq: Sequence[_T]) -> _T:
    # rng.choice would turn the strings into an array; indexing is faster and keeps the type.
    return seq[int(rng.integers(len(seq)))]


def _check(name: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown; use one of {list(allowed)}")


def shade(color: str) -> tuple[int, int, int]:
    """The darker second colour that striped/dotted/checkered objects of ``color`` use.

    Example:
        >>> shade("red")
        (99, 18, 18)
    """
    return tuple(int(c * 0.45) for c in COLORS[color])  # type: ignore[return-value]


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene."""

    shape: str
    """One of ``SHAPES``."""
    color: str
    """One of ``COLORS``; the pattern's second colour is ``shade(color)``."""
    pattern: str
    """One of ``PATTERNS``."""
    size: str
    """One of ``SIZES``."""
    position: str
    """One of ``POSITIONS`` (a cell of the 3x3 grid)."""

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, COLORS)
        _check("pattern", self.pattern, PATTERNS)
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITIONS)

    @property
    def subject(self) -> Subject:
        return (self.shape, self.color, self.pattern)

    def entity_text(self) -> str:
        """The entity words a subject image stands for, e.g. ``"red striped circle"``."""
        return f"{self.color} {self.pattern} {self.shape}"

    def describe(self) -> str:
        """E.g. ``"a small red striped circle on the left"``."""
        return f"a {self.size} {self.entity_text()} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    """A background and objects in distinct grid cells (so they never overlap)."""

    background: str
    """One of ``BACKGROUNDS``."""
    objects: tuple[ObjectSpec, ...] = ()
    """Drawn in order: a later object would cover an earlier one."""

    def __post_init__(self) -> None:
        _check("background", self.background, BACKGROUNDS)
        object.__setattr__(self, "objects", tuple(self.objects))
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects must be in distinct positions, got {positions}")

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """A caption naming every attribute; ``rng`` picks a grammar variant (None: the first).

        Example:
            >>> Scene("green", (ObjectSpec("circle", "red", "striped", "small", "left"),)).caption()
            'a small red striped circle on the left, on a green background'
        """
        return self.caption_with_spans(rng)[0]

    def caption_with_spans(
        self, rng: np.random.Generator | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The caption and, per object, the (start, end) character span of its entity words."""
        variant = 0 if rng is None else int(rng.integers(3))
        bg = f"a {self.background} background"
        # Chunks are (text, object index or None); the spans fall out of concatenation.
        listed: list[tuple[str, int | None]] = []
        for i, obj in enumerate(self.objects):
            if i:
                listed.append((" and " if i == len(self.objects) - 1 else ", ", None))
            listed += [(f"a {obj.size} ", None), (obj.entity_text(), i),
                       (" " + POSITION_PHRASES[obj.position], None)]
        if not self.objects:
            chunks = [(bg, None)]
        elif variant == 0:
            chunks = [*listed, (", on " + bg, None)]
        elif variant == 1:
            chunks = [("on " + bg + ", ", None), *listed]
        else:
            chunks = [(bg + " with ", None), *listed]
        text, spans = "", [(0, 0)] * len(self.objects)
        for chunk, index in chunks:
            if index is not None:
                spans[index] = (len(text), len(text) + len(chunk))
            text += chunk
        return text, spans


@dataclass
class RenderResult:
    """What :func:`render` returns."""

    image: np.ndarray
    """(H, W, 3) uint8."""
    masks: list[np.ndarray]
    """Per object, (H, W) bool: the pixels it covers after occlusion by later objects."""


# ---------------------------------------------------------------------------- rendering


def _center(position: str, size: int) -> tuple[int, int]:
    """(row, col) of the pixel whose centre is the object's centre."""
    row, col = divmod(POSITIONS.index(position), 3)
    return int((row + 0.5) * size / 3), int((col + 0.5) * size / 3)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test in coordinates normalised by the radius (y points down); broadcasts."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(ax, ay) <= 0.82  # a bit smaller than the circle: similar areas
    if shape == "diamond":
        return ax + ay <= 1.0
    if shape == "triangle":  # apex (0, -1), base at y = 0.75 with half-width 1
        return (y <= 0.75) & (ax <= (y + 1.0) / 1.75)
    if shape == "cross":
        return ((ax <= 0.32) & (ay <= 0.95)) | ((ay <= 0.32) & (ax <= 0.95))
    if shape == "hexagon":  # flat top and bottom; three pairs of faces at apothem cos(30deg)
        apothem = np.sqrt(3) / 2
        return (ay <= apothem) & (np.abs(x * apothem + y * 0.5) <= apothem) & (
            np.abs(x * apothem - y * 0.5) <= apothem
        )
    if shape == "star":  # five points; fold every point into the wedge between tip and notch
        wedge = np.pi / 5
        theta = np.arctan2(x, -y) % (2 * wedge)  # 0 at a tip (the first one points up)
        psi = wedge - np.abs(theta - wedge)  # 0 at a tip, wedge at a notch
        rho = np.hypot(x, y)
        px, py = rho * np.cos(psi), rho * np.sin(psi)
        ix, iy = 0.5 * np.cos(wedge), 0.5 * np.sin(wedge)  # notch radius 0.5: chunky enough for 64px
        return (ix - 1.0) * py - iy * (px - 1.0) >= 0.0  # same side of tip-notch edge as origin
    if shape == "heart":  # (X^2 + Y^2 - 1)^3 <= X^2 Y^3, scaled and shifted into the unit disc
        hx, hy = x * 1.15, -y * 1.15 + 0.12
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0.0
    raise ValueError(f"shape={shape!r} is unknown; use one of {list(SHAPES)}")


def _pattern_mask(pattern: str, dy: np.ndarray, dx: np.ndarray, size: int) -> np.ndarray:
    """Pixels of the second colour, from integer offsets to the object centre; broadcasts."""
    unit = size / 64  # patterns were tuned at 64x64 and scale with the image
    s = max(1, round(3 * unit))  # stripe / checker width in pixels
    if pattern == "solid":
        return np.zeros(np.broadcast_shapes(dy.shape, dx.shape), dtype=bool)
    if pattern == "striped":
        return np.broadcast_to(((dy + s // 2) // s) % 2 == 1, np.broadcast_shapes(dy.shape, dx.shape))
    if pattern == "checkered":
        return ((dy + s // 2) // s + (dx + s // 2) // s) % 2 == 1
    if pattern == "dotted":
        p = max(4, round(5 * unit))  # dot spacing; one dot sits on the centre
        qy, qx = (dy + p // 2) % p - p // 2, (dx + p // 2) % p - p // 2
        return qy * qy + qx * qx <= max(1.0, (1.2 * unit) ** 2)
    raise ValueError(f"pattern={pattern!r} is unknown; use one of {list(PATTERNS)}")


@lru_cache(maxsize=8192)
def _stamp(
    shape: str, pattern: str, size_name: str, position: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (H, W) bool masks: the object's pixels, and those of its second colour."""
    cy, cx = _center(position, size)
    dy = np.arange(size)[:, None] - cy  # (H, 1)
    dx = np.arange(size)[None, :] - cx  # (1, W)
    radius = SIZES[size_name] * size / 3
    inside = np.broadcast_to(_shape_mask(shape, dx / radius, dy / radius), (size, size)).copy()
    second = inside & _pattern_mask(pattern, dy, dx, size)
    inside.flags.writeable = second.flags.writeable = False
    return inside, second


@lru_cache(maxsize=256)
def _background(name: str, size: int) -> np.ndarray:
    _check("background", name, BACKGROUNDS)
    image = np.empty((size, size, 3), dtype=np.uint8)  # (H, W, 3)
    y, x = np.arange(size)[:, None], np.arange(size)[None, :]
    if name in _FLAT_BACKGROUNDS:
        image[:] = _FLAT_BACKGROUNDS[name]
    else:
        tile = max(4, size // 8)
        if name == "tiled":
            odd = (y // tile + x // tile) % 2 == 1
        else:  # grid: one-pixel lines every `tile` pixels
            odd = (y % tile == tile // 2) | (x % tile == tile // 2)
        first, second = _TILED if name == "tiled" else _GRID
        image[:] = first
        image[np.broadcast_to(odd, (size, size))] = second
    image.flags.writeable = False
    return image


def render_background(name: str, size: int = 64) -> np.ndarray:
    """The (H, W, 3) uint8 image of an empty background.

    Example:
        >>> render_background("gray", 32)[0, 0].tolist()
        [150, 150, 150]
    """
    return _background(name, size).copy()


def render(scene: Scene, size: int = 64) -> RenderResult:
    """Rasterise ``scene`` at ``size`` x ``size`` pixels with exact per-object masks.

    Example:
        >>> scene = Scene("blue", (ObjectSpec("star", "yellow", "solid", "large", "center"),))
        >>> result = render(scene, size=48)
        >>> result.image[24, 24].tolist(), bool(result.masks[0][24, 24])
        ([240, 215, 40], True)
    """
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size={size!r} must be an int >= 16 (pixels per side)")
    size = int(size)
    image = _background(scene.background, size).copy()  # (H, W, 3)
    shapes = []
    for obj in scene.objects:  # painter's order
        inside, second = _stamp(obj.shape, obj.pattern, obj.size, obj.position, size)
        image[inside] = COLORS[obj.color]
        image[second] = shade(obj.color)
        shapes.append(inside)
    masks, covered = [], np.zeros((size, size), dtype=bool)
    for inside in reversed(shapes):  # an object keeps what no later object covers
        masks.append(inside & ~covered)
        covered |= inside
    return RenderResult(image=image, masks=masks[::-1])


# ---------------------------------------------------------------------------- entity crops


def crop_box(mask: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the square around ``mask``'s bounding box, shifted into the image.

    Example:
        >>> m = np.zeros((8, 8), bool); m[0:2, 7] = True  # 2 x 1 at the right edge
        >>> crop_box(m)  # widened to 2 x 2 by moving left, not by clipping
        (0, 6, 2)
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("the mask is empty (the object is fully occluded); there is nothing to crop")
    height, width = mask.shape
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    side = min(max(h, w), height, width)
    # Shift rather than clip, so the crop stays square (the paper crops a square area).
    top = int(np.clip(rows[0] - (side - h) // 2, 0, height - side))
    left = int(np.clip(cols[0] - (side - w) // 2, 0, width - side))
    return top, left, int(side)


def entity_crops(
    result: RenderResult, index: int, *, out_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's two crops of object ``index``: the square crop and the same with the
    pixels outside the object's mask whitened (255). Both are (S, S, 3) uint8 with
    ``S = out_size`` (default: the render size), resized with nearest neighbour so colours
    and the whitening stay exact.

    Example:
        >>> scene = Scene("green", (ObjectSpec("heart", "red", "dotted", "small", "top"),))
        >>> square, white = entity_crops(render(scene), 0)
        >>> square.shape, int(white[0, 0, 0])
        ((64, 64, 3), 255)
    """
    if not 0 <= index < len(result.masks):
        raise ValueError(f"index={index} is out of range for {len(result.masks)} objects")
    mask = result.masks[index]
    top, left, side = crop_box(mask)
    out = out_size or mask.shape[0]
    sample = ((2 * np.arange(out) + 1) * side) // (2 * out)  # nearest source pixel, by centres
    rows, cols = (top + sample)[:, None], (left + sample)[None, :]  # (S, 1), (1, S)
    square = result.image[rows, cols]  # (S, S, 3)
    white = np.where(mask[rows, cols][..., None], square, np.uint8(255))
    return square, white


def subject_image(obj: ObjectSpec, *, size: int = 64, background: str | None = None) -> np.ndarray:
    """An image of one subject, as a prompt's ``<i>``: the object rendered alone at the
    centre and cropped like :func:`entity_crops` (so it matches the training crops);
    on white when ``background`` is None, else on that background.

    Example:
        >>> obj = ObjectSpec("star", "blue", "checkered", "large", "left")
        >>> subject_image(obj, background="yellow").shape
        (64, 64, 3)
    """
    result = render(Scene(background or "gray", (replace(obj, position="center"),)), size)
    square, white = entity_crops(result, 0)
    return white if background is None else square


# ---------------------------------------------------------------------------- sampling


@lru_cache(maxsize=16)
def held_out_subjects(seed: int = HELD_OUT_SEED) -> frozenset[Subject]:
    """A fixed set of subjects never used in stage-3 data: two (color, pattern) pairs per
    shape, 16 of the 256 subjects, so every single attribute is still seen in training.

    Example:
        >>> len(held_out_subjects()), held_out_subjects() == held_out_subjects(0)
        (16, True)
    """
    rng = np.random.default_rng(seed)
    pairs = [(c, p) for c in COLORS for p in PATTERNS]
    held = set()
    for shape in SHAPES:
        for k in rng.permutation(len(pairs))[:2]:
            held.add((shape, *pairs[k]))
    return frozenset(held)


def is_held_out(obj: ObjectSpec, seed: int = HELD_OUT_SEED) -> bool:
    """Whether ``obj``'s (shape, color, pattern) is one of :func:`held_out_subjects`."""
    return obj.subject in held_out_subjects(seed)


def _excluded(exclude: Collection[Subject], exclude_held_out: bool) -> frozenset[Subject]:
    held = held_out_subjects() if exclude_held_out else frozenset()
    return held | frozenset(exclude)


def _sample_object(
    rng: np.random.Generator, position: str, excluded: frozenset[Subject], taken: Collection[str]
) -> ObjectSpec:
    shapes = [s for s in SHAPES if s not in taken]  # distinct shapes keep "the circle" unambiguous
    for _ in range(1000):  # rejection: the excluded set is a small fraction of all subjects
        subject = (_pick(rng, shapes), _pick(rng, tuple(COLORS)), _pick(rng, PATTERNS))
        if subject not in excluded:
            return ObjectSpec(*subject, size=_pick(rng, tuple(SIZES)), position=position)
    raise ValueError("the exclusions leave (almost) no subject to sample; exclude fewer")


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    *,
    exclude: Collection[Subject] = (),
    exclude_held_out: bool = False,
) -> Scene:
    """A random scene: a background and ``n_objects`` (default: 1 to 3) objects with distinct
    shapes in distinct cells. Subjects in ``exclude`` (and, with ``exclude_held_out``, the
    :func:`held_out_subjects`) are never drawn.

    Example:
        >>> a, b = (sample_scene(np.random.default_rng(7), 2) for _ in range(2))
        >>> a == b, len(a.objects)
        (True, 2)
    """
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 0 <= n_objects <= len(SHAPES):  # shapes are distinct within a scene
        raise ValueError(f"n_objects={n_objects} must be between 0 and {len(SHAPES)}")
    excluded = _excluded(exclude, exclude_held_out)
    background = _pick(rng, BACKGROUNDS)
    objects: list[ObjectSpec] = []
    for cell in rng.permutation(len(POSITIONS))[:n_objects]:
        objects.append(_sample_object(rng, POSITIONS[cell], excluded, [o.shape for o in objects]))
    return Scene(background, tuple(objects))


_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "color": ("make the {ref} {value}", "turn the {ref} {value}", "change the color of the {ref} to {value}"),
    "pattern": ("make the {ref} {value}", "change the pattern of the {ref} to {value}"),
    "background": ("make the background {value}", "change the background to {value}"),
    "move": ("move the {ref} {value}",),
    "add": ("add {value}",),
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}"),
}


def make_edit(
    rng: np.random.Generator,
    scene: Scene,
    *,
    kind: str | None = None,
    exclude: Collection[Subject] = (),
    exclude_held_out: bool = False,
) -> tuple[Scene, Scene, str]:
    """An instruction edit of ``scene``: ``(source, target, instruction)``. The target differs
    from the source in exactly one attribute of ``kind`` (one of ``EDIT_KINDS``; default: a
    random kind that applies to this scene). No edit creates an excluded subject.

    Example:
        >>> scene = Scene("gray", (ObjectSpec("circle", "red", "solid", "large", "left"),))
        >>> src, tgt, text = make_edit(np.random.default_rng(0), scene, kind="remove")
        >>> text.endswith("circle"), tgt.objects
        (True, ())
    """
    excluded = _excluded(exclude, exclude_held_out)
    objs = scene.objects
    free = [p for p in POSITIONS if p not in {o.position for o in objs}]
    # Candidate edits per kind: (object index or None, new value).
    options: dict[str, list[tuple[int | None, Any]]] = {
        "color": [(i, c) for i, o in enumerate(objs) for c in COLORS
                  if c != o.color and (o.shape, c, o.pattern) not in excluded],
        "pattern": [(i, p) for i, o in enumerate(objs) for p in PATTERNS
                    if p != o.pattern and (o.shape, o.color, p) not in excluded],
        "background": [(None, b) for b in BACKGROUNDS if b != scene.background],
        "move": [(i, p) for i in range(len(objs)) for p in free],
        "remove": [(i, None) for i in range(len(objs))],
        "add": [(None, None)] if len(objs) < MAX_OBJECTS and free else [],
    }
    if kind is None:
        kind = _pick(rng, [k for k in EDIT_KINDS if options[k]])
    _check("kind", kind, EDIT_KINDS)
    if not options[kind]:
        raise ValueError(f"kind={kind!r} does not apply to this scene ({scene}); pick another kind")
    index, value = _pick(rng, options[kind])
    template = _pick(rng, _INSTRUCTIONS[kind])
    new = list(objs)
    if kind == "background":
        target = replace(scene, background=value)
    elif kind == "add":
        position = _pick(rng, free)
        added = _sample_object(rng, position, excluded, [o.shape for o in objs])
        target, value = replace(scene, objects=(*objs, added)), added.describe()
    elif kind == "remove":
        target = replace(scene, objects=tuple(o for i, o in enumerate(objs) if i != index))
    else:
        field = {"color": "color", "pattern": "pattern", "move": "position"}[kind]
        new[index] = replace(objs[index], **{field: value})
        target = replace(scene, objects=tuple(new))
        if kind == "move":
            value = "to the " + value
    ref = "" if index is None else _reference(scene, index)
    return scene, target, template.format(ref=ref, value=value)


def edit_kind(source: Scene, target: Scene) -> str:
    """Which of ``EDIT_KINDS`` turns ``source`` into ``target`` (as :func:`make_edit` made them).

    Example:
        >>> a = Scene("gray", (ObjectSpec("circle", "red", "solid", "large", "left"),))
        >>> edit_kind(a, replace(a, background="blue")), edit_kind(a, replace(a, objects=()))
        ('background', 'remove')
    """
    if source.background != target.background:
        return "background"
    if len(target.objects) != len(source.objects):
        return "add" if len(target.objects) > len(source.objects) else "remove"
    for a, b in zip(source.objects, target.objects):
        for field, kind in (("color", "color"), ("pattern", "pattern"), ("position", "move")):
            if getattr(a, field) != getattr(b, field):
                return kind
    raise ValueError(f"source and target are the same scene ({source}); an edit changes one attribute")


def canonical_caption(scene: Scene) -> str:
    """The one caption of what ``scene`` looks like: objects in reading order (top left to
    bottom right), the first grammar variant. A caption drawn with a generator picks one of
    several orders, which a picture cannot tell apart.

    Example:
        >>> canonical_caption(Scene("gray", (ObjectSpec("star", "red", "solid", "small", "bottom"),
        ...                                  ObjectSpec("circle", "blue", "dotted", "large", "top"))))
        'a large blue dotted circle at the top and a small red solid star at the bottom, on a gray background'
    """
    return replace(scene, objects=tuple(sorted(scene.objects, key=lambda o: POSITIONS.index(o.position)))).caption()


CELL_ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "pattern": PATTERNS}
"""The attributes :func:`cell_labels` gives per grid cell, and their classes in index order."""


def cell_labels(scene: Scene) -> dict[str, list[int | None]]:
    """Each grid cell's object attributes as class indices (``None``: an empty cell), cells in
    ``POSITIONS`` order: a caption sample's ``"cell_labels"`` (``stage1.cell_label_weight``).

    Example:
        >>> cell_labels(Scene("gray", (ObjectSpec("star", "red", "dotted", "small", "top"),)))["shape"]
        [None, 4, None, None, None, None, None, None, None]
    """
    labels: dict[str, list[int | None]] = {name: [None] * len(POSITIONS) for name in CELL_ATTRIBUTES}
    for obj in scene.objects:
        cell = POSITIONS.index(obj.position)
        for name, classes in CELL_ATTRIBUTES.items():
            labels[name][cell] = classes.index(getattr(obj, name))
    return labels


def _reference(scene: Scene, index: int) -> str:
    """How an instruction names object ``index``: its shape, if no other object shares it."""
    obj = scene.objects[index]
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return obj.shape
    return f"{obj.entity_text()} {POSITION_PHRASES[obj.position]}"


# ---------------------------------------------------------------------------- shard samples


def foreground(*results: RenderResult) -> np.ndarray:
    """The (H, W) uint8 foreground mask (255 on any object's pixels) of one or more renders
    of the same size: a stage-3 target's ``fg.png`` / ``tgt_fg.png``."""
    masks = [m for r in results for m in r.masks]
    if not masks:
        return np.zeros(results[0].image.shape[:2], np.uint8)
    return np.logical_or.reduce(masks).astype(np.uint8) * 255


def caption_sample(
    rng: np.random.Generator, *, size: int = 64, target_size: int | None = None,
    exclude_held_out: bool = True, with_foreground: bool = False,
) -> dict[str, Any]:
    """A ``caption`` sample: ``{"json": {...}, "png": (H, W, 3) uint8}``.

    ``target_size`` (default ``size``) renders the image at another resolution: images a
    sample only ever shows as a diffusion target (``png`` of stage-3 captions, ``tgt.png``)
    are rendered natively at micro-SD's resolution rather than resized, so stage 3 sees
    exactly the pictures micro-SD learned to draw; model inputs stay at ``size``.
    ``with_foreground`` adds ``"fg.png"``, the objects' exact mask (:func:`foreground`),
    for ``stage3.foreground_weight``; it draws nothing from ``rng``. The json carries the
    scene's :func:`cell_labels` (for ``stage1.cell_label_weight``).

    Example:
        >>> sorted(caption_sample(np.random.default_rng(0), with_foreground=True))
        ['fg.png', 'json', 'png']
    """
    scene = sample_scene(rng, exclude_held_out=exclude_held_out)
    result = render(scene, target_size or size)
    sample = {"json": {"kind": "caption", "caption": scene.caption(rng), "cell_labels": cell_labels(scene)},
              "png": result.image}
    if with_foreground:
        sample["fg.png"] = foreground(result)
    return sample


def entity_caption_sample(rng: np.random.Generator, *, size: int = 64, exclude_held_out: bool = True) -> dict[str, Any]:
    """A ``caption`` sample of one entity crop (:func:`entity_crops`, white or square by a
    coin) captioned by its entity words, e.g. ``"a red striped circle"``.

    Scene captions alone teach the MLLM to read small objects in a whole scene; a prompt's
    ``<i>`` is a crop filling the frame. Stage 1 on these crops is what makes the MLLM's
    image states carry shape and pattern, not only colour (docs/micro-world.md).

    Example:
        >>> s = entity_caption_sample(np.random.default_rng(0))
        >>> s["json"]["kind"], s["png"].shape
        ('caption', (64, 64, 3))
    """
    scene = sample_scene(rng, exclude_held_out=exclude_held_out)
    index = int(rng.integers(len(scene.objects)))
    square, white = entity_crops(render(scene, size), index)
    return {"json": {"kind": "caption", "caption": f"a {scene.objects[index].entity_text()}"},
            "png": white if rng.random() < 0.5 else square}


def compositional_sample(
    rng: np.random.Generator, *, size: int = 64, target_size: int | None = None,
    exclude_held_out: bool = True, with_foreground: bool = False,
) -> dict[str, Any]:
    """A ``compositional`` sample: the caption with each object's entity span, the target
    image ``"tgt.png"``, and per entity ``i`` the crops ``"e{i}_square.png"`` and
    ``"e{i}_white.png"`` (all (H, W, 3) uint8); ``with_foreground``: also ``"tgt_fg.png"``,
    the target's object mask.

    Example:
        >>> s = compositional_sample(np.random.default_rng(0))
        >>> e = s["json"]["entities"][0]
        >>> s["json"]["caption"][e["start"]:e["end"]] == e["text"], "e0_white.png" in s
        (True, True)
    """
    scene = sample_scene(rng, exclude_held_out=exclude_held_out)
    caption, spans = scene.caption_with_spans(rng)
    result = render(scene, size)
    entities = [{"text": caption[start:end], "start": start, "end": end} for start, end in spans]
    target = render(scene, target_size) if target_size else result
    sample: dict[str, Any] = {
        "json": {"kind": "compositional", "caption": caption, "entities": entities},
        "tgt.png": target.image,
    }
    if with_foreground:
        sample["tgt_fg.png"] = foreground(target)
    for i in range(len(scene.objects)):
        sample[f"e{i}_square.png"], sample[f"e{i}_white.png"] = entity_crops(result, i)
    return sample


def edit_sample(
    rng: np.random.Generator, *, size: int = 64, target_size: int | None = None,
    exclude_held_out: bool = True, with_foreground: bool = False,
) -> dict[str, Any]:
    """An ``edit`` sample: the source caption, the instruction, the edited scene's
    :func:`canonical_caption` (``target_caption``), ``"src.png"`` and ``"tgt.png"``;
    ``with_foreground``: also ``"tgt_fg.png"``, the objects of the target *and* the source
    at the target's size (a removed or moved object's old place is where the edit shows).

    Example:
        >>> s = edit_sample(np.random.default_rng(0))
        >>> s["json"]["kind"], s["src.png"].shape == s["tgt.png"].shape
        ('edit', True)
    """
    scene = sample_scene(rng, exclude_held_out=exclude_held_out)
    src, tgt, instruction = make_edit(rng, scene, exclude_held_out=exclude_held_out)
    source, target = render(src, size), render(tgt, target_size or size)
    sample = {
        "json": {"kind": "edit", "caption": src.caption(rng), "instruction": instruction,
                 "target_caption": canonical_caption(tgt)},
        "src.png": source.image,
        "tgt.png": target.image,
    }
    if with_foreground:
        at_target_size = source if (target_size or size) == size else render(src, target_size)
        sample["tgt_fg.png"] = foreground(target, at_target_size)
    return sample
