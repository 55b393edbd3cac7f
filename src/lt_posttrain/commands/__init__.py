"""Commands of ``lt-posttrain`` that are not Trainer methods (``data prepare``, ``data preview``): plain functions
with typed signatures that ``jsonargparse`` turns into subcommands; ``lt_posttrain.cli.main`` sends them here."""
