"""A real fine-tune through the command line: SmolLM2-135M-Instruct on GSM8K-train chats, on CPU."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMOLLM2_GGUF, gsm8k_chats, needs_smollm2, write_jsonl
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.model.loading import gguf_as_hf_folder, resolve_model_path


def held_out_loss(folder, chats) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chat in chats:
            sample = tokenize_conversation(chat["messages"], tokenizer, 1024)[0]
            labels = torch.tensor([sample["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([sample["input_ids"]]), labels=labels).loss.item() * n
            count += n
    return total / count


@needs_smollm2
@pytest.mark.slow
def test_cli_fine_tune_lowers_held_out_loss_and_exports(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", gsm8k_chats(400))
    held_out = gsm8k_chats(24, start=7000)
    val = write_jsonl(tmp_path / "val.jsonl", held_out)
    output = tmp_path / "model"
    command = [
        sys.executable, "-m", "lt_posttrain.cli", "fit", f"--model.name_or_path={SMOLLM2_GGUF}",
        "--model.learning_rate=5e-5", "--model.warmup=3", f"--data.sources=[{train}]", f"--data.val_sources=[{val}]",
        "--data.max_length=512", "--data.batch_size=1", "--data.packing=true", "--trainer.accelerator=cpu",
        "--trainer.max_steps=20", "--trainer.val_check_interval=10", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        f"--checkpoint.output_dir={output}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(output.resolve()) in result.stdout + result.stderr  # the path is printed at the end

    base = gguf_as_hf_folder(resolve_model_path(SMOLLM2_GGUF))
    before, after = held_out_loss(base, held_out), held_out_loss(output, held_out)
    assert after < before - 0.02, (before, after)

    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    generated = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
    print(json.dumps({"held_out_before": before, "held_out_after": after, "answer": text}))
