"""``RecipeInCheckpoint``: the run's recipe kept in each checkpoint, so that a resume can say what it changes."""

import lightning as L

from lt_posttrain.training.resume import RECIPE_KEY


class RecipeInCheckpoint(L.Callback):
    """Keep ``recipe`` (the whole recipe as the command line parsed it, in plain values) in every checkpoint, under
    ``checkpoint["recipe"]``: ``lt-posttrain fit --ckpt_path ...`` compares its own recipe with it and lists what
    differs (``training/resume.py``).

    Args:
        recipe: the recipe, a mapping of plain values (what ``config.yaml`` holds).
    """

    def __init__(self, recipe: dict):
        self.recipe = recipe

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RECIPE_KEY] = self.recipe
