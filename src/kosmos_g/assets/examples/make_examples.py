"""Redraw the example images in this folder (synthetic: drawn with PIL, no photos).

    python src/kosmos_g/assets/examples/make_examples.py

Each picture is a few shapes drawn at 4x and downsampled, so the files are small and
carry no licence or privacy question. They exist so that examples, the README quick
start and the CLI have subjects to feed a prompt; they are not training data.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
S = 4  # supersampling factor


def _canvas(color=(255, 255, 255)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (SIZE * S, SIZE * S), color)
    return im, ImageDraw.Draw(im)


def _box(*xy: float) -> list[float]:
    return [v * S for v in xy]


def _done(im: Image.Image) -> Image.Image:
    return im.resize((SIZE, SIZE), Image.LANCZOS)


def dog() -> Image.Image:
    """A brown cartoon dog, side view, on white."""
    im, d = _canvas()
    fur, dark = (160, 100, 50), (90, 55, 25)
    for x in (40, 52, 78, 90):  # legs
        d.rounded_rectangle(_box(x, 72, x + 9, 104), radius=3 * S, fill=fur)
    d.ellipse(_box(30, 50, 100, 84), fill=fur)  # body
    d.line(_box(98, 60, 114, 40), fill=fur, width=6 * S)  # tail
    d.ellipse(_box(12, 28, 50, 62), fill=fur)  # head
    d.ellipse(_box(6, 44, 26, 58), fill=fur)  # snout
    d.ellipse(_box(4, 46, 11, 52), fill=(20, 20, 20))  # nose
    d.ellipse(_box(24, 36, 30, 42), fill=(20, 20, 20))  # eye
    d.polygon(_box(34, 30, 46, 26, 44, 52), fill=dark)  # ear
    return _done(im)


def hat() -> Image.Image:
    """A black top hat with a red band, on white."""
    im, d = _canvas()
    d.ellipse(_box(14, 84, 114, 104), fill=(25, 25, 30))  # brim
    d.rectangle(_box(34, 30, 94, 94), fill=(25, 25, 30))  # crown
    d.ellipse(_box(34, 22, 94, 38), fill=(45, 45, 55))  # top
    d.rectangle(_box(34, 74, 94, 86), fill=(200, 30, 40))  # band
    return _done(im)


def scene() -> Image.Image:
    """A small house on grass under a blue sky (for img2img and editing examples)."""
    im, d = _canvas((135, 190, 235))
    d.rectangle(_box(0, 88, 128, 128), fill=(90, 170, 70))  # grass
    d.ellipse(_box(92, 10, 116, 34), fill=(250, 220, 60))  # sun
    d.rectangle(_box(36, 60, 92, 100), fill=(220, 200, 160))  # wall
    d.polygon(_box(30, 62, 64, 34, 98, 62), fill=(170, 60, 50))  # roof
    d.rectangle(_box(58, 78, 70, 100), fill=(110, 70, 40))  # door
    d.rectangle(_box(42, 68, 52, 78), fill=(200, 230, 250))  # window
    return _done(im)


def mask() -> Image.Image:
    """White where :func:`scene` should be repainted (the sky on the left), black elsewhere."""
    im = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(im).rectangle((4, 4, 60, 52), fill=255)
    return im.convert("RGB")


def edges() -> Image.Image:
    """A canny-style edge map (white lines on black) of the house, for ControlNet examples."""
    im, d = _canvas((0, 0, 0))
    w = 1 * S
    d.rectangle(_box(36, 60, 92, 100), outline=(255, 255, 255), width=w)
    d.line(_box(30, 62, 64, 34, 98, 62), fill=(255, 255, 255), width=w)
    d.rectangle(_box(58, 78, 70, 100), outline=(255, 255, 255), width=w)
    d.rectangle(_box(42, 68, 52, 78), outline=(255, 255, 255), width=w)
    d.line(_box(0, 100, 128, 100), fill=(255, 255, 255), width=w)
    return _done(im).point(lambda v: 255 if v > 60 else 0)


EXAMPLES = {"dog": dog, "hat": hat, "scene": scene, "mask": mask, "edges": edges}


def main() -> None:
    here = Path(__file__).parent
    for name, draw in EXAMPLES.items():
        draw().save(here / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
