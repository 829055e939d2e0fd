"""Small helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import io
import struct
import zlib
from importlib.resources import files
from pathlib import Path

from PIL import Image

EXAMPLES = files("kosmos_g") / "assets" / "examples"
DOG, HAT = str(EXAMPLES / "dog.png"), str(EXAMPLES / "hat.png")


def forged_png(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims ``width`` x ``height``: PIL reads that size without decoding,
    so a 30000x30000 image costs a few bytes here."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # 8-byte signature, then the IHDR chunk: length (4), b"IHDR" (4), width and height (4 each) ...
    data[16:24] = struct.pack(">II", width, height)
    # ... and a CRC over the chunk type and its 13 data bytes.
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path
