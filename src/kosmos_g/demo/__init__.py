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

# Names resolve on first use, so that `kosmos_g.demo.limits` (read by `kosmos-g --help`) imports
# neither torch nor gradio; build_app imports gradio, so it is not in __all__.
__all__ = ["DemoError", "Engine", "Limits", "canny_edges"]
_HOMES = {"DemoError": ".engine", "Engine": ".engine", "canny_edges": ".engine", "Limits": ".limits",
          "build_app": ".app"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
