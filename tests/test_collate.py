"""Collation of a micro-batch: padded ``[batch, longest]`` or packed into one padding-free row."""

import pytest
import torch

from lt_posttrain.batch import IGNORE_INDEX
from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.data.tokenize import tokenize_conversation

PAD = 2

# hand-made samples: labels[0] is deliberately *not* -100 in the second and third samples, so a shift across the
# packed boundary would show up as a trained target at the end of the previous sample
SAMPLES = [
    {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
    {"input_ids": [20, 21], "labels": [20, 21]},
    {"input_ids": [30, 31, 32, 33, 34, 35], "labels": [30, IGNORE_INDEX, 32, IGNORE_INDEX, 34, 35]},
]


def test_padded_layout():
    batch = collate_padded(SAMPLES, PAD)
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 13, PAD, PAD],
        [20, 21, PAD, PAD, PAD, PAD],
        [30, 31, 32, 33, 34, 35],
    ]
    assert batch["targets"].tolist() == [
        [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 32, IGNORE_INDEX, 34, 35, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
    assert int(batch["num_tokens"]) == 12
    assert "target_weights" not in batch
    assert "position_ids" not in batch


def test_padded_uses_the_given_pad_id():
    batch = collate_padded(SAMPLES[:2], pad_id=99)
    assert batch["input_ids"][1, 2:].tolist() == [99, 99]
    assert batch["targets"][1, 1:].tolist() == [IGNORE_INDEX] * 3
    assert int(batch["num_tokens"]) == 6


def test_packed_layout():
    batch = collate_packed(SAMPLES)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 30, 31, 32, 33, 34, 35]]
    # each sample's labels shifted by one inside the sample; its last position predicts nothing
    assert batch["targets"].tolist() == [
        [IGNORE_INDEX, 12, 13, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, 32, IGNORE_INDEX, 34, 35, IGNORE_INDEX]
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5]]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32
        assert batch[key].tolist() == [0, 4, 6, 12]
    assert batch["max_length_q"] == batch["max_length_k"] == 6
    assert int(batch["num_tokens"]) == 12
    assert "attention_mask" not in batch
    assert "target_weights" not in batch


def test_packed_never_predicts_across_a_boundary():
    batch = collate_packed(SAMPLES)
    targets = batch["targets"][0]
    boundaries = batch["cu_seq_lens_q"].tolist()
    for end in boundaries[1:]:
        assert targets[end - 1] == IGNORE_INDEX
    # a naive shift of the whole row would have trained the next sample's first token there
    naive = [label for sample in SAMPLES for label in sample["labels"]][1:] + [IGNORE_INDEX]
    assert naive[3] == 20 and naive[5] == 30
    assert targets.tolist() != naive


def test_packed_and_padded_agree_sample_by_sample():
    padded = collate_padded(SAMPLES, PAD)
    packed = collate_packed(SAMPLES)
    bounds = packed["cu_seq_lens_q"].tolist()
    for row, sample in enumerate(SAMPLES):
        length = len(sample["input_ids"])
        start, end = bounds[row], bounds[row + 1]
        assert end - start == length
        for key in ("input_ids", "targets"):
            assert packed[key][0, start:end].tolist() == padded[key][row, :length].tolist()


def test_weights_become_target_weights():
    weighted = [dict(SAMPLES[0], weight=0.5), dict(SAMPLES[1]), dict(SAMPLES[2], weight=2)]
    padded = collate_padded(weighted, PAD)
    assert padded["target_weights"].dtype == torch.float32
    assert padded["target_weights"].tolist() == [
        [0.5, 0.5, 0.5, 0.5, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # no weight: 1
        [2.0] * 6,
    ]
    packed = collate_packed(weighted)
    assert packed["target_weights"].tolist() == [[0.5] * 4 + [1.0] * 2 + [2.0] * 6]
    assert packed["target_weights"].shape == packed["targets"].shape


@pytest.fixture(scope="module")
def chat_samples(tokenizer) -> list[dict]:
    chats = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Green, like grass in spring."},
        ],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there! How can I help you today?"}],
    ]
    samples = [sample for chat in chats for sample in tokenize_conversation(chat, tokenizer, max_length=512)]
    assert len(samples) == 3
    assert len({len(sample["input_ids"]) for sample in samples}) == 3
    return samples


def test_real_samples_targets_are_the_next_label(chat_samples, tokenizer):
    padded = collate_padded(chat_samples, tokenizer.pad_token_id)
    packed = collate_packed(chat_samples)
    offset = 0
    for row, sample in enumerate(chat_samples):
        labels, length = sample["labels"], len(sample["input_ids"])
        for t in range(length):
            expected = labels[t + 1] if t + 1 < length else IGNORE_INDEX
            assert int(padded["targets"][row, t]) == expected
            assert int(packed["targets"][0, offset + t]) == expected
            if expected != IGNORE_INDEX:  # a trained target is the next input token
                assert expected == sample["input_ids"][t + 1]
        assert (padded["targets"][row, length:] == IGNORE_INDEX).all()
        offset += length
    trained = sum(sum(label != IGNORE_INDEX for label in sample["labels"][1:]) for sample in chat_samples)
    assert int((padded["targets"] != IGNORE_INDEX).sum()) == trained
    assert int((packed["targets"] != IGNORE_INDEX).sum()) == trained
    assert int(padded["num_tokens"]) == int(packed["num_tokens"]) == sum(len(s["input_ids"]) for s in chat_samples)


def test_packed_row_gives_the_same_logits_as_padded_batch(chat_samples, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    padded = collate_padded(chat_samples, tokenizer.pad_token_id)
    packed = collate_packed(chat_samples)
    with torch.no_grad():
        padded_logits = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).logits
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        # the same row without the per-sample positions: later samples attend to earlier ones
        flat_logits = model(input_ids=packed["input_ids"], use_cache=False).logits
    bounds = packed["cu_seq_lens_q"].tolist()
    for row, sample in enumerate(chat_samples):
        length = len(sample["input_ids"])
        start, end = bounds[row], bounds[row + 1]
        # each sample alone, as a reference for both layouts
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]
        torch.testing.assert_close(padded_logits[row, :length], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_logits[0, start:end], padded_logits[row, :length], atol=1e-5, rtol=0)
    # the check can fail: without position_ids the second sample's logits differ
    start, end = bounds[1], bounds[2]
    assert not torch.allclose(flat_logits[0, start:end], padded_logits[1, : end - start], atol=1e-3)
