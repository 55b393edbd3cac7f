"""Sources mixed by weight: the counts, the sampling, and the mix a data module trains on (GSM8K and ShareGPT)."""

import json
from collections import Counter

import pytest

from conftest import SHAREGPT, gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule
from lt_posttrain.data.mixing import mixture_counts, mixture_indices
from lt_posttrain.errors import UserError


def test_counts_follow_the_weights_and_keep_the_total():
    assert mixture_counts([100, 100], [3, 1]) == [150, 50]
    assert mixture_counts([90, 10], [None, None]) == [50, 50]  # no weight weighs 1: equal shares
    assert mixture_counts([4, 2, 1], [0.5, 0.3, 0.2]) == [4, 2, 1]  # 3.5, 2.1, 1.4: the rest to the largest fraction


def test_zero_weight_leaves_a_source_out_and_bad_weights_are_one_line():
    assert mixture_counts([10, 10], [0, 1]) == [0, 20]
    with pytest.raises(UserError, match="weights must be >= 0"):
        mixture_counts([10, 10], [-1, 1])
    with pytest.raises(UserError, match="weights must be >= 0"):
        mixture_counts([10, 10], [0, 0])


def test_indices_subsample_without_and_repeat_with_replacement():
    groups = [list(range(0, 10)), list(range(10, 14))]
    mixed = mixture_indices(groups, [1, 3], seed=0)  # 14 in all: 4 from the first (of 10), 10 from the second (of 4)
    drawn = Counter(mixed)
    first = [index for index in mixed if index < 10]
    assert len(first) == 4 and len(set(first)) == 4  # a subset, no sample twice
    second = [drawn[index] for index in range(10, 14)]
    assert sum(second) == 10 and sorted(second) == [2, 2, 3, 3]  # each twice, two of them a third time
    assert mixed == mixture_indices(groups, [1, 3], seed=0)
    assert mixed != mixture_indices(groups, [1, 3], seed=1)


def test_data_module_trains_on_the_weighted_mix(tmp_path, tokenizer):
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_chats(30))
    sharegpt_rows = json.loads(SHAREGPT.read_text())
    sharegpt = {
        "name_or_path": str(SHAREGPT),
        "type": "huggingface_instruct",
        "role_mapping": {"user": "conversations.from.human", "assistant": "conversations.from.gpt"},
        "content_key": "value",
        "weight": 1,
    }
    data = InstructDataModule(sources=[{"name_or_path": str(gsm8k), "weight": 1}, sharegpt], max_length=512)
    data.connect(tokenizer)
    data.setup("fit")
    unmixed = InstructDataModule(sources=[str(gsm8k), {**sharegpt, "weight": None}], max_length=512)
    unmixed.connect(tokenizer)
    unmixed.setup("fit")
    total = len(unmixed.train_samples)
    assert len(data.train_samples) == total
    sharegpt_samples = unmixed.train_samples["source"].count(1)
    assert sharegpt_samples >= len(sharegpt_rows) > 30  # at least one sample per conversation
    half = total // 2
    assert Counter(data.train_samples["source"]) == {0: total - half, 1: half}  # equal weights: equal shares
    assert data.mixture == [(str(gsm8k), 30, total - half), (str(SHAREGPT), sharegpt_samples, half)]

    def samples_of(module, number):
        pairs = zip(module.train_samples["input_ids"], module.train_samples["source"])
        return [tuple(ids) for ids, source in pairs if source == number]

    mixed_gsm8k, mixed_sharegpt = samples_of(data, 0), samples_of(data, 1)
    assert set(mixed_gsm8k) == set(samples_of(unmixed, 0))  # the small source: every sample, repeated
    assert max(Counter(mixed_gsm8k).values()) - min(Counter(mixed_gsm8k).values()) <= 1
    assert set(mixed_sharegpt) <= set(samples_of(unmixed, 1))  # the large one: a subset, no sample twice
    assert len(set(mixed_sharegpt)) == len(mixed_sharegpt) == half


def test_hold_out_happens_before_the_mix(tmp_path, tokenizer):
    small = write_jsonl(tmp_path / "small.jsonl", gsm8k_chats(4))
    large = write_jsonl(tmp_path / "large.jsonl", gsm8k_chats(40, start=100))
    sources = [{"name_or_path": str(small), "weight": 10}, {"name_or_path": str(large), "weight": 1}]
    data = InstructDataModule(sources=sources, val_fraction=0.25, max_length=512)
    data.connect(tokenizer)
    data.setup("fit")
    validated = {tuple(ids) for ids in data.val_samples["input_ids"]}
    trained = {tuple(ids) for ids in data.train_samples["input_ids"]}
    assert not validated & trained  # an upsampled sample is never also a validation sample
    assert Counter(data.train_samples["source"])[0] > 4  # the small source was repeated


def test_weighted_fit_runs_from_the_command_line(tmp_path, tiny_model_dir):
    from lt_posttrain import run

    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_chats(8))
    other = write_jsonl(tmp_path / "more.jsonl", gsm8k_chats(8, start=50))
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {
            "sources": [{"name_or_path": str(gsm8k), "weight": 0.75}, {"name_or_path": str(other), "weight": 0.25}],
            "max_length": 256,
            "batch_size": 4,
        },
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},  # fmt: skip
        "checkpoint": {"save_end_of_training": False},
    }
    cli = run(config, "fit")
    assert Counter(cli.datamodule.train_samples["source"]) == {0: 12, 1: 4}
    assert cli.trainer.global_step == 2


def test_prepare_reports_the_mix(tmp_path, tiny_model_dir):
    from test_cli import lt_posttrain
    from test_data_commands import recipe

    first = write_jsonl(tmp_path / "first.jsonl", gsm8k_chats(6))
    second = write_jsonl(tmp_path / "second.jsonl", gsm8k_chats(10, start=20))
    sources = [{"name_or_path": str(first), "weight": 3}, {"name_or_path": str(second), "weight": 1}]
    config = recipe(tmp_path / "r.yaml", {"name_or_path": str(tiny_model_dir)}, {"sources": sources, "max_length": 512})
    result = lt_posttrain("data", "prepare", "--config", config, "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    train = json.loads(result.stdout)["train"]
    assert train["samples"] == 16
    assert train["mixture"] == [
        {"source": str(first), "available": 6, "drawn": 12},
        {"source": str(second), "available": 10, "drawn": 4},
    ]
    table = lt_posttrain("data", "prepare", "--config", config)
    assert f"train mix: 12 samples from {first} (6 available)." in table.stdout
