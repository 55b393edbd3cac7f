"""The entry-point groups that lt-posttrain reads, and what a plugin of each must be.

A distribution registers plugins in its ``pyproject.toml`` (lt-posttrain registers its own built-ins the same way)::

    [project.entry-points."lt_posttrain.trainers"]
    my_trainer = "my_package.trainer:MyTrainer"
"""

from typing import Optional

from lt_posttrain.plugins.registry import PluginGroup


def _source_type_problem(obj) -> Optional[str]:
    if isinstance(obj, type) and all(callable(getattr(obj, method, None)) for method in ("messages", "renderer")):
        return None
    return "is not a source type: it needs messages(row, index) and renderer(...)"


TRAINERS = PluginGroup("lt_posttrain.trainers", "trainer", "my_package.MyTrainer", base="lt_posttrain.SFTModule")
"""``model`` (``--model NAME``): LightningModules, subclasses of ``SFTModule`` that override ``loss(batch)``."""

DATA_MODULES = PluginGroup(
    "lt_posttrain.data_modules", "data module", "my_package.MyDataModule", base="lt_posttrain.InstructDataModule"
)
"""``data`` (``data: {class_path: NAME}``): subclasses of ``InstructDataModule``."""

CALLBACKS = PluginGroup(
    "lt_posttrain.callbacks", "callback", "my_package.MyCallback", base="lightning.pytorch.Callback"
)
"""``trainer.callbacks`` (``[{class_path: NAME}]``): Lightning callbacks."""

SOURCE_TYPES = PluginGroup(
    "lt_posttrain.source_types", "type", "my_package.source_types.MySourceType", check=_source_type_problem
)
"""A data source's ``type``: classes with ``messages(row, index)`` and ``renderer(tokenizer, chat_template)`` (see
``lt_posttrain.data.source_types.base.SourceType``)."""

GROUPS = (TRAINERS, DATA_MODULES, CALLBACKS, SOURCE_TYPES)
