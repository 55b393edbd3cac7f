"""Label masks, token by token: only assistant turns (and their end-of-turn token) carry loss.

The expected ids and labels are built independently of the code under test: each piece of the expected text is
tokenized on its own and marked trained or not, and the pieces put together must give the same ids as the code.
"""

import pytest

from lt_posttrain.data.tokenize import (
    IGNORE_INDEX,
    RenderedConversation,
    count_loss_tokens,
    render_conversation,
    template_renderer,
    tokenize_conversation,
    tokenize_rendered,
)

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# A ChatML-like template that, like Qwen3 / DeepSeek-R1, drops ``<think>...</think>`` from every assistant turn but
# the last assistant turn of the conversation: adding a turn rewrites the history.
REWRITING_TEMPLATE = """{%- set ns = namespace(last=-1) -%}
{%- for m in messages %}{% if m['role'] == 'assistant' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor -%}
{%- for m in messages -%}
{%- set content = m['content'] -%}
{%- if m['role'] == 'assistant' and loop.index0 != ns.last and '</think>' in content -%}
{%- set content = content.split('<think>')[0] + content.split('</think>')[-1] -%}
{%- endif -%}
{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

# The same, but the think block is kept only when the assistant turn is the last message (a later user turn
# already rewrites it): the history changes at the user turn rather than at the assistant turn.
REWRITING_AT_USER_TEMPLATE = REWRITING_TEMPLATE.replace("loop.index0 != ns.last", "not loop.last")

# ChatML without a default system prompt and without any rewriting: every rendering is a prefix of the next.
PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def expected_sample(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels from ``(text, trained)`` pieces, each tokenized on its own; the first label is -100."""
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = ids_of(tokenizer, text)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    labels[0] = IGNORE_INDEX
    # the pieces must meet at token boundaries, or the expectation itself would be wrong
    assert input_ids == ids_of(tokenizer, "".join(text for text, _ in pieces))
    return input_ids, labels


def assert_sample(sample: dict, tokenizer, pieces: list[tuple[str, bool]]) -> None:
    input_ids, labels = expected_sample(tokenizer, pieces)
    assert sample["input_ids"] == input_ids
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    for index, (token, expected, actual) in enumerate(zip(tokens, labels, sample["labels"])):
        assert actual == expected, f"token {index} {token!r}: label {actual}, expected {expected}"
    assert len(sample["labels"]) == len(labels)
    assert sample["truncated"] == 0


def trained_runs(sample: dict) -> list[list[int]]:
    """The contiguous runs of trained token ids."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a trained label must be the token itself"
            current.append(token)
    if current:
        runs.append(current)
    return runs


def test_two_turn_chat_token_by_token(tokenizer):
    messages = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    # the real template's text, so the pieces below match what the model sees at inference
    assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert_sample(
        sample,
        tokenizer,
        [
            ("<|im_start|>system\nYou are a calculator.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("4<|im_end|>", True),
            ("\n", False),
        ],
    )
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"])
    trained = [token for token, label in zip(tokens, sample["labels"]) if label != IGNORE_INDEX]
    assert trained == ["4", "<|im_end|>"]
    assert trained_runs(sample) == [ids_of(tokenizer, "4<|im_end|>")]
    # the header right before the answer is masked, the newline after <|im_end|> too
    assert tokens[-7:] == ["<|im_start|>", "ass", "istant", "Ċ", "4", "<|im_end|>", "Ċ"]
    assert all(label == IGNORE_INDEX for label in sample["labels"][-7:-3])
    assert sample["labels"][-4] == IGNORE_INDEX and tokens[-4] == "Ċ"  # "\n" ending the assistant header
    assert sample["labels"][-1] == IGNORE_INDEX
    assert sample["labels"][0] == IGNORE_INDEX
    assert count_loss_tokens(sample["labels"]) == 2


def test_default_system_prompt_is_masked(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    assert_sample(
        sample,
        tokenizer,
        [(DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello!<|im_end|>", True), ("\n", False)],
    )


def test_answer_repeated_from_the_user_turn_is_trained_only_in_the_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "Repeat after me: the sky is blue"},
        {"role": "assistant", "content": "the sky is blue"},
    ]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    assert_sample(
        sample,
        tokenizer,
        [
            (DEFAULT_SYSTEM + "<|im_start|>user\nRepeat after me: the sky is blue<|im_end|>\n<|im_start|>assistant\n", False),
            ("the sky is blue<|im_end|>", True),
            ("\n", False),
        ],
    )
    # " sky is blue" has the same ids in both turns: the user's copy is masked, the assistant's is trained
    copy = ids_of(tokenizer, " sky is blue")
    ids = sample["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i : i + len(copy)] == copy]
    assert len(starts) == 2
    user_copy, assistant_copy = starts
    assert all(label == IGNORE_INDEX for label in sample["labels"][user_copy : user_copy + len(copy)])
    assert sample["labels"][assistant_copy : assistant_copy + len(copy)] == copy


def test_answer_identical_to_the_user_turn(tokenizer):
    messages = [{"role": "user", "content": "OK"}, {"role": "assistant", "content": "OK"}]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    assert_sample(
        sample,
        tokenizer,
        [(DEFAULT_SYSTEM + "<|im_start|>user\nOK<|im_end|>\n<|im_start|>assistant\n", False), ("OK<|im_end|>", True), ("\n", False)],
    )


def test_multi_turn_chat_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid, since 1561."},
    ]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    assert_sample(
        sample,
        tokenizer,
        [
            ("<|im_start|>system\nAnswer briefly.<|im_end|>\n", False),
            ("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Paris.<|im_end|>", True),
            ("\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Rome.<|im_end|>", True),
            ("\n<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Madrid, since 1561.<|im_end|>", True),
            ("\n", False),
        ],
    )
    runs = trained_runs(sample)
    assert [tokenizer.decode(run) for run in runs] == ["Paris.<|im_end|>", "Rome.<|im_end|>", "Madrid, since 1561.<|im_end|>"]
    # no header token is ever trained: every <|im_start|> and the role names after it are masked
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"])
    for index, token in enumerate(tokens):
        if token == "<|im_start|>":
            assert sample["labels"][index] == IGNORE_INDEX
            assert sample["labels"][index + 1] == IGNORE_INDEX
            assert sample["labels"][index + 2] == IGNORE_INDEX


def split_think(text: str) -> str:
    return text.split("<think>")[0] + text.split("</think>")[-1]


THINKING_CHAT = [
    {"role": "user", "content": "What is 3*4?"},
    {"role": "assistant", "content": "<think>3 fours are 12</think>12"},
    {"role": "user", "content": "Plus one?"},
    {"role": "assistant", "content": "<think>12 and 1 is 13</think>13"},
]


@pytest.mark.parametrize("template", [REWRITING_TEMPLATE, REWRITING_AT_USER_TEMPLATE], ids=["at-assistant", "at-user"])
def test_template_rewriting_history_cuts_the_conversation(tokenizer, template):
    # the template really rewrites history: rendering the whole chat is not the first turn's rendering continued
    render = template_renderer(tokenizer, template)
    assert not render(THINKING_CHAT, False).startswith(render(THINKING_CHAT[:2], False))
    assert "<think>3 fours" not in render(THINKING_CHAT, False)

    first, second = tokenize_conversation(THINKING_CHAT, tokenizer, max_length=512, chat_template=template)
    assert_sample(
        first,
        tokenizer,
        [
            ("<|im_start|>user\nWhat is 3*4?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>3 fours are 12</think>12<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert_sample(
        second,
        tokenizer,
        [
            ("<|im_start|>user\nWhat is 3*4?<|im_end|>\n<|im_start|>assistant\n", False),
            ("12<|im_end|>", False),  # the first turn as the template rewrites it: context only
            ("\n<|im_start|>user\nPlus one?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>12 and 1 is 13</think>13<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert [tokenizer.decode(run) for run in trained_runs(first)] == ["<think>3 fours are 12</think>12<|im_end|>"]
    assert [tokenizer.decode(run) for run in trained_runs(second)] == ["<think>12 and 1 is 13</think>13<|im_end|>"]
    assert "3 fours" not in tokenizer.decode(second["input_ids"])

    # the same cut at the level of characters
    parts = render_conversation(THINKING_CHAT, render)
    assert [[part.text[start:end] for start, end in part.spans] for part in parts] == [
        ["<think>3 fours are 12</think>12<|im_end|>"],
        ["<think>12 and 1 is 13</think>13<|im_end|>"],
    ]
    assert parts[1].text == render(THINKING_CHAT, False)


def test_template_rewriting_history_with_three_turns(tokenizer):
    messages = THINKING_CHAT + [
        {"role": "user", "content": "Times two?"},
        {"role": "assistant", "content": "<think>13 twice is 26</think>26"},
    ]
    samples = tokenize_conversation(messages, tokenizer, max_length=512, chat_template=REWRITING_TEMPLATE)
    assert len(samples) == 3
    answers = [message["content"] for message in messages if message["role"] == "assistant"]
    for index, (sample, answer) in enumerate(zip(samples, answers)):
        assert [tokenizer.decode(run) for run in trained_runs(sample)] == [answer + "<|im_end|>"]
        # earlier answers are in the context, without their think block
        text = tokenizer.decode(sample["input_ids"])
        for earlier in answers[:index]:
            assert split_think(earlier) + "<|im_end|>" in text
            assert earlier not in text


def test_prefix_consistent_template_gives_one_sample(tokenizer):
    render = template_renderer(tokenizer, PLAIN_CHATML)
    assert render(THINKING_CHAT, False).startswith(render(THINKING_CHAT[:2], False))
    [sample] = tokenize_conversation(THINKING_CHAT, tokenizer, max_length=512, chat_template=PLAIN_CHATML)
    assert_sample(
        sample,
        tokenizer,
        [
            ("<|im_start|>user\nWhat is 3*4?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>3 fours are 12</think>12<|im_end|>", True),
            ("\n<|im_start|>user\nPlus one?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>12 and 1 is 13</think>13<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_tool_turn_between_assistant_turns(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": 'get_weather("Paris")'},
        {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 21 degrees and clear."},
    ]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert_sample(
        sample,
        tokenizer,
        [
            (DEFAULT_SYSTEM + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
            ('get_weather("Paris")<|im_end|>', True),
            ('\n<|im_start|>tool\n{"temperature": 21, "sky": "clear"}<|im_end|>\n<|im_start|>assistant\n', False),
            ("It is 21 degrees and clear.<|im_end|>", True),
            ("\n", False),
        ],
    )
    text = tokenizer.decode(sample["input_ids"])
    assert text.index('get_weather("Paris")') < text.index("temperature") < text.index("It is 21")


def full_sample(tokenizer, messages):
    [sample] = tokenize_conversation(messages, tokenizer, max_length=10_000)
    return sample


def test_truncation_cuts_ids_and_labels(tokenizer):
    messages = [
        {"role": "user", "content": "Count to ten."},
        {"role": "assistant", "content": "one two three four five six seven eight nine ten"},
    ]
    full = full_sample(tokenizer, messages)
    assert full["truncated"] == 0
    total = len(full["input_ids"])
    prompt_length = len(ids_of(tokenizer, DEFAULT_SYSTEM + "<|im_start|>user\nCount to ten.<|im_end|>\n<|im_start|>assistant\n"))
    for max_length in (total, total - 1, prompt_length + 3, prompt_length, 5):
        [sample] = tokenize_conversation(messages, tokenizer, max_length=max_length)
        assert sample["input_ids"] == full["input_ids"][:max_length]
        assert sample["labels"] == full["labels"][:max_length]
        assert sample["truncated"] == total - max_length
    [sample] = tokenize_conversation(messages, tokenizer, max_length=prompt_length + 3)
    assert count_loss_tokens(sample["labels"]) == 3
    [sample] = tokenize_conversation(messages, tokenizer, max_length=total + 50)
    assert sample == full


def test_no_assistant_turn_gives_no_sample(tokenizer):
    assert tokenize_conversation([{"role": "user", "content": "Hello?"}], tokenizer, max_length=512) == []
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello?"}]
    assert tokenize_conversation(messages, tokenizer, max_length=512) == []


def test_empty_assistant_turn_still_trains_its_end_of_turn(tokenizer):
    messages = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    [sample] = tokenize_conversation(messages, tokenizer, max_length=512)
    assert trained_runs(sample) == [ids_of(tokenizer, "<|im_end|>")]


def test_trailing_user_turns_are_left_out(tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    trailing = chat + [{"role": "user", "content": "Tell me more."}, {"role": "user", "content": "Please?"}]
    [sample] = tokenize_conversation(trailing, tokenizer, max_length=512)
    assert sample == full_sample(tokenizer, chat)
    assert "Tell me more" not in tokenizer.decode(sample["input_ids"])


def test_first_label_is_masked_even_when_the_text_starts_with_an_answer(tokenizer):
    bare = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    [sample] = tokenize_conversation([{"role": "assistant", "content": "Hello world"}], tokenizer, 512, chat_template=bare)
    assert sample["input_ids"] == ids_of(tokenizer, "Hello world\n")
    assert sample["labels"] == [IGNORE_INDEX] + ids_of(tokenizer, " world") + [IGNORE_INDEX]
    assert count_loss_tokens(sample["labels"]) == 1


def test_tokenize_rendered_trains_tokens_whose_first_character_is_in_a_span(tokenizer):
    text = "alpha beta gamma delta"
    ids = ids_of(tokenizer, text)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["alpha", "Ġbeta", "Ġgamma", "Ġdelta"]
    # span " gamma" starts on the token boundary: that token is trained and nothing else
    start = text.index(" gamma")
    sample = tokenize_rendered(RenderedConversation(text, [(start, start + len(" gamma"))]), tokenizer, 100)
    expected = [label if token == "Ġgamma" else IGNORE_INDEX for token, label in zip(tokens, ids)]
    assert sample["labels"] == expected
    # a span starting inside a token does not train that token; one ending inside it still does
    start = text.index("amma")
    sample = tokenize_rendered(RenderedConversation(text, [(start, len(text))]), tokenizer, 100)
    assert sample["labels"] == [IGNORE_INDEX] * (len(ids) - 1) + [ids[-1]]
    sample = tokenize_rendered(RenderedConversation(text, [(text.index(" beta"), text.index(" beta") + 2)]), tokenizer, 100)
    assert [label != IGNORE_INDEX for label in sample["labels"]] == [token == "Ġbeta" for token in tokens]
    # two spans
    spans = [(text.index(" beta"), text.index(" gamma")), (text.index(" delta"), len(text))]
    sample = tokenize_rendered(RenderedConversation(text, spans), tokenizer, 100)
    assert [label != IGNORE_INDEX for label in sample["labels"]] == [token in ("Ġbeta", "Ġdelta") for token in tokens]


def test_leading_assistant_turn_trains_only_its_content(tokenizer):
    """A conversation that starts with the assistant (e.g. roles reversed by a mapping): the template's default
    system prompt and the assistant header stay masked."""
    messages = [
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": "4"},
    ]
    (sample,) = tokenize_conversation(messages, tokenizer, 512)
    assert_sample(
        sample,
        tokenizer,
        [
            (DEFAULT_SYSTEM + "<|im_start|>assistant\n", False),
            ("Hello! How can I help?<|im_end|>", True),
            ("\n<|im_start|>user\nAdd 2 and 2.<|im_end|>\n<|im_start|>assistant\n", False),
            ("4<|im_end|>", True),
            ("\n", False),
        ],
    )
