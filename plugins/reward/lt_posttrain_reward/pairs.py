"""``type: reward_pairs``: rows of a prompt and two answers to it, the preferred one (``chosen``) and the other
(``rejected``), with an optional margin by which the chosen one should score higher."""

import math

from lt_posttrain_dpo import PreferencePairsSourceType


class RewardPairsSourceType(PreferencePairsSourceType):
    """Rows ``{prompt or messages, chosen, rejected, margin}``: the DPO plugin's ``preference_pairs`` (``chosen`` and
    ``rejected`` as text or turns, whole conversations whose shared turns are the prompt, else a ``messages`` or
    ``prompt`` column) and ``margin``, a number: how much higher the chosen conversation's reward should be than the
    rejected one's (TRL's ``margin`` column; missing or null: 0).

    Options (``options:`` of the source): ``chosen_key``, ``rejected_key`` and ``margin_key``, other names for those
    columns.
    """

    def margin(self, row: dict, index: int) -> float:
        """The margin of ``row`` (``index`` is its position, for error messages)."""
        key = self.source.options.get("margin_key", "margin")
        value = row.get(key)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(index, f"{key!r} must be a finite number (how much the chosen answer's reward should "
                                    f"exceed the rejected one's), got {value!r:.60}")  # fmt: skip
        return float(value)
