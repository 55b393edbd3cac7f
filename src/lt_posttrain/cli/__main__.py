"""``python -m lt_posttrain.cli``: the ``lt-posttrain`` command (for launchers that start Python themselves)."""

from lt_posttrain.cli import main

main()
