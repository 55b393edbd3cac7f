"""SFTModule's loss is the plain transformers loss; its optimizer leaves norms, biases and embeddings undecayed."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SMOLLM2_GGUF, gsm8k_chats, needs_smollm2
from lt_posttrain import SFTModule
from lt_posttrain.data.collate import collate_padded
from lt_posttrain.data.tokenize import count_loss_tokens, tokenize_conversation
from lt_posttrain.errors import UserError
from lt_posttrain.model.loading import gguf_as_hf_folder, resolve_model_path
from lt_posttrain.testing import save_tiny_llama
from lt_posttrain.training.optimizer import decay_groups


def step0_losses(name_or_path, hf_folder, tokenizer):
    module = SFTModule(str(name_or_path))
    module.configure_model()
    samples = [tokenize_conversation(row["messages"], module.tokenizer, 512)[0] for row in gsm8k_chats(3)]
    batch = collate_padded(samples, module.tokenizer.pad_token_id)
    count = sum(count_loss_tokens(sample["labels"]) for sample in samples)
    ours = module.loss(batch) / count
    reference = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, sample in enumerate(samples):
        labels[row, : len(sample["labels"])] = torch.tensor(sample["labels"])
    theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    return ours.item(), theirs.item()


def test_step0_loss_equals_transformers_loss_tiny(tiny_model_dir, tokenizer):
    ours, theirs = step0_losses(tiny_model_dir, tiny_model_dir, tokenizer)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)


@needs_smollm2
def test_step0_loss_equals_transformers_loss_smollm2(tokenizer):
    ours, theirs = step0_losses(SMOLLM2_GGUF, gguf_as_hf_folder(resolve_model_path(SMOLLM2_GGUF)), tokenizer)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    assert ours < 3.0  # a real instruct model, not random weights


def test_no_weight_decay_on_norms_biases_embeddings(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))
    decay, plain = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in plain_names and "model.norm.weight" in plain_names
    assert "model.layers.0.self_attn.q_proj.bias" in plain_names
    assert "model.layers.0.input_layernorm.weight" in plain_names
    assert "model.layers.0.mlp.up_proj.weight" in decay_names and "model.layers.1.self_attn.o_proj.weight" in decay_names
    assert not plain_names & decay_names


def test_model_is_in_train_mode(tiny_model_dir):
    module = SFTModule(str(tiny_model_dir))
    module.configure_model()
    assert module.model.training


def test_frozen_model_is_a_copy_outside_training_that_moves_with_the_module(tiny_model_dir, tokenizer, tmp_path):
    module = SFTModule(str(tiny_model_dir))
    module.configure_model()
    copy_of_model = module.frozen_model()
    other = save_tiny_llama(tmp_path / "other", tokenizer, seed=1)
    module.prepare_frozen_model(str(other))
    loaded = module.frozen_model(str(other))
    samples = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(2)]
    batch = collate_padded(samples, tokenizer.pad_token_id)
    inputs = module.model_inputs(batch)
    module.eval()
    assert torch.equal(copy_of_model(**inputs).logits, module(batch))
    assert not torch.equal(loaded(**inputs).logits, module(batch))  # other weights
    assert not copy_of_model(**inputs).logits.requires_grad
    trained = {id(p) for p in module.parameters()}
    for frozen in (copy_of_model, loaded):
        assert not any(p.requires_grad or id(p) in trained for p in frozen.module.parameters())
    assert all(key.startswith("model.") for key in module.state_dict())
    module.train()
    assert module.model.training and not copy_of_model.module.training and not loaded.module.training
    module.to(torch.bfloat16)
    assert {p.dtype for frozen in (copy_of_model, loaded) for p in frozen.module.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match="no such file or folder"):
        module.prepare_frozen_model(str(tmp_path / "missing"))
