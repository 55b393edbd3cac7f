"""The reward model's loss equals TRL 1.16's on the same pairs and model, in float32 on CPU, to 1e-5.

The reference: ``trl.trainer.reward_trainer.RewardTrainer.compute_loss``, run by a ``RewardTrainer`` on a batch in
the form its ``DataCollatorForPreference`` gives (the chosen conversations, then the rejected ones, right-padded, and
``margin``), with and without ``center_rewards_coefficient``. Its model is the same ``...ForSequenceClassification``,
whose own forward reads each row's reward at the last token that is not padding: our rewards, padded or packed,
are those of that forward.
"""

import pytest
import torch
from lt_posttrain_reward import RewardModule, bradley_terry_losses
from reward_rows import SHORT_PAIRS, gsm8k_pairs, reward_data, write_jsonl

from lt_posttrain import is_packed

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", [*gsm8k_pairs(3), *SHORT_PAIRS])


def conversations(batch: dict) -> list[list[int]]:
    """The token ids of each conversation of a padded or packed batch, in order (chosen, rejected, chosen, ...)."""
    if is_packed(batch):
        bounds, ids = batch["cu_seq_lens_q"].tolist(), batch["input_ids"][0].tolist()
        return [ids[start:end] for start, end in zip(bounds, bounds[1:])]
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def trl_batch(batch: dict, pad_id: int) -> dict:
    """Our micro-batch as TRL's collator gives it: every chosen conversation, then every rejected one."""
    sequences = conversations(batch)
    ordered = [torch.tensor(ids) for ids in sequences[0::2] + sequences[1::2]]
    input_ids = torch.nn.utils.rnn.pad_sequence(ordered, batch_first=True, padding_value=pad_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(ids) for ids in ordered], batch_first=True)
    return {"input_ids": input_ids, "attention_mask": mask, "margin": batch["margin"]}


def trl_trainer(model, tokenizer, tmp_path, **config):
    import datasets
    from trl import RewardConfig, RewardTrainer

    rows = datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}])
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                        gradient_checkpointing=False, **config)  # fmt: skip
    return RewardTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)


@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_equals_trls_and_rewards_the_models_own(center, reward_model_dir, tokenizer, pairs_file, tmp_path):
    """Five pairs (three with a margin) in one micro-batch, padded and packed: the mean loss is TRL's
    ``RewardTrainer.compute_loss``, and each reward is what the Hugging Face model's forward gives that
    conversation alone."""
    from transformers import AutoModelForSequenceClassification

    module = RewardModule(str(reward_model_dir), center_rewards_coefficient=center)
    module.configure_model()
    theirs = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32)
    trainer = trl_trainer(theirs, tokenizer, tmp_path, center_rewards_coefficient=center)
    for packing in (False, True):
        batch = next(iter(reward_data(tokenizer, pairs_file, batch_size=5, packing=packing).train_dataloader()))
        assert batch["margin"].count_nonzero() == 3
        with torch.no_grad():
            losses, rewards = module.pair_losses(batch)
            expected = trainer.compute_loss(trainer.model, trl_batch(batch, tokenizer.pad_token_id))
            alone = [float(theirs(input_ids=torch.tensor([ids])).logits) for ids in conversations(batch)]
        assert float(losses.mean()) == pytest.approx(float(expected), abs=1e-5), f"{packing=}"
        assert rewards.flatten().tolist() == pytest.approx(alone, abs=1e-5), f"{packing=}"
        assert rewards.abs().max() > 0.1  # rewards that matter


def test_loss_function_identities():
    """``log 2`` where the rewards tie and no margin; a margin asks the chosen reward to exceed the rejected one by it;
    the centring term adds ``c * (r_c + r_r) ** 2``; the gradient raises the chosen reward and lowers the other."""
    rewards = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.0, -1.0]], requires_grad=True)
    plain = bradley_terry_losses(rewards)
    assert plain[0].item() == pytest.approx(0.6931472)
    margin = torch.tensor([0.0, 1.5, 1.0])
    assert bradley_terry_losses(rewards, margin)[1:].detach() == pytest.approx([0.6931472] * 2)
    centred = bradley_terry_losses(rewards, None, 0.1)
    assert (centred - plain).detach() == pytest.approx(0.1 * rewards.sum(-1).detach() ** 2)
    plain.sum().backward()
    assert (rewards.grad[:, 0] < 0).all() and (rewards.grad[:, 1] > 0).all()
