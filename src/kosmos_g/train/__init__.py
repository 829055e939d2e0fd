"""Training: the three Kosmos-G stages on one shared accelerate trainer.

``kosmos-g train stage1|stage2|stage3 --config recipe.yaml [key=value ...]`` runs
:class:`Trainer` on a :class:`~kosmos_g.train.recipe.Recipe`; see ``docs/training.md``.
"""

from .recipe import Recipe, load_recipe
from .trainer import Trainer, latest_checkpoint, train

__all__ = ["Recipe", "Trainer", "latest_checkpoint", "load_recipe", "train"]
