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
    lo = size - 1 - size // 2  # the window reaches lo pixels back and size - 1 - lo forward
    out = m
    for axis in (0, 1):  # separable: a square window is a row window then a column window
        pad = [(0, 0), (0, 0)]
        pad[axis] = (lo, size - 1 - lo)
        padded = np.pad(out, pad, constant_values=False)
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for d in range(size):  # OR of shifted copies: size cheap passes instead of a window view
            acc |= padded[d:d + n] if axis == 0 else padded[:, d:d + n]
        out = acc
    return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components (``scipy.ndimage.label``'s default): (labels, count), 0 = background.

    The runs of every row are found at once with numpy; a union-find over runs (not pixels)
    joins runs that overlap in consecutive rows. Labels are numbered in row-major order of
    each component's first pixel.
    """
    m = np.asarray(mask, bool)
    h, w = m.shape
    padded = np.zeros((h, w + 2), bool)
    padded[:, 1:-1] = m
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])  # run edges, row-major: start, end, start, ...
    r_row, r_start, r_end = rows[::2], cols[::2], cols[1::2]  # run k covers r_start[k]..r_end[k]-1 in r_row[k]
    n = len(r_row)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_first = np.searchsorted(r_row, np.arange(h + 1))  # runs of row y: row_first[y]..row_first[y+1]-1
    starts, ends, firsts = r_start.tolist(), r_end.tolist(), row_first.tolist()
    for y in range(1, h):
        j, j_end = firsts[y - 1], firsts[y]
        for k in range(firsts[y], firsts[y + 1]):
            while j < j_end and ends[j] <= starts[k]:  # runs above that end before this one starts
                j += 1
            i = j
            while i < j_end and starts[i] < ends[k]:  # every run above that overlaps this one
                a, b = find(i), find(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                i += 1
    roots = np.array([find(k) for k in range(n)], dtype=np.int64)
    uniq, run_label = np.unique(roots, return_inverse=True)  # roots are first runs: row-major order
    labels = np.zeros(h * w, np.int32)
    lengths = r_end - r_start
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0.. per run
    flat = np.repeat(r_row * w + r_start, lengths) + within
    labels[flat] = np.repeat(run_label.astype(np.int32) + 1, lengths)
    return labels.reshape(h, w), len(uniq)


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
