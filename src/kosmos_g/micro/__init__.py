"""The micro world: a synthetic world small enough that every training stage runs on a CPU.

See :mod:`kosmos_g.micro.world` for the scene renderer and the shard-sample builders,
``docs/micro-world.md`` for the whole story. This module only names what the package
ships, so that importing it stays cheap (the CLI reads it to pick its defaults).
"""

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
"""The shipped micro models: ``kosmos-g/``, ``kosmos-g-stage2/``, ``sd/``, ``clip/``, ``examples/``."""
SAMPLING_STEPS = 14
SAMPLING_GUIDANCE = 3.0
"""How the micro model samples by default (and how micro DreamBench is measured)."""
