"""``InstructDataModule``: instruct sources in, planned micro-batches out."""

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lt_posttrain.data.collate import pad_to_static, static_shape
from lt_posttrain.data.dataset import MicroBatchDataset, RowConverter, describe_dropped, load_samples, tokenize_rows
from lt_posttrain.data.mixing import mixture_indices
from lt_posttrain.data.packing import pack_best_fit
from lt_posttrain.data.plan import PlanSampler
from lt_posttrain.data.prompts import collate_prompts, prompt_of, sample_prompt
from lt_posttrain.data.source_types import load_source_type
from lt_posttrain.data.sources import Source, as_source, load_rows
from lt_posttrain.data.streaming import MixedSamples, StreamedMicroBatches, StreamedSamples, StreamLoader, StreamPacker
from lt_posttrain.data.streaming import TableSamples
from lt_posttrain.data.streams import check_streamable, open_stream
from lt_posttrain.errors import UserError
from lt_posttrain.training.sequence_parallel import data_parallel_rank, row_part


class InstructDataModule(L.LightningDataModule):
    """Chat data for supervised fine-tuning: each conversation rendered with the model's chat template, loss only on
    assistant turns (with their end-of-turn token).

    Args:
        sources: training data; each entry a hub id or local path, or a mapping with ``name_or_path``, ``split``,
            ``sample_count``, ``shuffle``, ``seed`` and ``type`` (how a row becomes a conversation: ``messages``, a
            column of ``{role, content}`` turns, by default; ``huggingface_instruct``, ``prompt_generation``,
            ``ragfit`` or a plugin) with that type's keys, and ``weight`` to mix sources by sampling (see
            ``lt_posttrain.Source``).
        val_sources: validation data, same shape as ``sources``.
        val_fraction: without ``val_sources``, hold out this fraction of the training conversations.
        test_sources: data for ``lt-posttrain test`` and ``predict`` (default: the validation data).
        max_length: tokens per sample; longer samples are cut (and counted). With ``packing``, tokens per row.
        batch_size: samples per micro-batch (packed rows per micro-batch with ``packing``).
        packing: pack samples best-fit into rows of ``max_length`` tokens, each attending only to itself.
        shuffle: reshuffle the training order every epoch.
        seed: seed of the shuffling, of the validation hold-out and of the weighted mix.
        chat_template: a Jinja chat template (text, or a path to a ``.jinja`` file) to use instead of the tokenizer's.
        num_workers: data-loader worker processes.
        overlong: what happens to a sample longer than ``max_length``: ``truncate`` (cut, counted) or ``drop``.
        num_proc: processes that tokenize in parallel (the result is cached on disk either way).
        static_shapes: give every micro-batch of a loader the same shapes, so that a compiled model
            (``model.compile``) is compiled once: a packed row padded to the tokens of the ``batch_size`` fullest
            packs with padding samples (no loss), its sample boundaries to a fixed count, ``max_length_q/k`` fixed to
            the longest sample; padded batches ``batch_size`` rows as wide as the longest sample. Padding costs compute
            and carries no loss; token counts and throughput leave it out.
        packing_buffer: with a streamed training source (``streaming: true``), the samples packed together at a time
            (best-fit over the buffer; larger packs fuller, and holds more in memory and in each checkpoint).
    """

    sequences_per_sample = 1
    """Sequences a training sample becomes in a batch (a subclass that trains on pairs of answers sets 2)."""

    def __init__(
        self,
        sources: list[Union[str, Source]],
        val_sources: Optional[list[Union[str, Source]]] = None,
        val_fraction: float = 0.0,
        test_sources: Optional[list[Union[str, Source]]] = None,
        max_length: int = 2048,
        batch_size: int = 4,
        packing: bool = False,
        shuffle: bool = True,
        seed: int = 42,
        chat_template: Optional[str] = None,
        num_workers: int = 0,
        overlong: Literal["truncate", "drop"] = "truncate",
        num_proc: Optional[int] = None,
        static_shapes: bool = False,
        packing_buffer: int = 512,
    ):
        super().__init__()
        if not sources:
            raise UserError("data.sources is empty: give at least one dataset (a hub id or a local .jsonl file)")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.sources = [as_source(entry) for entry in sources]
        self.val_sources = [as_source(entry) for entry in val_sources or []]
        self.test_sources = [as_source(entry) for entry in test_sources or []]
        self.val_fraction = val_fraction
        self.max_length, self.batch_size, self.packing = max_length, batch_size, packing
        self.shuffle, self.seed, self.num_workers = shuffle, seed, num_workers
        self.overlong, self.num_proc, self.static_shapes = overlong, num_proc, static_shapes
        if packing_buffer < 1:
            raise UserError(f"data.packing_buffer must be 1 or more, got {packing_buffer}")
        self.packing_buffer = packing_buffer
        self.train_tables: Optional[dict[int, object]] = None  # with streams: the tokenized sources not streamed
        self.chat_template = _read_template(chat_template)
        self.tokenizer = None
        self.train_samples = self.val_samples = self.test_samples = None
        self.dropped: dict = {}
        self.mixture: Optional[list[tuple[str, int, int]]] = None  # (source, samples it has, samples drawn)

    def connect(self, tokenizer) -> None:
        """Give the data module the model's tokenizer (the CLI does this; ``setup`` falls back to the model's)."""
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        if self.train_samples is not None or stage == "predict":
            return
        if self.streams:
            self._setup_streams(stage)
            return
        samples, self.dropped = self.tokenize(self.sources)
        if self.val_sources:
            self.train_samples, self.val_samples = samples, self.tokenize(self.val_sources)[0]
        elif self.val_fraction > 0:
            split = samples.train_test_split(test_size=self.val_fraction, seed=self.seed)
            self.train_samples, self.val_samples = split["train"], split["test"]
        else:
            self.train_samples = samples
        self.mixture = None
        if any(source.weight is not None for source in self.sources) and len(self.train_samples):
            self.train_samples = self._mix(self.train_samples)
        if len(self.train_samples) == 0:
            raise UserError(
                f"no training sample has an assistant turn to learn from: {describe_dropped(self.dropped)}; check "
                "data.sources (type, role_mapping, columns) and data.max_length"
            )
        self.test_samples = self.tokenize(self.test_sources)[0] if self.test_sources else self.val_samples
        self.train_packs = self._packs(self.train_samples)
        self.val_packs = self._packs(self.val_samples) if self.val_samples is not None else None
        self.test_packs = self._packs(self.test_samples) if self.test_samples is not None else None
        self._report()

    @property
    def streams(self) -> bool:
        """Whether a training source is streamed (``streaming: true``): training data then comes from
        :meth:`stream_loader`, and nothing is tokenized before training starts."""
        return any(source.streaming for source in self.sources)

    def _setup_streams(self, stage: str) -> None:
        """``setup`` with a streamed training source: the validation and test data as always (a streamed one keeps
        its first ``sample_count`` rows), and, to fit, the training sources that are not streamed tokenized."""
        self._check_streams(stage)
        if self.val_samples is None and self.val_sources:
            self.val_samples = self.tokenize(self.val_sources)[0]
            self.val_packs = self._packs(self.val_samples)
        if self.test_samples is None and (self.test_sources or self.val_samples is not None):
            self.test_samples = self.tokenize(self.test_sources)[0] if self.test_sources else self.val_samples
            self.test_packs = self._packs(self.test_samples)
        if stage == "fit" and self.train_tables is None:
            self.train_tables = {}
            for number, source in enumerate(self.sources):
                if not source.streaming:
                    rows = load_rows(source)
                    self.train_tables[number], dropped = tokenize_rows(
                        rows, source, self.tokenizer, self.max_length, self.chat_template, self.overlong, self.num_proc
                    )  # fmt: skip
                    self.dropped.update({(source.name_or_path, reason): count for reason, count in dropped.items()})
            names = ", ".join(f"{s.name_or_path!r} ({'streamed' if s.streaming else 'table'})" for s in self.sources)
            validation = len(self.val_samples) if self.val_samples is not None else 0
            rank_zero_info(f"data: training sources {names}, tokenized as they are read; {validation} validation "
                           "samples")  # fmt: skip

    def _check_streams(self, stage: str) -> None:
        """The settings a streamed training source cannot work with, each a one-line error."""
        streamed = next(source.name_or_path for source in self.sources if source.streaming)
        if type(self).tokenize is not InstructDataModule.tokenize:
            raise UserError(f"data source {streamed!r}: {type(self).__name__} tokenizes its own training units and "
                            "does not stream them; remove streaming: true")  # fmt: skip
        problems = [
            ("data.val_fraction", self.val_fraction, "holds out part of a table; give data.val_sources instead"),
            ("data.static_shapes", self.static_shapes, "needs the lengths of all samples before training; turn it off"),
            ("data.num_workers", self.num_workers > 1,
             "must be 0 or 1 (one worker reads and tokenizes the stream in the background)"),
        ]  # fmt: skip
        for key, refused, problem in problems:
            if refused:
                raise UserError(f"{key}: data source {streamed!r} is streamed, and {key} {problem}")
        for source in self.sources:
            if source.streaming and source.sample_count is not None:
                raise UserError(f"data source {source.name_or_path!r}: sample_count does not apply to a streamed "
                                "training source (it is read until trainer.max_steps, pass after pass); remove it")
            if source.streaming:
                check_streamable(source)
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.max_steps < 0:
            raise UserError(f"trainer.max_steps is required: data source {streamed!r} is streamed, so the number of "
                            "steps is not known from the data (set e.g. --trainer.max_steps 1000)")  # fmt: skip

    def stream_loader(self) -> StreamLoader:
        """The training loader of a run with a streamed source: this rank's micro-batches, tokenized, mixed and
        packed as the streams are read (``data/streaming.py``); resumable, its state every rank's position."""
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        rank, world_size = data_parallel_rank(trainer)  # a sequence-parallel group's ranks read the same rows
        dataset = self.stream_micro_batches(rank, world_size, accumulate, trainer.max_steps)
        identity = {
            "data.sources": [f"{s.name_or_path} ({'streamed' if s.streaming else 'table'}, weight {s.weight})"
                             for s in self.sources],
            "data.batch_size": self.batch_size, "trainer.accumulate_grad_batches": accumulate,
            "data.packing": self.packing, "data.max_length": self.max_length,
            "data.packing_buffer": self.packing_buffer, "data.seed": self.seed,
        }  # fmt: skip
        pin = trainer.strategy.root_device.type == "cuda"
        # A worker sends its position (the packing buffer included) once a step, at the step boundaries where
        # checkpoints are taken, not with every micro-batch.
        return StreamLoader(dataset, identity, num_workers=self.num_workers, pin_memory=pin,
                            snapshot_every_n_steps=accumulate, collate_fn=self._batch_transform())  # fmt: skip

    def stream_micro_batches(self, rank: int = 0, world_size: int = 1, accumulate: int = 1,
                             steps: int = 1) -> StreamedMicroBatches:  # fmt: skip
        """Rank ``rank``'s micro-batches of ``steps`` optimizer steps of ``accumulate`` micro-batches each, from the
        training sources (after ``setup("fit")``): the streamed ones read as they come (this rank's part), the others
        from their tokenized tables (this rank's share), mixed by ``weight``, packed in a buffer of
        ``packing_buffer`` samples."""
        parts = []
        for number, source in enumerate(self.sources):
            if source.streaming:
                converter = RowConverter.of(source, self.tokenizer, self.max_length, self.chat_template, self.overlong)
                parts.append(StreamedSamples(open_stream(source, rank, world_size), converter))
            else:
                table = self.train_tables[number]
                parts.append(TableSamples(table, source.name_or_path, rank, world_size, self.shuffle, self.seed))
        mixed = MixedSamples(parts, [source.weight for source in self.sources], self.seed)
        packs = StreamPacker(mixed, self.max_length, self.packing_buffer, self.packing)
        return StreamedMicroBatches(packs, self.batch_size, accumulate, self.packing, self.tokenizer.pad_token_id,
                                    length=steps * accumulate)  # fmt: skip

    def tokenize(self, sources: list[Source]):
        """Stages 1 to 3 for ``sources``: ``(samples, dropped)`` as :func:`~lt_posttrain.data.dataset.load_samples`
        returns them, one row per training unit with its ``length``, ``truncated`` and ``loss_count`` (what the
        step's loss is divided by). A subclass that trains on other units (pairs of answers) overrides this and
        :meth:`batch_dataset`."""
        return load_samples(sources, self.tokenizer, self.max_length, self.chat_template, self.overlong, self.num_proc)

    def batch_dataset(self, samples) -> MicroBatchDataset:
        """What the data loader indexes with each planned :class:`~lt_posttrain.data.plan.MicroBatch`: its tensors."""
        return MicroBatchDataset(samples, self.packing, self.tokenizer.pad_token_id)

    def _mix(self, samples):
        """The training samples drawn from each source in proportion to its ``weight`` (after the validation
        hold-out, so no repeated sample is both trained on and validated on)."""
        groups: list[list[int]] = [[] for _ in self.sources]
        of_source = samples["source"][:]  # [:]: one read of the column, not one per item
        for index, number in enumerate(of_source):
            groups[number].append(index)
        indices = mixture_indices(groups, [source.weight for source in self.sources], self.seed)
        drawn = Counter(of_source[index] for index in indices)
        self.mixture = [(source.name_or_path, len(groups[n]), drawn[n]) for n, source in enumerate(self.sources)]
        return samples.select(indices)

    def _report(self) -> None:
        truncated = sum(1 for count in self.train_samples["truncated"][:] if count)
        loss_tokens = sum(self.train_samples["loss_count"][:])
        rank_zero_info(
            f"data: {len(self.train_samples)} training samples, {loss_tokens} loss tokens, {truncated} cut to "
            f"{self.max_length} tokens; {len(self.val_samples) if self.val_samples is not None else 0} validation "
            f"samples; {describe_dropped(self.dropped)}"
        )
        for name, available, drawn in self.mixture or []:
            how = "repeated" if drawn > available else "subsampled" if drawn < available else "all"
            rank_zero_info(f"data mix: {drawn} samples from {name!r} ({available} available, {how})")

    def longest_micro_batch_tokens(self) -> Optional[int]:
        """Tokens of the longest training micro-batch the data plan can make, padding included (after
        ``setup("fit")``): packed, the ``batch_size`` fullest packs in one row; padded, ``batch_size`` rows as wide as
        the longest sample. None before ``setup`` and with a streamed source, whose samples are not known before
        training."""
        if self.streams or self.train_samples is None:
            return None
        lengths = self.train_samples["length"][:]
        if not self.packing:
            return self.batch_size * max(lengths, default=0)
        return static_shape(lengths, self.train_packs, self.batch_size, packing=True).tokens

    def _packs(self, samples) -> list[list[int]]:
        if not self.packing:
            return [[index] for index in range(len(samples))]
        return pack_best_fit(samples["length"][:], self.max_length)

    def _loader(self, samples, packs, train: bool) -> StatefulDataLoader:
        trainer = self.trainer
        # the ranks of a sequence-parallel group share each micro-batch (each keeps its part of the row)
        rank, world_size = data_parallel_rank(trainer) if trainer else (0, 1)
        sampler = PlanSampler(
            packs=packs,
            loss_counts=samples["loss_count"][:],
            batch_size=self.batch_size,
            accumulate=trainer.accumulate_grad_batches if train and trainer else 1,
            rank=rank,
            world_size=world_size,
            shuffle=self.shuffle and train,
            seed=self.seed,
            even=train,
        )
        # Its own generator: starting an iteration (validation, too) then draws nothing from the global one, which
        # dropout uses, so a resumed run draws the same dropout masks as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        # Pinned batches: Lightning's non-blocking copy to the GPU then does not wait for the queued steps.
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return StatefulDataLoader(
            self.batch_dataset(samples), sampler=sampler, batch_size=None, num_workers=self.num_workers,
            generator=generator, pin_memory=pin, collate_fn=self._batch_transform(samples, packs),
        )  # fmt: skip

    def _batch_transform(self, samples=None, packs=None) -> Optional[partial]:
        """What a loader does to each micro-batch it makes: the padding of ``static_shapes`` (for a loader over
        ``samples`` and ``packs``), then under sequence parallelism the cut to this rank's part of the row (each
        rank of a group gets the same micro-batch); None when neither applies."""
        steps = [self._static_padding(samples, packs) if samples is not None else None,
                 row_part(self.trainer, self.tokenizer.pad_token_id)]  # fmt: skip
        steps = tuple(step for step in steps if step is not None)
        return partial(_in_turn, steps=steps) if len(steps) > 1 else (steps[0] if steps else None)

    def _static_padding(self, samples, packs) -> Optional[partial]:
        """With ``static_shapes``, what pads each batch of a loader over ``samples`` and ``packs`` to their one
        shape; None without."""
        if not self.static_shapes:
            return None
        shape = static_shape(samples["length"][:], packs, self.batch_size, self.packing, self.sequences_per_sample)
        return partial(pad_to_static, shape=shape, pad_id=self.tokenizer.pad_token_id)

    def train_dataloader(self):
        if self.streams:
            return self.stream_loader()
        return self._loader(self.train_samples, self.train_packs, train=True)

    def val_dataloader(self):
        return self._loader(self.val_samples, self.val_packs, train=False) if self.val_samples is not None else []

    def test_dataloader(self):
        if self.test_samples is None:
            raise UserError("nothing to test on: set data.test_sources, data.val_sources or data.val_fraction")
        return self._loader(self.test_samples, self.test_packs, train=False)

    def generation_prompts(self, count: int) -> list[dict]:
        """The first ``count`` validation samples as prompts to answer (after ``setup``): ``{"input_ids", "prompt",
        "reference"}`` each, the sample's tokens before its last trained answer and that answer's text
        (:func:`~lt_posttrain.data.prompts.sample_prompt`).

        Raises:
            UserError: no validation data, or validation samples that are not one token sequence each.
        """
        if self.val_samples is None:
            raise UserError("validation_answers.num_prompts: there is no validation data to answer; set "
                            "data.val_sources or data.val_fraction")  # fmt: skip
        if not {"input_ids", "labels"} <= set(self.val_samples.column_names):
            raise UserError(f"validation_answers.num_prompts: the validation samples of {type(self).__name__} are "
                            "not one token sequence each, so they give no prompt to answer; set it to 0")  # fmt: skip
        rows = self.val_samples.select(range(min(count, len(self.val_samples))))
        return [sample_prompt(row["input_ids"], row["labels"], self.tokenizer) for row in rows]

    def predict_dataloader(self):
        """The test (else validation) conversations as prompts, for greedy generation of their last answer."""
        prompts = []
        for source in self.test_sources or self.val_sources or self.sources:
            source_type = load_source_type(source)
            render = source_type.resolved_renderer(self.tokenizer, self.chat_template)
            for index, row in enumerate(load_rows(source)):
                messages, tools = source_type.messages(row, index), source_type.tools(row, index)
                if messages:
                    prompts.append(prompt_of(messages, self.tokenizer, render=render, tools=tools))
        collate = partial(collate_prompts, pad_id=self.tokenizer.pad_token_id)
        return DataLoader(prompts, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers)


def _in_turn(batch, steps: tuple):
    for step in steps:
        batch = step(batch)
    return batch


def _read_template(chat_template: Optional[str]) -> Optional[str]:
    if chat_template and "{" not in chat_template:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template {chat_template!r}: not a Jinja template and no such file")
        return path.read_text()
    return chat_template
