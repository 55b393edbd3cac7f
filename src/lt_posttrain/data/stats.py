"""What a tokenized sample set holds: sample and token counts, cut samples, loss tokens, length percentiles."""

import math
from typing import Optional

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[int], percent: float) -> int:
    """The nearest-rank ``percent``-th percentile of ``sorted_values`` (ascending): the smallest value with at least
    ``percent`` % of the values at or below it, so always one of the values; 0 for an empty list."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def sample_stats(samples, rows: Optional[int] = None, held_out: int = 0, dropped: Optional[int] = None) -> dict:
    """Statistics of tokenized ``samples``: a ``datasets.Dataset`` (or a dict of columns) with ``loss_count``,
    ``truncated`` (tokens cut off) and ``length`` or ``input_ids`` -- what ``InstructDataModule.setup`` builds.

    ``rows`` is the number of source rows the samples came from (``None`` if not known), ``held_out`` how many of
    their samples were set aside elsewhere (the validation hold-out) and ``dropped`` how many rows gave no sample
    (no assistant turn, or none of its tokens within ``max_length``). Without ``dropped`` it is estimated as
    ``rows - samples - held_out`` (never below 0), exact unless the template split a row into several samples.

    Returns ``rows``, ``held_out``, ``samples``, ``dropped``, ``truncated`` (samples cut to ``max_length``),
    ``truncated_tokens``, ``tokens``, ``loss_tokens``, ``loss_share`` (``loss_tokens / tokens``) and
    ``length``: ``{"p50", "p90", "p99", "max"}`` in tokens.
    """
    columns = samples.column_names if hasattr(samples, "column_names") else list(samples)
    if "length" in columns:
        lengths = [int(length) for length in samples["length"][:]]
    else:
        lengths = [len(ids) for ids in samples["input_ids"][:]]
    loss_counts = [int(count) for count in samples["loss_count"][:]]
    truncated = [int(count) for count in samples["truncated"][:]]
    tokens, loss_tokens = sum(lengths), sum(loss_counts)
    ordered = sorted(lengths)
    return {
        "rows": rows,
        "held_out": held_out,
        "samples": len(lengths),
        "dropped": dropped if dropped is not None or rows is None else max(0, rows - len(lengths) - held_out),
        "truncated": sum(1 for count in truncated if count),
        "truncated_tokens": sum(truncated),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "loss_share": loss_tokens / tokens if tokens else 0.0,
        "length": {**{f"p{p}": percentile(ordered, p) for p in PERCENTILES}, "max": ordered[-1] if ordered else 0},
    }
