"""``model.long_context``: each option, and all of them together, gives the losses and gradients of the run without it
(CPU, float32, to 1e-6), on padded and packed batches, with per-sample weights and with LoRA; what an option cannot
do is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_runs import command_here, failing_here
from conftest import gsm8k_chats, write_jsonl
from test_cli import assert_one_line_error
from lt_posttrain import SFTModule
from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.errors import UserError
from lt_posttrain.model import attention
from lt_posttrain.training.long_context import HostBuffers, LongContext, _Offloaded, long_context_options

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Tiles far smaller than the samples, so every option really tiles.
TILES = {"loss_tile_tokens": 16, "mlp_tile_tokens": 32}
OPTIONS = {"tiled_loss": {"tiled_loss": True, **TILES}, "tiled_mlp": {"tiled_mlp": True, **TILES},
           "offload_checkpoints": {"offload_checkpoints": True}}


VOCAB = 512  # a small vocabulary keeps the full logits of the runs compared against cheap


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama of a 512-token vocabulary, its head tied to the embeddings (random fp32 weights); the
    batches' token ids are taken modulo 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("small-vocab-llama")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[dict]:
    """Four GSM8K chats (about 150 tokens each), two of them weighted, their token ids in the small vocabulary."""
    rows = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(4)]
    for row in rows:
        row["input_ids"] = [token % VOCAB for token in row["input_ids"]]
        row["labels"] = [label if label < 0 else label % VOCAB for label in row["labels"]]
    rows[1]["weight"], rows[2]["weight"] = 0.5, 2.0
    return rows


@pytest.fixture(scope="module", params=["padded", "packed"])
def batch(request, samples, tokenizer) -> dict:
    return collate_padded(samples, tokenizer.pad_token_id) if request.param == "padded" else collate_packed(samples)


def loss_and_grads(model_dir, batch: dict, **options) -> tuple[float, dict]:
    """The micro-batch's summed loss and the gradients of the trained weights, in training mode."""
    module = SFTModule(str(model_dir), **options)
    torch.manual_seed(0)  # LoRA's A matrices
    module.configure_model()
    module.model.train()
    loss = module.loss(batch)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in module.model.named_parameters() if p.requires_grad}


def assert_same(expected: tuple[float, dict], actual: tuple[float, dict], tolerance=1e-6) -> None:
    """The same loss and gradients, each tensor to ``tolerance`` of its largest entry."""
    assert actual[0] == pytest.approx(expected[0], rel=tolerance)
    assert expected[1].keys() == actual[1].keys()
    for name, grad in expected[1].items():
        scale = grad.abs().max().clamp(min=1e-12)
        error = ((actual[1][name] - grad).abs().max() / scale).item()
        assert error < tolerance, f"{name}: relative difference {error:.2e}"


_plain = {}


def plain_run(model_dir, batch: dict, lora=None) -> tuple[float, dict]:
    key = (id(batch), repr(lora))
    if key not in _plain:
        _plain[key] = loss_and_grads(model_dir, batch, lora=lora)
    return _plain[key]


@pytest.mark.parametrize("option", [*OPTIONS, "all"])
def test_each_option_gives_the_losses_and_gradients_of_the_run_without_it(model_dir, batch, option):
    options = OPTIONS[option] if option != "all" else {key: True for key in OPTIONS} | TILES
    assert_same(plain_run(model_dir, batch), loss_and_grads(model_dir, batch, long_context=options))


def test_all_options_with_lora(model_dir, batch):
    lora = {"r": 8, "dropout": 0.0, "target_modules": "all-linear"}
    options = {key: True for key in OPTIONS} | TILES
    assert_same(plain_run(model_dir, batch, lora), loss_and_grads(model_dir, batch, lora=lora,
                                                                       long_context=options))  # fmt: skip


def test_the_tiled_loss_never_computes_the_logits(model_dir, samples, monkeypatch):
    """The causal LM's own forward (which returns logits) never runs; the head's weight is applied to a tile of loss
    tokens at a time, each tile again in the backward pass."""
    module = SFTModule(str(model_dir), long_context={"tiled_loss": True, "loss_tile_tokens": 16})
    module.configure_model()
    calls, rows = [], []
    module.model.register_forward_hook(lambda *args: calls.append("logits"))
    head = module.model.get_output_embeddings()
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, weight, *args: (
        rows.append(x.shape[0]) if weight is head.weight else None) or linear(x, weight, *args))  # fmt: skip
    batch = collate_packed(samples)
    module.loss(batch).backward()
    loss_tokens = int((batch["targets"] != -100).sum())
    assert calls == [] and max(rows) == 16 and sum(rows) == 2 * loss_tokens


def test_the_mlp_runs_a_tile_at_a_time_and_recomputes_each_in_the_backward(model_dir, samples):
    module = SFTModule(str(model_dir), long_context={"tiled_mlp": True, "mlp_tile_tokens": 64})
    module.configure_model()
    rows = []
    for layer in module.model.model.layers:
        layer.mlp.up_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    batch = collate_packed(samples)
    module.loss(batch).backward()
    tokens = batch["input_ids"].numel()
    assert max(rows) == 64 and sum(rows) == 2 * 2 * tokens  # two layers, each tile run again in the backward
    assert set(module.model.state_dict()) == set(SFTModule(str(model_dir)).build_model().state_dict())


def test_each_layer_s_checkpoint_is_offloaded_and_the_one_before_prefetched(model_dir, samples, monkeypatch, caplog):
    """The forward copies each layer's input (a copy, not the tensor itself); the backward brings them back in the
    reverse order, each unpack prefetching the layer before. Gradient checkpointing is turned on, with a note."""
    events = []
    for name in ("prefetch", "bring_back"):
        method = getattr(_Offloaded, name)
        monkeypatch.setattr(_Offloaded, name, lambda self, method=method, name=name: events.append(
            (name, self.sequence)) or method(self))  # fmt: skip
    module = SFTModule(str(model_dir), long_context={"offload_checkpoints": True})
    with caplog.at_level("INFO"):
        module.configure_model()
    assert "gradient checkpointing on" in caplog.text
    module.model.train()
    inputs = []
    module.model.model.layers[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    loss = module.loss(collate_packed(samples))
    offloaded = [ref() for ref in module.checkpoint_offload._packed]
    assert [item.sequence for item in offloaded] == [1, 2]  # one per decoder layer
    assert torch.equal(offloaded[0].host, inputs[0]) and offloaded[0].host.data_ptr() != inputs[0].data_ptr()
    loss.backward()
    assert events == [("bring_back", 2), ("prefetch", 1), ("bring_back", 1)]


def test_host_buffers_serve_again_within_a_quarter_and_release_the_rest():
    buffers = HostBuffers(pin=False)
    first = buffers.take(1000)
    assert 1000 <= first.numel() <= 1000 * 17 // 16
    buffers.give_back(first)
    assert buffers.take(900).data_ptr() == first.data_ptr()  # within 5/4 of the size asked for
    buffers.give_back(first)
    assert buffers.take(700).data_ptr() != first.data_ptr() and buffers._free == []  # too large: released


def test_true_turns_every_option_on_and_a_mapping_those_it_sets():
    assert long_context_options(True) == LongContext(**{key: True for key in OPTIONS})
    assert long_context_options(False) == LongContext() == long_context_options(None)
    assert long_context_options({"tiled_loss": True}) == LongContext(tiled_loss=True)


def test_the_tiled_loss_and_liger_s_fused_loss_are_one_or_the_other(model_dir, monkeypatch):
    monkeypatch.setattr("lt_posttrain.trainers.sft.require_liger", lambda: None)
    with pytest.raises(UserError, match="tiled_loss and model.liger.fused_linear_cross_entropy both compute"):
        SFTModule(str(model_dir), liger={"fused_linear_cross_entropy": True}, long_context={"tiled_loss": True})


def test_a_model_that_scales_its_logits_is_refused_in_one_line(tmp_path, tokenizer):
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, logits_scaling=4.0)  # fmt: skip
    GraniteForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = SFTModule(str(tmp_path), long_context=True)
    message = r"^model.long_context.tiled_loss: granite scales its logits \(logits_scaling\)"
    with pytest.raises(UserError, match=message):
        module.configure_model()


class NoCheckpointing(SFTModule):
    """A model that does not support gradient checkpointing."""

    def build_model(self):
        model = super().build_model()
        model.supports_gradient_checkpointing = False
        return model


def test_offload_without_gradient_checkpointing_support_is_refused_in_one_line(model_dir):
    module = NoCheckpointing(str(model_dir), long_context={"offload_checkpoints": True})
    with pytest.raises(UserError, match="^model.long_context.offload_checkpoints offloads gradient checkpoints, which "
                                        "LlamaForCausalLM does not support; set it to false$"):  # fmt: skip
        module.configure_model()


def test_the_example_recipe_trains(capsys, tiny_model_dir, tmp_path):
    """``configs/long_context.yaml`` (its model and data swapped for small ones) trains through Lightning, and
    exports."""
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(8))
    result = command_here(capsys, "fit", "--config", CONFIGS / "long_context.yaml", "--model.name_or_path",
                          tiny_model_dir, f"--data.sources=[{chats}]", "--data.max_length=512", "--trainer.max_steps=2",
                          f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.output_dir={tmp_path / 'model'}",
                          "--trainer.enable_progress_bar=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").exists()


class FeedForwardLayers(SFTModule):
    """A model whose decoder layers call their MLP ``feed_forward``."""

    def build_model(self):
        model = super().build_model()
        for layer in model.model.layers:
            layer.feed_forward = layer.mlp
            del layer.mlp
        return model


def test_a_model_whose_layers_have_no_mlp_is_refused_in_one_line(capsys, model_dir, tmp_path):
    """Through the command line: one line, exit status 2."""
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2))
    result = failing_here(capsys, "fit", "--model", f"{__name__}.FeedForwardLayers", "--model.name_or_path", model_dir,
                          "--model.long_context.tiled_mlp", "true", f"--data.sources=[{chats}]",
                          "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.max_steps", "1",
                          f"--trainer.default_root_dir={tmp_path}")  # fmt: skip
    assert_one_line_error(result, "model.long_context.tiled_mlp: decoder layer 0 (LlamaDecoderLayer) has no mlp module "
                                  "to tile; set it to false")  # fmt: skip


def test_offload_beside_fsdp_s_own_activation_checkpointing_is_refused_in_one_line(model_dir):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lt_posttrain.training.long_context import check_offload

    strategy = FSDPStrategy(activation_checkpointing_policy={LlamaDecoderLayer})
    model = SFTModule(str(model_dir)).build_model()
    with pytest.raises(UserError, match="^model.long_context.offload_checkpoints offloads the model's own gradient "
                                        "checkpoints, not FSDP's: remove the strategy's activation_checkpointing"):
        check_offload(model, strategy)
    check_offload(model, FSDPStrategy())  # without it: accepted


# -- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_offloaded_checkpoints_leave_the_device_and_change_nothing(model_dir):
    """float32 on the GPU, one packed sample of 8192 tokens: with the offload, after the forward the device holds
    about the two layers' inputs less than with gradient checkpointing alone, their copies are in page-locked host
    memory, and the loss and gradients are the same (every option on: to 1e-5)."""
    torch.manual_seed(0)
    ids = torch.randint(VOCAB, (8192,)).tolist()
    batch = {key: value.cuda() if torch.is_tensor(value) else value
             for key, value in collate_packed([{"input_ids": ids, "labels": ids}]).items()}  # fmt: skip
    results = {}
    for name, options in (("checkpointing", {}), ("offload", {"offload_checkpoints": True}),
                          ("all", {key: True for key in OPTIONS})):  # fmt: skip
        module = SFTModule(str(model_dir), gradient_checkpointing=True, long_context=options)
        module.configure_model()
        module.cuda().model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = module.loss(batch)
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator frees blocks whose copies have finished
        held = torch.cuda.memory_allocated() - before
        if module.checkpoint_offload is not None:
            assert all(ref().host.is_pinned() for ref in module.checkpoint_offload._packed)
        loss.backward()
        grads = {name: p.grad.cpu() for name, p in module.model.named_parameters()}
        results[name] = (loss.item(), grads, held)
        del module, loss
    layer_input = 8192 * 64 * 4
    assert results["checkpointing"][2] - results["offload"][2] >= 1.5 * layer_input
    assert_same(results["checkpointing"][:2], results["offload"][:2], tolerance=1e-6)
    assert_same(results["checkpointing"][:2], results["all"][:2], tolerance=1e-5)


# -- nothing quadratic in the sequence length -----------------------------------------------------------------------
class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most bytes any operation's output had while active (an operator's own inner buffers aside: the
    per-sample attention's kernels are checked on their own)."""

    def __init__(self):
        super().__init__()
        self.largest, self.name = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            size = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
            if size > self.largest:
                self.largest, self.name = size, f"{func}: {tuple(tensor.shape)} {tensor.dtype}"
        return out


def test_the_cpu_attention_of_one_long_sample_never_builds_a_tokens_by_tokens_matrix(monkeypatch):
    """Forward and backward over one sample of 2048 tokens hold at most a block of scores; the result is that of the
    backward in one block."""
    tokens, heads = 2048, 2
    torch.manual_seed(0)
    query, grad = torch.randn(1, heads, tokens, 8), torch.randn(1, heads, tokens, 8)
    key, value = torch.randn(1, 1, tokens, 8), torch.randn(1, 1, tokens, 8)  # grouped-query: one key/value head
    bounds = torch.tensor([0, 1500, tokens], dtype=torch.int32)  # a long sample and a shorter one
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 2**16)
    with LargestTensor() as watch:
        attention._per_sample_loop(query, key, value, bounds, None)
        blocked = attention._per_sample_backward(grad, query, key, value, bounds, None)
    assert watch.largest <= 4 * (2**16 + heads * 1500 * 8), watch.name  # a block of scores, not tokens x tokens
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", heads * tokens * tokens)
    whole = attention._per_sample_backward(grad, query, key, value, bounds, None)
    for mine, theirs in zip(blocked, whole):  # the same sums, in another order
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_a_step_on_one_long_sample_builds_nothing_of_tokens_by_tokens(model_dir, monkeypatch):
    """Collate, masks, positions, rotary embeddings, the layers, the loss and the backward of one sample of 2048
    tokens, packed and padded, with every option: no tensor is an eighth of a float32 [tokens, tokens] matrix (the
    logits would be a quarter: 2048 x 512)."""
    tokens = 2048
    torch.manual_seed(0)
    ids = torch.randint(VOCAB, (tokens,)).tolist()
    sample = {"input_ids": ids, "labels": ids}
    module = SFTModule(str(model_dir), long_context={"tiled_loss": True, "tiled_mlp": True, "offload_checkpoints": True,
                                                     "mlp_tile_tokens": 512, "loss_tile_tokens": 512})  # fmt: skip
    module.configure_model()
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 2**18)
    with LargestTensor() as watch:
        for batch in (collate_packed([sample]), collate_padded([sample], 0)):
            module.loss(batch).backward()
    assert watch.largest < 4 * tokens * tokens // 8, watch.name


# -- under every strategy -------------------------------------------------------------------------------------------
STEPS, RANKS = 3, 2


def test_every_option_under_ddp_zero2_zero3_and_fsdp_gives_the_losses_of_one_process(model_dir, tokenizer, tmp_path):
    """Two CPU ranks, every option on (and gradient checkpointing), three steps of two packed micro-batches each
    (``long_context_worker.py``, one launch for the four strategies): every strategy's step losses are those of one
    process without the options, so the gradients of the first two steps were too."""
    pytest.importorskip("deepspeed")
    from lt_posttrain.training.optimizer import build_optimizer

    rows = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(2 * STEPS * RANKS)]
    for row in rows:
        row["input_ids"] = [token % VOCAB for token in row["input_ids"]]
        row["labels"] = [label if label < 0 else label % VOCAB for label in row["labels"]]
    batches = [collate_packed(rows[2 * index : 2 * index + 2]) for index in range(STEPS * RANKS)]
    for batch in batches:
        batch["loss_count"] = (batch["targets"] != -100).sum()
    torch.save(batches, tmp_path / "batches.pt")
    tests = Path(__file__).parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(tests / "long_context_worker.py"), str(model_dir), str(tmp_path / "batches.pt"), str(tmp_path)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]

    module = SFTModule(str(model_dir), learning_rate=1e-3)
    module.configure_model()
    optimizer, losses = build_optimizer("adamw", module.model, 1e-3, 0.0), []
    for step in range(STEPS):
        group = batches[step * RANKS : (step + 1) * RANKS]
        loss = sum(module.loss(batch) for batch in group) / sum(batch["loss_count"] for batch in group)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ("ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"):
        assert reports[1][name] == reports[0][name], name
        assert reports[0][name] == pytest.approx(losses, rel=1e-5), name
