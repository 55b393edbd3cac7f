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
from lt_posttrain.data.dataset import MicroBatchDataset, describe_dropped, load_samples
from lt_posttrain.data.mixing import mixture_indices
from lt_posttrain.data.packing import pack_best_fit
from lt_posttrain.data.plan import PlanSampler
from lt_posttrain.data.prompts import collate_prompts, prompt_of
from lt_posttrain.data.source_types import load_source_type
from lt_posttrain.data.sources import Source, as_source, load_rows
from lt_posttrain.errors import UserError


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

    def _packs(self, samples) -> list[list[int]]:
        if not self.packing:
            return [[index] for index in range(len(samples))]
        return pack_best_fit(samples["length"][:], self.max_length)

    def _loader(self, samples, packs, train: bool) -> StatefulDataLoader:
        trainer = self.trainer
        sampler = PlanSampler(
            packs=packs,
            loss_counts=samples["loss_count"][:],
            batch_size=self.batch_size,
            accumulate=trainer.accumulate_grad_batches if train and trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
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
            generator=generator, pin_memory=pin, collate_fn=self._static_padding(samples, packs),
        )  # fmt: skip

    def _static_padding(self, samples, packs) -> Optional[partial]:
        """With ``static_shapes``, what pads each batch of a loader over ``samples`` and ``packs`` to their one
        shape; None without."""
        if not self.static_shapes:
            return None
        shape = static_shape(samples["length"][:], packs, self.batch_size, self.packing, self.sequences_per_sample)
        return partial(pad_to_static, shape=shape, pad_id=self.tokenizer.pad_token_id)

    def train_dataloader(self):
        return self._loader(self.train_samples, self.train_packs, train=True)

    def val_dataloader(self):
        return self._loader(self.val_samples, self.val_packs, train=False) if self.val_samples is not None else []

    def test_dataloader(self):
        if self.test_samples is None:
            raise UserError("nothing to test on: set data.test_sources, data.val_sources or data.val_fraction")
        return self._loader(self.test_samples, self.test_packs, train=False)

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


def _read_template(chat_template: Optional[str]) -> Optional[str]:
    if chat_template and "{" not in chat_template:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template {chat_template!r}: not a Jinja template and no such file")
        return path.read_text()
    return chat_template
