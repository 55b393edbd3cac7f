"""Preference rows become pairs; each answer is scored after its prompt, alone; a pair never splits across
micro-batches, the validation hold-out or packing rows."""

import math

import pytest
from dpo_rows import gsm8k_pairs, write_jsonl
from lt_posttrain_dpo import Pair, PreferenceDataModule

from lt_posttrain import Source, UserError, is_packed, load_source_type

USER, ASSISTANT = "user", "assistant"


def turn(role, content):
    return {"role": role, "content": content}


def pair_of(row: dict, **source) -> Pair:
    return load_source_type(Source(name_or_path="pairs.jsonl", type="preference_pairs", **source)).pair(row, 0)


def test_rows_in_each_shape_become_pairs():
    plain = pair_of({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    four, five = [turn(ASSISTANT, "4")], [turn(ASSISTANT, "5")]
    assert (plain.prompt, plain.chosen, plain.rejected) == ([turn(USER, "2+2?")], four, five)
    assert len(plain.reference) == 2 and all(math.isnan(value) for value in plain.reference)  # none in the row
    chat = [turn("system", "Be brief."), turn(USER, "2+2?")]
    assert pair_of({"messages": chat, "chosen": "4", "rejected": "5"}).prompt == chat
    conversational = pair_of({"prompt": chat, "chosen": four, "rejected": five})  # TRL's conversational form
    assert (conversational.prompt, conversational.chosen, conversational.rejected) == (chat, four, five)
    whole = pair_of({"prompt": "2+2?", "chosen": [*chat, *four], "rejected": [*chat, *five]})
    assert (whole.prompt, whole.chosen, whole.rejected) == (chat, four, five)
    renamed = pair_of({"question": "2+2?", "good": "4", "bad": "5", "reference_chosen_logp": -1.5,
                       "reference_rejected_logp": -2.0}, input_key="question",
                      options={"chosen_key": "good", "rejected_key": "bad"})  # fmt: skip
    assert renamed.prompt == [turn(USER, "2+2?")] and renamed.reference == (-1.5, -2.0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x", "chosen": "a"}, r"no column 'rejected' \(options.rejected_key\)"),
        ({"chosen": "a", "rejected": "b"}, r"no prompt: give a 'messages' column"),
        ({"prompt": "x", "chosen": [turn(USER, "a")], "rejected": "b"}, r"the 'chosen' answer must end with an"),
        ({"prompt": "x", "chosen": 3, "rejected": "b"}, r"'chosen' must be text or a list of"),
        ({"prompt": [{"role": USER}], "chosen": "a", "rejected": "b"}, r"'prompt' must be text or a list of"),
    ],
)
def test_malformed_rows_are_one_line_errors(row, message):
    with pytest.raises(UserError, match=rf"^data source 'pairs.jsonl', row 0: {message}"):
        pair_of(row)


def setup_pairs(tokenizer, path, **options) -> PreferenceDataModule:
    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512, **options)
    data.connect(tokenizer)
    data.setup("fit")
    return data


def test_only_the_answer_carries_labels(tokenizer, tmp_path):
    history = [turn(USER, "Name a prime."), turn(ASSISTANT, "Seven."), turn(USER, "Another one?")]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": history, "chosen": "Eleven.", "rejected": "Nine."}])
    sample = setup_pairs(tokenizer, path, batch_size=1).train_samples[0]
    for side, answer in (("chosen", "Eleven."), ("rejected", "Nine.")):
        ids, labels = sample[f"{side}_input_ids"], sample[f"{side}_labels"]
        assert tokenizer.decode([i for i, label in zip(ids, labels) if label != -100]) == f"{answer}<|im_end|>"
        assert "Seven." in tokenizer.decode(ids)  # the earlier answer is context, without loss


@pytest.mark.parametrize("packing", [False, True])
def test_pairs_stay_together(tokenizer, tmp_path, packing):
    rows = gsm8k_pairs(12)
    data = setup_pairs(tokenizer, write_jsonl(tmp_path / "pairs.jsonl", rows), batch_size=2, packing=packing,
                       val_fraction=0.25)  # fmt: skip
    assert (len(data.train_samples), len(data.val_samples)) == (9, 3)  # whole pairs held out
    chosen_of = {row["chosen"]: row for row in rows}
    seen = 0
    for loader in (data.train_dataloader(), data.val_dataloader()):
        for batch in loader:
            sequences = split_sequences(batch)
            assert len(sequences) == 2 * batch["loss_count"]  # pairs, each chosen then rejected
            for chosen_ids, rejected_ids in zip(sequences[::2], sequences[1::2]):
                chosen, rejected = tokenizer.decode(chosen_ids), tokenizer.decode(rejected_ids)
                row = next(row for answer, row in chosen_of.items() if answer in chosen)
                assert row["prompt"] in chosen and row["prompt"] in rejected and row["rejected"] in rejected
                seen += 1
    assert seen == 12


def split_sequences(batch) -> list[list[int]]:
    if is_packed(batch):
        bounds, ids = batch["cu_seq_lens_q"].tolist(), batch["input_ids"][0].tolist()
        return [ids[start:end] for start, end in zip(bounds, bounds[1:])]
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_a_source_without_pairs_is_a_one_line_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [turn(USER, "hi"), turn(ASSISTANT, "hello")]}])
    data = PreferenceDataModule([str(path)])
    data.connect(tokenizer)
    with pytest.raises(UserError, match=r"type 'messages' reads one conversation per row; .* type to preference_pairs"):
        data.setup("fit")
