"""A source's masking mode (``mask``, ``train_end_of_turn``), plain text rows (``type: text``) and per-message
``train`` / ``weight`` fields, on the test tokenizer's template and on real ones."""

import json

import pytest

from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.data.dataset import load_samples, tokenize_rows
from lt_posttrain.data.sources import Source, load_rows
from lt_posttrain.data.tokenize import (
    IGNORE_INDEX,
    Masking,
    render_in_one_pass,
    render_turn_by_turn,
    template_renderer,
    tokenize_conversation,
)
from lt_posttrain.errors import UserError
from lt_posttrain.testing import real_chat_template

from conftest import write_jsonl
from test_real_templates import model_tokenizer, trained_texts  # noqa: F401 (a fixture)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]
TEMPLATES = [None, "qwen3_training", "phi3", "llama3", "qwen3"]


def samples_of(messages, tokenizer, template, masking):
    chat_template = real_chat_template(template) if template else None
    return tokenize_conversation(messages, tokenizer, 4096, chat_template, masking)


@pytest.mark.parametrize("template", TEMPLATES)
def test_last_assistant_trains_the_last_answer_only(model_tokenizer, template):
    every = samples_of(CHAT, model_tokenizer, template, Masking())
    last = samples_of(CHAT, model_tokenizer, template, Masking("last_assistant"))
    assert len(last) == 1 and last[0]["input_ids"] == every[-1]["input_ids"]  # the whole conversation as context
    assert trained_texts(last[0], model_tokenizer) == trained_texts(every[-1], model_tokenizer)[-1:]
    assert "Madrid." in trained_texts(last[0], model_tokenizer)[0]


@pytest.mark.parametrize("template", TEMPLATES)
def test_all_tokens_trains_the_whole_rendering(model_tokenizer, template):
    chat = CHAT + [{"role": "user", "content": "Thanks!"}]  # a trailing turn is kept: it is text to learn too
    [sample] = samples_of(chat, model_tokenizer, template, Masking("all_tokens"))
    render = template_renderer(model_tokenizer, real_chat_template(template) if template else None)
    assert model_tokenizer.decode(sample["input_ids"]) == render(chat, False)
    assert sample["labels"] == [IGNORE_INDEX] + sample["input_ids"][1:]


@pytest.mark.parametrize("template", [None, "qwen3_training", "phi3", "llama3"])
def test_end_of_turn_not_trained(model_tokenizer, template):
    [sample] = samples_of(CHAT, model_tokenizer, template, Masking(train_end_of_turn=False))
    think = "<think>\n\n</think>\n\n" if template == "qwen3_training" else ""
    assert trained_texts(sample, model_tokenizer) == [think + answer for answer in ("Paris.", "Rome.", "Madrid.")]
    # the one pass and the turn-by-turn renderings agree on it
    render = template_renderer(model_tokenizer, real_chat_template(template) if template else None)
    one = render_in_one_pass(CHAT, render, Masking(train_end_of_turn=False))
    reference = render_turn_by_turn(CHAT, render, Masking(train_end_of_turn=False))
    assert [(p.text, p.spans) for p in one] == [(p.text, p.spans) for p in reference]


@pytest.mark.parametrize("template", [None, "phi3", "llama3"])
def test_field_mode_trains_and_weighs_per_message(model_tokenizer, template):
    chat = [dict(message) for message in CHAT]
    chat[2]["train"] = False
    chat[4]["weight"] = 0.25
    for masking in (Masking("field"), Masking("field", train_end_of_turn=False)):
        [sample] = samples_of(chat, model_tokenizer, template, masking)
        texts = trained_texts(sample, model_tokenizer)
        assert len(texts) == 2 and texts[0].startswith("Rome.") and texts[1].startswith("Madrid.")
        weights = {label: weight for label, weight in zip(sample["labels"], sample["token_weights"]) if label != -100}
        assert len(sample["token_weights"]) == len(sample["input_ids"])
        rome = [w for label, w in zip(sample["labels"], sample["token_weights"]) if label != IGNORE_INDEX][:2]
        assert rome == [0.25, 0.25] and 1.0 in weights.values()
        assert all(w == 0 for label, w in zip(sample["labels"], sample["token_weights"]) if label == IGNORE_INDEX)
    # without mask: field, the fields are ignored
    [plain] = samples_of(chat, model_tokenizer, template, Masking())
    assert len(trained_texts(plain, model_tokenizer)) == 3 and "token_weights" not in plain


def test_token_weights_reach_the_targets_shifted():
    samples = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "token_weights": [0.0, 0.0, 0.5, 0.5]},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "token_weights": [0.0, 2.0, 2.0], "weight": 3.0},
    ]
    packed = collate_packed(samples)
    assert packed["targets"].tolist() == [[-100, 3, 4, -100, 6, 7, -100]]
    assert packed["target_weights"].tolist() == [[0.0, 0.5, 0.5, 0.0, 6.0, 6.0, 0.0]]
    padded = collate_padded(samples, pad_id=0)
    assert padded["target_weights"].tolist() == [[0.0, 0.5, 0.5, 0.0], [6.0, 6.0, 0.0, 0.0]]


def test_field_values_are_checked(tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [*CHAT[:2], {**CHAT[2], "weight": "high"}]}])
    source = Source(name_or_path=str(bad), mask="field")
    with pytest.raises(UserError, match=r"bad.jsonl.*row 0: message 2: 'weight' must be a number"):
        tokenize_rows(load_rows(source), source, tokenizer, 512, None)


def test_text_rows_train_every_token_and_the_end_of_sequence(tokenizer, tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Second document.", ""]
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": text} for text in texts])
    samples, dropped = load_samples([Source(name_or_path=str(path), type="text")], tokenizer, 512, None)
    assert len(samples) == 2 and sum(dropped.values()) == 1
    for sample, text in zip(samples, texts):
        ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert sample["input_ids"] == ids and sample["labels"] == [IGNORE_INDEX] + ids[1:]
    with pytest.raises(UserError, match="type text.*mask 'last_assistant'"):
        load_samples([Source(name_or_path=str(path), type="text", mask="last_assistant")], tokenizer, 512, None)


def test_every_mode_is_cached_apart_and_mixes_with_others(tokenizer, tmp_path):
    chat = [dict(message) for message in CHAT]
    chat[4]["weight"] = 0.5
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat}] * 3)
    loss = {}
    for mask in ("all_assistant", "last_assistant", "all_tokens", "field"):
        samples, _ = load_samples([Source(name_or_path=str(path), mask=mask)], tokenizer, 512, None)
        loss[mask] = samples["loss_count"][0]
    assert loss["last_assistant"] < loss["all_assistant"] == loss["field"] < loss["all_tokens"]
    # a source with token weights mixes with one without: those weigh 1 a token
    sources = [Source(name_or_path=str(path), mask="field"), Source(name_or_path=str(path))]
    samples, _ = load_samples(sources, tokenizer, 512, None)
    assert samples["token_weights"][3] == [1.0] * samples["length"][3]
    assert 0.5 in samples["token_weights"][0]
