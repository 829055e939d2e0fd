"""Mask post-processing and entity crops, as the release does them after CLIPSeg.

Pure numpy on (H, W) arrays, so each step is tested against hand-made masks:
sigmoid + threshold (:func:`binarize`), a grey dilation with a (side/100)-pixel window
(:func:`dilate`), the largest connected component (:func:`largest_component`), a square box
of side max(h, w) around it shifted, never shrunk, to lie inside the image
(:func:`square_box`), and the two crops: as is and with everything outside the component
white (:func:`entity_crops`).

Example:
    >>> m = np.zeros((10, 10), bool); m[2:4, 3:8] = True
    >>> square_box(bounding_box(m), (10, 10))   # (top, left, bottom, right), end exclusive
    (0, 3, 5, 8)
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.3


def center_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side min(width, height) as a PIL box (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def binarize(logits: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """sigmoid(logits) > threshold, as a bool mask."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))) > threshold


def dilation_size(side: int) -> int:
    """The release's dilation window for an image of side ``side``: side/100, at least 1."""
    return max(1, side // 100)


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Grey dilation of a mask with a ``size`` x ``size`` window, as bool, centred like
    ``scipy.ndimage.grey_dilation``: pixel ``i`` takes the max of ``i - (size - 1 - size//2) .. i + size//2``
    (an even window grows a mask one pixel more up/left than down/right)."""
    if size < 1:
        raise ValueError(f"Dilation size must be >= 1, got {size}.")
    m = np.asarray(mask, bool)
    if size == 1:
        return m.copy()
    lo, hi = size - 1 - size // 2, size // 2
    out = m
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (lo, hi)
        padded = np.pad(out, pad, constant_values=False)
        windows = np.lib.stride_tricks.sliding_window_view(padded, size, axis=axis)
        out = windows.any(axis=-1)
    return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components (``scipy.ndimage.label``'s default): (labels, count), 0 = background.

    Works on runs of each row, so the Python loop is over runs, not pixels.
    """
    m = np.asarray(mask, bool)
    h, w = m.shape
    parent: list[int] = [0]

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    runs_per_row: list[list[tuple[int, int, int]]] = []
    prev: list[tuple[int, int, int]] = []
    for y in range(h):
        row = np.concatenate(([False], m[y], [False]))
        edges = np.flatnonzero(row[1:] != row[:-1])
        runs = []
        j = 0
        for x0, x1 in zip(edges[::2], edges[1::2]):  # run covers x0..x1-1
            label = 0
            while j < len(prev) and prev[j][1] <= x0:
                j += 1
            k = j
            while k < len(prev) and prev[k][0] < x1:
                other = find(prev[k][2])
                if label == 0:
                    label = other
                elif other != label:
                    parent[max(other, label)] = min(other, label)
                    label = min(other, label)
                k += 1
            if label == 0:
                label = len(parent)
                parent.append(label)
            runs.append((int(x0), int(x1), label))
        runs_per_row.append(runs)
        prev = runs
    roots = {}
    labels = np.zeros((h, w), np.int32)
    for y, runs in enumerate(runs_per_row):
        for x0, x1, label in runs:
            root = find(label)
            labels[y, x0:x1] = roots.setdefault(root, len(roots) + 1)
    return labels, len(roots)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a mask (ties: the first in row-major order)."""
    labels, n = label_components(mask)
    if n == 0:
        return np.zeros_like(np.asarray(mask, bool))
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the mask's true pixels, end exclusive; ValueError when empty."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        raise ValueError("The mask is empty: it has no bounding box.")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def square_box(box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A square of side max(h, w) centred on ``box``, shifted (not shrunk) to lie in an image of
    ``shape`` = (H, W). A side larger than the image's shorter side is capped at it (a centre-cropped
    square image never needs the cap)."""
    top, left, bottom, right = box
    height, width = shape
    side = min(max(bottom - top, right - left), height, width)

    def place(lo: int, hi: int, limit: int) -> int:
        start = (lo + hi - side) // 2
        return min(max(start, 0), limit - side)

    y, x = place(top, bottom, height), place(left, right, width)
    return y, x, y + side, x + side


def entity_crops(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The two crops of one entity: (square crop, the same crop whitened outside ``mask``, its box).

    ``image`` is (H, W, 3) uint8 and ``mask`` the entity's final (H, W) bool mask (already
    dilated and reduced to its largest component).
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"Image {image.shape[:2]} and mask {mask.shape} sizes differ.")
    top, left, bottom, right = square_box(bounding_box(mask), mask.shape)
    crop = image[top:bottom, left:right].copy()
    white = crop.copy()
    white[~mask[top:bottom, left:right]] = 255
    return crop, white, (top, left, bottom, right)


def postprocess_mask(probabilities_or_mask: np.ndarray, *, dilation: int | None = None) -> np.ndarray:
    """A binary (H, W) mask -> the release's final mask: dilated (window side/100 by default),
    then its largest component. An empty mask stays empty."""
    m = np.asarray(probabilities_or_mask, bool)
    if not m.any():
        return m
    size = dilation if dilation is not None else dilation_size(min(m.shape))
    return largest_component(dilate(m, size))
