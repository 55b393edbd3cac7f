"""Counting a model's parameters, trainable and in all."""

from torch import nn


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts every value it packs, not its bytes, and a
    DeepSpeed ZeRO-3 partitioned weight its full size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", None) or parameter.numel()
        if type(parameter).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte of storage
            count *= 2 * parameter.element_size()
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def describe_parameter_counts(model: nn.Module) -> str:
    """``"trainable parameters: 1,234 of 5,678 (21.73%)"``."""
    trainable, total = parameter_counts(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
