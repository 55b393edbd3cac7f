"""``ValidationAnswers``: at each validation, the first validation prompts answered by the model in training and
logged as a table beside their references, with the mean answer length and, from a regular expression, the share of
exact answers."""

import contextlib
import csv
import math
import re
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import torch

from lt_posttrain.errors import UserError
from lt_posttrain.model.generation import generate_answers
from lt_posttrain.training.strategy import FSDP, distribution, gather_objects

TABLE_FILE = "validation_answers.csv"
COLUMNS = ["step", "index", "prompt", "reference", "answer", "answer_tokens"]
MATCH_COLUMNS = ["reference_extracted", "answer_extracted", "exact_match"]


class ValidationAnswers(L.Callback):
    """After each validation (not the sanity check), the first ``num_prompts`` validation samples are answered: the
    prompt is a sample's tokens before its last trained answer, the reference that answer
    (``InstructDataModule.generation_prompts``). Each rank answers its share (prompt ``i`` goes to rank
    ``i % world_size``), in batches of ``batch_size`` with the KV cache; rank 0 gathers them and writes the table:
    ``validation_answers.csv`` in the logger's folder (a row per prompt and validation, with its ``step``), and a
    text table under ``val/answers`` in TensorBoard or a table in Weights & Biases when those loggers are used.
    ``val/answer_length`` (mean tokens per answer) is logged, and ``val/exact_match`` with ``answer_regex``.

    Under DeepSpeed ZeRO-3 every rank runs as many generation calls and steps as the others (each forward gathers
    the weights with all ranks). FSDP is refused (its weights are whole only inside the model's own forward).

    Args:
        num_prompts: validation prompts answered each validation; 0 (the default): off, nothing is prepared or run.
        max_new_tokens: tokens generated per answer at most (default: the model's ``max_new_tokens``).
        batch_size: prompts generated together.
        do_sample: sample with ``temperature`` and ``top_p`` instead of greedy decoding; the draws come from a
            generator seeded with ``seed``, the step and the rank, so training's random state is left as it was.
        temperature: sampling temperature.
        top_p: nucleus sampling's probability mass.
        seed: seed of the sampling.
        answer_regex: a regular expression that extracts the answer from a text (its first group if it has one,
            else the whole match; the last match in the text), e.g. ``'#### (\\S+)'`` for GSM8K's ``#### 42``:
            ``val/exact_match`` is the share of prompts whose answer's extract equals the reference's (prompts whose
            reference has none are left out). Empty (the default): no exact match. (A plain string, not an optional
            one: jsonargparse reads an optional string's value as YAML, where ``#### ...`` is a comment, so null.)
    """

    def __init__(
        self,
        num_prompts: int = 0,
        max_new_tokens: Optional[int] = None,
        batch_size: int = 8,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        answer_regex: str = "",
    ):
        if num_prompts < 0 or batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
            raise UserError(f"validation_answers: num_prompts must be >= 0, batch_size and max_new_tokens >= 1, got "
                            f"{num_prompts}, {batch_size} and {max_new_tokens}")  # fmt: skip
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise UserError(f"validation_answers: temperature must be > 0 and top_p in (0, 1], got {temperature} and "
                            f"{top_p}")  # fmt: skip
        try:
            self.pattern = re.compile(answer_regex) if answer_regex else None
        except re.error as error:
            raise UserError(f"validation_answers.answer_regex {answer_regex!r}: not a regular expression ({error})")
        self.num_prompts, self.max_new_tokens, self.batch_size = num_prompts, max_new_tokens, batch_size
        self.do_sample, self.temperature, self.top_p, self.seed = do_sample, temperature, top_p, seed
        self._prompts: Optional[list[dict]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The prompts, read once (the data module is set up by now): no validation data is one line before
        training starts, not at the first validation."""
        if not self.num_prompts or stage not in ("fit", "validate"):
            return
        if distribution(trainer.strategy).family == FSDP:
            raise UserError("validation_answers: answers are generated under one device, DDP and DeepSpeed, not FSDP "
                            "(its weights are whole only inside the model's own forward); set num_prompts 0")
        generation_prompts = getattr(trainer.datamodule, "generation_prompts", None)
        if generation_prompts is None:
            raise UserError(f"validation_answers: the data module ({type(trainer.datamodule).__name__}) gives no "
                            "prompts to answer (it has no generation_prompts); set num_prompts 0")  # fmt: skip
        self._prompts = generation_prompts(self.num_prompts)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._prompts or trainer.sanity_checking:
            return
        max_new_tokens = self.max_new_tokens or pl_module.hparams.get("max_new_tokens", 256)
        records = answer_prompts(
            pl_module.model, pl_module.tokenizer, self._prompts, trainer.global_rank, trainer.world_size,
            max_new_tokens=max_new_tokens, batch_size=self.batch_size, synced=distribution(trainer.strategy).zero3,
            sampling=self._sampling(trainer),
        )  # fmt: skip
        for record in records:
            record.update(step=trainer.global_step, **extract_answers(record, self.pattern))
        for name, value in answer_metrics(records, self.pattern).items():
            pl_module.log(name, torch.tensor(value), rank_zero_only=True)
        folder = trainer.log_dir or trainer.default_root_dir  # on every rank: log_dir is a collective (a broadcast)
        if trainer.is_global_zero:
            write_tables(trainer, records, self.pattern is not None, folder)

    def _sampling(self, trainer: L.Trainer) -> Optional[dict]:
        if not self.do_sample:
            return None
        seed = self.seed + trainer.global_step * trainer.world_size + trainer.global_rank
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": seed}


def answer_prompts(model, tokenizer, prompts: list[dict], rank: int = 0, world_size: int = 1, *,
                   max_new_tokens: int, batch_size: int = 8, synced: bool = False,
                   sampling: Optional[dict] = None) -> list[dict]:  # fmt: skip
    """Every prompt's answer, on every rank: this rank answers prompts ``rank, rank + world_size, ...`` in batches,
    then the ranks gather them (a collective: every rank calls it).

    Args:
        prompts: ``{"input_ids", "prompt", "reference"}`` each (``InstructDataModule.generation_prompts``).
        synced: the model's weights are partitioned over the ranks (ZeRO-3): every rank makes as many ``generate``
            calls as the others (a rank short of prompts repeats one and drops the answer) and generates until all
            are done.
        sampling: ``{"temperature", "top_p", "seed"}`` to sample (from a generator of its own), None for greedy.

    Returns:
        ``{"index", "prompt", "reference", "answer", "answer_tokens"}`` per prompt, in the prompts' order.
    """
    mine = list(range(rank, len(prompts), world_size))
    share = math.ceil(len(prompts) / world_size) if synced else len(mine)  # synced: the largest share, on every rank
    settings = {key: value for key, value in (sampling or {}).items() if key != "seed"}
    records = []
    for call in range(math.ceil(share / batch_size)):
        indices = mine[call * batch_size : (call + 1) * batch_size]
        batch = [prompts[index]["input_ids"] for index in indices] or [prompts[0]["input_ids"]]  # answer dropped
        with _seeded(sampling["seed"] if sampling else None, model):
            answers = generate_answers(model, tokenizer, batch, max_new_tokens, sampling is not None,
                                       synced_gpus=synced and world_size > 1, **settings)  # fmt: skip
        for index, answer in zip(indices, answers):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            prompt = prompts[index]
            records.append({"index": index, "prompt": prompt["prompt"], "reference": prompt["reference"],
                            "answer": text, "answer_tokens": len(answer)})  # fmt: skip
    gathered = [record for part in gather_objects(records) for record in part]
    return sorted(gathered, key=lambda record: record["index"])


@contextlib.contextmanager
def _seeded(seed: Optional[int], model) -> Iterator[None]:
    """Torch's generator seeded with ``seed`` for the time of the block, then put back as it was (nothing without a
    seed): sampling leaves training's random state, and so its dropout masks, as they were."""
    if seed is None:
        yield
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def extract_answer(pattern: Optional[re.Pattern], text: str) -> Optional[str]:
    """The last match of ``pattern`` in ``text`` (its first group if it has one), stripped; None if none."""
    if pattern is None:
        return None
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    found = matches[-1].group(1) if pattern.groups else matches[-1].group(0)
    return found.strip() if found is not None else None


def extract_answers(record: dict, pattern: Optional[re.Pattern]) -> dict:
    """``reference_extracted``, ``answer_extracted`` and ``exact_match`` (1, 0, or None when the reference has no
    answer to extract) of a record of :func:`answer_prompts`; nothing without a ``pattern``."""
    if pattern is None:
        return {}
    reference, answer = extract_answer(pattern, record["reference"]), extract_answer(pattern, record["answer"])
    exact = None if reference is None else int(answer == reference)
    return {"reference_extracted": reference, "answer_extracted": answer, "exact_match": exact}


def answer_metrics(records: list[dict], pattern: Optional[re.Pattern]) -> dict[str, float]:
    """``val/answer_length`` (mean tokens per answer) and, with a ``pattern``, ``val/exact_match`` (over the prompts
    whose reference has an answer to extract; absent if none has)."""
    metrics = {"val/answer_length": sum(record["answer_tokens"] for record in records) / max(len(records), 1)}
    judged = [record["exact_match"] for record in records if record.get("exact_match") is not None]
    if pattern is not None and judged:
        metrics["val/exact_match"] = sum(judged) / len(judged)
    return metrics


def write_tables(trainer: L.Trainer, records: list[dict], matched: bool, folder: str) -> None:
    """The validation's answers appended to ``validation_answers.csv`` in ``folder`` (the logger's), and given to the
    TensorBoard (a text table) and Weights & Biases (a table) loggers among ``trainer.loggers``."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    columns = COLUMNS + (MATCH_COLUMNS if matched else [])
    rows = [["" if record.get(column) is None else record[column] for column in columns] for record in records]
    path = Path(folder) / TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(columns)
        writer.writerows(rows)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("val/answers", markdown_table(columns, rows), global_step=trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key="val/answers", columns=columns, data=rows, step=trainer.global_step)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """``rows`` as a Markdown table (TensorBoard renders its text summaries as Markdown)."""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows])
