"""The micro world: a synthetic world small enough that every training stage runs on a CPU.

A workflow on top of the library, never imported by it: :mod:`.world` renders scenes and
builds shard samples, :mod:`.clip` and :mod:`.sd` train the stand-ins for CLIP and Stable
Diffusion, :mod:`.reader` reads generated images back, :mod:`.evaluate` is micro
DreamBench and :mod:`.train_all` trains every model in order (``docs/micro-world.md``).
This module only names what the package ships, so importing it stays cheap.
"""

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
"""The shipped micro models: ``kosmos-g/``, ``kosmos-g-stage2/``, ``sd/``, ``clip/``, ``reader/``, ``examples/``."""
