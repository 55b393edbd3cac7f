"""The decoder layers of a causal LM: the repeated blocks that gradient checkpointing, compiling and FSDP's wrapping
act on, found one way for all three."""

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model`` (PEFT-wrapped or not), in order: the modules of the classes the model names in
    ``_no_split_modules`` (transformers' list of the blocks that stay whole on one device: ``LlamaDecoderLayer``,
    ...). Empty for a model that names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]
