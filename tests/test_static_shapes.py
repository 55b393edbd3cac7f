"""``data.static_shapes``: every micro-batch of a loader padded to one shape, with the same loss, gradients and counts
as the batch it pads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import run
from lt_posttrain.batch import IGNORE_INDEX, sample_count, sample_ids, sample_lengths, sum_per_sample
from lt_posttrain.data.collate import StaticShape, collate_packed, collate_padded, pad_to_static, static_shape
from lt_posttrain.data.packing import pack_best_fit
from lt_posttrain.data.plan import plan_epoch
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.model.attention import per_sample_attention, register_varlen_attention
from lt_posttrain.trainers.sft import SFTModule

PAD = 2
SAMPLES = [
    {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13], "weight": 0.5},
    {"input_ids": [20, 21], "labels": [20, 21], "weight": 1.0},
    {"input_ids": [30, 31, 32, 33, 34], "labels": [30, IGNORE_INDEX, 32, IGNORE_INDEX, 34], "weight": 2.0},
]


def test_a_packed_row_is_padded_with_padding_samples_and_empty_boundaries():
    shape = StaticShape(tokens=20, samples=8, longest=5)
    batch = pad_to_static(collate_packed(SAMPLES), shape, PAD)
    # 11 real tokens, then padding samples of at most `longest` tokens (5, 4), then zero-length samples
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6, 11, 16, 20, 20, 20, 20]
    assert batch["cu_seq_lens_q"] is batch["cu_seq_lens_k"] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["input_ids"][0, 11:].tolist() == [PAD] * 9
    assert batch["targets"][0, 11:].tolist() == [IGNORE_INDEX] * 9
    assert batch["target_weights"][0, 11:].tolist() == [0.0] * 9
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    assert batch["num_samples"] == 3 and int(batch["num_tokens"]) == 11


def test_a_padded_batch_gets_rows_and_columns_of_padding():
    shape = StaticShape(tokens=7, samples=4, longest=7)
    batch = pad_to_static(collate_padded(SAMPLES[:2], PAD), shape, PAD)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, PAD, PAD, PAD], [20, 21] + [PAD] * 5, [PAD] * 7, [PAD] * 7]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 3, [1, 1] + [0] * 5, [1] + [0] * 6, [1] + [0] * 6]
    assert batch["targets"][2:].eq(IGNORE_INDEX).all() and batch["target_weights"][2:].eq(0).all()
    assert batch["num_samples"] == 2 and int(batch["num_tokens"]) == 6


@pytest.mark.parametrize("collate", [collate_packed, lambda samples: collate_padded(samples, PAD)])
def test_the_batch_questions_see_only_the_real_samples(collate):
    plain = collate(SAMPLES)
    static = pad_to_static(plain, StaticShape(tokens=24, samples=9, longest=6), PAD)
    assert sample_count(static) == sample_count(plain) == 3
    assert sample_lengths(static).tolist() == sample_lengths(plain).tolist() == [4, 2, 5]
    real = torch.arange(plain["targets"].numel(), dtype=torch.float).view_as(plain["targets"])
    values = torch.zeros(static["targets"].shape)  # what a loss gives padding: nothing
    rows, width = real.shape
    values[:rows, :width] = real
    assert sum_per_sample(values, static).tolist() == sum_per_sample(real, plain).tolist()
    assert sample_ids(static).shape == static["targets"].shape


def test_a_batch_that_does_not_fit_the_shape_is_refused():
    with pytest.raises(ValueError, match="does not fit the static shape"):
        pad_to_static(collate_packed(SAMPLES), StaticShape(tokens=10, samples=8, longest=5), PAD)
    with pytest.raises(ValueError, match="does not fit the static shape"):
        pad_to_static(collate_packed(SAMPLES), StaticShape(tokens=20, samples=4, longest=5), PAD)


def test_every_micro_batch_of_every_epoch_gets_the_same_shapes(tokenizer):
    samples = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(120)]
    lengths = [len(sample["input_ids"]) for sample in samples]
    packs = pack_best_fit(lengths, 1024)
    shape = static_shape(lengths, packs, batch_size=3, packing=True)
    assert shape.tokens <= 3 * 1024 and shape.longest == max(lengths)
    seen = set()
    for epoch in range(4):
        for micro_batch in plan_epoch(packs, [1] * len(samples), batch_size=3, seed=7, epoch=epoch):
            members = [samples[index] for pack in micro_batch.packs for index in pack]
            batch = pad_to_static(collate_packed(members), shape, PAD)
            assert batch["num_samples"] == len(members)
            seen.add((tuple(batch["input_ids"].shape), len(batch["cu_seq_lens_q"]), batch["max_length_q"]))
    assert seen == {((1, shape.tokens), shape.samples + 1, shape.longest)}


def test_the_per_sample_operator_has_the_gradients_of_attention_sample_by_sample():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    bounds = torch.tensor([0, 5, 12, 12], dtype=torch.int32)  # the last sample is empty
    inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    out = per_sample_attention(*inputs, bounds, 0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    q, k, v = expected_inputs
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    parts = [torch.nn.functional.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :],
                                                              is_causal=True, scale=0.3) for a, b in ((0, 5), (5, 12))]  # fmt: skip
    expected = torch.cat(parts, dim=2)
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for got, want in zip(inputs, expected_inputs):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("packing", [True, False])
def test_the_loss_and_gradients_of_a_padded_batch_are_those_of_the_batch(tiny_model_dir, tokenizer, packing):
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="varlen")
    samples = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(3)]
    plain = collate_packed(samples) if packing else collate_padded(samples, PAD)
    longest = max(len(sample["input_ids"]) for sample in samples)
    shape = StaticShape(tokens=plain["input_ids"].shape[-1] + 2 * longest + 7, samples=6, longest=longest)
    if not packing:
        shape = StaticShape(tokens=longest + 9, samples=5, longest=longest + 9)
    static = pad_to_static(plain, shape, PAD)
    module = SFTModule(str(tiny_model_dir))
    module.model = model
    losses, gradients = [], []
    for batch in (plain, static):
        model.zero_grad()
        loss = module.loss(batch)
        loss.backward()
        losses.append(loss.detach())
        gradients.append([parameter.grad.clone() for parameter in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for padded_gradient, gradient in zip(*gradients[::-1]):
        torch.testing.assert_close(padded_gradient, gradient, rtol=1e-4, atol=1e-6)


def test_a_fit_with_static_shapes_trains_on_one_shape_with_the_same_losses(tmp_path, tiny_model_dir):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(40))

    def fit(static: bool):
        recipe = {
            "seed_everything": 0,
            "model": {"name_or_path": str(tiny_model_dir), "learning_rate": 1e-3},
            "data": {"sources": [str(chats)], "batch_size": 2, "max_length": 512, "packing": True,
                     "static_shapes": static},
            "trainer": {"accelerator": "cpu", "max_steps": 4, "logger": False, "enable_progress_bar": False,
                        "enable_checkpointing": False, "default_root_dir": str(tmp_path / str(static)),
                        "callbacks": [{"class_path": "batch_shapes.BatchShapes"}]},
            "checkpoint": {"save_end_of_training": False},
            "throughput": {"warmup_steps": 1},
        }  # fmt: skip
        cli = run(recipe, "fit")
        [shapes] = [callback for callback in cli.trainer.callbacks if type(callback).__name__ == "BatchShapes"]
        return shapes

    plain, static = fit(False), fit(True)
    assert len(set(plain.shapes)) > 1 and len(set(static.shapes)) == 1
    assert static.tokens == plain.tokens  # the padding is not counted
    torch.testing.assert_close(torch.tensor(static.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-5)
