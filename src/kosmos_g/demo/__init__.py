"""The web demo: compose an interleaved prompt in a browser and generate with a loaded model.

A workflow on top of the library, in two layers:

* :mod:`.engine` has no web code: it loads the models once, checks every value that comes
  from a browser (:class:`~.engine.DemoError`, one sentence), runs one generation at a time
  per device with live step progress and a cancel that stops the sampling loop, and writes
  each PNG with a JSON sidecar.
* :mod:`.app` builds the Gradio page on an engine (``gradio`` is imported there, lazily, so
  that ``import kosmos_g.demo`` works without the ``demo`` extra).

``kosmos-g demo`` (``kosmos_g.commands.demo``) puts them together; see ``docs/demo.md``.

Example:
    >>> from kosmos_g.demo import Engine, build_app  # doctest: +SKIP
    >>> engine = Engine.load("ckpt/kosmos-g", "ckpt/sd-v1-5", lora_files=["style.safetensors"])  # doctest: +SKIP
    >>> build_app(engine).launch(server_name="127.0.0.1")  # doctest: +SKIP
"""

from __future__ import annotations

from .engine import DemoError, Engine, Limits, canny_edges

# build_app is resolved on first use (it imports gradio), so it is not in __all__.
__all__ = ["DemoError", "Engine", "Limits", "canny_edges"]


def __getattr__(name: str):
    if name == "build_app":  # imports gradio
        from .app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
