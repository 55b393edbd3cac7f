"""The values each numeric recipe key accepts, decided in one place and checked before anything loads: a negative
learning rate, a batch size of 0 or a negative ``max_steps`` is one line naming the key, not a traceback minutes
later (or, worse, a run that trains on with a value it silently replaced)."""

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from lt_posttrain.errors import UserError

SEED_MAX = 2**32 - 1
"""The largest seed numpy (and so Lightning's ``seed_everything`` and the data set library) accepts."""


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts.

    Args:
        minimum: the smallest value.
        maximum: the largest value (None: no limit).
        above: ``minimum`` itself is refused (the value must be greater).
        below: ``maximum`` itself is refused.
        also: other values accepted (``-1``: "no limit", "all").
        integer: only whole numbers (a float key given ``2.0`` is fine; an int key's parser refuses ``2.5``).
        fraction: a float value is a fraction, in ``[0, 1]`` (``(0, 1]`` with ``above``), and an int a count from
            ``minimum`` (Lightning's ``limit_train_batches``, ``val_check_interval``).
    """

    minimum: float
    maximum: Optional[float] = None
    above: bool = False
    below: bool = False
    also: tuple = ()
    fraction: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # not a number: the parser checks its type
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.fraction and isinstance(value, float):
            return (0 < value if self.above else 0 <= value) and value <= 1
        if value < self.minimum or (self.above and value == self.minimum and not self.fraction):
            return False
        return self.maximum is None or value < self.maximum or (value == self.maximum and not self.below)

    def describe(self) -> str:
        low, high = _number(self.minimum), _number(self.maximum)
        if self.fraction:
            text = f"a fraction in {'(0' if self.above else '[0'}, 1] or a whole number >= {low}"
        elif self.maximum is not None:
            text = f"in {'(' if self.above else '['}{low}, {high}{')' if self.below else ']'}"
        else:
            text = f"{'>' if self.above else '>='} {low}"
        also = " or ".join(str(value) for value in self.also)
        return f"{text}{f' (or {also})' if also else ''}"


def _number(value: Optional[float]) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


POSITIVE, NON_NEGATIVE, COUNT = Range(0, above=True), Range(0), Range(1)
BATCH_LIMIT = Range(0, fraction=True)

RANGES: dict[str, Range] = {
    "seed_everything": Range(0, SEED_MAX),
    # model (every trainer: they pass these on to SFTModule)
    "model.learning_rate": POSITIVE,
    "model.weight_decay": NON_NEGATIVE,
    "model.warmup": NON_NEGATIVE,
    "model.max_new_tokens": COUNT,
    "model.sequence_parallel": COUNT,
    "model.lora.r": COUNT,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": Range(0, 1, below=True),
    # data
    "data.val_fraction": Range(0, 1, below=True),
    "data.max_length": COUNT,
    "data.batch_size": COUNT,
    "data.seed": Range(0, SEED_MAX),
    "data.num_workers": NON_NEGATIVE,
    "data.num_proc": COUNT,
    "data.packing_buffer": COUNT,
    "data.sources.sample_count": COUNT,
    "data.sources.weight": POSITIVE,
    "data.sources.seed": Range(0, SEED_MAX),
    # trainer (Lightning's)
    "trainer.devices": Range(1, also=(-1,)),
    "trainer.num_nodes": COUNT,
    "trainer.fast_dev_run": NON_NEGATIVE,
    "trainer.max_epochs": Range(1, also=(-1,)),
    "trainer.min_epochs": NON_NEGATIVE,
    "trainer.max_steps": Range(1, also=(-1,)),
    "trainer.min_steps": NON_NEGATIVE,
    "trainer.limit_train_batches": BATCH_LIMIT,
    "trainer.limit_val_batches": BATCH_LIMIT,
    "trainer.limit_test_batches": BATCH_LIMIT,
    "trainer.limit_predict_batches": BATCH_LIMIT,
    "trainer.overfit_batches": BATCH_LIMIT,
    "trainer.val_check_interval": Range(1, above=True, fraction=True),
    "trainer.check_val_every_n_epoch": COUNT,
    "trainer.num_sanity_val_steps": Range(0, also=(-1,)),
    "trainer.log_every_n_steps": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": NON_NEGATIVE,
    "trainer.reload_dataloaders_every_n_epochs": NON_NEGATIVE,
    # the sections lt-posttrain adds
    "checkpoint.save_every_n_steps": NON_NEGATIVE,
    "checkpoint.max_shard_size": COUNT,
    "training_state.every_n_steps": NON_NEGATIVE,
    "training_state.keep_last": Range(0, also=(-1,)),
    "throughput.warmup_steps": NON_NEGATIVE,
    "throughput.peak_tflops": POSITIVE,
    "validation_answers.num_prompts": NON_NEGATIVE,
    "validation_answers.max_new_tokens": COUNT,
    "validation_answers.batch_size": COUNT,
    "validation_answers.temperature": POSITIVE,
    "validation_answers.top_p": Range(0, 1, above=True),
    "validation_answers.seed": Range(0, SEED_MAX),
}
"""``section.key`` -> the values it accepts. ``data.sources.KEY`` is each source's key (``val_sources`` and
``test_sources`` too), ``model.lora.KEY`` a key of ``model.lora``."""


def check_ranges(recipe: Any) -> None:
    """Refuse, in one line naming the key, the first numeric value of ``recipe`` (a parsed recipe: mappings or
    jsonargparse namespaces, a section's keys under ``init_args`` or not) outside its :data:`RANGES`."""
    for key, value in recipe_values(recipe):
        value = _as_number(value)
        allowed = RANGES.get(key)
        if allowed is not None and not allowed.accepts(value):
            raise UserError(f"{key} must be {allowed.describe()}, got {value!r}")


def recipe_values(recipe: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` for every key of :data:`RANGES` that ``recipe`` sets (each source's, one per source)."""
    for key in RANGES:
        section, _, rest = key.partition(".")
        if not rest:
            yield key, _get(recipe, section)
            continue
        values = _arguments(_get(recipe, section))
        if key.startswith("data.sources."):
            name = rest.partition(".")[2]
            for sources in ("sources", "val_sources", "test_sources"):
                for source in _get(values, sources) or ():
                    if not isinstance(source, str):
                        yield key, _get(source, name)
        elif key.startswith("model.lora."):
            yield key, _get(_get(values, "lora"), rest.partition(".")[2])
        else:
            yield key, _get(values, rest)


def _as_number(value: Any) -> Any:
    """A number given where a key also takes text (``trainer.devices``, ``val_check_interval``), as that number."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _arguments(section: Any) -> Any:
    init_args = _get(section, "init_args")
    return init_args if init_args is not None else section


def _get(container: Any, name: str) -> Any:
    if container is None or isinstance(container, (str, int, float, bool, list, tuple)):
        return None
    if isinstance(container, dict):
        return container.get(name)
    try:
        return container[name] if name in container else None  # a jsonargparse Namespace
    except TypeError:
        return getattr(container, name, None)
