"""``lt-posttrain data prepare`` and ``lt-posttrain data preview``: a recipe's data, tokenized and looked at, without
loading the model's weights.

Both read the recipe of ``fit`` (``--config recipe.yaml``) and take its keys on the command line the same way
(``--data.max_length 1024``, ``--data.sources '[chats.jsonl]'``, ``--model.name_or_path ...``). The ``data`` section
is parsed and validated as ``fit`` does it (an :class:`InstructDataModule`, flat keys or ``class_path``/
``init_args``); of the ``model`` section only ``name_or_path`` and ``trust_remote_code`` are read, for the tokenizer.
"""

import contextlib
import inspect
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, Literal, Optional, Union

from jsonargparse import ArgumentParser, auto_cli

from lt_posttrain.batch import IGNORE_INDEX
from lt_posttrain.cli.help import asks_for_help, print_class_keys
from lt_posttrain.cli.parse_errors import ConfigError, config_files, explain_parser_error
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.data.dataset import conversation_samples, masking_of
from lt_posttrain.data.source_types import load_source_type
from lt_posttrain.data.sources import Source, load_rows
from lt_posttrain.data.stats import PERCENTILES, sample_stats
from lt_posttrain.data.streams import open_stream
from lt_posttrain.data.tokenize import count_loss_tokens
from lt_posttrain.errors import UserError
from lt_posttrain.model.loading import load_tokenizer

Format = Literal["text", "json"]
Section = Optional[dict[str, Any]]
LOSS_STYLE, CONTEXT_STYLE = "black on green", "dim"
LOSS_MARKS = ("\u27e6", "\u27e7")  # around the tokens that carry loss where there is no colour: ⟦ ⟧


# -- the commands ------------------------------------------------------------------------------------------------
def _fit_recipe_keys(
    trainer: Section = None,
    checkpoint: Section = None,
    predictions: Section = None,
    throughput: Section = None,
    training_state: Section = None,
    nonfinite_loss: Section = None,
    validation_answers: Section = None,
    seed_everything: Union[bool, int] = True,
    optimizer: Union[dict, str, None] = None,
    lr_scheduler: Union[dict, str, None] = None,
    ckpt_path: Optional[str] = None,
    weights_only: Optional[bool] = None,
) -> None:
    """The keys of a ``fit`` recipe that the data commands accept and do not use.

    Args:
        trainer: accepted so that a ``fit`` recipe can be given unchanged; not used.
        checkpoint: not used (a ``fit`` recipe section).
        predictions: not used (a ``fit`` recipe section).
        throughput, training_state, nonfinite_loss, validation_answers: not used (``fit`` recipe sections).
        seed_everything: not used (a ``fit`` recipe key).
        optimizer: not used (a ``fit`` recipe key).
        lr_scheduler: not used (a ``fit`` recipe key).
        ckpt_path: not used (a ``fit`` recipe key).
        weights_only: not used (a ``fit`` recipe key).
    """


def takes_fit_recipe(command):
    """``command``, whose ``**_fit_keys`` take the keys of :func:`_fit_recipe_keys`, with those keys added to its
    signature and docstring, where jsonargparse reads its options and their help."""
    signature = inspect.signature(command)
    own = [parameter for parameter in signature.parameters.values() if parameter.kind is not parameter.VAR_KEYWORD]
    fit_keys = inspect.signature(_fit_recipe_keys).parameters.values()
    command.__signature__ = signature.replace(parameters=[*own, *fit_keys])
    command.__doc__ = command.__doc__.rstrip() + "\n" + _fit_recipe_keys.__doc__.split("Args:\n", 1)[1]
    return command


@takes_fit_recipe
def prepare(
    data: InstructDataModule,
    model: Section = None,
    format: Format = "text",
    **_fit_keys,
) -> None:
    """Tokenize a recipe's data as fit will, and print what it holds.

    The samples are cached by ``datasets``, so a ``fit`` with the same data and tokenizer reuses them. Printed for
    the training and the validation data: rows in, samples kept, rows dropped, samples cut to max_length, tokens,
    loss tokens and their share, and token-length percentiles.

    Args:
        data: the recipe's ``data`` section (``InstructDataModule``), e.g. ``--data.max_length 1024``.
        model: the recipe's ``model`` section; only ``name_or_path`` and ``trust_remote_code`` are read, to load the
            tokenizer (never the weights).
        format: ``text`` (a table) or ``json`` (one JSON object).
    """
    if data.streams:
        streamed = next(source.name_or_path for source in data.sources if source.streaming)
        raise UserError(f"data prepare counts every row, and data source {streamed!r} is streamed (tokenized as fit "
                        "reads it, never counted whole); see its first samples with lt-posttrain data preview")
    data.connect(tokenizer_of(model))
    data.setup("fit")
    report = {"tokenizer": str(model_keys(model)["name_or_path"]), **data_report(data)}
    print(json.dumps(report) if format == "json" else format_report(report))


@takes_fit_recipe
def preview(
    data: InstructDataModule,
    model: Section = None,
    num: int = 3,
    format: Format = "text",
    **_fit_keys,
) -> None:
    """Show the first training samples as the model sees them, the tokens that carry loss highlighted.

    The samples are taken in source order, before shuffling and before the validation hold-out.

    Args:
        data: the recipe's ``data`` section (``InstructDataModule``), e.g. ``--data.max_length 1024``.
        model: the recipe's ``model`` section; only ``name_or_path`` and ``trust_remote_code`` are read, to load the
            tokenizer (never the weights).
        num: how many samples to show.
        format: ``text`` (tokens that carry loss on a green background, the others dim; without colour, as
            when the output is not a terminal, between ``⟦`` and ``⟧``) or ``json`` (one
            ``{"messages", "input_ids", "labels"}`` object per line; ``labels`` is -100 where there is no loss).
    """
    if num < 0:
        raise UserError(f"--num must be 0 or more, got {num}")
    tokenizer = tokenizer_of(model)
    data.connect(tokenizer)
    samples = first_samples(data, num)
    if format == "json":
        for messages, sample in samples:
            print(json.dumps({"messages": messages, "input_ids": sample["input_ids"], "labels": sample["labels"]}))
        return
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    marked = console.color_system is None  # no colour (not a terminal, NO_COLOR): the mask needs marks
    console.print(_legend(marked))
    for index, (_messages, sample) in enumerate(samples):
        console.print()
        console.print(_header(index, sample))
        console.print(sample_text(sample["input_ids"], sample["labels"], tokenizer, marked))


# -- the pieces ---------------------------------------------------------------------------------------------------
def model_keys(model: Optional[dict]) -> dict:
    """The init arguments of a recipe's ``model`` section, flat or ``class_path``/``init_args`` (flat keys, e.g. from
    ``--model.name_or_path``, win); ``name_or_path`` is required."""
    model = model or {}
    flat = {key: value for key, value in model.items() if key not in ("class_path", "init_args")}
    keys = {**(model.get("init_args") or {}), **flat}
    if not keys.get("name_or_path"):
        raise UserError("model.name_or_path is missing: the tokenizer is read from it (set it in the recipe or give "
                        "--model.name_or_path)")  # fmt: skip
    return keys


def tokenizer_of(model: Optional[dict]):
    """The tokenizer of a recipe's ``model`` section (its weights are never loaded)."""
    keys = model_keys(model)
    return load_tokenizer(str(keys["name_or_path"]), trust_remote_code=bool(keys.get("trust_remote_code", False)))


def first_samples(data: InstructDataModule, num: int) -> Iterator[tuple[list[dict], dict]]:
    """The first ``num`` training samples in source order, each with the conversation it came from: the stages the
    data module runs (rows, messages, tokens), row by row, keeping the samples that carry loss as it does."""
    if num <= 0:
        return
    for source in data.sources:
        source_type = load_source_type(source)
        render = source_type.resolved_renderer(data.tokenizer, data.chat_template)
        rows = open_stream(source) if source.streaming else enumerate(load_rows(source))
        for index, row in rows:
            messages, tools = source_type.messages(row, index), source_type.tools(row, index)
            where = f"data source {source.name_or_path!r}, row {index}"
            masking = masking_of(source)
            samples = conversation_samples(messages, render, data.tokenizer, data.max_length, where, masking, tools)
            for sample in samples:
                if data.overlong == "drop" and sample["truncated"]:
                    continue
                yield messages, sample
                num -= 1
                if num == 0:
                    return


def data_report(data: InstructDataModule) -> dict:
    """The statistics of a data module after ``setup("fit")``: ``max_length``, ``packing`` and, per split (``train``,
    ``validation`` (``None`` without validation data), and ``test`` with ``test_sources``), :func:`sample_stats`
    (plus ``packed_rows`` with packing, and the training rows dropped by reason)."""

    def rows_of(sources: list[Source]) -> int:
        return sum(len(load_rows(source)) for source in sources)

    def stats(samples, packs, rows=None, held_out=0, dropped=None) -> dict:
        result = sample_stats(samples, rows, held_out, dropped)
        if data.packing:
            result["packed_rows"] = len(packs)
        return result

    held_out = len(data.val_samples) if data.val_samples is not None and not data.val_sources else 0
    reasons: dict[str, int] = {}
    for (_source, reason), count in data.dropped.items():
        reasons[reason] = reasons.get(reason, 0) + count
    report = {
        "max_length": data.max_length,
        "packing": data.packing,
        "train": {
            **stats(data.train_samples, data.train_packs, rows_of(data.sources), held_out, sum(reasons.values())),
            "dropped_reasons": reasons,
        },
        "validation": None,
    }
    if data.mixture:
        report["train"]["mixture"] = [
            {"source": name, "available": available, "drawn": drawn} for name, available, drawn in data.mixture
        ]
    if data.val_samples is not None:
        val_rows = rows_of(data.val_sources) if data.val_sources else None  # else held out from the training rows
        report["validation"] = stats(data.val_samples, data.val_packs, val_rows)
    if data.test_sources:
        report["test"] = stats(data.test_samples, data.test_packs, rows_of(data.test_sources))
    return report


def format_report(report: dict) -> str:
    """:func:`data_report` as a table."""
    columns = ["rows", "held out", "samples", "dropped", "truncated", "tokens", "loss tokens", "loss share"]
    columns += [f"p{p}" for p in PERCENTILES] + ["max"]
    if report["packing"]:
        columns.append("packed rows")
    splits = [name for name in ("train", "validation", "test") if report.get(name)]
    table = [["", *columns]]
    for name in splits:
        s = report[name]
        held_out = s["held_out"] if s["rows"] is not None else None
        values = [s["rows"], held_out, s["samples"], s["dropped"], s["truncated"], s["tokens"], s["loss_tokens"],
                  f"{100 * s['loss_share']:.1f}%", *s["length"].values(), s.get("packed_rows")]  # fmt: skip
        table.append([name, *("-" if value is None else str(value) for value in values[: len(columns)])])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    packing = "on" if report["packing"] else "off"
    lines = [
        f"tokenizer {report.get('tokenizer', '?')}, max_length {report['max_length']}, packing {packing}",
        "",
        *("  ".join([row[0].ljust(widths[0]), *map(str.rjust, row[1:], widths[1:])]) for row in table),
        "",
        "rows: source rows read; held out: samples set aside for validation (data.val_fraction); dropped: rows with no",
        "assistant token to learn from; truncated: samples cut to max_length; p50..max: tokens per sample.",
    ]  # fmt: skip
    for part in report["train"].get("mixture", []):
        lines.append(f"train mix: {part['drawn']} samples from {part['source']} ({part['available']} available).")
    reasons = report["train"].get("dropped_reasons")
    if reasons:
        lines.append("train rows dropped: " + ", ".join(f"{n} ({reason})" for reason, n in reasons.items()) + ".")
    if report.get("validation") is None:
        lines.append("No validation data (set data.val_fraction or data.val_sources).")
    return "\n".join(lines)


def token_pieces(input_ids: list[int], tokenizer, context: int = 4) -> list[str]:
    """The text of each token as it appears in the decoded sequence (their concatenation is the decoded text).

    A token decoded alone can lose its leading space (SentencePiece) or hold half a UTF-8 character, so each token
    is decoded after a few tokens of context and only the new text is kept; a token that ends inside a character
    gets ``""`` and the token that completes it the whole character.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces, start = [], 0  # start: the first token whose text is not out yet
    for end in range(1, len(input_ids) + 1):
        left = max(0, start - context)
        before, after = decode(input_ids[left:start]), decode(input_ids[left:end])
        if after.endswith("\ufffd") and end < len(input_ids) and end - start < 4:
            pieces.append("")
            continue
        pieces.append(after[len(before) :] if after.startswith(before) else decode(input_ids[start:end]))
        start = end
    return pieces


def sample_text(input_ids: list[int], labels: list[int], tokenizer, marked: bool = False):
    """A ``rich`` ``Text`` of one sample: tokens that carry loss on green, the others dim; with ``marked`` (output
    without colour), each run of tokens that carry loss between :data:`LOSS_MARKS` as well.

    The text is decoded a run of tokens with the same mask at a time (a few decodes per turn, so a sample of a
    million tokens shows in seconds). Where a run ends inside a character, the sample is decoded token by token
    (:func:`token_pieces`), a character split over tokens being trained if any of its tokens is.
    """
    from rich.text import Text

    trained = [label != IGNORE_INDEX for label in labels]
    runs: list[tuple[str, bool]] | None = []
    start = 0
    while start < len(input_ids):
        end = start
        while end < len(input_ids) and trained[end] == trained[start]:
            end += 1
        piece = _decoded(input_ids, start, end, tokenizer)
        if piece is None:
            runs = None
            break
        runs.append((piece, trained[start]))
        start = end
    if runs is None or "".join(piece for piece, _ in runs) != _decode(input_ids, tokenizer):
        runs, carried = [], False
        for piece, is_trained in zip(token_pieces(input_ids, tokenizer), trained):
            carried = carried or is_trained  # a character split over tokens is trained if any part is
            if piece:
                runs.append((piece, carried))
                carried = False
    text = Text()
    for piece, is_trained in runs:
        if marked and is_trained:
            piece = LOSS_MARKS[0] + piece + LOSS_MARKS[1]
        text.append(piece, style=LOSS_STYLE if is_trained else CONTEXT_STYLE)
    return text


def _decode(ids: list[int], tokenizer) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decoded(input_ids: list[int], start: int, end: int, tokenizer, context: int = 4):
    """The text of tokens ``[start, end)`` as it appears in the decoded sequence, or ``None`` when a character is
    split at either end."""
    left = max(0, start - context)
    before, after = _decode(input_ids[left:start], tokenizer), _decode(input_ids[left:end], tokenizer)
    if "\ufffd" in before[-1:] + after[-1:] or not after.startswith(before):
        return None
    return after[len(before) :]


def _legend(marked: bool):
    from rich.text import Text

    if marked:
        return Text(f"{LOSS_MARKS[0]}tokens that carry loss{LOSS_MARKS[1]}; the rest is context, no loss")
    return Text.assemble(
        "green: ", ("tokens that carry loss", LOSS_STYLE), "; dim: ", ("context, no loss", CONTEXT_STYLE)
    )


def _header(index: int, sample: dict):
    from rich.text import Text

    counts = f"{len(sample['input_ids'])} tokens, {count_loss_tokens(sample['labels'])} loss tokens"
    cut = f", {sample['truncated']} tokens cut" if sample["truncated"] else ""
    return Text(f"── sample {index}: {counts}{cut} ──", style="bold")


# -- the command line ---------------------------------------------------------------------------------------------
# One level of subcommands under the prog ``lt-posttrain data``: jsonargparse 4.53 loses the name of an unknown
# recipe key under nested subcommands (``{"data": {"prepare": ...}}`` reports it as ``'data'``).
COMMANDS = {"prepare": prepare, "preview": preview}


class _Parser(ArgumentParser):
    """jsonargparse's parser whose usage-and-error output becomes one :class:`ConfigError`, as in ``fit``."""

    _parsing = False

    def parse_args(self, args=None, *rest, **kwargs):
        if _Parser._parsing:  # a parser used inside the outer parse: leave its errors to it
            return super().parse_args(args, *rest, **kwargs)
        printed = io.StringIO()
        _Parser._parsing = True
        try:
            with contextlib.redirect_stderr(printed):
                return super().parse_args(args, *rest, **kwargs)
        except SystemExit as exit:
            argv = list(sys.argv[1:] if args is None else args)
            subcommand = getattr(self._subcommands_action, "_name_parser_map", {}).get(argv[0] if argv else "")
            if exit.code in (0, None) and subcommand is not None and asks_for_help(argv):
                print_class_keys(subcommand, argv, {"data": "lt_posttrain.InstructDataModule"}, f"{self.prog} {argv[0]}")
            if exit.code in (0, None) or "error:" not in printed.getvalue():
                raise
            message = printed.getvalue().split("error:", 1)[1]
            command = f"{self.prog} {argv[0]}" if subcommand is not None else self.prog
            raise ConfigError(explain_parser_error(message, _option_names(self), config_files(args), command)) from None
        finally:
            _Parser._parsing = False
            if "error:" not in printed.getvalue():
                sys.stderr.write(printed.getvalue())


def _option_names(parser: ArgumentParser) -> list[str]:
    options, parsers = set(), [parser]
    while parsers:
        current = parsers.pop()
        options.update(option for option in current._option_string_actions if option.startswith("--"))
        parsers.extend(getattr(getattr(current, "_subcommands_action", None), "_name_parser_map", {}).values())
    return sorted(options)


def run(args: list[str]) -> None:
    """Run ``lt-posttrain data ARGS`` (``args``: ``["prepare", "--config", ...]``), parsed by ``jsonargparse``; bad
    input is raised as a ``UserError``."""
    try:
        auto_cli(COMMANDS, args=[str(arg) for arg in args], as_positional=False, parser_class=_Parser,
                 prog="lt-posttrain data", description="Prepare or preview the data of a recipe.")  # fmt: skip
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
