"""Writing a Hugging Face folder (model or LoRA adapter, + tokenizer) so that a crash never leaves a half-written one."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from lt_posttrain.errors import UserError
from lt_posttrain.model.lora import fsdp_units_unwrapped, is_peft_model, merged_lora_model


def export_hf(
    model,
    tokenizer,
    output_dir: str | os.PathLike,
    merge_lora: bool = False,
    trust_remote_code: bool = False,
    state_dict: Optional[dict] = None,
    max_shard_size: Union[int, str] = "5GB",
) -> Path:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``output_dir``, loadable with ``from_pretrained``.

    A LoRA model (PEFT) is written as its adapter (``PeftModel.from_pretrained(base, output_dir)`` loads it) or, with
    ``merge_lora``, as a plain model: the base reloaded from its source on the CPU with the adapter merged in
    (``trust_remote_code`` for that reload); ``model`` itself is not changed. Everything is written into a hidden
    folder beside the files first and moved in only once complete, so a failed write leaves whatever ``output_dir``
    held before. Sub-folders of ``output_dir`` (step exports) are kept.

    ``state_dict`` (keyed as ``model.state_dict()``) gives the weights to write when ``model``'s own are not whole,
    e.g. gathered from the shards of DeepSpeed ZeRO-3 or FSDP (:func:`lt_posttrain.training.sharding.gather_state_dict`);
    ``model`` then provides only the config and, for an adapter, which weights belong to it. A model's weights are
    split into safetensors files of at most ``max_shard_size`` (``"5GB"``, or bytes) with an index file.
    """
    if merge_lora and is_peft_model(model):
        model, state_dict = merged_lora_model(model, trust_remote_code, state_dict), None
    target = Path(output_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    except OSError as error:
        raise UserError(f"checkpoint.output_dir {str(target)!r}: cannot write there ({error.strerror})") from error
    try:
        if is_peft_model(model):  # an adapter: small, one file
            with fsdp_units_unwrapped(model):
                model.save_pretrained(staging, state_dict=state_dict)
        else:
            model.save_pretrained(staging, state_dict=state_dict, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        for stale in target.iterdir():  # files of an earlier export that this one does not write (other shards)
            if stale.is_file() and not (staging / stale.name).exists():
                stale.unlink()
        for item in staging.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def submodule_state_dict(state_dict: dict, name: str) -> dict:
    """The entries of ``state_dict`` under the submodule ``name``, with ``name.`` taken off their keys: a
    LightningModule's state dict (``model.lm_head.weight``) becomes its Hugging Face model's (``lm_head.weight``).
    Entries of other submodules are left out."""
    prefix = f"{name}."
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
