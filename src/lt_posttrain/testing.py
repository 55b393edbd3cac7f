"""Helpers for testing trainers and plugins on CPU in seconds: a tiny random Llama that uses a real tokenizer, and
what a test needs to run a strategy by hand in several processes (Lightning runs DeepSpeed and FSDP on CUDA only).

Part of the public surface for tests (``docs/plugins.md``): a plugin's tests may import these; its package may not.
"""

from pathlib import Path

from lt_posttrain.training.strategy import leave_process_group, prepare_strategy

__all__ = ["leave_process_group", "prepare_strategy", "save_tiny_llama"]


def save_tiny_llama(folder, tokenizer, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden size 64, random fp32 weights from ``seed``) and ``tokenizer`` as a Hugging Face
    folder that ``name_or_path`` can point at.

    Args:
        folder: where to write it (created if missing).
        tokenizer: the tokenizer to pair it with; the vocabulary and special tokens follow it.
        seed: seed of the random weights.

    Returns:
        ``folder`` as a ``Path``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def real_chat_template(name: str) -> str:
    """A model's real chat template as TRL ships it (``trl/chat_templates/NAME.jinja``: ``qwen3`` is Qwen3's own,
    ``qwen3_training`` the same with ``{% generation %}`` markers, ``phi3``, ``llama3``, ...), read as a file so
    that TRL itself is never imported.

    Args:
        name: the file's name without ``.jinja``.
    """
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is None:
        raise ModuleNotFoundError("the real chat templates come with TRL: pip install 'trl>=1.16'")
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / f"{name}.jinja").read_text()
