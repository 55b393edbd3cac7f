"""KTO's loss equals TRL 1.16's on the same micro-batch and models, in float32 on CPU, to 1e-5.

The reference: ``trl.trainer.kto_trainer.KTOTrainer.compute_loss`` (its ``_compute_loss``, where TRL 1.16 computes
the KL estimate and eq. 7's losses inline: there is no separate ``kto_loss`` function), run by a ``KTOTrainer`` on a
batch in the form its ``DataCollatorForUnpairedPreference`` gives: ``input_ids``, ``completion_mask``, ``label`` and
the mismatched ``KL_*`` sequences. The batch holds the same token ids and scored positions as ours (TRL's own
tokenization scores the newline after the end-of-turn token as well; ours scores the answer and its end-of-turn
token), and its mismatched pairs are ours: a step of one micro-batch rotates its answers as TRL's
``add_kl_completion_ids`` rotates a batch, ``(x_1, y_n), (x_2, y_1), ...``.
"""

import pytest
import torch
from kto_rows import SHORT_ROWS, gsm8k_rows, labelled_data, write_jsonl
from lt_posttrain_kto import KTOModule, kl_estimate, kto_losses, mismatched_partners

trl = pytest.importorskip("trl")

ROWS = 6


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", [*gsm8k_rows(ROWS - 2), *SHORT_ROWS])


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer):
    """Another tiny Llama (other random weights): a reference that differs from the trained model."""
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("other-llama"), tokenizer, seed=1)


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in rows], batch_first=True, padding_value=value)


def trl_batch(samples, order: list[int], pad_id: int) -> dict:
    """The samples ``order`` (one step's micro-batch) as TRL's collator gives them, the KL sequences paired as
    :func:`mismatched_partners` pairs them."""
    partners = mismatched_partners([(index,) for index in order])
    batch = {}
    for prefix, answer_of in (("", lambda index: index), ("KL_", lambda index: partners[index])):
        ids, masks = [], []
        for index in order:
            prompt, answer = samples[index], samples[answer_of(index)]
            start, answer_start = prompt["answer_start"], answer["answer_start"]
            ids.append(prompt["input_ids"][:start] + answer["input_ids"][answer_start:])
            masks.append([0] * start + [int(label != -100) for label in answer["labels"][answer_start:]])
        batch[f"{prefix}input_ids"] = pad(ids, pad_id)
        batch[f"{prefix}attention_mask"] = pad([[1] * len(row) for row in ids], 0)
        batch[f"{prefix}completion_mask"] = pad(masks, 0)
    batch["label"] = torch.tensor([bool(samples[index]["desirable"]) for index in order])
    return batch


def trl_trainer(model_dir, reference_dir, tokenizer, tmp_path, **config):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    rows = datasets.Dataset.from_list([{"prompt": "x", "completion": "a", "label": True},
                                       {"prompt": "y", "completion": "b", "label": False}])  # fmt: skip
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in (model_dir, reference_dir)]
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=ROWS, **config)  # fmt: skip
    return KTOTrainer(model=models[0], ref_model=models[1], args=args, train_dataset=rows, processing_class=tokenizer)


CASES = [  # (our keys, TRL's keys, the trained model and reference in both roles, layouts)
    ({"beta": 0.5}, {"beta": 0.5}, True, (False, True)),
    ({"beta": 0.2, "desirable_weight": 1.3, "undesirable_weight": 0.7},
     {"beta": 0.2, "desirable_weight": 1.3, "undesirable_weight": 0.7}, False, (False,)),
    ({"beta": 0.3, "loss_type": "apo_zero_unpaired"}, {"beta": 0.3, "loss_type": "apo_zero_unpaired"}, False, (True,)),
]  # fmt: skip


@pytest.mark.parametrize(("ours", "theirs", "both_ways", "layouts"), CASES, ids=["kto", "kto-weighted", "apo-zero"])
def test_loss_and_kl_equal_trls(ours, theirs, both_ways, layouts, tiny_model_dir, other_model_dir, tokenizer,
                                rows_file, tmp_path):  # fmt: skip
    """A step of one micro-batch of six answers (four desirable, two not), padded or packed, against TRL's
    ``KTOTrainer.compute_loss``; for ``kto``, with the trained model and the reference in both roles: the KL estimate
    is positive one way and clamped to 0 the other."""
    kls = []
    roles = [(tiny_model_dir, other_model_dir), (other_model_dir, tiny_model_dir)][: 2 if both_ways else 1]
    for model_dir, reference_dir in roles:
        module = KTOModule(str(model_dir), reference_name_or_path=str(reference_dir), **ours)
        module.configure_model()
        trainer = trl_trainer(model_dir, reference_dir, tokenizer, tmp_path, **theirs)
        for packing in layouts:
            data = labelled_data(tokenizer, rows_file, batch_size=ROWS, packing=packing)
            batch = next(iter(data.train_dataloader()))
            order = [index for pack in (data.train_packs if packing else [[i] for i in range(ROWS)]) for index in pack]
            with torch.no_grad():
                losses, _, kl = module.answer_losses(batch, training=False)
                expected = trainer.compute_loss(trainer.model, trl_batch(data.train_samples, order,
                                                                         tokenizer.pad_token_id))  # fmt: skip
                # An answer's log-probability is a float32 sum of token values, hundreds of nats (a random model's
                # ~11 a token), where float32's spacing is ~3e-5 (~2e-4 for GSM8K's whole answers). TRL computes the
                # token values with its own head and attention, and packed we sum them in another order: the sums
                # agree to about that spacing, r and z0 (differences of two sums) to 2 spacings, and the loss, whose
                # slope in either is at most beta / 4 times the weight, to that much of 4 spacings (1e-5 or less).
                spacing = torch.finfo(torch.float32).eps * float(module.policy_logps(batch).abs().max())
            weight = max(ours.get("desirable_weight", 1.0), ours.get("undesirable_weight", 1.0))
            tolerance = max(1e-5, module.beta / 4 * weight * 4 * spacing)
            assert float(losses.sum()) / ROWS == pytest.approx(float(expected), abs=tolerance), f"{packing=}"
            if module.loss_type == "kto":
                mode = "train" if trainer.model.training else "eval"
                assert float(kl) == pytest.approx(trainer._metrics[mode]["kl"][-1], abs=2 * spacing), f"{packing=}"
        kls.append(float(kl))
    if both_ways:
        assert max(kls) > 0.01 and min(kls) == 0  # unclamped one way, clamped the other


def test_loss_function_identities():
    """The loss is 1/2 per answer where policy and reference agree and ``z0`` is 0; the weights scale each kind;
    the gradient raises a desirable answer and lowers an undesirable one; ``z0`` is the clamped mean."""
    policy = (-50 * torch.rand(6)).requires_grad_()
    desirable = torch.tensor([True, False, True, True, False, False])
    losses, rewards = kto_losses(policy, policy.detach(), desirable, torch.tensor(0.0), beta=0.1)
    assert torch.allclose(losses, torch.full((6,), 0.5)) and torch.equal(rewards, torch.zeros(6))
    weighted, _ = kto_losses(policy, policy.detach(), desirable, torch.tensor(0.0), 0.1, 2.0, 3.0)
    assert torch.allclose(weighted, torch.where(desirable, 1.0, 1.5))
    losses, _ = kto_losses(policy, policy.detach() + torch.randn(6), desirable, torch.tensor(0.3), beta=0.5)
    losses.sum().backward()
    assert (policy.grad[desirable] < 0).all() and (policy.grad[~desirable] > 0).all()  # descent: up, and down
    assert float(kl_estimate(torch.tensor(-3.0), torch.tensor(4.0))) == 0
    assert float(kl_estimate(torch.tensor(3.0), torch.tensor(4.0))) == pytest.approx(0.75)


def test_mismatched_partners_rotate_the_steps_answers():
    """Each prompt gets the answer of the sample before it in the step's order, the first the last's (TRL's
    ``(x_1, y_n), (x_2, y_1), ...``), packs flattened in order."""
    assert mismatched_partners([(4, 7), (2,), (9,)]) == {4: 9, 7: 4, 2: 7, 9: 2}
