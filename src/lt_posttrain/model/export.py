"""Writing a Hugging Face folder (model or LoRA adapter, + tokenizer) so that a crash never leaves a half-written one."""

import os
import shutil
import tempfile
from pathlib import Path

from lt_posttrain.errors import UserError
from lt_posttrain.model.lora import is_peft_model, merged_lora_model


def export_hf(
    model, tokenizer, output_dir: str | os.PathLike, merge_lora: bool = False, trust_remote_code: bool = False
) -> Path:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``output_dir``, loadable with ``from_pretrained``.

    A LoRA model (PEFT) is written as its adapter (``PeftModel.from_pretrained(base, output_dir)`` loads it) or, with
    ``merge_lora``, as a plain model: the base reloaded from its source on the CPU with the adapter merged in
    (``trust_remote_code`` for that reload); ``model`` itself is not changed. Everything is written into a hidden
    folder beside the files first and moved in only once complete, so a failed write leaves whatever ``output_dir``
    held before. Sub-folders of ``output_dir`` (step exports) are kept.
    """
    if merge_lora and is_peft_model(model):
        model = merged_lora_model(model, trust_remote_code)
    target = Path(output_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    except OSError as error:
        raise UserError(f"checkpoint.output_dir {str(target)!r}: cannot write there ({error.strerror})") from error
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for stale in target.iterdir():  # files of an earlier export that this one does not write (other shards)
            if stale.is_file() and not (staging / stale.name).exists():
                stale.unlink()
        for item in staging.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
