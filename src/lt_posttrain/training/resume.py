"""What a resumed run (``--ckpt_path``) may change of the recipe its checkpoint was written with, decided here once.

The recipe is what runs: its values, not the checkpoint's, build the model, the data and the trainer. After the
checkpoint's optimizer and schedule states are restored, the recipe's learning rate and weight decay are put back
into them (:func:`lt_posttrain.training.optimizer.apply_recipe_values`), and the schedule (``model.schedule``,
``model.warmup``, ``trainer.max_steps``) is the recipe's, continued at the checkpoint's step: so a run stopped by a
divergence can go on with a lower learning rate. What shapes the weights or the optimizer states a checkpoint holds
cannot change (:data:`FIXED_ON_RESUME`); nor can the data plan, which the data loader's restored position checks
(``data.batch_size``, ``trainer.accumulate_grad_batches``, ...). Every difference is said in one line at the start.
"""

import os
import sys
from typing import Any, Optional

from lt_posttrain.errors import UserError

FIXED_ON_RESUME = (
    "model.class_path",
    "model.name_or_path",
    "model.dtype",
    "model.lora",
    "model.load_in_4bit",
    "model.load_in_8bit",
    "model.optimizer",
    "model.optimizer_in_backward",
    "trainer.precision",
)
"""Keys (and the keys under them) a resume cannot change: the trainer class, the model, the dtype and precision of
the weights, LoRA's adapters and the optimizer's kind shape what the checkpoint holds."""

RECIPE_KEY = "recipe"
"""Where a checkpoint holds the recipe it was written with (``callbacks/recipe.py``)."""

NOT_COMPARED = ("ckpt_path", "config", "weights_only", "__path__", "seed_everything")
"""Keys of the command, not of the recipe; and the seed, which a resume does not use (the checkpoint's random states
are restored), and which the command line gives as ``true`` where the run that wrote the checkpoint chose one."""


def flatten_recipe(recipe: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model.learning_rate": 0.001, ...}`` from a recipe as the CLI dumps it (``class_path`` kept, ``init_args``
    and ``dict_kwargs`` folded into their section); lists stay whole values."""
    flat = {}
    for key, value in recipe.items():
        if not prefix and key in NOT_COMPARED:
            continue
        name = prefix if key in ("init_args", "dict_kwargs") else f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten_recipe(value, name))
        else:
            flat[name] = value
    return flat


def recipe_of_hyper_parameters(hyper_parameters: dict) -> dict[str, Any]:
    """The model section of a checkpoint that holds no recipe (written before recipes were saved, or by Lightning
    alone), from the trainer's hyper-parameters."""
    flat = {}
    for key, value in hyper_parameters.items():
        if key == "_class_path":
            flat["model.class_path"] = value
        elif not key.startswith("_"):
            flat.update(flatten_recipe({key: value}, "model"))
    return flat


def recipe_changes(saved: dict[str, Any], recipe: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, recipe's value)}`` for every key that differs between the two flattened recipes: a
    key both have, or one that is a value in one and a mapping in the other (``model.lora``: None, then ``{r: 8}``).
    A key only one of them has, of another version of a class, is left out."""
    changes = {}
    for key in sorted(saved.keys() & recipe.keys()):
        before, now = saved[key], recipe[key]
        if before != now and not _same(key, before, now):
            changes[key] = (before, now)
    for key in sorted(saved.keys() ^ recipe.keys()):
        inside = _under(recipe, key) if key in saved else _under(saved, key)
        if inside:
            changes[key] = (saved[key], inside) if key in saved else (inside, recipe[key])
    return changes


def _under(flat: dict[str, Any], key: str) -> dict[str, Any]:
    return {name[len(key) + 1 :]: value for name, value in flat.items() if name.startswith(f"{key}.")}


def refuse_fixed_changes(changes: dict[str, tuple[Any, Any]], checkpoint: str) -> None:
    """One line for the first change a resume cannot make (:data:`FIXED_ON_RESUME`)."""
    for key, (before, now) in changes.items():
        fixed = next((fixed for fixed in FIXED_ON_RESUME if key == fixed or key.startswith(f"{fixed}.")), None)
        if fixed is not None:
            raise UserError(
                f"--ckpt_path {checkpoint}: written with {key} {_short(before)}, the recipe says {_short(now)}; a "
                f"resume cannot change {fixed} (the checkpoint's weights and optimizer states depend on it): resume "
                "with the checkpoint's value, or start a new run in another trainer.default_root_dir"
            )


def describe_changes(changes: dict[str, tuple[Any, Any]], checkpoint: str, step: Optional[int]) -> str:
    """The one line a resume with a changed recipe prints at the start."""
    listed = [f"{key} {_short(before)} -> {_short(now)}" for key, (before, now) in changes.items()]
    at = f"step {step} of " if step is not None else ""
    return (
        f"resuming from {at}{checkpoint} with a changed recipe: {', '.join(listed)} (the recipe's values apply; the "
        "learning rate follows the recipe's schedule from that step)"
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same(key: str, first: Any, second: Any) -> bool:
    """Two spellings of one thing: a class by two import paths, a local model folder by two paths."""
    if key.endswith("class_path"):
        return _same_class(first, second)
    return key == "model.name_or_path" and _same_path(first, second)


def _same_class(first: Any, second: Any) -> bool:
    """Two import paths of one class (``lt_posttrain.SFTModule``, ``lt_posttrain.trainers.sft.SFTModule``), among the
    modules imported already: nothing a checkpoint names is imported to find out."""
    classes = []
    for path in (first, second):
        module, _, name = str(path).rpartition(".")
        classes.append(getattr(sys.modules.get(module), name, None))
    return classes[0] is not None and classes[0] is classes[1]


def _same_path(first: Any, second: Any) -> bool:
    """Two spellings of one local model folder (relative and absolute, through a link)."""
    if not (isinstance(first, str) and isinstance(second, str)) or "://" in first + second:
        return False
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)
