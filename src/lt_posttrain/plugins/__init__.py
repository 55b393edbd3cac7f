"""Plugins: trainers, data modules, callbacks and source types that installed packages register under
lt-posttrain's entry-point groups (``groups``), found by name (``registry``) and usable by short name in a recipe
(``short_names``)."""
