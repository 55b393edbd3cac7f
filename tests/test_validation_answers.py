"""Answers generated during validation (``validation_answers``): the prompts are the validation samples up to their
last answer, the answers those of transformers' ``generate`` one prompt at a time, the table holds them beside their
references, and the metrics (exact match of a regex-extracted answer, mean length) are those of the table."""

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_runs import failing_here, fit_args, logged, write_recipe
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import Source
from lt_posttrain.callbacks.validation_answers import (
    TABLE_FILE,
    ValidationAnswers,
    answer_metrics,
    answer_prompts,
    extract_answer,
    extract_answers,
    write_tables,
)
from lt_posttrain.cli import main
from lt_posttrain.data.dataset import tokenize_rows
from lt_posttrain.data.prompts import prompt_of, sample_prompt
from lt_posttrain.data.sources import load_rows
from lt_posttrain.model.loading import load_causal_lm
from test_cli import assert_one_line_error

GSM8K_ANSWER = r"#### (\S+)"


def greedy_one_at_a_time(model, prompts: list[list[int]], max_new_tokens: int, stop: int) -> list[list[int]]:
    """transformers' own greedy generation, each prompt alone (no padding), cut at the first ``stop`` token."""
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=stop)[0, len(prompt) :].tolist()  # fmt: skip
            answers.append(out[: out.index(stop)] if stop in out else out)
    return answers


# ---------------------------------------------------------------- the prompts


def test_a_sample_prompt_is_its_conversation_before_the_last_answer(tokenizer, tmp_path):
    """The prompt read from a tokenized sample is the one ``predict`` renders from the conversation, token for token,
    and the reference is the answer's text."""
    chats = gsm8k_chats(3)
    source = Source(str(write_jsonl(tmp_path / "chats.jsonl", chats)))
    samples, _ = tokenize_rows(load_rows(source), source, tokenizer, 1024, None)
    for chat, sample in zip(chats, samples):
        prompt = sample_prompt(sample["input_ids"], sample["labels"], tokenizer)
        assert prompt["input_ids"] == prompt_of(chat["messages"], tokenizer)["input_ids"]
        assert prompt["reference"] == chat["messages"][-1]["content"]
        assert prompt["prompt"].endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- the answers, the table and the metrics


def test_batched_answers_are_those_of_generate_one_prompt_at_a_time(tiny_model_dir, tokenizer, tmp_path):
    """Five prompts of different lengths, answered three at a time (left-padded, KV cache) by the model as it trains
    (varlen attention, switched to sdpa for the call and back): the answers of transformers' generate, one prompt at
    a time."""
    source = Source(str(write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(5))))
    samples, _ = tokenize_rows(load_rows(source), source, tokenizer, 1024, None)
    prompts = [sample_prompt(sample["input_ids"], sample["labels"], tokenizer) for sample in samples]
    assert len({len(prompt["input_ids"]) for prompt in prompts}) > 1
    model = load_causal_lm(str(tiny_model_dir), "float32", "varlen").eval()
    records = answer_prompts(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert model.config._attn_implementation == "varlen"

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected = greedy_one_at_a_time(reference, [p["input_ids"] for p in prompts], 12, tokenizer.eos_token_id)
    assert [record["answer"] for record in records] == tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert [record["answer_tokens"] for record in records] == [len(answer) for answer in expected]
    assert [record["reference"] for record in records] == [prompt["reference"] for prompt in prompts]
    assert [record["index"] for record in records] == list(range(5))


def test_sampled_answers_are_seeded_and_leave_the_random_state_alone(tiny_model_dir, tokenizer, tmp_path):
    source = Source(str(write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2))))
    samples, _ = tokenize_rows(load_rows(source), source, tokenizer, 1024, None)
    prompts = [sample_prompt(sample["input_ids"], sample["labels"], tokenizer) for sample in samples]
    model = load_causal_lm(str(tiny_model_dir), "float32", "sdpa").eval()

    def sampled(seed: int) -> list[str]:
        sampling = {"temperature": 1.5, "top_p": 1.0, "seed": seed}
        records = answer_prompts(model, tokenizer, prompts, max_new_tokens=10, sampling=sampling)
        return [record["answer"] for record in records]

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = sampled(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert sampled(1) == first and sampled(2) != first
    greedy = [record["answer"] for record in answer_prompts(model, tokenizer, prompts, max_new_tokens=10)]
    assert greedy != first


def test_gsm8k_answers_are_extracted_and_matched(tokenizer):
    pattern = re.compile(GSM8K_ANSWER)
    reference = gsm8k_chats(1)[0]["messages"][1]["content"]  # "... #### 72"
    assert extract_answer(pattern, reference) == "72"
    assert extract_answer(pattern, "#### 5 then #### 7") == "7"  # the last one
    assert extract_answer(pattern, "no answer") is None
    assert extract_answer(re.compile(r"\d+"), "3 and 41") == "41"  # no group: the whole match
    records = [
        {"reference": reference, "answer": "So #### 72", "answer_tokens": 4},
        {"reference": reference, "answer": "#### 71", "answer_tokens": 3},
        {"reference": reference, "answer": "I do not know", "answer_tokens": 5},
        {"reference": "no number here", "answer": "#### 72", "answer_tokens": 4},  # not judged
    ]
    for record in records:
        record.update(extract_answers(record, pattern))
    assert [record["exact_match"] for record in records] == [1, 0, 0, None]
    assert answer_metrics(records, pattern) == {"val/answer_length": 4.0, "val/exact_match": 1 / 3}
    assert answer_metrics(records, None) == {"val/answer_length": 4.0}


def table_trainer(tmp_path: Path, loggers: list):
    return SimpleNamespace(loggers=loggers, global_step=7)


RECORDS = [
    {"index": 0, "prompt": "p0", "reference": "#### 1", "answer": "a | b\nc #### 1", "answer_tokens": 6, "step": 7,
     "reference_extracted": "1", "answer_extracted": "1", "exact_match": 1},
    {"index": 1, "prompt": "p1", "reference": "x", "answer": "", "answer_tokens": 0, "step": 7,
     "reference_extracted": None, "answer_extracted": None, "exact_match": None},
]  # fmt: skip


def test_the_table_goes_to_tensorboard_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    write_tables(table_trainer(tmp_path, [logger]), RECORDS, matched=True, folder=str(tmp_path))
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    (text,) = events.Tensors("val/answers/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert text.step == 7
    assert "| step | index | prompt | reference | answer | answer_tokens |" in markdown
    assert "| 7 | 0 | p0 | #### 1 | a \\| b<br>c #### 1 | 6 | 1 | 1 | 1 |" in markdown


def test_the_table_goes_to_weights_and_biases_as_a_table(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    class RecordingWandb(WandbLogger):  # a stand-in: wandb itself is not installed for the tests
        def __init__(self):
            self.tables = []

        def log_table(self, **table):
            self.tables.append(table)

    logger = RecordingWandb()
    write_tables(table_trainer(tmp_path, [logger]), RECORDS, matched=False, folder=str(tmp_path))
    (table,) = logger.tables
    assert table["key"] == "val/answers" and table["step"] == 7
    assert table["columns"] == ["step", "index", "prompt", "reference", "answer", "answer_tokens"]
    assert table["data"][0] == [7, 0, "p0", "#### 1", "a | b\nc #### 1", 6]


def test_off_it_prepares_and_runs_nothing():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"read {name}")

    callback = ValidationAnswers()  # num_prompts 0, the default
    trainer = SimpleNamespace(datamodule=Untouchable(), strategy=Untouchable(), loggers=Untouchable(),
                              sanity_checking=False)  # fmt: skip
    callback.setup(trainer, Untouchable(), "fit")
    callback.on_validation_epoch_end(trainer, Untouchable())


# ---------------------------------------------------------------- through the command line


@pytest.fixture(scope="module")
def sums(tmp_path_factory) -> Path:
    """Two short chats whose answers end with a GSM8K-style ``#### N``, to be learnt by heart."""
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            for question, answer in [("2 + 2?", "#### 4"), ("3 + 6?", "#### 9")]]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("sums") / "sums.jsonl", rows)


def test_a_fit_logs_the_answers_to_its_validation_prompts(tmp_path, tiny_model_dir, sums, tokenizer):
    """The tiny model learns short answers by heart; at each validation it answers the two prompts, and the table in
    the logger's folder holds its answers (transformers' own greedy ones from the exported weights, at the last
    validation) beside the references, with the regex's extracts; val/exact_match and val/answer_length are the
    table's."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_model_dir, sums, model={"learning_rate": 1e-2, "warmup": 0},
        data={"val_sources": [str(sums)], "packing": False, "batch_size": 2, "shuffle": False},
        trainer={"max_steps": 40, "val_check_interval": 20, "check_val_every_n_epoch": None, "max_epochs": -1,
                 "accumulate_grad_batches": 1},
        validation_answers={"num_prompts": 2, "max_new_tokens": 8, "answer_regex": GSM8K_ANSWER, "batch_size": 2},
        checkpoint={"save_end_of_training": True, "output_dir": str(tmp_path / "export")},
    )  # fmt: skip
    main(fit_args(recipe, tmp_path, "run"))
    with open(tmp_path / "run" / "version_0" / TABLE_FILE) as file:
        rows = list(csv.DictReader(file))
    assert [(row["step"], row["index"]) for row in rows] == [("20", "0"), ("20", "1"), ("40", "0"), ("40", "1")]
    assert [row["reference"] for row in rows] == ["#### 4", "#### 9"] * 2
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)
    last = rows[2:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in last]
    expected = greedy_one_at_a_time(model, prompts, 8, tokenizer.eos_token_id)
    assert [row["answer"] for row in last] == tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert [row["answer_tokens"] for row in last] == [str(len(answer)) for answer in expected]
    pattern = re.compile(GSM8K_ANSWER)
    for row in rows:
        extracted = extract_answer(pattern, row["answer"])
        assert row["answer_extracted"] == (extracted or "")
        assert row["exact_match"] == str(int(extracted == extract_answer(pattern, row["reference"])))
    assert "1" in [row["exact_match"] for row in last]  # the answers are learnt (the two prompts told apart or not)
    exact, length = logged(tmp_path, "run", "val/exact_match"), logged(tmp_path, "run", "val/answer_length")
    for step, table in ((19, rows[:2]), (39, last)):
        assert exact[step] == sum(int(row["exact_match"]) for row in table) / 2
        assert length[step] == pytest.approx(sum(int(row["answer_tokens"]) for row in table) / 2)


def test_what_cannot_be_answered_is_one_line(capsys, tmp_path, tiny_model_dir, sums):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, sums, trainer={"max_steps": 2},
                          validation_answers={"num_prompts": 2})  # fmt: skip
    result = failing_here(capsys, *fit_args(recipe, tmp_path / "a", "run"))
    assert_one_line_error(result, "no validation data to answer", "data.val_sources")
    for settings, fragments in [({"answer_regex": "#### ("}, ["answer_regex '#### ('", "not a regular expression"]),
                                ({"num_prompts": -1}, ["num_prompts must be >= 0"])]:  # fmt: skip
        recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, sums, trainer={"max_steps": 2},
                              validation_answers=settings)  # fmt: skip
        assert_one_line_error(failing_here(capsys, *fit_args(recipe, tmp_path / "b", "run")), *fragments)
