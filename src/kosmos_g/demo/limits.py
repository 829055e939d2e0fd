"""What one web-demo request may ask for (no heavy imports: the command line reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass
class Limits:
    """What one request may ask for; the page's sliders stop at the same values."""

    max_upload_mb: float = 10.0
    """Largest uploaded file, in MB (the upload server refuses bigger ones before they are stored)."""
    max_image_pixels: int = 16_000_000
    """Largest uploaded image, in pixels, read from its header before decoding (decompression bombs)."""
    max_prompt_chars: int = 1000
    """Longest prompt or negative prompt."""
    max_slots: int = 6
    """Most images in a prompt (image slots on the page)."""
    max_negative_slots: int = 2
    """Most images in a negative prompt."""
    max_images: int = 4
    """Most images per request."""
    max_steps: int = 100
    """Most denoising steps per request."""
    max_side: int = 1024
    """Largest width or height, in pixels."""
    queue_size: int = 8
    """Requests that may wait for the device; one more is told that the queue is full."""

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_slots", "max_images", "max_steps", "max_side", "queue_size",
                     "max_image_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if not isinstance(self.max_negative_slots, int) or self.max_negative_slots < 0:
            raise ValueError(f"Limits.max_negative_slots must be an integer >= 0, got {self.max_negative_slots!r}.")
        if not self.max_upload_mb > 0:
            raise ValueError(f"Limits.max_upload_mb must be > 0, got {self.max_upload_mb!r}.")
        from ..processing import MAX_IMAGE_PIXELS  # imports torch: not at the top, which --help reads

        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise ValueError(f"Limits.max_image_pixels may not exceed kosmos_g.processing.MAX_IMAGE_PIXELS "
                             f"({MAX_IMAGE_PIXELS:,}), got {self.max_image_pixels:,}.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)
