"""DPO's loss and log-probabilities as functions: the known identities of the loss, and one answer per sequence
whether the batch is padded or packed."""

import math

import pytest
import torch
from lt_posttrain_dpo import dpo_loss, sequence_logps

from lt_posttrain import StaticShape, collate_packed, collate_padded, pad_to_static


def test_loss_is_log_2_where_policy_equals_reference():
    logps = -100 * torch.rand(5, 2)
    losses, rewards = dpo_loss(logps, logps.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.equal(rewards, torch.zeros(5, 2))


def test_gradient_raises_the_chosen_and_lowers_the_rejected():
    policy = (-100 * torch.rand(4, 2)).requires_grad_()
    reference = -100 * torch.rand(4, 2)
    losses, rewards = dpo_loss(policy, reference, beta=0.5)
    losses.sum().backward()
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()  # descent: chosen up, rejected down
    margin = rewards[:, 0] - rewards[:, 1]
    expected = 0.5 * torch.sigmoid(-margin)  # d(-log sigmoid(m)) / d(m) = -sigmoid(-m), times beta
    expected = expected.detach()
    assert torch.allclose(policy.grad[:, 0], -expected) and torch.allclose(policy.grad[:, 1], expected)
    assert losses.detach() == pytest.approx(-torch.nn.functional.logsigmoid(margin).detach())


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_sequence_logps_sum_the_target_tokens_of_each_sequence(packing, static):
    torch.manual_seed(0)
    vocab, lengths = 11, [5, 3, 7]
    labels = [[-100, -100, *torch.randint(vocab, (n - 2,)).tolist()] for n in lengths]  # the first two: no loss
    samples = [{"input_ids": torch.randint(vocab, (n,)).tolist(), "labels": each} for n, each in zip(lengths, labels)]
    per_sample_logits = [torch.randn(n, vocab) for n in lengths]
    if packing:
        batch, logits = collate_packed(samples), torch.cat(per_sample_logits).unsqueeze(0)
    else:
        batch = collate_padded(samples, pad_id=0)
        logits = torch.nn.utils.rnn.pad_sequence(per_sample_logits, batch_first=True, padding_value=5.0)
    if static:  # data.static_shapes: padding samples (packed) or rows and columns (padded) after the sequences
        shape = StaticShape(tokens=24, samples=8, longest=7) if packing else StaticShape(10, 4, 10)
        batch = pad_to_static(batch, shape, pad_id=0)
        rows, width = logits.shape[:2]
        logits = torch.cat([logits, torch.randn(rows, batch["input_ids"].shape[1] - width, vocab)], dim=1)
        logits = torch.cat([logits, torch.randn(batch["input_ids"].shape[0] - rows, *logits.shape[1:])])
    expected = []
    for sample, sample_logits in zip(samples, per_sample_logits):
        targets = sample["labels"][1:] + [-100]  # position i predicts label i + 1
        logps = sample_logits.log_softmax(-1)
        expected.append(sum(logps[i, t] for i, t in enumerate(targets) if t != -100))
    assert sequence_logps(logits, batch) == pytest.approx(torch.stack(expected), rel=1e-6)
