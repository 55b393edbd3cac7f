"""``--help`` lists the keys of the trainer and the data module, and a misspelled key's error names the command that
lists the valid ones (which does list the suggestion)."""

import inspect
import re

import pytest

from cli_runs import failing_here
from lt_posttrain import InstructDataModule, SFTModule
from lt_posttrain.cli import main


def help_of(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([*args, "--help"])
    assert exit.value.code in (0, None)
    return capsys.readouterr().out


def init_keys(cls) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs")]


def test_fit_help_lists_every_key_of_the_default_trainer_and_data_module(capsys):
    text = help_of(capsys, "fit")
    listed = set(re.findall(r"^  (--[\w.]+)", text, re.MULTILINE))
    assert {f"--model.{key}" for key in init_keys(SFTModule)} <= listed
    assert {f"--data.{key}" for key in init_keys(InstructDataModule)} <= listed
    assert {"--trainer.max_steps", "--checkpoint.output_dir"} <= listed  # and the sections listed before


def test_help_lists_the_keys_of_the_trainer_the_command_line_names(capsys):
    text = help_of(capsys, "fit", "--model", "custom_trainer.LabelSmoothingSFT")
    assert "keys of --model custom_trainer.LabelSmoothingSFT" in text
    assert re.search(r"^  --model\.smoothing ", text, re.MULTILINE)


def test_data_prepare_help_lists_the_data_keys(capsys):
    listed = set(re.findall(r"^  (--[\w.]+)", help_of(capsys, "data", "prepare"), re.MULTILINE))
    assert {f"--data.{key}" for key in init_keys(InstructDataModule)} <= listed


@pytest.mark.parametrize(
    "command, typo, suggestion",
    [
        (["fit"], "--model.learning_rat", "--model.learning_rate"),
        (["fit"], "--data.max_lenght", "--data.max_length"),
        (["fit"], "--trainer.max_step", "--trainer.max_steps"),
        (["data", "prepare"], "--data.max_lenght", "--data.max_length"),
    ],
)
def test_a_misspelled_keys_error_names_the_command_that_lists_the_suggestion(capsys, command, typo, suggestion):
    result = failing_here(capsys, *command, "--model.name_or_path", "org/model", "--data.sources", "[chats.jsonl]", typo, "1")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert f"did you mean '{suggestion[2:]}'?" in line, line
    lister = re.search(r"'(lt-posttrain [^']+)' lists the valid keys$", line)
    assert lister, line
    program, *args = lister.group(1).split()
    assert args[: len(command)] == command
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args)
    assert re.search(rf"^  {re.escape(suggestion)} ", capsys.readouterr().out, re.MULTILINE)
