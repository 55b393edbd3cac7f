"""Reward pairs: the row forms ``reward_pairs`` reads (the DPO plugin's pairs with a margin) and the batches: each
pair's chosen conversation, then its rejected one, the margins beside them."""

import pytest
from reward_rows import SHORT_PAIRS, reward_data, write_jsonl

from lt_posttrain import Source, UserError, load_source_type


def source_type(**source):
    return load_source_type(Source(name_or_path="pairs.jsonl", type="reward_pairs", **source))


def test_rows_and_margins():
    rows = source_type()
    user = {"role": "user", "content": "2+2?"}
    pair = rows.pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, 0)
    assert pair.prompt == [user] and pair.chosen == [{"role": "assistant", "content": "4"}]
    whole = rows.pair({"chosen": [user, {"role": "assistant", "content": "4"}],
                       "rejected": [user, {"role": "assistant", "content": "5"}]}, 1)  # fmt: skip
    assert whole.prompt == [user] and whole.rejected == [{"role": "assistant", "content": "5"}]
    assert rows.margin({"margin": 2}, 0) == 2.0 and rows.margin({"margin": None}, 0) == rows.margin({}, 0) == 0.0
    assert source_type(options={"margin_key": "gap"}).margin({"gap": 0.5, "margin": 9}, 0) == 0.5
    for bad in ("high", True, float("nan")):
        with pytest.raises(UserError, match=r"^data source 'pairs.jsonl', row 4: 'margin' must be a finite number"):
            rows.margin({"margin": bad}, 4)


@pytest.mark.parametrize("packing", [False, True])
def test_a_batch_holds_each_pairs_chosen_then_rejected_conversation(tokenizer, tmp_path, packing):
    data = reward_data(tokenizer, write_jsonl(tmp_path / "pairs.jsonl", SHORT_PAIRS), batch_size=2, packing=packing)
    batch = next(iter(data.train_dataloader()))
    text = tokenizer.decode(batch["input_ids"].flatten().tolist(), skip_special_tokens=False)
    assert text.index("2+2?") < text.index("4<|im_end|>") < text.index("5<|im_end|>") < text.index("Is 7 prime?")
    assert sorted(batch["margin"].tolist()) == [0.0, 1.5] and int(batch["loss_count"]) == 2
    assert (batch["targets"] == -100).all()  # no token is a target: a conversation is scored as a whole
