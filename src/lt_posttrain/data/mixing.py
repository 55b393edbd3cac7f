"""Between stages 3 and 4: training sources mixed by weight, by sampling their tokenized samples (streamed sources:
by drawing each next sample's source, ``data/streaming.py``)."""

import random
from typing import Optional

from lt_posttrain.errors import UserError


def mixture_shares(weights: list[Optional[float]]) -> list[float]:
    """Each source's weight as a number (a source without a weight weighs 1), checked: >= 0 and not all 0."""
    shares = [1.0 if weight is None else float(weight) for weight in weights]
    if any(share < 0 for share in shares) or sum(shares) <= 0:
        raise UserError(f"data.sources weights must be >= 0 and not all 0, got {weights}")
    return shares


def mixture_counts(sizes: list[int], weights: list[Optional[float]]) -> list[int]:
    """How many samples each source gives to a mixture as large as all sources together, in proportion to its
    weight (a source without a weight weighs 1). Rounded by largest remainder, so the counts add up exactly."""
    shares = mixture_shares(weights)
    total, norm = sum(sizes), sum(shares)
    exact = [total * share / norm for share in shares]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    empty = [i for i, (size, count) in enumerate(zip(sizes, counts)) if count and not size]
    if empty:
        raise UserError(f"data.sources[{empty[0]}] has weight {weights[empty[0]]} but no sample to draw from")
    return counts


def mixture_indices(groups: list[list[int]], weights: list[Optional[float]], seed: int) -> list[int]:
    """The sample indices of the mixture: from each group (the indices of one source's samples) its
    :func:`mixture_counts` share, every sample repeated ``count // size`` times plus a seeded random
    ``count % size`` of them (so a down-weighted source is subsampled and an up-weighted one repeated, never
    duplicated beyond that)."""
    counts = mixture_counts([len(group) for group in groups], weights)
    generator = random.Random(seed)
    mixed = []
    for group, count in zip(groups, counts):
        repeats, rest = divmod(count, len(group)) if group else (0, 0)
        mixed += group * repeats + sorted(generator.sample(group, rest))
    return mixed
