"""Running a recipe from Python: the same config as the YAML file, as a dict (or a path)."""

import json
import os
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from lt_posttrain.cli.lightning import PostTrainCLI


def run(config: Union[dict, str, os.PathLike], command: str = "fit", *overrides: str) -> "PostTrainCLI":
    """Run ``command`` (``fit``, ``validate``, ``test``, ``predict``) on a recipe and return the finished CLI
    (``.trainer``, ``.model``, ``.datamodule``).

    ``config`` is a dict shaped like the YAML recipe, or a path to one; ``overrides`` are command-line style
    (``"--trainer.max_steps=10"``). Example: ``run({"model": {"name_or_path": ...}, "data": {"sources": [...]}})``.
    """
    from lt_posttrain.cli.lightning import build_cli  # the top floor: imported when a recipe runs, not with the package

    source = json.dumps(config) if isinstance(config, dict) else os.fspath(config)
    return build_cli([command, f"--config={source}", *overrides])
