"""The batch contract: what a trainer's ``loss(batch)`` receives (the ground floor: it imports nothing of ours)."""

IGNORE_INDEX = -100
"""The label (and target) of a position that adds nothing to the loss."""
