"""The distillation loss equals TRL 1.16's ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (``beta=0``:
forward KL, ``beta=1``: reverse KL, between: the generalized JSD; with a temperature) in float32 on CPU, to 1e-5:
on logits, and on the same chats and models through the trainer, padded and packed, gradients included.

TRL's ``reduction="batchmean"`` divides the sum over the loss tokens by their number; so does the step here (over
the whole optimizer step), so one micro-batch's ``loss(batch) / loss_count`` is TRL's value.
"""

import pytest
import torch
from distill_rows import chat_data, gsm8k_chats, write_jsonl
from lt_posttrain_distill import DistillModule, tiled_divergence_sum, token_divergences

pytest.importorskip("trl")

# (ours, TRL's beta): the KLs are the ends of TRL's beta
SETTINGS = [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 0.5), ("jsd", 0.1, 0.1), ("jsd", 0.9, 0.9)]


def trl_loss(student_logits, teacher_logits, labels, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature, reduction="batchmean")  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("divergence", "beta", "trl_beta"), SETTINGS)
def test_token_divergences_equal_trls(divergence, beta, trl_beta, temperature):
    torch.manual_seed(0)
    student, teacher = 3 * torch.randn(2, 9, 40), 3 * torch.randn(2, 9, 40)
    labels = torch.randint(40, (2, 9))
    labels[0, :3] = labels[1, 6:] = -100
    ours = token_divergences(student, teacher, divergence, beta, temperature)
    mean = ours[labels != -100].sum() / (labels != -100).sum()
    assert mean.item() == pytest.approx(trl_loss(student, teacher, labels, trl_beta, temperature).item(), abs=1e-6)
    assert (ours >= -1e-6).all()  # a divergence
    assert token_divergences(student, student, divergence, beta, temperature).abs().max() < 1e-6


@pytest.mark.parametrize(("divergence", "beta", "softcap"), [("jsd", 0.3, None), ("forward_kl", 0.5, 4.0)])
def test_tiled_sum_and_its_gradients_equal_the_whole_logits(divergence, beta, softcap):
    """Tiles of 3 tokens, gradients computed in the forward pass: the value and the gradients of the hidden states,
    the head's weight and its bias are those of autograd through the whole logits."""
    torch.manual_seed(0)
    vocab, width, tokens = 30, 8, 10
    head = torch.nn.Linear(width, vocab)
    hidden = torch.randn(tokens, width, requires_grad=True)
    teacher = 2 * torch.randn(tokens, vocab)
    weights = torch.rand(tokens)
    tiled = tiled_divergence_sum(hidden, head, lambda start, end: teacher[start:end], weights, divergence, beta, 1.5,
                                 softcap, tile_bytes=4 * vocab * 3)  # fmt: skip
    (3 * tiled).backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    logits = head(hidden)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    whole = (token_divergences(logits, teacher, divergence, beta, 1.5) * weights).sum()
    (3 * whole).backward()
    assert tiled.item() == pytest.approx(whole.item(), rel=1e-6)
    for ours, theirs in zip(grads, [hidden.grad, head.weight.grad, head.bias.grad]):
        assert ours == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize(("divergence", "beta", "trl_beta", "packing"),
                         [(*SETTINGS[0], False), (*SETTINGS[1], True), (*SETTINGS[3], True)])  # fmt: skip
def test_trainer_loss_and_gradient_equal_trls(divergence, beta, trl_beta, packing, student_dir, teacher_dir,
                                              tokenizer, tmp_path):  # fmt: skip
    """Four chats in one micro-batch: the step's loss (``loss(batch) / loss_count``) and its gradient on the
    student's weights equal TRL's loss of both models' full logits, as ``GKDTrainer.compute_loss`` shifts them."""
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(4))
    batch = next(iter(chat_data(tokenizer, path, batch_size=4, packing=packing).train_dataloader()))
    module = DistillModule(str(student_dir), teacher_name_or_path=str(teacher_dir), divergence=divergence, beta=beta,
                           temperature=2.0)  # fmt: skip
    module.configure_model()
    loss = module.loss(batch) / batch["loss_count"]
    loss.backward()
    ours = {name: p.grad.clone() for name, p in module.model.named_parameters()}

    padded = next(iter(chat_data(tokenizer, path, batch_size=4).train_dataloader()))
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    labels = torch.cat([torch.full_like(padded["targets"][:, :1], -100), padded["targets"][:, :-1]], 1)
    expected = trl_loss(student(**inputs).logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:], trl_beta, 2.0)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, p in student.named_parameters():
        error = (ours[name] - p.grad).abs().max() / p.grad.abs().max()
        assert error < 1e-4, f"{name}: relative difference {error:.1e}"
