"""``model.gradient_checkpointing``: full and selective checkpointing give the losses and gradients of no
checkpointing, and a selective policy keeps what it names (its operators are not run again in the backward)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cli_runs import failing_here
from conftest import gsm8k_chats
from lt_posttrain import SFTModule
from lt_posttrain.data.collate import collate_packed
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.errors import UserError
from lt_posttrain.training.gradient_checkpointing import checkpoint_options, checkpointed_layers, projection_shapes

ATTENTION = torch.ops.lt_posttrain.per_sample_attention.default
MATMUL = torch.ops.aten.mm.default

MODES = {
    "none": False,
    "full": True,
    "attention": {"save": ["attention"]},
    "attention_projections": {"save": ["attention", "attention_projections"]},
    "matmuls": {"save": ["matmuls"]},
    "every_second": {"every": 2},
}


class OperatorCount(TorchDispatchMode):
    """How often each operator runs: the forward, the backward and what checkpointing recomputes between them."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def batch(tokenizer):
    samples = [tokenize_conversation(row["messages"], tokenizer, 160)[0] for row in gsm8k_chats(3)]
    return collate_packed(samples)


def step(model_dir, batch, mode, lora=None) -> tuple[torch.Tensor, dict, Counter, SFTModule]:
    torch.manual_seed(0)  # the same adapters in every run
    module = SFTModule(str(model_dir), gradient_checkpointing=MODES[mode], lora=lora)
    module.configure_model()
    with OperatorCount() as count:
        loss = module.loss(batch)
        loss.backward()
    gradients = {name: p.grad for name, p in module.model.named_parameters() if p.requires_grad}
    return loss.detach(), gradients, count.counts, module


def test_every_mode_gives_the_loss_and_gradients_of_no_checkpointing(tiny_model_dir, batch):
    runs = {mode: step(tiny_model_dir, batch, mode) for mode in MODES}
    assert_same_losses_and_gradients(runs)
    plain = runs["none"][2]
    layers = 2
    counts = {mode: run[2] for mode, run in runs.items()}
    # without checkpointing each layer's attention runs once; full checkpointing runs it again in the backward
    assert plain[ATTENTION] == layers and counts["full"][ATTENTION] == 2 * layers
    assert counts["attention"][ATTENTION] == layers and counts["every_second"][ATTENTION] == layers + 1
    # kept matrix products are not recomputed: all kept, as many as without checkpointing
    assert counts["matmuls"][MATMUL] == plain[MATMUL] < counts["attention_projections"][MATMUL]
    assert counts["attention_projections"][MATMUL] < counts["attention"][MATMUL] == counts["full"][MATMUL]
    assert checkpointed_layers(runs["every_second"][3].model) == [0]
    assert checkpointed_layers(runs["full"][3].model) == [0, 1] and checkpointed_layers(runs["none"][3].model) == []


def test_with_lora_too(tiny_model_dir, batch):
    lora = {"r": 4, "dropout": 0.0}
    runs = {mode: step(tiny_model_dir, batch, mode, lora) for mode in ("none", "full", "attention_projections")}
    assert_same_losses_and_gradients(runs)
    assert any("lora_B" in name for name in runs["none"][1])


def test_a_copy_of_the_model_checkpoints_its_own_layers(tiny_model_dir):
    """A frozen copy (``frozen_model()``: DPO's reference) runs its own layers, not the trained model's."""
    import copy

    module = SFTModule(str(tiny_model_dir), gradient_checkpointing={"save": ["attention"]})
    module.configure_model()
    twin = copy.deepcopy(module.model)
    for layer, original in zip(twin.model.layers, module.model.model.layers):
        bound_layer, forward = layer.forward.args[:2]
        assert bound_layer is layer and forward.__self__ is layer and layer is not original
    assert checkpointed_layers(twin) == [0, 1]


def assert_same_losses_and_gradients(runs: dict) -> None:
    loss, gradients, _, _ = runs["none"]
    assert any(gradient.abs().max() > 0 for gradient in gradients.values())
    for mode, (other_loss, other_gradients, _, _) in runs.items():
        torch.testing.assert_close(other_loss, loss, rtol=1e-6, atol=1e-6, msg=mode)
        assert other_gradients.keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(other_gradients[name], gradient, rtol=1e-6, atol=1e-6, msg=f"{mode}: {name}")


def test_attention_projections_are_the_query_key_value_and_output_products():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert projection_shapes(LlamaDecoderLayer(config, 0)) == {(64, 64), (64, 32)}
    config = LlamaConfig(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UserError, match="attention_projections: cannot tell them from the MLP's products"):
        projection_shapes(LlamaDecoderLayer(config, 0))


def test_bad_options_are_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="model.gradient_checkpointing.save: 'everything' is not one of attention"):
        checkpoint_options({"save": ["everything"]})
    result = failing_here(capsys, "fit", "--model.name_or_path", tiny_model_dir, "--data.sources", "[unused.jsonl]",
                          "--model.gradient_checkpointing", "{every: 0}", "--trainer.default_root_dir", tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0] == "lt-posttrain: error: model.gradient_checkpointing.every must be 1 or more, got 0"
