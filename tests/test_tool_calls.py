"""Tool calls, tool results and reasoning, on the real templates that render them (Qwen3, Qwen2.5, Qwen3.5, Llama
3.1, LFM2, GLM-4.5, Nemotron as TRL ships them): the calls are trained with their turn, the tool results never, the
reasoning where the template renders it unless ``train_reasoning`` is off; against transformers' assistant masks
where a template has ``{% generation %}`` markers, else on the exact trained text. And hub-shaped rows (xLAM,
APIGen-MT's ShareGPT, OpenAI messages) whose tools and arguments are JSON text become the same turns."""

import copy
import json
import re

import pytest

from lt_posttrain.data.dataset import load_samples, tokenize_rows
from lt_posttrain.data.prompts import prompt_of
from lt_posttrain.data.source_types import load_source_type
from lt_posttrain.data.sources import Source, load_rows
from lt_posttrain.data.tokenize import (
    IGNORE_INDEX,
    Masking,
    render_conversation,
    render_in_one_pass,
    render_turn_by_turn,
    template_renderer,
    tokenize_conversation,
)
from lt_posttrain.errors import UserError
from lt_posttrain.testing import real_chat_template

from conftest import TOKENIZER_DIR, write_jsonl
from test_real_templates import SPECIAL_TOKENS, assert_agrees_with_transformers, trained_texts

# the special tokens of the templates' own tokenizers, so that no token straddles a template's marker
TOOL_TOKENS = ["<|python_tag|>", "<|eom_id|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|observation|>",
               "[gMASK]", "<sop>", "<tool_response>", "</tool_response>", "<｜User｜>", "<｜Assistant｜>",
               "<｜end▁of▁sentence｜>"]  # fmt: skip
def function(name: str, description: str) -> dict:
    """A tool as OpenAI's API and transformers take it: a function of one string argument, ``city``."""
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


WEATHER, TIME = function("get_weather", "Current weather of a city"), function("get_time", "Local time of a city")
TOOLS = [WEATHER, TIME]


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# two user turns; parallel calls, a call after a call, a call with text, answers
TRIP = [
    {"role": "system", "content": "You are a travel helper."},
    {"role": "user", "content": "Weather in Paris and Rome, and the time in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two weather calls first.",
     "tool_calls": [call("get_weather", city="Paris"), call("get_weather", city="Rome")]},
    {"role": "tool", "name": "get_weather", "content": "Sunny, 24C"},
    {"role": "tool", "name": "get_weather", "content": "Rain, 18C"},
    {"role": "assistant", "content": "Now the time.", "reasoning_content": "Then the time.",
     "tool_calls": [call("get_time", city="Paris")]},
    {"role": "tool", "name": "get_time", "content": "It is 14:05."},
    {"role": "assistant", "content": "Paris: sunny, 24C, 14:05. Rome: rain, 18C.", "reasoning_content": "All in."},
    {"role": "user", "content": "And Berlin?"},
    {"role": "assistant", "content": "", "reasoning_content": "One more call.",
     "tool_calls": [call("get_weather", city="Berlin")]},
    {"role": "tool", "name": "get_weather", "content": "Cloudy, 15C"},
    {"role": "assistant", "content": "Berlin: cloudy, 15C.", "reasoning_content": "Done."},
]  # fmt: skip
RESULTS = ["Sunny, 24C", "Rain, 18C", "It is 14:05.", "Cloudy, 15C"]
REASONINGS = ["Two weather calls first.", "Then the time.", "All in.", "One more call.", "Done."]


def without_reasoning(chat: list[dict]) -> list[dict]:
    return [{key: value for key, value in message.items() if key != "reasoning_content"} for message in chat]


def one_call_a_turn(chat: list[dict]) -> list[dict]:
    """The conversation with one call a turn (Llama 3.1 makes one at a time) and no text beside a call (its
    template drops it)."""
    kept = []
    for message in chat:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": message["tool_calls"][:1], "content": ""}
        if message["role"] == "tool" and kept[-1]["role"] == "tool":
            continue
        kept.append(message)
    return kept


def agent_run(rounds: int, reasoning: bool = True) -> list[dict]:
    """One user turn, then ``rounds`` calls, each answered by a tool, then the answer: an agent's trace."""
    chat = [{"role": "system", "content": "You plan trips."}, {"role": "user", "content": f"Weather in {rounds} cities?"}]
    for number in range(rounds):
        turn = {"role": "assistant", "content": f"Checking city {number}.", "tool_calls": [call("get_weather", city=f"C{number}")]}
        if reasoning:
            turn["reasoning_content"] = f"City {number} next."
        chat += [turn, {"role": "tool", "content": f"Sunny, {20 + number}C"}]
    answer = {"role": "assistant", "content": f"All {rounds} cities are sunny."}
    return chat + [{**answer, "reasoning_content": "Summing up."} if reasoning else answer]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + TOOL_TOKENS})
    return tokenizer


def all_trained(samples: list[dict], tokenizer) -> str:
    return "|".join(text for sample in samples for text in trained_texts(sample, tokenizer))


def assert_results_and_tools_untrained(samples: list[dict], tokenizer) -> None:
    trained = all_trained(samples, tokenizer)
    for result in RESULTS:
        assert result not in trained
    assert "Current weather of a city" not in trained
    assert all("Current weather of a city" in tokenizer.decode(sample["input_ids"]) for sample in samples)


# -- against transformers' assistant masks ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["qwen3_training", "qwen2_5_training", "qwen3_instruct_2507_training", "qwen3_vl_training",
             "lfm2_v2_training", "glm4moe_training"]
)  # fmt: skip
def test_tool_calls_agree_with_transformers(tokenizer, name):
    """Multi-turn conversations with parallel and successive calls: the same trained tokens as transformers' mask
    on the template's generation markers (reasoning included where the template reads it). (Qwen3.5's and
    Nemotron's generation prompts open the think block, which is then not trained: see the one-pass test.)"""
    template = real_chat_template(name)
    reads_reasoning = name in ("qwen3_training", "glm4moe_training")
    chats = [agent_run(4, reasoning=reads_reasoning)]
    if name != "glm4moe_training":  # GLM drops the reasoning of turns before the last user turn (split below)
        chats.append(TRIP if reads_reasoning else without_reasoning(TRIP))
    for chat in chats:
        assert_agrees_with_transformers(chat, tokenizer, template, TOOLS)
    [sample] = tokenize_conversation(chats[0], tokenizer, 100_000, template, tools=TOOLS)
    trained = all_trained([sample], tokenizer)
    assert all(f"C{number}" in trained and f"Sunny, {20 + number}C" not in trained for number in range(4))


def test_qwen3_trains_the_calls_and_reasoning_and_never_the_results(tokenizer):
    """Qwen3's own template drops the reasoning of turns before the last user turn: each user turn's answers are
    trained in their own sample, with their reasoning, calls and end-of-turn; the tool results and the tools in the
    system prompt never."""
    samples = tokenize_conversation(TRIP, tokenizer, 4096, real_chat_template("qwen3"), tools=TOOLS)
    assert [trained_texts(sample, tokenizer) for sample in samples] == [
        [
            "<think>\nTwo weather calls first.\n</think>\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
            "<think>\nThen the time.\n</think>\n\nNow the time.\n<tool_call>\n"
            '{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            "<think>\nAll in.\n</think>\n\nParis: sunny, 24C, 14:05. Rome: rain, 18C.<|im_end|>",
        ],
        [
            "<think>\nOne more call.\n</think>\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>',
            "<think>\nDone.\n</think>\n\nBerlin: cloudy, 15C.<|im_end|>",
        ],
    ]
    assert_results_and_tools_untrained(samples, tokenizer)
    # the second sample renders the first user turn's answers as the template does then: without reasoning
    assert "Two weather calls first." not in tokenizer.decode(samples[1]["input_ids"])


def test_llama_3_1_trains_the_json_call(tokenizer):
    """Llama 3.1 (no generation markers) puts the tools in the first user turn and renders a call as bare JSON
    with ``parameters``; the results are ``ipython`` turns."""
    chat = one_call_a_turn(without_reasoning(TRIP))
    [sample] = tokenize_conversation(chat, tokenizer, 4096, real_chat_template("llama3_1"), tools=TOOLS)
    assert trained_texts(sample, tokenizer) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        '{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|>',
        "Paris: sunny, 24C, 14:05. Rome: rain, 18C.<|eot_id|>",
        '{"name": "get_weather", "parameters": {"city": "Berlin"}}<|eot_id|>',
        "Berlin: cloudy, 15C.<|eot_id|>",
    ]
    assert_results_and_tools_untrained([sample], tokenizer)
    assert "<|start_header_id|>ipython<|end_header_id|>" in tokenizer.decode(sample["input_ids"])


def test_a_template_error_is_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", [{"messages": without_reasoning(TRIP), "tools": TOOLS}])
    with pytest.raises(UserError, match=r"row 0: the chat template cannot render this conversation: This model "
                                        r"only supports single tool-calls at once!$"):  # fmt: skip
        tokenize_rows(load_rows(Source(str(path))), Source(str(path)), tokenizer, 4096, real_chat_template("llama3_1"))


# -- reasoning --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3_training", "qwen3", "glm4moe_training"])
def test_untrained_reasoning_leaves_the_answer_and_calls_trained(tokenizer, name):
    template = real_chat_template(name)
    trained = tokenize_conversation(TRIP, tokenizer, 4096, template, tools=TOOLS)
    untrained = tokenize_conversation(TRIP, tokenizer, 4096, template, Masking(train_reasoning=False), TOOLS)
    assert [sample["input_ids"] for sample in untrained] == [sample["input_ids"] for sample in trained]
    with_reasoning, without = all_trained(trained, tokenizer), all_trained(untrained, tokenizer)
    for reasoning in REASONINGS:
        assert reasoning in with_reasoning and reasoning not in without
        assert any(reasoning in tokenizer.decode(sample["input_ids"]) for sample in untrained)
    # exactly the reasoning's own characters are left out: the think tags, calls and answers stay trained
    for reasoning in REASONINGS:
        with_reasoning = with_reasoning.replace(reasoning, "")
    assert without.replace("|", "") == with_reasoning.replace("|", "")


def test_untrained_reasoning_in_qwen3_trains_the_think_tags(tokenizer):
    samples = tokenize_conversation(
        TRIP[:8], tokenizer, 4096, real_chat_template("qwen3_training"), Masking(train_reasoning=False), TOOLS
    )
    assert trained_texts(samples[0], tokenizer)[:2] == [
        "<think>\n",
        '\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
    ]


def test_reasoning_goes_to_the_field_the_template_reads(tokenizer):
    """Qwen3 reads ``reasoning_content``, LFM2.5 ``thinking``: either field of a message renders in both."""
    as_thinking = [
        {**{k: v for k, v in m.items() if k != "reasoning_content"}, "thinking": m["reasoning_content"]}
        if "reasoning_content" in m else m
        for m in TRIP[:8]
    ]  # fmt: skip
    for name in ("qwen3_training", "lfm2_2_5"):
        render = template_renderer(tokenizer, real_chat_template(name))
        assert render(as_thinking, False, tools=TOOLS) == render(TRIP[:8], False, tools=TOOLS)
        assert "Two weather calls first." in render(as_thinking, False, tools=TOOLS)


def test_reasoning_for_a_template_without_reasoning_is_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", [{"messages": TRIP[:3], "tools": TOOLS}])
    source = Source(str(path))
    with pytest.raises(UserError, match=r"calls.jsonl', row 0: message 2 has reasoning \('reasoning_content'\), "
                                        r"which the chat template does not render"):  # fmt: skip
        tokenize_rows(load_rows(source), source, tokenizer, 4096, real_chat_template("qwen2_5"))
    all_tokens = Source(str(path), mask="all_tokens", train_reasoning=False)
    with pytest.raises(UserError, match="mask all_tokens trains every token, the reasoning too"):
        tokenize_rows(load_rows(all_tokens), all_tokens, tokenizer, 4096, real_chat_template("qwen3"))


def test_deepseek_r1_reads_the_reasoning_from_the_content(tokenizer):
    """DeepSeek-R1's templates read the reasoning from a think block in the content, and the generation prompt opens
    it: a reasoning field renders as that block, the same as reasoning written in the content; the training
    template trains it (after the prompt's ``<think>``), the original drops it as at inference."""
    inline = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"},
    ] * 2
    fields = [
        {**m, "content": m["content"].split("\n\n")[-1], "reasoning_content": m["content"][8:].split("\n</think>")[0]}
        if m["role"] == "assistant" else m
        for m in inline
    ]  # fmt: skip
    for name in ("deepseek_r1_distill", "deepseek_r1_distill_training"):
        render = template_renderer(tokenizer, real_chat_template(name))
        assert render(fields, False) == render(inline, False)
    training = real_chat_template("deepseek_r1_distill_training")
    for chat in (inline, fields):
        [sample] = tokenize_conversation(chat, tokenizer, 4096, training)
        assert trained_texts(sample, tokenizer)[:2] == ["Add them.\n</think>\n\n4<｜end▁of▁sentence｜>",
                                                        "Add again.\n</think>\n\n6<｜end▁of▁sentence｜>"]  # fmt: skip
    [sample] = tokenize_conversation(fields, tokenizer, 4096, training, Masking(train_reasoning=False))
    assert trained_texts(sample, tokenizer)[:2] == ["\n</think>\n\n4<｜end▁of▁sentence｜>",
                                                    "\n</think>\n\n6<｜end▁of▁sentence｜>"]  # fmt: skip
    render = template_renderer(tokenizer, training)
    for masking in (Masking(), Masking(train_reasoning=False)):
        one = render_in_one_pass(fields, render, masking)
        assert [(p.text, p.spans) for p in one] == [(p.text, p.spans) for p in render_turn_by_turn(fields, render, masking)]
    [sample] = tokenize_conversation(fields, tokenizer, 4096, real_chat_template("deepseek_r1_distill"))
    assert "Add them." not in tokenizer.decode(sample["input_ids"])


def test_mistral_templates_with_calls_and_reasoning(tokenizer):
    """Mistral's templates, as mistral-common generates them for its tokenizers (v13, with and without thinking):
    ``[TOOL_CALLS]name[ARGS]{...}`` trained, ``[TOOL_RESULTS]`` never; the thinking template reads
    ``reasoning_content`` (its content parts' ``thinking`` is another field), the other none. (mistral-common pins
    numpy below 2.4, so it is not a test requirement: the test runs where it is installed.)"""
    generator = pytest.importorskip("mistral_common.integrations.chat_templates.template_generator")
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    def mistral(thinking: bool) -> str:
        return generator.build_chat_template(generator.TemplateConfig(
            version=TokenizerVersion.v13, spm=False, image_support=False, audio_support=False,
            thinking_support=thinking, plain_thinking_support=False, use_special_token_variables=True,
        ))  # fmt: skip

    mistral_tokens = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                      "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]"]  # fmt: skip
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + TOOL_TOKENS + mistral_tokens})
    eos = tokenizer.eos_token
    samples = tokenize_conversation(without_reasoning(TRIP), tokenizer, 4096, mistral(False), tools=TOOLS)
    assert [trained_texts(sample, tokenizer) for sample in samples] == [[
        f'[TOOL_CALLS]get_weather[ARGS]{{"city": "Paris"}}[TOOL_CALLS]get_weather[ARGS]{{"city": "Rome"}}{eos}',
        f'Now the time.[TOOL_CALLS]get_time[ARGS]{{"city": "Paris"}}{eos}',
        f"Paris: sunny, 24C, 14:05. Rome: rain, 18C.{eos}",
        f'[TOOL_CALLS]get_weather[ARGS]{{"city": "Berlin"}}{eos}',
        f"Berlin: cloudy, 15C.{eos}",
    ]]  # fmt: skip
    assert_results_and_tools_untrained(samples, tokenizer)
    with pytest.raises(ValueError, match="message 2 has reasoning"):
        tokenize_conversation(TRIP, tokenizer, 4096, mistral(False), tools=TOOLS)
    for masking in (Masking(), Masking(train_reasoning=False)):
        samples = tokenize_conversation(TRIP, tokenizer, 4096, mistral(True), masking, TOOLS)
        trained = all_trained(samples, tokenizer)
        assert "[THINK]" in trained and all((reasoning in trained) == masking.train_reasoning for reasoning in REASONINGS)
        assert '[TOOL_CALLS]get_weather[ARGS]{"city": "Berlin"}' in trained


# -- masking modes with tool calls ------------------------------------------------------------------------------------
def test_masking_modes_on_tool_calls(tokenizer):
    template = real_chat_template("qwen3_training")
    chat = without_reasoning(TRIP)
    [last] = tokenize_conversation(chat, tokenizer, 4096, template, Masking("last_assistant"), TOOLS)
    assert trained_texts(last, tokenizer) == ["<think>\n\n</think>\n\nBerlin: cloudy, 15C.<|im_end|>"]
    [no_end] = tokenize_conversation(chat, tokenizer, 4096, template, Masking(train_end_of_turn=False), TOOLS)
    texts = trained_texts(no_end, tokenizer)
    assert texts[0].endswith('{"city": "Rome"}}\n</tool_call>') and texts[3].endswith("</tool_call>")
    assert not any("<|im_end|>" in text for text in texts)
    fields = copy.deepcopy(chat)
    fields[2]["train"], fields[5]["weight"] = False, 0.5
    [weighted] = tokenize_conversation(fields, tokenizer, 4096, template, Masking("field"), TOOLS)
    texts = trained_texts(weighted, tokenizer)
    assert len(texts) == 4 and texts[0].startswith("<think>\n\n</think>\n\nNow the time.")
    weights = {w for label, w in zip(weighted["labels"], weighted["token_weights"]) if label != IGNORE_INDEX}
    assert weights == {0.5, 1.0}


# -- one pass --------------------------------------------------------------------------------------------------------
ONE_PASS_TOOL_TEMPLATES = ["qwen3_training", "qwen3", "qwen2_5", "llama3_1", "lfm2_v2_training", "glm4moe_training",
                           "qwen3_5_think_training", "nemotron_3_nano_training"]  # fmt: skip
MASKINGS = [Masking(), Masking(train_reasoning=False), Masking(train_end_of_turn=False), Masking("last_assistant"),
            Masking("field", train_end_of_turn=False, train_reasoning=False)]  # fmt: skip


@pytest.mark.parametrize("name", ONE_PASS_TOOL_TEMPLATES)
def test_one_pass_gives_the_turn_by_turn_spans_with_tool_calls(tokenizer, name):
    """Turns with tool calls and no text, reasoning left untrained, and an agent's run of calls after one user turn
    (rendered from the latest call on): the one pass answers where the template never rewrites a turn, with the
    turn-by-turn texts and spans."""
    template = real_chat_template(name)
    render = template_renderer(tokenizer, template)
    reasoning = "reasoning_content" in template
    chats = [agent_run(9, reasoning)]
    trip = TRIP if reasoning else without_reasoning(TRIP)
    chats.append(one_call_a_turn(trip) if name == "llama3_1" else trip)
    for number, chat in enumerate(chats):
        if name == "llama3_1":
            chat = [{**m, "content": ""} if m.get("tool_calls") else m for m in chat]
        rewrites = len(render_turn_by_turn(chat, lambda m, g: render(m, g, tools=TOOLS))) > 1
        for masking in MASKINGS:
            one = render_in_one_pass(chat, lambda m, g: render(m, g, tools=TOOLS), masking)
            reference = render_turn_by_turn(chat, lambda m, g: render(m, g, tools=TOOLS), masking)
            assert (one is None) == rewrites, (number, masking)
            if one is not None:
                assert [(p.text, p.spans) for p in one] == [(p.text, p.spans) for p in reference], (number, masking)


def test_one_pass_declines_a_template_that_counts_calls(tokenizer):
    """A template whose call text depends on calls left out of the short renderings (a running count) is seen to
    render otherwise, and the conversation is rendered turn by turn."""
    counting = (
        "{% set ns = namespace(calls=0) %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}#{{ ns.calls }}</tool_call>"
        "{% set ns.calls = ns.calls + 1 %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = agent_run(5, reasoning=False)
    render = template_renderer(tokenizer, counting)
    assert render_in_one_pass(chat, render) is None
    [sample] = render_conversation(chat, render)
    assert [sample.text[a:b] for a, b in sample.spans][4] == "Checking city 4.<tool_call>get_weather#4</tool_call><|im_end|>"


# -- rows as hub data sets keep them ---------------------------------------------------------------------------------
def openai_row(chat: list[dict], as_text: bool) -> dict:
    """A row of an OpenAI-style data set: arguments and tools as JSON text (as the hub keeps them) or objects."""
    messages = copy.deepcopy(chat)
    for message in messages:
        for tool_call in message.get("tool_calls", []):
            if as_text:
                tool_call["function"]["arguments"] = json.dumps(tool_call["function"]["arguments"])
            tool_call["id"] = f"call_{tool_call['function']['name']}"
    return {"messages": messages, "tools": json.dumps(TOOLS) if as_text else TOOLS}


@pytest.mark.parametrize("source_type", ["messages", "huggingface_instruct"])
def test_json_text_tools_and_arguments_make_the_same_turns(tokenizer, tmp_path, source_type):
    """The same conversations, once with objects (JSON Lines) and once with tools and arguments as JSON text
    (parquet, as hub data sets keep them): the same turns and the same samples."""
    import datasets

    chats = [without_reasoning(TRIP), agent_run(3, reasoning=False)]
    objects = write_jsonl(tmp_path / "objects.jsonl", [openai_row(chat, as_text=False) for chat in chats])
    text = tmp_path / "text.parquet"
    datasets.Dataset.from_list([openai_row(chat, as_text=True) for chat in chats]).to_parquet(text)
    roles = {role: f"messages.role.{role}" for role in ("system", "user", "assistant", "tool")}
    keys = {"role_mapping": roles} if source_type == "huggingface_instruct" else {}
    sources = [Source(str(path), type=source_type, **keys) for path in (objects, text)]
    readers = [load_source_type(source) for source in sources]
    turns = [[reader.messages(row, i) for i, row in enumerate(load_rows(source))] for reader, source in zip(readers, sources)]
    assert turns[0] == turns[1]
    assert turns[0][0][2]["tool_calls"][1] == {"type": "function", "id": "call_get_weather",
                                               "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}  # fmt: skip
    assert turns[0][0][3] == {"role": "tool", "name": "get_weather", "content": "Sunny, 24C"}
    assert [reader.tools(row, 0) for reader, source in zip(readers, sources) for row in load_rows(source)] == [TOOLS] * 4
    template = real_chat_template("qwen3_training")
    samples = [load_samples([source], tokenizer, 4096, template)[0] for source in sources]
    assert samples[0]["input_ids"] == samples[1]["input_ids"] and samples[0]["labels"] == samples[1]["labels"]
    expected = [tokenize_conversation(chat, tokenizer, 4096, template, tools=TOOLS)[0] for chat in chats]
    assert samples[0]["labels"] == [sample["labels"] for sample in expected]


def test_xlam_rows_become_a_call_turn(tokenizer, tmp_path):
    """xLAM keeps the query, the answer's calls and the tools as three columns, calls and tools as JSON text of
    flat ``{name, arguments}`` and ``{name, description, parameters}`` objects."""
    row = {
        "id": 7,
        "query": "Weather in Oslo and the time in Lima?",
        "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                               {"name": "get_time", "arguments": {"city": "Lima"}}]),  # fmt: skip
        "tools": json.dumps([tool["function"] for tool in TOOLS]),
    }
    path = write_jsonl(tmp_path / "xlam.jsonl", [row])
    source = Source(str(path), type="huggingface_instruct", role_mapping={"user": "query", "tool_calls": "answers"})
    reader = load_source_type(source)
    [loaded] = load_rows(source)
    assert reader.messages(loaded, 0) == [
        {"role": "user", "content": "Weather in Oslo and the time in Lima?"},
        {"role": "assistant", "tool_calls": [call("get_weather", city="Oslo"), call("get_time", city="Lima")]},
    ]
    assert reader.tools(loaded, 0) == TOOLS
    samples, _ = load_samples([source], tokenizer, 4096, real_chat_template("qwen3_training"))
    [texts] = [trained_texts(sample, tokenizer) for sample in samples]
    assert texts == ['<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>'
                     "<|im_end|>"]  # fmt: skip


def test_sharegpt_function_call_turns_join_the_assistant_turn(tokenizer, tmp_path):
    """APIGen-MT's ShareGPT shape: ``function_call`` turns (the JSON of a call) and ``observation`` turns (the
    results), a system column and tools as JSON text; a call after the assistant's text joins that turn, a
    reasoning column the answer after it."""
    conversations = [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "gpt", "value": "Let me check."},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "Snow, -3C"},
        {"from": "gpt", "value": "Oslo: snow, -3C."},
    ]
    row = {"system": "You are a weather bot.", "conversations": conversations, "tools": json.dumps(TOOLS)}
    path = write_jsonl(tmp_path / "apigen.jsonl", [row])
    mapping = {"system": "system", "user": "conversations.from.human", "assistant": "conversations.from.gpt",
               "tool_calls": "conversations.from.function_call", "tool": "conversations.from.observation"}  # fmt: skip
    source = Source(str(path), type="huggingface_instruct", role_mapping=mapping, content_key="value")
    [loaded] = load_rows(source)
    assert load_source_type(source).messages(loaded, 0) == [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", city="Oslo")]},
        {"role": "tool", "content": "Snow, -3C"},
        {"role": "assistant", "content": "Oslo: snow, -3C."},
    ]
    samples, _ = load_samples([source], tokenizer, 4096, real_chat_template("qwen2_5"))
    [sample] = samples
    assert trained_texts(sample, tokenizer) == [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "Oslo: snow, -3C.<|im_end|>",
    ]
    reasoning = Source(str(tmp_path / "r.jsonl"), type="huggingface_instruct",
                       role_mapping={"user": "q", "reasoning": "why", "assistant": "a"})  # fmt: skip
    write_jsonl(tmp_path / "r.jsonl", [{"q": "2+2?", "why": "Add them.", "a": "4"}])
    [loaded] = load_rows(reasoning)
    assert load_source_type(reasoning).messages(loaded, 0) == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add them."}
    ]


@pytest.mark.parametrize("source_type", ["messages", "huggingface_instruct"])
def test_malformed_json_is_one_line_naming_the_row(tokenizer, tmp_path, source_type):
    good = openai_row(without_reasoning(TRIP), as_text=True)
    bad_tools = {**good, "tools": good["tools"][:-5]}
    bad_arguments = copy.deepcopy(good)
    bad_arguments["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"city": Paris}'
    roles = {role: f"messages.role.{role}" for role in ("system", "user", "assistant", "tool")}
    keys = {"role_mapping": roles} if source_type == "huggingface_instruct" else {}
    for rows, problem in (
        ([good, bad_tools], r"row 1: column 'tools' is not valid JSON \(Expecting .* at character \d+ of"),
        ([good, good, bad_arguments], r"row 2: turn 2 of 'messages', tool call 0 \(get_weather\): arguments is not "
                                      r"valid JSON \(Expecting value at character 9 of '\{\"city\": Paris\}'\): fix the row"),
    ):  # fmt: skip
        path = tmp_path / "rows.parquet"
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(path)
        source = Source(str(path), type=source_type, **keys)
        with pytest.raises(UserError, match=rf"^data source '.*rows.parquet', {problem}"):
            tokenize_rows(load_rows(source), source, tokenizer, 4096, real_chat_template("qwen3"))


def test_train_reasoning_is_part_of_the_cache_identity(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", [{"messages": TRIP, "tools": TOOLS}] * 2)
    template = real_chat_template("qwen3_training")
    counts = [
        load_samples([Source(str(path), train_reasoning=flag)], tokenizer, 4096, template)[0]["loss_count"][0]
        for flag in (True, False, True)
    ]
    assert counts[0] == counts[2] > counts[1]


def test_prompts_for_prediction_carry_the_tools(tokenizer):
    prompt = prompt_of(without_reasoning(TRIP[:6]), tokenizer, real_chat_template("qwen2_5"), tools=TOOLS)
    assert "Current weather of a city" in prompt["prompt"]
    assert prompt["prompt"].endswith("Rain, 18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert prompt["reference"] == "Now the time."


def test_the_readme_recipe_previews_calls_trained_and_results_untrained():
    """``configs/tool_calls.yaml`` as the README runs it (the test tokenizer in place of the quantized model's):
    the calls and answers marked as trained, the tools and tool results not, the reasoning only in sample 0."""
    from pathlib import Path

    from test_cli import lt_posttrain

    root = Path(__file__).resolve().parents[1]
    result = lt_posttrain("data", "preview", "--config", "configs/tool_calls.yaml", "--model.name_or_path",
                          TOKENIZER_DIR, "--num", 3, cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    samples = result.stdout.split("── sample ")[1:]
    assert len(samples) == 3
    calls = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"⟦<think>\nI need the weather of both cities.\n</think>\n\n{calls}" in samples[0]
    assert f"⟦<think>\n⟧I need the weather of both cities.⟦\n</think>\n\n{calls}" in samples[1]
    for sample in samples:
        trained, context = re.findall("⟦(.*?)⟧", sample, re.S), "".join(re.split("⟦.*?⟧", sample, flags=re.S))
        assert "Current weather of a city" in context and not any("weather of a city" in text for text in trained)
        assert not any("temperature" in text for text in trained)
    assert '<tool_response>\n{"temperature": 24}\n</tool_response>' in samples[0]
    assert '⟦<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in samples[2]


def test_turns_and_tools_as_json_text_and_a_named_tools_column(tmp_path):
    """A ``messages`` column kept as the JSON text of the whole list (turns of varying fields), and tools in a
    column of another name (``tools_column``); a named column that is missing is an error, the default one not."""
    chat = without_reasoning(TRIP)
    path = write_jsonl(tmp_path / "text.jsonl", [{"messages": json.dumps(chat), "functions": json.dumps(TOOLS)}])
    source = Source(str(path), tools_column="functions")
    reader, [row] = load_source_type(source), load_rows(source)
    assert reader.messages(row, 0) == chat
    assert reader.tools(row, 0) == TOOLS
    assert load_source_type(Source(str(path))).tools(row, 0) is None  # no 'tools' column: no tools
    with pytest.raises(UserError, match=r"row 0: no column 'tool_defs' \(tools_column\); the rows have messages, "
                                        r"functions: set tools_column to one"):  # fmt: skip
        load_source_type(Source(str(path), tools_column="tool_defs")).tools(row, 0)
    with pytest.raises(UserError, match="'tools_column' has no effect with type 'text'"):
        load_source_type(Source(str(path), type="text", tools_column="functions"))
