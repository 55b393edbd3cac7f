"""Masks on real chat templates (Qwen3, Phi-3, Llama 3, Qwen2.5 as TRL ships them), against transformers' own
assistant masks where a template has ``{% generation %}`` markers.

The templates render with the SmolLM2 tokenizer given the special tokens of those models (``<|end|>``,
``<think>``, ...), as their own tokenizers have them, so that a token never straddles a template's marker.
"""

import json

import pytest

from lt_posttrain.data.tokenize import (
    IGNORE_INDEX,
    render_conversation,
    render_in_one_pass,
    render_turn_by_turn,
    template_renderer,
    tokenize_conversation,
)
from lt_posttrain.testing import real_chat_template

from conftest import SHAREGPT, TOKENIZER_DIR

SPECIAL_TOKENS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<think>", "</think>", "<|eot_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<tool_call>", "</tool_call>"]  # fmt: skip
# templates with generation markers, each beside the original it patches (None: no original without markers here)
TRAINING_TEMPLATES = ["qwen3_training", "phi3_training", "phi3_5_training", "llama3_training", "qwen2_5_training"]


@pytest.fixture(scope="module")
def model_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


def sharegpt(count: int) -> list[list[dict]]:
    roles = {"human": "user", "gpt": "assistant"}
    rows = json.loads(SHAREGPT.read_text())[:count]
    return [[{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]] for row in rows]


def trained_texts(sample: dict, tokenizer) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label == IGNORE_INDEX:
            runs, current = runs + [current] if current else runs, []
        else:
            current.append(token)
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def transformers_mask(messages: list[dict], tokenizer, template: str, tools=None) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    return out["input_ids"], out["assistant_masks"]


def assert_agrees_with_transformers(messages: list[dict], tokenizer, template: str, tools=None) -> None:
    """Every token transformers' mask trains is trained here too, except whitespace after an end-of-turn token or
    inside the assistant header (the model never has to generate it: the next header or the prompt supplies it);
    nothing else is trained here. The first token is never trained (nothing predicts it)."""
    [sample] = tokenize_conversation(messages, tokenizer, 100_000, chat_template=template, tools=tools)
    ids, mask = transformers_mask(messages, tokenizer, template, tools)
    assert sample["input_ids"] == ids
    mask = [0] + mask[1:]
    ours = [label != IGNORE_INDEX for label in sample["labels"]]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for index, (token, theirs, trained) in enumerate(zip(tokens, mask, ours)):
        if trained:
            assert theirs, f"token {index} {token!r} is trained here but not by transformers' mask"
        elif theirs:
            assert tokenizer.decode([ids[index]]).strip() == "", f"token {index} {token!r} is not trained here"
    assert sum(ours) >= sum(1 for message in messages if message["role"] == "assistant")


@pytest.mark.parametrize("name", TRAINING_TEMPLATES)
def test_masks_agree_with_transformers_on_the_sharegpt_set(model_tokenizer, name):
    template = real_chat_template(name)
    for messages in sharegpt(60):
        assert_agrees_with_transformers(messages, model_tokenizer, template)


@pytest.mark.parametrize("name", TRAINING_TEMPLATES)
def test_leading_assistant_turn_agrees_with_transformers(model_tokenizer, name):
    messages = [
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": "4"},
    ]
    assert_agrees_with_transformers(messages, model_tokenizer, real_chat_template(name))


def test_a_turn_is_masked_the_same_first_or_after_a_user_turn(model_tokenizer):
    """Qwen3's training template puts an empty think block before every answer: the model generates it, so it is
    trained, whether the turn opens the conversation or follows a user turn."""
    template = real_chat_template("qwen3_training")
    greeting = {"role": "assistant", "content": "Hello! How can I help?"}
    first = [greeting, {"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]
    later = [{"role": "user", "content": "Hi"}, greeting]
    [first_sample] = tokenize_conversation(first, model_tokenizer, 512, chat_template=template)
    [later_sample] = tokenize_conversation(later, model_tokenizer, 512, chat_template=template)
    answer = "<think>\n\n</think>\n\nHello! How can I help?<|im_end|>"
    assert trained_texts(first_sample, model_tokenizer) == [answer, "<think>\n\n</think>\n\n4<|im_end|>"]
    assert trained_texts(later_sample, model_tokenizer) == [answer]
    # the header before the think block stays masked
    text = model_tokenizer.decode(first_sample["input_ids"])
    assert text.startswith("<|im_start|>assistant\n<think>")


def test_end_of_sequence_added_at_the_end_only_keeps_the_conversation_whole(model_tokenizer):
    """Phi-3's template adds the end-of-sequence token after the last turn only: one sample, every answer trained
    up to its <|end|>, the end-of-sequence token once, after the last answer (as in Phi-3's training template)."""
    template = real_chat_template("phi3")
    assert "{% else %}{{ eos_token }}" in template
    messages = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    render = template_renderer(model_tokenizer, template)
    assert not render(messages, False).startswith(render(messages[:2], False))  # the suffix moves to the end
    [sample] = tokenize_conversation(messages, model_tokenizer, 512, chat_template=template)
    eos = model_tokenizer.eos_token
    assert trained_texts(sample, model_tokenizer) == ["Paris.<|end|>", f"Rome.<|end|>\n{eos}"]
    assert model_tokenizer.decode(sample["input_ids"]) == render(messages, False)
    trained_eos = [i for i, t in zip(sample["input_ids"], sample["labels"]) if t != IGNORE_INDEX and i == model_tokenizer.eos_token_id]
    assert len(trained_eos) == 1
    # the same masks as transformers' on Phi-3's training template (its markers around the same text)
    assert_agrees_with_transformers(messages, model_tokenizer, real_chat_template("phi3_training"))


@pytest.mark.parametrize("name", ["phi3", "phi3_5", "llama3", "qwen2_5", "qwen3_training"])
def test_prefix_consistent_templates_never_split_the_sharegpt_set(model_tokenizer, name):
    render = template_renderer(model_tokenizer, real_chat_template(name))
    for messages in sharegpt(500):
        assert len(render_conversation(messages, render)) == 1


def test_a_template_dropping_earlier_reasoning_still_splits(model_tokenizer):
    """Qwen3's own template gives the last answer an empty think block that a later user turn removes: a rewrite
    of a trained turn, so each answer is trained in its own sample, as the template renders it at inference."""
    render = template_renderer(model_tokenizer, real_chat_template("qwen3"))
    messages = sharegpt(20)
    multi = [m for m in messages if sum(turn["role"] == "assistant" for turn in m) > 1]
    assert multi
    for conversation in multi:
        parts = render_conversation(conversation, render)
        assert len(parts) == sum(turn["role"] == "assistant" for turn in conversation)
        for part in parts:
            start, end = part.spans[-1]
            assert part.text[start:end].startswith("<think>\n\n</think>\n\n")
            assert part.text[:start].endswith("<|im_start|>assistant\n")


# -- one pass against turn by turn ---------------------------------------------------------------------------------
ONE_PASS_TEMPLATES = ["qwen3_training", "phi3", "phi3_5", "llama3", "qwen2_5", "deepseek_r1_distill", "lfm2", "cohere"]


def same_parts(one, reference) -> bool:
    return [(part.text, part.spans) for part in one] == [(part.text, part.spans) for part in reference]


@pytest.mark.parametrize("name", ["smollm2", "qwen3", *ONE_PASS_TEMPLATES])
def test_one_pass_gives_the_turn_by_turn_spans(model_tokenizer, name):
    """On the ShareGPT set (with and without a system turn) and GSM8K: wherever the one-pass path answers, its
    texts and spans are the turn-by-turn ones; it answers for every conversation of a template that never rewrites
    an earlier turn, and for Qwen3's own template only where no later turn rewrites one."""
    from conftest import gsm8k_chats

    render = template_renderer(model_tokenizer, None if name == "smollm2" else real_chat_template(name))
    chats = sharegpt(500)
    chats += [[{"role": "system", "content": "Answer briefly."}, *chat] for chat in chats[:100]]
    chats += [row["messages"] for row in gsm8k_chats(200)]
    answered = 0
    for messages in chats:
        one = render_in_one_pass(messages, render)
        if one is not None:
            answered += 1
            assert same_parts(one, render_turn_by_turn(messages, render)), messages
    if name == "qwen3":
        single = sum(sum(message["role"] == "assistant" for message in chat) == 1 for chat in chats)
        assert answered == single
    else:
        assert answered == len(chats)


def test_one_pass_declines_templates_that_change_contents_or_rewrite_turns(model_tokenizer, tokenizer):
    from test_masks import PLAIN_CHATML, REWRITING_AT_USER_TEMPLATE, REWRITING_TEMPLATE, THINKING_CHAT

    chat = THINKING_CHAT * 2
    for template in (REWRITING_TEMPLATE, REWRITING_AT_USER_TEMPLATE):
        render = template_renderer(tokenizer, template)
        assert render_in_one_pass(chat, render) is None
        assert same_parts(render_conversation(chat, render), render_turn_by_turn(chat, render))
        assert len(render_conversation(chat, render)) == 4
    render = template_renderer(tokenizer, PLAIN_CHATML)
    assert same_parts(render_in_one_pass(chat, render), render_turn_by_turn(chat, render))
    # Llama 3 trims every content: a content with spaces around it is not rendered as given
    render = template_renderer(model_tokenizer, real_chat_template("llama3"))
    padded = [{**message, "content": f"  {message['content']} \n"} for message in chat]
    assert render_in_one_pass(padded, render) is None
    assert same_parts(render_conversation(padded, render), render_turn_by_turn(padded, render))
    # a content that holds the placeholder's character is rendered turn by turn
    marked = [*chat[:-1], {"role": "assistant", "content": "\ue000 13"}]
    assert render_in_one_pass(marked, render) is None
