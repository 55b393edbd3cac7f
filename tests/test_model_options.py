"""Model options around the weights: quantization and the paged optimizer (refused in one line without a GPU),
gradient checkpointing with LoRA, the hidden states the fused loss reads, and the ``build_model`` factory hook."""

import importlib.util

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from conftest import gsm8k_chats
from lt_posttrain import SFTModule
from lt_posttrain.cli import main
from lt_posttrain.data.collate import collate_packed
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import fused_loss_parts
from lt_posttrain.training.gradient_checkpointing import checkpointed_layers

needs_cuda_bitsandbytes = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs a CUDA GPU and bitsandbytes",
)


def packed_batch(tokenizer, count: int = 3, max_length: int = 256) -> dict:
    samples = [tokenize_conversation(row["messages"], tokenizer, max_length)[0] for row in gsm8k_chats(count)]
    return collate_packed(samples)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
@pytest.mark.parametrize(
    "options, message",
    [
        (["--model.load_in_4bit", "true"], "model.load_in_4bit: quantized weights cannot be trained; add a model.lora"),
        (["--model.load_in_4bit", "true", "--model.lora.r", "8"], "model.load_in_4bit needs a CUDA GPU"),
        (["--model.load_in_8bit", "true", "--model.lora.r", "8"], "model.load_in_8bit needs a CUDA GPU"),
        (["--model.load_in_4bit", "true", "--model.load_in_8bit", "true"], "choose one"),
        (["--model.optimizer", "paged_adamw_8bit"], "model.optimizer paged_adamw_8bit needs a CUDA GPU"),
    ],
)
def test_quantization_and_paged_optimizer_refused_in_one_line(tiny_model_dir, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model.name_or_path", str(tiny_model_dir), "--data.sources", f"[{tmp_path / 'unused.jsonl'}]",
              "--trainer.logger", "false", *options])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lt-posttrain: error:")]
    assert exit.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert message in lines[0]


def lora_grads(model_dir, batch, gradient_checkpointing: bool) -> dict:
    torch.manual_seed(0)  # the same adapter initialisation for both runs
    module = SFTModule(str(model_dir), lora={"r": 4, "dropout": 0.0}, gradient_checkpointing=gradient_checkpointing)
    module.configure_model()
    assert module.model.training and checkpointed_layers(module.model) == ([0, 1] if gradient_checkpointing else [])
    module.loss(batch).backward()
    return {name: p.grad.clone() for name, p in module.model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tiny_model_dir, tokenizer):
    batch = packed_batch(tokenizer)
    plain, checkpointed = lora_grads(tiny_model_dir, batch, False), lora_grads(tiny_model_dir, batch, True)
    assert plain.keys() == checkpointed.keys() and any("lora_B" in name for name in plain)
    assert any(grad.abs().max() > 0 for grad in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "lora", [None, {"r": 4}, {"r": 4, "modules_to_save": ["lm_head"]}], ids=["full", "lora", "saved-head"]
)
def test_hidden_states_through_the_head_are_the_logits(tiny_model_dir, tokenizer, lora):
    """The fused loss reads the decoder's hidden states and the head's weight (the trained copy of a saved head):
    together they give the logits."""
    module = SFTModule(str(tiny_model_dir), lora=lora)
    module.configure_model()
    batch = packed_batch(tokenizer)
    _, head, softcap = fused_loss_parts(module.model)
    assert softcap is None and head.weight.shape == (len(tokenizer), 64)
    with torch.no_grad():
        torch.testing.assert_close(head(module.hidden_states(batch)), module(batch), rtol=1e-5, atol=1e-5)


def test_fused_loss_refuses_an_adapted_head(tiny_model_dir):
    module = SFTModule(str(tiny_model_dir), lora={"r": 4, "target_modules": ["q_proj", "lm_head"]})
    module.configure_model()
    with pytest.raises(UserError, match="model.liger.fused_linear_cross_entropy: the output head"):
        fused_loss_parts(module.model)


class FromConfigSFT(SFTModule):
    """A model factory: the architecture built from its config (fresh weights) instead of loaded."""

    def build_model(self):
        torch.manual_seed(1)
        return LlamaForCausalLM(AutoConfig.from_pretrained(self.hparams.name_or_path))


def test_build_model_hook_gets_lora_and_checkpointing(tiny_model_dir):
    module = FromConfigSFT(str(tiny_model_dir), lora={"r": 2}, gradient_checkpointing=True)
    module.configure_model()
    base = module.model.get_base_model()
    assert type(base) is LlamaForCausalLM and checkpointed_layers(base) == [0, 1]
    trainable = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


@needs_cuda_bitsandbytes
@pytest.mark.gpu
def test_qlora_4bit_trains_with_paged_adamw_and_exports_the_adapter(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from lt_posttrain.model.export import export_hf
    from lt_posttrain.training.optimizer import build_optimizer

    module = SFTModule(str(tiny_model_dir), lora={"r": 4}, load_in_4bit=True, gradient_checkpointing=True,
                       optimizer="paged_adamw_8bit")  # fmt: skip
    module.configure_model()
    assert module.model.is_loaded_in_4bit and module.model.device.type == "cuda"
    batch = {key: value.cuda() if torch.is_tensor(value) else value for key, value in packed_batch(tokenizer).items()}
    optimizer = build_optimizer("paged_adamw_8bit", module.model, 1e-2, 0.0)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0], losses

    folder = export_hf(module.model, module.tokenizer, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    saved, trained = get_peft_model_state_dict(loaded), get_peft_model_state_dict(module.model)
    assert saved.keys() == trained.keys() and saved
    assert all(torch.equal(saved[name], trained[name].cpu()) for name in saved)
