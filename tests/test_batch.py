"""The batch contract: the same samples padded or packed give the same per-sample answers (lengths, sums,
log-probabilities), and those answers match a computation sample by sample."""

import pytest
import torch

from lt_posttrain.batch import IGNORE_INDEX, is_packed, sample_count, sample_ids, sample_lengths, sum_per_sample
from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.training.losses import sequence_logps, token_cross_entropy_sum, token_logps

VOCAB = 13


@pytest.fixture
def samples() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in (5, 2, 7):
        input_ids = torch.randint(VOCAB, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX if position < 2 else token for position, token in enumerate(input_ids)]
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples


def layouts(samples: list[dict]) -> dict:
    return {"padded": collate_padded(samples, pad_id=0), "packed": collate_packed(samples)}


def logits_for(batch: dict, per_sample: list[torch.Tensor]) -> torch.Tensor:
    """The per-sample logits laid out as ``batch`` lays out its samples (padding gets logits that must not count)."""
    if is_packed(batch):
        return torch.cat(per_sample).unsqueeze(0)
    return torch.nn.utils.rnn.pad_sequence(per_sample, batch_first=True, padding_value=7.0)


def test_layout_questions_have_the_same_answers_padded_and_packed(samples):
    for name, batch in layouts(samples).items():
        assert is_packed(batch) == (name == "packed")
        assert sample_count(batch) == 3
        assert sample_lengths(batch).tolist() == [5, 2, 7]
        ids = sample_ids(batch)
        assert ids.shape == batch["targets"].shape
        if is_packed(batch):
            assert ids.flatten().tolist() == [0] * 5 + [1] * 2 + [2] * 7
        else:
            assert ids.tolist() == [[row] * 7 for row in range(3)]


def test_sum_per_sample_adds_each_samples_positions(samples):
    for batch in layouts(samples).values():
        values = (batch["targets"] != IGNORE_INDEX).float()  # a sample's targets: its labels but the first, shifted
        expected = [sum(label != IGNORE_INDEX for label in sample["labels"][1:]) for sample in samples]
        assert sum_per_sample(values, batch).tolist() == expected


def test_log_probabilities_of_the_targets_sample_by_sample(samples):
    generator = torch.Generator().manual_seed(1)
    per_sample = [torch.randn(len(sample["input_ids"]), VOCAB, generator=generator) for sample in samples]
    expected = []
    for sample, logits in zip(samples, per_sample):
        targets = sample["labels"][1:] + [IGNORE_INDEX]  # position i predicts label i + 1
        logps = logits.log_softmax(-1)
        expected.append(sum(float(logps[i, t]) for i, t in enumerate(targets) if t != IGNORE_INDEX))
    for batch in layouts(samples).values():
        logits = logits_for(batch, per_sample)
        assert sequence_logps(logits, batch).tolist() == pytest.approx(expected, rel=1e-6)
        per_token = token_logps(logits, batch["targets"])
        assert per_token.shape == batch["targets"].shape
        assert (per_token[batch["targets"] == IGNORE_INDEX] == 0).all()
        # SFT's loss is the same sum, negated, over every sample
        assert float(token_cross_entropy_sum(logits, batch["targets"])) == pytest.approx(-sum(expected), rel=1e-6)
