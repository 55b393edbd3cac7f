"""Labelled answers: the row forms ``labelled_completions`` reads and its one-line errors, and the mismatched
sequences of KTO's KL estimate: each prompt of the step followed by the answer before it in the step's order, carried
by the step's first micro-batch on each rank."""

import pytest
import torch
from kto_rows import SHORT_ROWS, gsm8k_rows, labelled_data, write_jsonl
from lt_posttrain_kto import LabelledCompletion

from lt_posttrain import IGNORE_INDEX, MicroBatch, Source, UserError, is_packed, load_source_type


def labelled(row: dict, **source):
    return load_source_type(Source(name_or_path="rows.jsonl", type="labelled_completions", **source)).labelled(row, 3)


def test_rows_as_text_turns_or_messages():
    user, answer = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    expected = LabelledCompletion([user], [answer], True)
    assert labelled({"prompt": "2+2?", "completion": "4", "label": True}) == expected
    assert labelled({"prompt": [user], "completion": [answer], "label": 1}) == expected  # TRL's conversational form
    assert labelled({"messages": [user], "completion": "4", "label": True}) == expected
    assert labelled({"question": "2+2?", "answer": "4", "good": 0}, input_key="question",
                    options={"completion_key": "answer", "label_key": "good"}) == LabelledCompletion([user], [answer],
                                                                                                   False)  # fmt: skip


@pytest.mark.parametrize(("row", "problem"), [
    ({"prompt": "2+2?", "completion": "4", "label": "yes"}, "'label' must be true (a desirable answer) or false"),
    ({"prompt": "2+2?", "completion": "4"}, "no column 'label' (options.label_key)"),
    ({"completion": "4", "label": True}, "no prompt: give a 'messages' column of turns or a 'prompt' column"),
    ({"prompt": "2+2?", "completion": [{"role": "user", "content": "4"}], "label": True},
     "the 'completion' answer must end with an assistant turn"),
])  # fmt: skip
def test_malformed_rows_are_one_line_errors(row, problem):
    with pytest.raises(UserError) as error:
        labelled(row)
    assert str(error.value).startswith(f"data source 'rows.jsonl', row 3: {problem}") and "\n" not in str(error.value)


def test_the_steps_first_micro_batch_carries_its_mismatched_sequences(tokenizer, tmp_path):
    """A step of two micro-batches of two answers (samples 2, 0 then 3, 1, as a shuffled plan would order them): the
    first carries one batch of mismatched sequences per micro-batch of the step, each prompt followed by the answer
    of the sample before it in the step (2 gets 1's, 0 gets 2's, 3 gets 0's, 1 gets 3's), labels on that answer only;
    the second carries none. Padded and packed alike."""
    path = write_jsonl(tmp_path / "rows.jsonl", [*gsm8k_rows(2), *SHORT_ROWS])
    for packing in (False, True):
        data = labelled_data(tokenizer, path, batch_size=2, packing=packing)
        samples, dataset = data.train_samples, data.batch_dataset(data.train_samples)
        step = (((2,), (0,)), ((3,), (1,)))
        first, second = (dataset[MicroBatch(packs, 2, 4, ((2,), (0,), (3,), (1,)), step)] for packs in step)
        assert second["kl_batches"] == [] and len(first["kl_batches"]) == 2
        assert first["desirable"].tolist() == [bool(samples[i]["desirable"]) for i in (2, 0)]
        pairs = [(2, 1), (0, 2), (3, 0), (1, 3)]
        sequences = [sequence for kl_batch in first["kl_batches"] for sequence in split(kl_batch)]
        for (prompt, answer), (input_ids, targets) in zip(pairs, sequences):
            prompt_part = samples[prompt]["input_ids"][: samples[prompt]["answer_start"]]
            answer_part = samples[answer]["input_ids"][samples[answer]["answer_start"] :]
            assert input_ids == prompt_part + answer_part
            scored = [token for token in targets if token != IGNORE_INDEX]
            assert scored == [token for token in samples[answer]["labels"] if token != IGNORE_INDEX]
            assert targets[: len(prompt_part) - 1] == [IGNORE_INDEX] * (len(prompt_part) - 1)


def split(batch: dict) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, targets)`` of each sequence of a padded or packed batch, padding left out."""
    if is_packed(batch):
        bounds = batch["cu_seq_lens_q"].tolist()
        ids, targets = batch["input_ids"][0].tolist(), batch["targets"][0].tolist()
        return [(ids[a:b], targets[a:b]) for a, b in zip(bounds, bounds[1:])]
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [(row[:n], target[:n]) for row, target, n in zip(batch["input_ids"].tolist(), batch["targets"].tolist(),
                                                             lengths)]  # fmt: skip


def test_mismatched_sequences_are_cut_to_max_length(tokenizer, tmp_path):
    """A long prompt followed by a long answer is cut to ``max_length`` as any sample is."""
    path = write_jsonl(tmp_path / "rows.jsonl", [*gsm8k_rows(3)])
    data = labelled_data(tokenizer, path, batch_size=3)
    dataset = data.batch_dataset(data.train_samples)
    dataset.max_length = 40
    batch = dataset[MicroBatch(((0,), (1,), (2,)), 3, 3)]  # made outside a plan: a step of its own
    assert batch["kl_batches"][0]["input_ids"].shape[1] == 40
    assert torch.equal(batch["input_ids"], next(iter(data.train_dataloader()))["input_ids"])
