"""ORPO's and SimPO's losses equal TRL 1.16's on the same pairs and model, in float32 on CPU, to 1e-5.

The references, run as TRL runs them:

- ORPO: ``trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`` (its ``concatenated_forward`` and
  ``odds_ratio_loss``), and ``odds_ratio_loss`` alone for the odds-ratio term;
- SimPO: ``trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics`` with ``loss_type="simpo"`` (its ``cpo_loss``),
  plain (``cpo_alpha=0``) and CPO-SimPO (``cpo_alpha > 0``, label smoothing).

TRL's supervised term is a mean over the tokens of the whole micro-batch's chosen sequences; here it is each pair's
own mean (the ORPO paper's per-pair expectation), so the step's loss does not change with the batching. The two agree
on a micro-batch of one pair, which is what the whole-loss comparisons use; the per-pair terms are compared on
micro-batches of several pairs.
"""

import pytest
import torch
from lt_posttrain_reference_free import ORPOModule, SimPOModule, orpo_losses, simpo_losses
from reference_free_rows import SHORT_PAIRS, gsm8k_pairs, pairs_data, write_jsonl

from lt_posttrain import is_packed

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", [*gsm8k_pairs(3), *SHORT_PAIRS])


def trl_batch(samples: list[dict], pad_id: int) -> dict:
    """Pairs as TRL's preference collator gives them: right-padded chosen and rejected tensors, labels ``-100`` off
    the answer."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [torch.tensor(sample[f"{side}_input_ids"]) for sample in samples]
        labels = [torch.tensor(sample[f"{side}_labels"]) for sample in samples]
        batch[f"{side}_input_ids"] = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id)
        batch[f"{side}_labels"] = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
        batch[f"{side}_attention_mask"] = (torch.nn.utils.rnn.pad_sequence(
            [torch.ones_like(each) for each in ids], batch_first=True, padding_value=0))  # fmt: skip
    return batch


def trl_trainer(kind: str, model, tokenizer, tmp_path, **config):
    """A TRL trainer around ``model`` (the dataset only satisfies its constructor)."""
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "x", "chosen": "a", "rejected": "b"}])
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    args = Config(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **config)
    return Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)


CASES = [
    ("orpo", {"beta": 0.2}, {"beta": 0.2}),
    ("simpo", {"beta": 2.0, "gamma": 0.7}, {"beta": 2.0, "simpo_gamma": 0.7, "loss_type": "simpo", "cpo_alpha": 0.0}),
    ("simpo", {"beta": 2.5, "gamma": 1.2, "label_smoothing": 0.1, "sft_weight": 0.5},
     {"beta": 2.5, "simpo_gamma": 1.2, "loss_type": "simpo", "label_smoothing": 0.1, "cpo_alpha": 0.5}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "ours", "theirs"), CASES, ids=["orpo", "simpo", "cpo-simpo"])
def test_loss_of_each_pair_equals_trl(kind, ours, theirs, tiny_model_dir, tokenizer, pairs_file, tmp_path):
    """Our whole loss of each pair, padded (one pair a micro-batch) and packed (several pairs a row), equals TRL's
    ``get_batch_loss_metrics`` on that pair alone."""
    from transformers import AutoModelForCausalLM

    module = (ORPOModule if kind == "orpo" else SimPOModule)(str(tiny_model_dir), **ours)
    module.configure_model()
    trl_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = trl_trainer(kind, trl_model, tokenizer, tmp_path, **theirs)
    samples = pairs_data(tokenizer, pairs_file, batch_size=1).train_samples
    expected = [trainer.get_batch_loss_metrics(trl_model, trl_batch([sample], tokenizer.pad_token_id))[0].item()
                for sample in samples]  # fmt: skip
    index_of = {tuple(sample["chosen_input_ids"]): index for index, sample in enumerate(samples)}
    for packing in (False, True):
        losses = [None] * len(samples)
        with torch.no_grad():
            for batch in pairs_data(tokenizer, pairs_file, batch_size=1, packing=packing).train_dataloader():
                for chosen, loss in zip(chosen_sequences(batch), module.pair_losses(batch)[0].tolist()):
                    losses[index_of[chosen]] = loss
        assert losses == pytest.approx(expected, abs=1e-5), f"{packing=}"


def chosen_sequences(batch: dict) -> list[tuple]:
    """The token ids of each pair's chosen sequence (packing places pairs in another order than the rows')."""
    if is_packed(batch):
        bounds, ids = batch["cu_seq_lens_q"].tolist(), batch["input_ids"][0].tolist()
        return [tuple(ids[start:end]) for start, end in zip(bounds[:-1:2], bounds[1::2])]
    chosen = zip(batch["input_ids"][::2], batch["attention_mask"][::2])
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in chosen]


def test_mean_logps_of_a_batch_of_pairs_equal_trls(tiny_model_dir, tokenizer, pairs_file, tmp_path):
    """On a micro-batch of five pairs, packed, the tiled mean log-probabilities equal TRL's ``get_batch_logps``
    (``average_log_prob=True``) of the full logits, and ORPO's per-pair odds-ratio term TRL's ``odds_ratio_loss``."""
    from transformers import AutoModelForCausalLM

    module = ORPOModule(str(tiny_model_dir), beta=0.3)
    module.configure_model()
    trl_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = trl_trainer("orpo", trl_model, tokenizer, tmp_path, beta=0.3)
    data = pairs_data(tokenizer, pairs_file, batch_size=5, packing=True)
    batch = next(iter(data.train_dataloader()))
    index_of = {tuple(sample["chosen_input_ids"]): index for index, sample in enumerate(data.train_samples)}
    order = [index_of[chosen] for chosen in chosen_sequences(batch)]  # the pairs as packed
    theirs = trl_batch([data.train_samples[i] for i in order], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected, *_ = trainer.concatenated_forward(trl_model, theirs)
        scores = module.pair_scores(batch)
    assert scores.mean_logps == pytest.approx(torch.stack([chosen, rejected], -1), abs=1e-5)
    odds_ratio_terms = trainer.odds_ratio_loss(chosen, rejected)[0]  # beta * log sigmoid(log odds ratio)
    ours, _ = orpo_losses(scores.mean_logps, torch.zeros(5), beta=0.3)
    assert ours == pytest.approx(-odds_ratio_terms, abs=1e-5)


def test_loss_functions_equal_trls_near_certain_answers(tiny_model_dir, tokenizer, tmp_path):
    """Mean log-probabilities from -20 to -1e-6, where ``log(1 - exp(m))`` cancels unless computed with care: ORPO's
    term equals TRL's ``ORPOTrainer.odds_ratio_loss``, SimPO's TRL's ``CPOTrainer.cpo_loss`` (``loss_type="simpo"``),
    and both raise the chosen answer and lower the rejected one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    logps = -torch.logspace(-6, 1.3, 40).view(20, 2)[torch.randperm(20)]
    orpo = trl_trainer("orpo", model, tokenizer, tmp_path, beta=0.1)
    simpo = trl_trainer("simpo", model, tokenizer, tmp_path, beta=2.0, simpo_gamma=0.5, loss_type="simpo",
                        label_smoothing=0.2)  # fmt: skip
    chosen, rejected = logps[:, 0].clone(), logps[:, 1].clone()
    logps.requires_grad_(True)
    ours, _ = orpo_losses(logps, torch.zeros(20), beta=0.1)
    assert ours.detach() == pytest.approx(-orpo.odds_ratio_loss(chosen, rejected)[0], abs=1e-6)
    ours.sum().backward()
    assert (logps.grad[:, 0] < 0).all() and (logps.grad[:, 1] > 0).all()
    ours, _ = simpo_losses(logps.detach(), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert ours == pytest.approx(simpo.cpo_loss(chosen, rejected)[0], abs=1e-6)
