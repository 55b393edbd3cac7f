"""LoRA adapters (PEFT): the ``model.lora`` block, wrapping a model with them, and merging them for export."""

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Union

import torch

from lt_posttrain.errors import UserError


@dataclass
class LoraOptions:
    """Low-rank adapters on the model's linear layers; the base weights stay frozen.

    Args:
        r: rank of the adapter matrices.
        alpha: scaling numerator: the adapter's output is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: dropout on the adapter's input.
        target_modules: module names to adapt (``[q_proj, v_proj]``, matched as name suffixes) or ``all-linear``
            (every linear layer but the output head).
        bias: which biases train: ``none``, ``all``, or ``lora_only`` (those of adapted layers).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        use_dora: weight-decomposed adapters (DoRA).
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``[lm_head, embed_tokens]``).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Union[list[str], str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[list[str]] = None


def _peft():
    try:
        import peft
    except ImportError as error:
        raise UserError("model.lora needs peft: pip install 'lt-posttrain[peft]'") from error
    return peft


def lora_config(options: LoraOptions):
    """The ``peft.LoraConfig`` for a causal LM with ``options``."""
    peft = _peft()
    return peft.LoraConfig(
        task_type="CAUSAL_LM", r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=options.target_modules, bias=options.bias, use_rslora=options.use_rslora,
        use_dora=options.use_dora, modules_to_save=options.modules_to_save,
    )  # fmt: skip


def apply_lora(model, options: LoraOptions):
    """Wrap ``model`` in LoRA adapters (a ``peft.PeftModel``); only the adapters (and ``modules_to_save``) train."""
    peft = _peft()
    try:
        return peft.get_peft_model(model, lora_config(options))
    except ValueError as error:  # e.g. target modules that match nothing
        raise UserError(f"model.lora: {str(error).strip().splitlines()[0]}") from error


def is_peft_model(model) -> bool:
    """Whether ``model`` is wrapped in PEFT adapters (without importing peft when it is not installed)."""
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


@contextmanager
def fsdp_units_unwrapped(model: torch.nn.Module) -> Iterator[None]:
    """``model`` with each FSDP unit inside it replaced by the module it wraps, for as long as the context lasts.

    PEFT picks an adapter's weights out of a state dict by the names of the model's modules; FSDP's units put
    ``_fsdp_wrapped_module.`` into those names (per decoder layer) but not into the keys of their gathered state dict,
    and PEFT would pick nothing: an empty adapter. Only the module tree changes, not the weights, and nothing talks to
    the other ranks, so rank 0 alone may use it."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, FullyShardedDataParallel)]  # fmt: skip
    for parent, name, unit in units:
        setattr(parent, name, unit.module)
    try:
        yield
    finally:
        for parent, name, unit in reversed(units):
            setattr(parent, name, unit)


def merged_lora_model(model, trust_remote_code: bool = False, state_dict: Optional[dict] = None):
    """A plain Hugging Face model on the CPU: the base reloaded from its source (in its own dtype, never quantized)
    with ``model``'s adapters merged in. ``model`` itself is left untouched, so training can go on. ``state_dict``
    (keyed as ``model.state_dict()``, the adapter's weights at least) stands in for ``model``'s own weights when
    those are sharded."""
    from transformers import AutoModelForCausalLM

    peft = _peft()
    config = model.peft_config[model.active_adapter]
    if not config.base_model_name_or_path:
        raise UserError("checkpoint.merge_lora: the base model has no source to reload it from (built in build_model?)")
    base = AutoModelForCausalLM.from_pretrained(
        config.base_model_name_or_path, dtype="auto", trust_remote_code=trust_remote_code
    )
    adapted = peft.get_peft_model(base, copy.deepcopy(config))
    with fsdp_units_unwrapped(model):
        adapter = peft.get_peft_model_state_dict(model, state_dict)
    state = {key: value.detach().to("cpu", torch.float32) for key, value in adapter.items()}
    peft.set_peft_model_state_dict(adapted, state)
    return adapted.merge_and_unload()
