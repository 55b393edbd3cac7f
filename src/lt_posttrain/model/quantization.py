"""QLoRA: base weights loaded in 4 or 8 bits with bitsandbytes, adapters trained on top of them."""

import importlib.util

import torch

from lt_posttrain.errors import UserError


def require_bitsandbytes(option: str) -> None:
    """Raise one line unless a CUDA GPU and the bitsandbytes package are both there; ``option`` names the key."""
    if not torch.cuda.is_available():
        raise UserError(f"{option} needs a CUDA GPU (bitsandbytes), and none is visible on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{option} needs bitsandbytes: pip install 'lt-posttrain[qlora]'")


def check_quantization(load_in_4bit: bool, load_in_8bit: bool, lora) -> None:
    """Refuse, in one line, quantization options that cannot train."""
    if load_in_4bit and load_in_8bit:
        raise UserError("model.load_in_4bit and model.load_in_8bit: choose one")
    option = "model.load_in_4bit" if load_in_4bit else "model.load_in_8bit"
    if (load_in_4bit or load_in_8bit) and lora is None:
        raise UserError(f"{option}: quantized weights cannot be trained; add a model.lora block (QLoRA)")
    if load_in_4bit or load_in_8bit:
        require_bitsandbytes(option)


def bitsandbytes_config(load_in_4bit: bool, load_in_8bit: bool):
    """transformers' ``BitsAndBytesConfig``: 4-bit NF4 with double quantisation and bf16 compute, or 8-bit; None
    when neither is asked for."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip


def is_quantized(model) -> bool:
    """Whether ``model`` was loaded in 4 or 8 bits."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_for_training(model):
    """peft's ``prepare_model_for_kbit_training``: base frozen, norms and other non-quantized weights in fp32
    (gradient checkpointing is ours, ``training/gradient_checkpointing.py``)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
