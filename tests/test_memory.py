"""The memory a step of the longest micro-batch needs, estimated before training (``training/memory.py``): against the
peaks measured on an H100 (BENCHMARKS.md), part by part for each option on the Llama-3.1-8B and Llama-3.2-1B shapes,
LoRA and full; and a length that cannot fit refused in one line before the first step (the device's memory faked)."""

from dataclasses import replace

import pytest
from transformers import LlamaConfig

from cli_runs import command_here, failing_here
from conftest import gsm8k_chats, write_jsonl
from test_cli import assert_one_line_error
from lt_posttrain.errors import UserError
from lt_posttrain.training.gradient_checkpointing import GradientCheckpointing
from lt_posttrain.training.memory import (
    GiB,
    LOGIT_BYTES,
    ModelShape,
    StepSetup,
    check_step,
    estimate_step,
    optimizer_state_bytes,
)

LLAMA_1B = ModelShape(layers=16, hidden=2048, intermediate=8192, vocab=128256, heads=32, kv_heads=8, head_dim=64)
LLAMA_8B = ModelShape(layers=32, hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, head_dim=128)
LIGER = frozenset({"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"})
CHECKPOINTED = GradientCheckpointing()
H100 = 79 * GiB


def parameters(shape: ModelShape, tied: bool) -> int:
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layer = 2 * shape.hidden * q + 2 * shape.hidden * kv + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
    return shape.vocab * shape.hidden * (1 if tied else 2) + shape.layers * layer + shape.hidden


def lora_parameters(shape: ModelShape, r: int = 16) -> int:
    """LoRA on every linear layer of the decoder: ``r x (in + out)`` each."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return shape.layers * r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)


P1, P8 = parameters(LLAMA_1B, tied=True), parameters(LLAMA_8B, tied=False)
L1, L8 = lora_parameters(LLAMA_1B), lora_parameters(LLAMA_8B)


def full(params: int, optimizer: str = "adamw_kahan", **fields) -> StepSetup:
    """A full fine-tune of bf16 weights (``bf16-true``)."""
    return StepSetup(resident=2 * params, trainable=params, trainable_bytes=2, optimizer=optimizer, **fields)


def lora(params: int, adapters: int, **fields) -> StepSetup:
    """LoRA (float32 adapters, AdamW) on a bf16 base."""
    return StepSetup(resident=2 * (params - adapters) + 4 * adapters, trainable=adapters, trainable_bytes=4,
                     optimizer="adamw", **fields)  # fmt: skip


def test_the_counts_of_the_shapes():
    assert (P1, P8, L1, L8) == (1_235_814_400, 8_030_261_248, 11_272_192, 41_943_040)  # the bench logs' counts
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    assert ModelShape.of(config) == LLAMA_8B
    assert ModelShape.of(object()) is None  # a config without the sizes: nothing is estimated


# Peaks (max_memory_allocated) measured on an H100 80GB, Llama-3.2-1B shape, gradient checkpointing:
# BENCHMARKS.md, "Precision and optimizer on the GPU" (call D; 4 packed rows of 4,096 tokens, Liger) and
# bench/results/h100-model-options.txt (4 rows of 2,048 tokens).
MEASURED = {
    "bf16, Kahan AdamW, Liger": (16384, full(P1, loss="fused", liger=LIGER), 12.97),
    "bf16, Kahan AdamW in the backward, Liger": (16384, full(P1, gradients=False, loss="fused", liger=LIGER), 12.21),
    "bf16, plain AdamW, Liger": (16384, full(P1, "adamw", loss="fused", liger=LIGER), 10.67),
    "bf16, stochastic-rounding AdamW, Liger": (16384, full(P1, "adamw_stochastic", loss="fused", liger=LIGER), 10.77),
    "bf16-mixed, fp32 weights, AdamW, Liger": (16384, StepSetup(resident=4 * P1, trainable=P1, trainable_bytes=4,
                                                                residual_bytes=4, loss="fused", liger=LIGER), 20.32),
    # the model-options runs: their peaks are those of plain AdamW's states (Kahan's buffer alone is 2.3 GiB)
    "bf16, AdamW, Liger, 8K": (8192, full(P1, "adamw", loss="fused", liger=LIGER), 10.43),
    "bf16, AdamW, 8K": (8192, full(P1, "adamw"), 19.7),
    "LoRA r=16 on a bf16 base, 8K": (8192, lora(P1, L1), 14.8),
}  # fmt: skip


@pytest.mark.parametrize("case", MEASURED)
def test_the_estimate_comes_within_a_few_percent_below_the_peaks_measured_on_an_h100(case):
    tokens, setup, measured = MEASURED[case]
    estimate = estimate_step(LLAMA_1B, tokens, replace(setup, checkpointing=CHECKPOINTED)).device / GiB
    assert -0.06 <= estimate / measured - 1 <= 0.02, (estimate, measured)


def test_llama_3_1_8b_lora_fits_16k_and_not_128k_without_the_options_and_400k_with_them():
    """The issue's starting point (16K fits one H100, 128K does not) and its target (400K with every option)."""
    plain = lora(P8, L8, checkpointing=CHECKPOINTED)
    assert estimate_step(LLAMA_8B, 16384, plain).device < H100 < estimate_step(LLAMA_8B, 131072, plain).device
    every = replace(plain, loss="tiled", mlp_tile_tokens=4096, offload=True)
    memory = estimate_step(LLAMA_8B, 400_000, every)
    assert memory.device < H100
    assert memory.host == 32 * 4096 * 2 * 400_000  # the floor: layers x hidden x 2 bytes a token, on the host
    assert memory.resident == 2 * (P8 - L8) + 4 * L8 + 8 * L8 and memory.gradients == 4 * L8


@pytest.mark.parametrize("shape, setup", [(LLAMA_8B, lora(P8, L8)), (LLAMA_8B, full(P8)), (LLAMA_1B, lora(P1, L1)),
                                          (LLAMA_1B, full(P1))], ids=["8b-lora", "8b-full", "1b-lora", "1b-full"])
def test_each_option_cuts_its_part_and_only_it(shape, setup):
    tokens, h, v = 65536, shape.hidden, shape.vocab
    checkpointed = replace(setup, checkpointing=CHECKPOINTED)
    base = estimate_step(shape, tokens, checkpointed)
    assert base.kept == shape.layers * h * 2 * tokens and base.host == 0  # each layer's input, bf16
    assert base.loss == LOGIT_BYTES * v * tokens + (4 + 2) * h * tokens  # the logits, the final norm's

    without = estimate_step(shape, tokens, setup)  # every activation of every layer kept
    assert without.kept > 10 * base.kept and without.layer < base.layer

    tiled_loss = estimate_step(shape, tokens, replace(checkpointed, loss="tiled"))
    assert tiled_loss.loss < base.loss / 25 and replace(tiled_loss, loss=base.loss) == base

    tiled_mlp = estimate_step(shape, tokens, replace(checkpointed, mlp_tile_tokens=h))
    untiled_mlp = 4 * 2 * shape.intermediate * tokens  # gate, up, activation, product, bf16
    assert base.layer - tiled_mlp.layer > untiled_mlp and replace(tiled_mlp, layer=base.layer) == base

    offloaded = estimate_step(shape, tokens, replace(checkpointed, offload=True))
    assert offloaded.host == base.kept and offloaded.kept == 2 * h * 2 * tokens  # one layer back, the next coming
    assert replace(offloaded, kept=base.kept, host=0) == base

    every = estimate_step(shape, tokens, replace(checkpointed, loss="tiled", mlp_tile_tokens=h, offload=True))
    assert every.device < min(m.device for m in (base, tiled_loss, tiled_mlp, offloaded))


def test_lora_and_full_differ_in_gradients_and_optimizer_states():
    full_memory = estimate_step(LLAMA_1B, 1024, full(P1))
    assert full_memory.resident == 2 * P1 + 3 * 2 * P1  # bf16 weights, Kahan AdamW's two moments and compensation
    assert full_memory.gradients == 2 * P1
    lora_memory = estimate_step(LLAMA_1B, 1024, lora(P1, L1))
    assert lora_memory.resident == 2 * (P1 - L1) + 4 * L1 + 8 * L1 and lora_memory.gradients == 4 * L1
    assert (lora_memory.kept, lora_memory.layer, lora_memory.loss) == (full_memory.kept, full_memory.layer,
                                                                       full_memory.loss)  # fmt: skip
    assert estimate_step(LLAMA_1B, 1024, full(P1, gradients=False)).gradients == 0  # optimizer_in_backward


def test_optimizer_states_by_optimizer():
    assert [optimizer_state_bytes(name, 2) for name in ("adamw", "adamw_kahan", "adamw_stochastic", "adamw_8bit")] == [
        4, 6, 4, 2]  # fmt: skip
    assert optimizer_state_bytes("adamw_kahan", 4) == 8  # no compensation for float32 weights
    assert optimizer_state_bytes("torch.optim.SGD", 4) == optimizer_state_bytes(None, 4) == 0  # unknown: left out


def test_selective_checkpointing_and_every_other_layer_keep_more():
    setup = lora(P8, L8, checkpointing=CHECKPOINTED)
    base = estimate_step(LLAMA_8B, 8192, setup)
    saved = [estimate_step(LLAMA_8B, 8192, replace(setup, checkpointing=GradientCheckpointing(save=[what]))).kept
             for what in ("attention", "attention_projections", "matmuls")]  # fmt: skip
    assert base.kept < saved[0] < saved[1] < saved[2]
    half = estimate_step(LLAMA_8B, 8192, replace(setup, checkpointing=GradientCheckpointing(every=2))).kept
    none = estimate_step(LLAMA_8B, 8192, replace(setup, checkpointing=None)).kept
    assert half == pytest.approx((base.kept + none) / 2)


def test_lora_dropout_keeps_each_adapted_input():
    setup = lora(P8, L8, checkpointing=CHECKPOINTED, mlp_tile_tokens=4096)
    attention, mlp = 4 * 4096, 2 * 4096 + 14336  # q, k, v, o; gate, up, down
    dropped = estimate_step(LLAMA_8B, 8192, replace(setup, lora_dropout=(attention, mlp)))
    plain = estimate_step(LLAMA_8B, 8192, setup)
    assert dropped.layer - plain.layer == attention * 3 * 8192 + mlp * 3 * 4096  # bf16 and a mask byte; MLP a tile


def test_what_cannot_fit_is_one_line_with_the_options_that_cut_it():
    setup = lora(P8, L8, checkpointing=CHECKPOINTED)
    with pytest.raises(UserError) as error:
        check_step(LLAMA_8B, 131072, setup, H100, 120 * GiB, "cuda:0")
    line = str(error.value)
    assert "\n" not in line
    assert line.startswith("the longest micro-batch (131,072 tokens) needs about 238.2 GiB of GPU memory a step (")
    assert "and cuda:0 has 79.0 GiB: turn on model.long_context.tiled_loss (-161.4 GiB), then " in line
    assert line.endswith("or lower data.max_length or data.batch_size (or set model.long_context.check_memory false)")

    with pytest.raises(UserError, match=r"lower data.max_length or data.batch_size: even with model.long_context.tiled_"
                                        r"loss \(-\d+.\d GiB\), then model.long_context.tiled_mlp"):  # fmt: skip
        check_step(LLAMA_8B, 600_000, setup, H100, 120 * GiB)  # its checkpoints would not fit the host: no offload

    offloaded = replace(setup, offload=True, loss="tiled", mlp_tile_tokens=4096)
    with pytest.raises(UserError, match=r"^the longest micro-batch \(400,000 tokens\) offloads about 97.7 GiB of "
                                        r"checkpoints to host memory .* and 64.0 GiB is available: lower"):
        check_step(LLAMA_8B, 400_000, offloaded, H100, 64 * GiB)


def test_within_the_margin_a_warning_and_below_nothing():
    setup = lora(P8, L8, checkpointing=CHECKPOINTED)
    memory = estimate_step(LLAMA_8B, 32768, setup)
    assert check_step(LLAMA_8B, 32768, setup, memory.device + 1) == (memory, None)
    _, warning = check_step(LLAMA_8B, 32768, setup, int(memory.device / 1.05), None, "cuda:0")
    assert warning.startswith("the longest micro-batch (32,768 tokens) may not fit: a step needs about 71.1 GiB")


# -- before the first step, through the command line (the device's memory faked: the check runs on CUDA only) ------
def test_a_run_whose_longest_micro_batch_cannot_fit_stops_before_training_in_one_line(
    capsys, tiny_model_dir, tmp_path, monkeypatch
):
    import lt_posttrain.trainers.sft as sft

    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(8))
    measured = []
    monkeypatch.setattr(sft, "device_memory", lambda device: measured.append(device) or (2**20, 128 * 2**20))
    args = ["fit", "--model.name_or_path", tiny_model_dir, f"--data.sources=[{chats}]", "--data.max_length=512",
            "--data.packing=true", "--data.batch_size=2", "--trainer.accelerator=cpu", "--trainer.max_steps=1",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--checkpoint.save_end_of_training=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--model.long_context.loss_tile_tokens=16"]  # a tile far shorter than the micro-batch  # fmt: skip
    result = failing_here(capsys, *args)
    assert_one_line_error(result, "the longest micro-batch (", "tokens) needs about 0.", "GiB of GPU memory a step",
                          "and cpu has 0.12 GiB: turn on model.long_context.tiled_loss (-0.",
                          "(or set model.long_context.check_memory false)")  # fmt: skip
    assert measured and not (tmp_path / "run" / "config.yaml").exists()  # no training step ran
    assert command_here(capsys, *args, "--model.long_context.check_memory=false").returncode == 0


def test_the_longest_micro_batch_of_the_data_plan(tokenizer, tmp_path):
    from lt_posttrain import InstructDataModule

    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(12))
    lengths = {}
    for packing in (False, True):
        data = InstructDataModule([str(chats)], max_length=400, batch_size=2, packing=packing)
        data.connect(tokenizer)
        assert data.longest_micro_batch_tokens() is None  # before setup
        data.setup("fit")
        lengths[packing] = data.longest_micro_batch_tokens()
        if packing:  # the two fullest rows
            rows = sorted(sum(data.train_samples["length"][i] for i in pack) for pack in data.train_packs)
            assert lengths[True] == sum(rows[-2:]) <= 2 * 400
        else:  # two rows as wide as the longest sample
            assert lengths[False] == 2 * max(data.train_samples["length"][:])


def test_the_setup_of_a_model_as_placed(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lt_posttrain.model.lora import LoraOptions, apply_lora
    from lt_posttrain.training.memory import setup_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # float32: hidden 64, MLP 128, query 64
    setup = setup_of(model, 123, "bf16-mixed", optimizer="adamw")
    assert (setup.resident, setup.trainable, setup.trainable_bytes) == (123, model.num_parameters(), 4)
    assert (setup.compute_bytes, setup.residual_bytes, setup.lora_dropout) == (2, 4, (0, 0))
    adapted = apply_lora(model, LoraOptions(r=4, dropout=0.05))
    setup = setup_of(adapted, 0, "32-true")
    assert (setup.compute_bytes, setup.trainable_bytes) == (4, 4)
    assert setup.trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert setup.lora_dropout == (4 * 64, 64 + 64 + 128)  # q, k, v, o take 64 each; gate, up 64, down 128


def test_a_cpu_s_memory_is_not_judged():
    import torch

    from lt_posttrain.training.memory import device_memory

    assert device_memory(torch.device("cpu")) is None


@pytest.mark.gpu
def test_on_a_gpu_the_device_s_memory_is_read_and_an_overlong_plan_refused(capsys, tiny_model_dir, tmp_path):
    """One text of about 300,000 tokens: its float32 logits alone (12 bytes each, a 49,152-token vocabulary) weigh
    about 165 GiB, more than any one GPU has; with the tiled loss a step needs a fraction of a GiB."""
    import torch

    from lt_posttrain.training.memory import device_memory

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    in_use, available = device_memory(torch.device("cuda", 0))
    free, total = torch.cuda.mem_get_info(0)
    assert 0 <= in_use and free <= available <= total
    sentence = "The cat sat on the mat, and the dog lay by the door. "
    text = write_jsonl(tmp_path / "long.jsonl", [{"text": sentence * 23_000}])
    args = ["fit", "--model.name_or_path", tiny_model_dir, f"--data.sources=[{{name_or_path: {text}, type: text}}]",
            "--data.max_length=400000", "--data.batch_size=1", "--trainer.accelerator=gpu", "--trainer.devices=1",
            "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--checkpoint.save_end_of_training=false", f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    result = failing_here(capsys, *args)
    assert_one_line_error(result, "the longest micro-batch (", "GiB of GPU memory a step", "and cuda:0 has ",
                          "turn on model.long_context.tiled_loss (-")  # fmt: skip
