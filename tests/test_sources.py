"""Sources and their types: the fields a recipe gives, how a type is found (entry points, dotted paths), and the
errors for what cannot be found."""

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from conftest import SHAREGPT, write_jsonl
from lt_posttrain import InstructDataModule, Source
from lt_posttrain.data.source_types import known_types, load_source_type, registry
from lt_posttrain.data.sources import as_source, load_rows
from lt_posttrain.errors import UserError

BUILT_IN = ["huggingface_instruct", "messages", "prompt_generation", "ragfit"]

PLUGIN = '''
from lt_posttrain.data.source_types.base import SourceType


class ShoutSourceType(SourceType):
    """Test plugin: the ``text`` column as a question, shouted back as the answer (``options.suffix`` appended)."""

    def messages(self, row, index):
        suffix = self.source.options.get("suffix", "")
        answer = row["text"].upper() + suffix
        return [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": answer}]


class NotASourceType:
    pass
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """``my_formats`` importable, and the registry's caches cleared before and after."""
    (tmp_path / "my_formats.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._registered.cache_clear()
    registry._source_type_class.cache_clear()
    yield tmp_path
    sys.modules.pop("my_formats", None)
    registry._registered.cache_clear()
    registry._source_type_class.cache_clear()


def test_every_field_is_documented():
    doc = Source.__doc__
    for field in dataclasses.fields(Source):
        assert f"\n        {field.name}: " in doc, f"Source.{field.name} is not in the docstring"


def test_defaults_keep_old_recipes_working():
    source = as_source("chats.jsonl")
    assert (source.type, source.messages_column, source.content_key, source.role_key) == (
        "messages",
        "messages",
        "content",
        "role",
    )
    assert source.weight is None and source.options == {} and source.role_mapping is None
    assert as_source({"name_or_path": "x.jsonl", "weight": 0.3}).weight == 0.3


def test_unknown_source_key_suggests_the_closest():
    with pytest.raises(
        UserError, match=r"data source 'x.jsonl': unknown key 'role_maping' \(did you mean 'role_mapping'\?\)"
    ):
        as_source({"name_or_path": "x.jsonl", "role_maping": {"user": "question"}})
    with pytest.raises(UserError, match=r"no 'name_or_path'"):
        as_source({"type": "messages"})


def test_sharegpt_json_array_loads_as_rows():
    rows = load_rows(Source(name_or_path=str(SHAREGPT)))
    assert len(rows) == 500 and set(rows.column_names) == {"id", "conversations"}
    assert rows[0]["conversations"][0] == {"from": "human", "value": "Who are you?"}


def test_built_in_types_are_entry_points():
    assert set(BUILT_IN) <= set(known_types())
    for name in BUILT_IN:
        source = Source(name_or_path="x.jsonl", type=name, output_key="answer" if name == "ragfit" else None)
        assert type(load_source_type(source)).__module__ == f"lt_posttrain.data.source_types.{name}"


def test_only_the_chosen_type_is_imported():
    code = textwrap.dedent(
        """
        import sys
        from lt_posttrain import Source
        from lt_posttrain.data.source_types import load_source_type
        load_source_type(Source(name_or_path="x.jsonl", type="prompt_generation"))
        print(sorted(name.rsplit(".", 1)[1] for name in sys.modules if name.startswith("lt_posttrain.data.source_types.")))
        """
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "['base', 'prompt_generation', 'registry']"


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(UserError) as error:
        load_source_type(Source(name_or_path="data.jsonl", type="ragfti"))
    message = str(error.value)
    assert message.startswith("data source 'data.jsonl': unknown type 'ragfti' (did you mean 'ragfit'? known types: ")
    assert all(name in message for name in BUILT_IN) and "dotted import path" in message


@pytest.mark.parametrize("type_name", ["my_formats.ShoutSourceType", "my_formats:ShoutSourceType"])
def test_dotted_path_type_with_options(plugin_module, tokenizer, type_name):
    path = write_jsonl(plugin_module / "words.jsonl", [{"text": "hello"}])
    source = {"name_or_path": str(path), "type": type_name, "options": {"suffix": "!"}}
    source_format = load_source_type(as_source(source))
    assert source_format.messages({"text": "hello"}, 0)[1] == {"role": "assistant", "content": "HELLO!"}
    datamodule = InstructDataModule(sources=[source], batch_size=1)
    datamodule.connect(tokenizer)
    datamodule.setup("fit")
    sample = datamodule.train_samples[0]
    trained = [token for token, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "HELLO!<|im_end|>"


def test_plugin_registered_by_entry_point(plugin_module):
    dist = plugin_module / "my_formats-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-formats\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lt_posttrain.source_types]\nshout = my_formats:ShoutSourceType\n")
    assert "shout" in known_types()
    source_format = load_source_type(Source(name_or_path="words.jsonl", type="shout"))
    assert type(source_format).__name__ == "ShoutSourceType"


@pytest.mark.parametrize(
    ("type_name", "message"),
    [
        (
            "no_such_package.formats.Format",
            r"type 'no_such_package.formats.Format': cannot import 'no_such_package.formats'",
        ),
        ("my_formats.Missing", r"type 'my_formats.Missing': module 'my_formats' has no 'Missing'"),
        ("my_formats.NotASourceType", r"type 'my_formats.NotASourceType' is not a source type"),
    ],
)
def test_dotted_path_errors(plugin_module, type_name, message):
    with pytest.raises(UserError, match=rf"^data source 'x.jsonl': {message}"):
        load_source_type(Source(name_or_path="x.jsonl", type=type_name))


def test_recipe_keys_parse_into_a_source():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InstructDataModule, "data")
    source = (
        "{type: huggingface_instruct, name_or_path: chats.jsonl, role_mapping: {user: question, assistant: answer}}"
    )
    config = parser.parse_args(["--data.sources", f"[{source}]"])
    [parsed] = parser.instantiate_classes(config).data.sources
    assert parsed.type == "huggingface_instruct" and parsed.role_mapping == {"user": "question", "assistant": "answer"}


def test_hub_source_asks_for_its_split_and_subset_and_knows_gsm8k(monkeypatch, tokenizer):
    """A hub id goes to ``datasets.load_dataset`` with its subset and split (stood in for by the local GSM8K-train
    file: no hub here); ``openai/gsm8k`` needs no role_mapping."""
    import datasets

    from conftest import GSM8K

    asked = []
    local = datasets.load_dataset("json", data_files=str(GSM8K), split="train")

    def load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = {"name_or_path": "openai/gsm8k", "subset": "main", "split": "train", "type": "huggingface_instruct",
              "sample_count": 5}  # fmt: skip
    data = InstructDataModule(sources=[source], max_length=512)
    data.connect(tokenizer)
    data.setup("fit")
    assert asked == [("openai/gsm8k", "main", "train")]
    first = tokenizer.decode(data.train_samples[0]["input_ids"])
    assert local[0]["question"] in first and local[0]["answer"] in first and len(data.train_samples) == 5


def test_unreachable_hub_source_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^data source 'openai/gsm8k' \(split 'test', subset 'main'\): not a local path"):
        load_rows(Source(name_or_path="openai/gsm8k", subset="main", split="test"))


def test_parquet_arrow_and_a_folder_hold_the_same_rows(tmp_path):
    import datasets

    from conftest import GSM8K

    rows = datasets.load_dataset("json", data_files=str(GSM8K), split="train").select(range(12))
    rows.to_parquet(str(tmp_path / "gsm8k.parquet"))
    (tmp_path / "shards").mkdir()
    rows.select(range(6)).to_json(str(tmp_path / "shards" / "a.jsonl"))
    rows.select(range(6, 12)).to_json(str(tmp_path / "shards" / "b.jsonl"))
    rows.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "gsm8k.parquet", tmp_path / "shards", arrow):
        loaded = load_rows(Source(name_or_path=str(path)))
        assert loaded["question"] == rows["question"], path


def test_sample_count_after_a_seeded_shuffle():
    from conftest import GSM8K

    first = load_rows(Source(name_or_path=str(GSM8K), sample_count=5))
    assert len(first) == 5
    shuffled = load_rows(Source(name_or_path=str(GSM8K), sample_count=5, shuffle=True, seed=1))
    again = load_rows(Source(name_or_path=str(GSM8K), sample_count=5, shuffle=True, seed=1))
    other = load_rows(Source(name_or_path=str(GSM8K), sample_count=5, shuffle=True, seed=2))
    assert shuffled["question"] == again["question"] != first["question"]
    assert shuffled["question"] != other["question"]


def test_a_folder_of_mixed_formats_is_one_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"messages": []}])
    (tmp_path / "b.csv").write_text("x\n1\n")
    with pytest.raises(UserError, match=r"a folder must hold files of one format \(found: csv, json\)"):
        load_rows(Source(name_or_path=str(tmp_path)))


def test_every_row_dropped_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "questions.jsonl", [{"messages": [{"role": "user", "content": "Why?"}]}] * 3)
    data = InstructDataModule(sources=[str(path)])
    data.connect(tokenizer)
    with pytest.raises(UserError, match=r"no training sample has an assistant turn.*3 rows dropped"):
        data.setup("fit")
