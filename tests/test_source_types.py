"""Source types: each turns real-shaped rows into the conversation we expect, and the masks that follow train
exactly the answers (checked token by token where the type renders on its own)."""

import json
from pathlib import Path

import pytest

from conftest import GSM8K, SHAREGPT, TOKENIZER_DIR, write_jsonl
from lt_posttrain import InstructDataModule, Source
from lt_posttrain.data.dataset import NO_ASSISTANT_TURN, NO_LOSS_TOKEN, tokenize_rows
from lt_posttrain.data.source_types import load_source_type
from lt_posttrain.data.sources import load_rows
from lt_posttrain.data.tokenize import count_loss_tokens, tokenize_conversation
from lt_posttrain.errors import UserError
from test_masks import DEFAULT_SYSTEM, assert_sample, trained_runs

CONVERSATIONS = {"user": "conversations.from.human", "assistant": "conversations.from.gpt"}


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The SmolLM2 tokenizer without a chat template, like a base model's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = None
    return tokenizer


def tokenized(tokenizer, path, max_length=512, chat_template=None, **fields):
    """The samples (a list of dicts) and the dropped-row counts of the source at ``path`` with ``fields``."""
    source = Source(name_or_path=str(path), **fields)
    samples, dropped = tokenize_rows(load_rows(source), source, tokenizer, max_length, chat_template)
    return samples.to_list(), dropped


def conversations(path, **fields) -> list[list[dict]]:
    source = Source(name_or_path=str(path), **fields)
    source_format = load_source_type(source)
    return [source_format.messages(row, index) for index, row in enumerate(load_rows(source))]


def trained_text(tokenizer, sample) -> list[str]:
    return [tokenizer.decode(run) for run in trained_runs(sample)]


def gsm8k_rows(count: int) -> list[dict]:
    with open(GSM8K) as file:
        return [json.loads(next(file)) for _ in range(count)]


# -- messages (the default) ------------------------------------------------------------------------------------------
def test_messages_type_is_the_default_and_tokenizes_as_before(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat}])
    [sample], dropped = tokenized(tokenizer, path)
    assert dropped == {}
    [expected] = tokenize_conversation(chat, tokenizer, 512)
    assert {key: sample[key] for key in expected} == expected
    assert sample["length"] == len(expected["input_ids"]) and sample["loss_count"] == count_loss_tokens(
        expected["labels"]
    )


def test_messages_with_other_column_and_keys(tmp_path, tokenizer):
    turns = [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4", "name": "calc"}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"chat": turns}])
    [messages] = conversations(path, messages_column="chat", role_key="from", content_key="value")
    assert messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "name": "calc"}]


def test_messages_rows_without_an_assistant_turn_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "Hello?"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": None},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]},
    ]
    samples, dropped = tokenized(tokenizer, write_jsonl(tmp_path / "chats.jsonl", rows))
    assert dropped == {NO_ASSISTANT_TURN: 3}
    assert [trained_text(tokenizer, sample) for sample in samples] == [["4<|im_end|>"]]


def test_rows_whose_answer_starts_past_max_length_are_counted(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}] * 2
    samples, dropped = tokenized(tokenizer, write_jsonl(tmp_path / "long.jsonl", rows), max_length=16)
    assert samples == [] and dropped == {NO_LOSS_TOKEN: 2}


def test_weights_stay_with_their_rows_when_rows_are_dropped(tmp_path, tokenizer):
    from lt_posttrain.data.dataset import load_samples

    def chat(answer):
        return [{"role": "user", "content": "Say it."}] + ([{"role": "assistant", "content": answer}] if answer else [])

    weights = {None: 5.0, "two": 2.0, "three": 3.0}
    weighted = write_jsonl(
        tmp_path / "weighted.jsonl", [{"messages": chat(a), "weight": w} for a, w in weights.items()]
    )
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"messages": chat(None)}, {"messages": chat("one")}])
    sources = [Source(name_or_path=str(weighted)), Source(name_or_path=str(plain))]
    samples, dropped = load_samples(sources, tokenizer, 512, None)
    assert dropped == {(str(weighted), NO_ASSISTANT_TURN): 1, (str(plain), NO_ASSISTANT_TURN): 1}
    assert [trained_text(tokenizer, sample) for sample in samples] == [
        ["two<|im_end|>"],
        ["three<|im_end|>"],
        ["one<|im_end|>"],
    ]
    assert samples["weight"] == [2.0, 3.0, 1.0]


def test_bad_turn_names_source_row_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"from": "human", "value": "Hi"}]}])
    with pytest.raises(
        UserError, match=r"chats.jsonl', row 0: each turn of 'messages' needs a 'role' and a 'content'.*content_key"
    ):
        conversations(path)


def test_a_type_specific_key_on_another_type_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", gsm8k_rows(1))
    with pytest.raises(UserError, match=r"qa.jsonl': 'role_mapping' has no effect with type 'messages'.*'type'"):
        conversations(path, role_mapping={"user": "question", "assistant": "answer"})


def test_without_a_chat_template_the_error_names_the_source(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(
        UserError, match=r"chats.jsonl' \(type 'messages'\): the tokenizer has no chat template: set data.chat_template"
    ):
        tokenized(plain_tokenizer, path)


# -- huggingface_instruct --------------------------------------------------------------------------------------------
def test_gsm8k_string_columns_per_role(tokenizer):
    fields = dict(type="huggingface_instruct", role_mapping={"user": "question", "assistant": "answer"}, sample_count=3)
    messages = conversations(GSM8K, **fields)
    for row, conversation in zip(gsm8k_rows(3), messages):
        assert conversation == [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
    samples, dropped = tokenized(tokenizer, GSM8K, **fields)
    assert dropped == {} and len(samples) == 3
    first = gsm8k_rows(1)[0]
    assert_sample(
        samples[0],
        tokenizer,
        [
            (DEFAULT_SYSTEM + f"<|im_start|>user\n{first['question']}<|im_end|>\n<|im_start|>assistant\n", False),
            (first["answer"] + "<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_sharegpt_multi_turn_keeps_every_turn_in_order(tokenizer):
    fields = dict(type="huggingface_instruct", role_mapping=CONVERSATIONS, content_key="value")
    rows = json.loads(SHAREGPT.read_text())
    messages = conversations(SHAREGPT, **fields)
    assert len(messages) == len(rows) == 500
    for row, conversation in zip(rows, messages):
        roles = {"human": "user", "gpt": "assistant"}
        assert conversation == [
            {"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]
        ]
    # identity_2: three exchanges, alternating, in the file's order
    assert [turn["role"] for turn in messages[2]] == ["user", "assistant"] * 3
    assert [turn["content"] for turn in messages[2]][::2] == ["What is up?", "Who are you?", "Goodbye"]

    samples, dropped = tokenized(tokenizer, SHAREGPT, sample_count=3, **fields)
    assert dropped == {}
    assert trained_text(tokenizer, samples[2]) == [turn["content"] + "<|im_end|>" for turn in messages[2][1::2]]
    assert tokenizer.decode(samples[2]["input_ids"]) == tokenizer.apply_chat_template(messages[2], tokenize=False)


def test_sharegpt_without_content_key_says_which_field_to_use():
    with pytest.raises(UserError) as error:
        conversations(SHAREGPT, type="huggingface_instruct", role_mapping=CONVERSATIONS)
    message = str(error.value)
    assert "sharegpt_dummy_conversation.json', row 0" in message
    assert "has no 'content' (content_key; its fields: from, value): set content_key" in message


def test_filter_field_that_turns_do_not_have(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}]}])
    mapping = {"user": "conversations.role.user", "assistant": "conversations.role.assistant"}
    with pytest.raises(
        UserError, match=r"row 0: turn 0 of 'conversations' has no field 'role'.*its fields: from, value"
    ):
        conversations(path, type="huggingface_instruct", role_mapping=mapping, content_key="value")


SLIMORCA_TURNS = [
    {"from": "system", "value": "You are a tutor.", "weight": None},
    {"from": "human", "value": "2+2?", "weight": 0.0},
    {"from": "gpt", "value": "4", "weight": 1.0},
    {"from": "human", "value": "And 3+3?", "weight": 0.0},
    {"from": "gpt", "value": "6", "weight": 1.0},
    {"from": "human", "value": "And 4+4?", "weight": 0.0},
    {"from": "gpt", "value": "8", "weight": 1.0},
]


def test_mapped_system_keeps_every_exchange(tmp_path, tokenizer):
    # ArcticTraining groups turns by role and zips the groups: one system turn cuts this chat to its first exchange
    path = write_jsonl(tmp_path / "orca.jsonl", [{"conversations": SLIMORCA_TURNS}])
    mapping = {"system": "conversations.from.system", **CONVERSATIONS}
    [messages] = conversations(path, type="huggingface_instruct", role_mapping=mapping, content_key="value")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "You are a tutor."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6"),
        ("user", "And 4+4?"), ("assistant", "8"),
    ]  # fmt: skip
    [sample], _ = tokenized(tokenizer, path, type="huggingface_instruct", role_mapping=mapping, content_key="value")
    assert trained_text(tokenizer, sample) == ["4<|im_end|>", "6<|im_end|>", "8<|im_end|>"]


def test_system_column_then_list_turns(tmp_path):
    rows = [{"system_prompt": "You are a tutor.", "conversations": SLIMORCA_TURNS[1:]}]
    path = write_jsonl(tmp_path / "orca.jsonl", rows)
    mapping = {**CONVERSATIONS, "system": "system_prompt"}  # the order of the mapping does not matter
    [messages] = conversations(path, type="huggingface_instruct", role_mapping=mapping, content_key="value")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    assert messages[0]["content"] == "You are a tutor." and messages[-1]["content"] == "8"


def test_string_columns_form_one_exchange_system_first(tmp_path):
    rows = [{"response": "Paris.", "question": "Capital of France?", "system_prompt": "Answer briefly."}]
    path = write_jsonl(tmp_path / "openorca.jsonl", rows)
    mapping = {"assistant": "response", "user": "question", "system": "system_prompt"}
    [messages] = conversations(path, type="huggingface_instruct", role_mapping=mapping)
    assert messages == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]


def test_roles_reversed_by_the_mapping(tmp_path, tokenizer):
    # a question writer: the worked answer is the prompt, the question is what the model learns to write
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(2))
    fields = dict(type="huggingface_instruct", role_mapping={"user": "answer", "assistant": "question"})
    first = gsm8k_rows(1)[0]
    assert conversations(path, **fields)[0] == [
        {"role": "user", "content": first["answer"]},
        {"role": "assistant", "content": first["question"]},
    ]
    samples, _ = tokenized(tokenizer, path, **fields)
    assert trained_text(tokenizer, samples[0]) == [first["question"] + "<|im_end|>"]
    # in a list column too: the human turns become the assistant's
    reversed_mapping = {"user": "conversations.from.gpt", "assistant": "conversations.from.human"}
    [chat] = conversations(
        SHAREGPT, type="huggingface_instruct", role_mapping=reversed_mapping, content_key="value", sample_count=1
    )
    assert [(m["role"], m["content"]) for m in chat[:2]] == [
        ("assistant", "Who are you?"),
        ("user", chat[1]["content"]),
    ]
    assert chat[1]["content"].startswith("I am Vicuna")


def test_known_datasets_get_their_mapping():
    orca = load_source_type(Source(name_or_path="Open-Orca/SlimOrca", type="huggingface_instruct"))
    assert orca.content_key == "value"
    messages = orca.messages({"conversations": SLIMORCA_TURNS}, 0)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    ultrachat = load_source_type(Source(name_or_path="HuggingFaceH4/ultrachat_200k", type="huggingface_instruct"))
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    row = {"prompt": "Hi", "prompt_id": "x", "messages": turns}
    assert ultrachat.messages(row, 0) == turns
    # a mapping that is given wins
    mapping = {"user": "response", "assistant": "query"}
    given = load_source_type(Source(name_or_path="meta-math/MetaMathQA", type="huggingface_instruct", role_mapping=mapping))
    assert given.messages({"query": "q", "response": "a"}, 0) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "q"},
    ]


def test_mapped_column_that_does_not_exist(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(1))
    with pytest.raises(UserError) as error:
        conversations(path, type="huggingface_instruct", role_mapping={"user": "prompt", "assistant": "answer"})
    message = str(error.value)
    assert "\n" not in message
    assert (
        f"data source '{path}', row 0: role_mapping user: 'prompt' names column 'prompt', which does not exist"
        in message
    )
    assert "(columns: question, answer)" in message and "set role_mapping" in message


def test_huggingface_instruct_drops_rows_without_an_answer(tmp_path, tokenizer):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": None}]
    fields = dict(type="huggingface_instruct", role_mapping={"user": "question", "assistant": "answer"})
    samples, dropped = tokenized(tokenizer, write_jsonl(tmp_path / "qa.jsonl", rows), **fields)
    assert len(samples) == 1 and dropped == {NO_ASSISTANT_TURN: 1}


def test_bad_role_mapping_spec(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", gsm8k_rows(1))
    with pytest.raises(
        UserError, match=r"role_mapping user: 'conversations.from' is neither a column nor 'column.field.value'"
    ):
        conversations(path, type="huggingface_instruct", role_mapping={"user": "conversations.from"})


def test_list_column_mapped_as_a_string(tmp_path):
    with pytest.raises(
        UserError, match=r"column 'conversations' holds a list: map its turns as 'conversations.FIELD.VALUE'"
    ):
        conversations(SHAREGPT, type="huggingface_instruct", role_mapping={"user": "conversations", "assistant": "id"})


# -- prompt_generation -----------------------------------------------------------------------------------------------
def test_prompt_generation_trains_only_the_generation_and_eos(tmp_path, plain_tokenizer):
    rows = [{"prompt": "Question: What is 2+2?\nAnswer:", "generation": " 4"}]
    samples, dropped = tokenized(plain_tokenizer, write_jsonl(tmp_path / "pg.jsonl", rows), type="prompt_generation")
    assert dropped == {}
    assert_sample(
        samples[0],
        plain_tokenizer,
        [("Question: What is 2+2?\nAnswer:", False), (" 4" + plain_tokenizer.eos_token, True)],
    )
    assert samples[0]["loss_count"] == 3  # " ", "4", EOS


def test_prompt_generation_renderer_is_plain_concatenation(tokenizer):
    source_format = load_source_type(Source(name_or_path="x.jsonl", type="prompt_generation"))
    messages = source_format.messages({"prompt": "P", "generation": "G"}, 0)
    render = source_format.renderer(tokenizer, None)
    assert render(messages[:1], True) == "P"
    assert render(messages, False) == "PG" + tokenizer.eos_token


def test_prompt_generation_with_other_keys_on_gsm8k(tokenizer):
    fields = dict(type="prompt_generation", input_key="question", output_key="answer", sample_count=2)
    samples, _ = tokenized(tokenizer, GSM8K, **fields)
    first = gsm8k_rows(1)[0]
    assert tokenizer.decode(samples[0]["input_ids"]) == first["question"] + first["answer"] + tokenizer.eos_token
    assert trained_text(tokenizer, samples[0]) == [first["answer"] + tokenizer.eos_token]


def test_prompt_generation_missing_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pg.jsonl", [{"input": "P", "generation": "G"}])
    with pytest.raises(
        UserError, match=r"row 0: no column 'prompt' \(input_key\); the rows have input, generation: set input_key"
    ):
        tokenized(tokenizer, path, type="prompt_generation")


# -- ragfit ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def ragfit_rows(tmp_path) -> Path:
    rows = [
        {"query": "Context: Paris is in France.\nQuestion: Where is Paris?", "answers": ["In France.", "France"]},
        {"query": "Question: Capital of Italy?", "answers": "Rome."},
        {"query": "Question: Unanswerable?", "answers": []},
    ]
    return write_jsonl(tmp_path / "rag.jsonl", rows)


@pytest.fixture
def instruction(tmp_path) -> Path:
    path = tmp_path / "qa.txt"
    path.write_text("Answer the question from the context.")
    return path


def test_ragfit_instruction_as_system_prompt(ragfit_rows, instruction, tokenizer):
    fields = dict(type="ragfit", input_key="query", output_key="answers", instruction=str(instruction))
    messages = conversations(ragfit_rows, **fields)
    assert messages[0] == [
        {"role": "system", "content": "Answer the question from the context."},
        {"role": "user", "content": "Context: Paris is in France.\nQuestion: Where is Paris?"},
        {"role": "assistant", "content": "In France."},  # a list of answers: the first, as RAG-FiT does
    ]
    assert messages[2] == []
    samples, dropped = tokenized(tokenizer, ragfit_rows, **fields)
    assert dropped == {NO_ASSISTANT_TURN: 1}
    assert [trained_text(tokenizer, sample) for sample in samples] == [["In France.<|im_end|>"], ["Rome.<|im_end|>"]]
    [expected] = tokenize_conversation(messages[0], tokenizer, 512)
    assert samples[0]["input_ids"] == expected["input_ids"] and samples[0]["labels"] == expected["labels"]


def test_ragfit_instruction_in_prompt(ragfit_rows, instruction):
    fields = dict(
        type="ragfit", input_key="query", output_key="answers", instruction=str(instruction), instruction_in_prompt=True
    )
    assert conversations(ragfit_rows, **fields)[1] == [
        {"role": "user", "content": "Answer the question from the context.\nQuestion: Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]


def test_ragfit_template_without_a_chat_template(ragfit_rows, instruction, plain_tokenizer):
    template = "### Question:\n{query}\n### Answer:\n{output}"
    fields = dict(type="ragfit", input_key="query", output_key="answers", template=template,
                  instruction=str(instruction), instruction_in_prompt=True)  # fmt: skip
    samples, _ = tokenized(plain_tokenizer, ragfit_rows, **fields)
    assert_sample(
        samples[1],
        plain_tokenizer,
        [
            ("### Question:\nAnswer the question from the context.\nQuestion: Capital of Italy?\n### Answer:\n", False),
            ("Rome." + plain_tokenizer.eos_token, True),
        ],
    )


def test_ragfit_template_from_a_file(tmp_path, ragfit_rows, plain_tokenizer):
    template = tmp_path / "template.txt"
    template.write_text("Q: {query}\nA:{output}")
    samples, _ = tokenized(
        plain_tokenizer, ragfit_rows, type="ragfit", input_key="query", output_key="answers", template=str(template)
    )
    assert trained_text(plain_tokenizer, samples[1]) == ["Rome." + plain_tokenizer.eos_token]
    assert (
        plain_tokenizer.decode(samples[1]["input_ids"])
        == "Q: Question: Capital of Italy?\nA:Rome." + plain_tokenizer.eos_token
    )


def test_ragfit_completion_start_with_the_chat_template(ragfit_rows, tokenizer):
    # RAG-FiT's collator trains everything after the marker: here the newline that ends the assistant header too
    fields = dict(type="ragfit", input_key="query", output_key="answers", completion_start="<|im_start|>assistant")
    samples, _ = tokenized(tokenizer, ragfit_rows, **fields)
    assert_sample(
        samples[1],
        tokenizer,
        [
            (DEFAULT_SYSTEM + "<|im_start|>user\nQuestion: Capital of Italy?<|im_end|>\n<|im_start|>assistant", False),
            ("\nRome.<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_ragfit_completion_start_with_a_template(ragfit_rows, plain_tokenizer):
    template = "Question: {query}\nAnswer: {output}"
    fields = dict(
        type="ragfit", input_key="query", output_key="answers", template=template, completion_start="\nAnswer:"
    )
    samples, _ = tokenized(plain_tokenizer, ragfit_rows, **fields)
    eos = plain_tokenizer.eos_token
    assert_sample(
        samples[1], plain_tokenizer, [("Question: Question: Capital of Italy?\nAnswer:", False), (" Rome." + eos, True)]
    )


def test_ragfit_completion_start_not_in_the_prompt(ragfit_rows, tokenizer):
    fields = dict(type="ragfit", input_key="query", output_key="answers", completion_start="<|assistant|>")
    with pytest.raises(
        UserError, match=r"rag.jsonl', row 0: completion_start '<\|assistant\|>' does not occur before the answer"
    ):
        tokenized(tokenizer, ragfit_rows, **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(input_key="query"), r"\(type ragfit\): set output_key"),
        (
            dict(output_key="answers", template="{query} {output}", instruction="INSTRUCTION"),
            r"set instruction_in_prompt: true",
        ),
        (dict(output_key="answers", template="{query} and nothing else"), r"template needs \{output\} exactly once"),
        (dict(output_key="answers", template="{context} {query} {output}"), r"template has a placeholder other than"),
        (
            dict(output_key="answers", instruction="no-such-instruction.txt"),
            r"instruction 'no-such-instruction.txt': no such file",
        ),
        (
            dict(output_key="answers", role_mapping={"user": "query"}),
            r"'role_mapping' has no effect with type 'ragfit'",
        ),
    ],
)
def test_ragfit_configuration_errors(ragfit_rows, instruction, fields, message):
    if fields.get("instruction") == "INSTRUCTION":
        fields = {**fields, "instruction": str(instruction)}
    with pytest.raises(UserError, match=message):
        conversations(ragfit_rows, type="ragfit", **fields)


def test_ragfit_missing_query_column(ragfit_rows):
    with pytest.raises(UserError, match=r"row 0: no column 'prompt' \(input_key\); the rows have query, answers"):
        conversations(ragfit_rows, type="ragfit", output_key="answers")


# -- the cache knows the source type -----------------------------------------------------------------------------------
def test_changing_the_format_is_not_served_from_the_cache(tmp_path, tokenizer, instruction):
    path = write_jsonl(tmp_path / "rag.jsonl", [{"prompt": "Capital of Italy?", "answer": "Rome."}])
    base = dict(type="ragfit", output_key="answer", instruction=str(instruction))
    first, _ = tokenized(tokenizer, path, **base)
    again, _ = tokenized(tokenizer, path, **base)
    in_prompt, _ = tokenized(tokenizer, path, instruction_in_prompt=True, **base)
    assert first == again and first != in_prompt
    instruction.write_text("A new instruction.")  # same path, new text
    changed, _ = tokenized(tokenizer, path, **base)
    assert "A new instruction." in tokenizer.decode(changed[0]["input_ids"])


# -- through the data module -----------------------------------------------------------------------------------------
def test_sharegpt_through_the_data_module(tokenizer):
    source = {
        "name_or_path": str(SHAREGPT),
        "type": "huggingface_instruct",
        "role_mapping": CONVERSATIONS,
        "content_key": "value",
    }
    datamodule = InstructDataModule(sources=[source], max_length=1024, batch_size=4, shuffle=False)
    datamodule.connect(tokenizer)
    datamodule.setup("fit")
    assert len(datamodule.train_samples) == 500 and datamodule.dropped == {}
    rows = json.loads(SHAREGPT.read_text())
    for index in (0, 2):
        sample = datamodule.train_samples[index]
        answers = [turn["value"] + "<|im_end|>" for turn in rows[index]["conversations"] if turn["from"] == "gpt"]
        assert trained_text(tokenizer, sample) == answers
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and int(batch["loss_count"]) == int((batch["targets"] != -100).sum())


def test_data_module_says_how_many_rows_were_dropped_and_why(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Hello {i}?"}]} for i in range(3)]
    path = write_jsonl(tmp_path / "no_answers.jsonl", rows)
    datamodule = InstructDataModule(sources=[str(path)])
    datamodule.connect(tokenizer)
    with pytest.raises(
        UserError, match=rf"no training sample .*: 3 rows dropped \(3 from '{path}': no assistant turn\)"
    ):
        datamodule.setup("fit")


def test_prompts_for_predict_use_the_format(tmp_path, tokenizer):
    rows = [{"prompt": "Question: What is 2+2?\nAnswer:", "generation": " 4"}]
    path = write_jsonl(tmp_path / "pg.jsonl", rows)
    datamodule = InstructDataModule(sources=[{"name_or_path": str(path), "type": "prompt_generation"}], batch_size=1)
    datamodule.connect(tokenizer)
    batch = next(iter(datamodule.predict_dataloader()))
    assert batch["prompt"] == ["Question: What is 2+2?\nAnswer:"] and batch["reference"] == [" 4"]
