"""Stages 2 to 4 on the fly, for training data with a streamed source (``streaming: true``): each rank's rows become
samples as they are read (with the same :class:`~lt_posttrain.data.dataset.RowConverter`, so the same masks, as a
table), the sources' samples are mixed by weight, packed best-fit in a bounded buffer, and each optimizer step's
micro-batches are formed before the step runs, so its loss-token count is exact.

Every stage keeps its position as plain values (``state_dict``), the packing buffer and the micro-batches of a step
not yet handed out included. :class:`StreamLoader` gathers every rank's into the one checkpoint rank 0 writes, and a
resumed run continues with the next micro-batch without reading a row twice. Memory is bounded by the buffers
(``data.packing_buffer`` samples, one step's micro-batches, a few rows), whatever the size of the data.
"""

import random
from collections import Counter
from itertools import islice
from typing import Optional, Protocol

import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lt_posttrain.data.dataset import SAMPLE_KEYS, RowConverter, collate_micro_batch, describe_dropped
from lt_posttrain.data.mixing import mixture_shares
from lt_posttrain.data.packing import pack_best_fit
from lt_posttrain.errors import UserError
from lt_posttrain.training.strategy import gather_objects

ROWS_PER_CONVERSION = 16
"""Rows of a stream rendered and then tokenized in one call."""

_KEPT = (*SAMPLE_KEYS, "length", "loss_count")  # what a sample carries through the buffers


class Samples(Protocol):
    """A source of training samples, endless (each pass over the data followed by the next), with a position."""

    def next_sample(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StreamedSamples:
    """The samples of one streamed source: its rows converted as they are read (a few at a time), pass after pass.

    Args:
        rows: the source's row stream for this rank (``data/streams.py``).
        converter: the source's :class:`~lt_posttrain.data.dataset.RowConverter`.
    """

    def __init__(self, rows, converter: RowConverter):
        self.rows, self.converter = rows, converter
        self.pending: list[dict] = []  # samples converted and not handed out yet
        self.dropped: Counter = Counter()  # rows left out, by reason
        self.kept = 0  # samples this pass has given
        self._reader = None

    def next_sample(self) -> dict:
        while not self.pending:
            self._convert_more()
        return self.pending.pop(0)

    def _convert_more(self) -> None:
        if self._reader is None:
            self._reader = iter(self.rows)
        batch = list(islice(self._reader, ROWS_PER_CONVERSION))
        if not batch:
            self._start_next_pass()
            return
        indices = [index for index, _ in batch]
        names = dict.fromkeys(name for _, row in batch for name in row)  # every row's columns, in order
        out = self.converter({name: [row.get(name) for _, row in batch] for name in names}, indices)
        for position, reason in enumerate(out["dropped"]):
            if reason:
                self.dropped[reason] += 1
            else:
                self.pending.append({key: out[key][position] for key in _KEPT if key in out})
                self.kept += 1

    def _start_next_pass(self) -> None:
        name = self.converter.source.name_or_path
        if self.rows.read == 0:
            raise UserError(f"data source {name!r}: this rank's part of the stream holds no row (fewer rows than "
                            "data-parallel ranks?); give more rows or fewer devices")  # fmt: skip
        if self.kept == 0:
            dropped = describe_dropped({(name, reason): count for reason, count in self.dropped.items()})
            raise UserError(f"data source {name!r}: no streamed row gives a training sample ({dropped}); check its "
                            "type, role_mapping and columns, and data.max_length")  # fmt: skip
        self.rows.next_epoch()
        self._reader, self.kept = None, 0

    def state_dict(self) -> dict:
        return {"rows": self.rows.state_dict(), "pending": list(self.pending), "dropped": dict(self.dropped),
                "kept": self.kept}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state["rows"])
        self.pending, self.dropped, self.kept = list(state["pending"]), Counter(state["dropped"]), state["kept"]
        self._reader = None  # the next read starts where the loaded position is


class TableSamples:
    """The samples of a source that is not streamed, in a mix with streamed ones: its tokenized table (cached as
    always), this rank's share (every ``world_size``-th sample) of each pass, in a new seeded order per pass with
    ``shuffle``.

    Args:
        samples: the tokenized samples (``tokenize_rows``' table).
        name: the source's name, for errors.
        rank, world_size: this data-parallel rank and the number of ranks.
        shuffle, seed: shuffle each pass with ``seed + pass``.
    """

    def __init__(self, samples, name: str, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if len(samples) < world_size:
            raise UserError(f"data source {name!r}: {len(samples)} training samples for {world_size} data-parallel "
                            "ranks; give more rows or fewer devices")  # fmt: skip
        self.samples, self.rank, self.world_size, self.shuffle, self.seed = samples, rank, world_size, shuffle, seed
        self.epoch, self.position = 0, 0
        self._order: Optional[tuple[int, list[int]]] = None  # (epoch, this rank's sample indices in that pass)

    def _indices(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(len(self.samples)))
            if self.shuffle:
                random.Random(self.seed + self.epoch).shuffle(order)
            self._order = (self.epoch, order[self.rank :: self.world_size])
        return self._order[1]

    def next_sample(self) -> dict:
        if self.position >= len(self._indices()):
            self.epoch, self.position = self.epoch + 1, 0
        row = self.samples[self._indices()[self.position]]
        self.position += 1
        return {key: row[key] for key in _KEPT if key in row}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class MixedSamples:
    """Samples of several sources: each next sample drawn from source ``i`` with probability ``weight_i / sum``
    (a source without a weight weighs 1), from a seeded generator whose state is part of the position.

    Args:
        sources: each source's :class:`Samples`.
        weights: each source's ``weight`` (``None``: 1).
        seed: seed of the draws.
    """

    def __init__(self, sources: list, weights: list[Optional[float]], seed: int = 0):
        self.sources, self.shares = sources, mixture_shares(weights)
        self.random = random.Random(seed)

    def next_sample(self) -> dict:
        if len(self.sources) == 1:
            return self.sources[0].next_sample()
        (source,) = self.random.choices(self.sources, weights=self.shares)
        return source.next_sample()

    def state_dict(self) -> dict:
        return {"random": self.random.getstate(), "sources": [source.state_dict() for source in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["random"]
        self.random.setstate((version, tuple(internal), gauss))
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)


class StreamPacker:
    """Stage 4a on the fly: packs of samples, best-fit (:func:`~lt_posttrain.data.packing.pack_best_fit`) over a
    buffer of ``buffer_size`` samples at a time, handed out in the order of their first sample. Without
    ``packing``, each sample is a pack of its own.

    Args:
        samples: where the samples come from (:class:`MixedSamples`).
        capacity: tokens per pack (``data.max_length``).
        buffer_size: samples packed together (``data.packing_buffer``): larger packs fuller and holds more in memory.
        packing: pack (else one sample per pack).
    """

    def __init__(self, samples, capacity: int, buffer_size: int, packing: bool = True):
        self.samples, self.capacity, self.buffer_size, self.packing = samples, capacity, buffer_size, packing
        self.ready: list[list[dict]] = []  # packs formed and not handed out yet

    def next_pack(self) -> list[dict]:
        if not self.packing:
            return [self.samples.next_sample()]
        if not self.ready:
            buffer = [self.samples.next_sample() for _ in range(self.buffer_size)]
            packs = sorted(pack_best_fit([sample["length"] for sample in buffer], self.capacity))
            self.ready = [[buffer[index] for index in pack] for pack in packs]
        return self.ready.pop(0)

    def state_dict(self) -> dict:
        return {"ready": [list(pack) for pack in self.ready], "samples": self.samples.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ready = [list(pack) for pack in state["ready"]]
        self.samples.load_state_dict(state["samples"])


class StreamedMicroBatches(IterableDataset):
    """Stage 4b and c on the fly: this rank's micro-batches, endless. The ``accumulate`` micro-batches of an optimizer
    step (``batch_size`` packs each) are formed together before the first is handed out, so each carries the step's
    loss-token count (``step_loss_count``, this rank's share) as the planned micro-batches of a table do.

    Stateful (``state_dict``/``load_state_dict``, which torchdata's ``StatefulDataLoader`` saves): the position of
    every stage, the step's micro-batches not handed out yet included.

    Args:
        packs: where the packs come from (:class:`StreamPacker`).
        batch_size: packs per micro-batch.
        accumulate: micro-batches per optimizer step.
        packing: collate packed (else padded).
        pad_id: the padding token.
        length: micro-batches of the whole run (``max_steps`` steps): what ``len`` tells Lightning, which then
            fetches no batch ahead (a batch fetched ahead would be in the saved position, yet never trained on).
    """

    def __init__(self, packs: StreamPacker, batch_size: int, accumulate: int, packing: bool, pad_id: int, length: int):
        self.packs, self.batch_size, self.accumulate, self.packing = packs, batch_size, accumulate, packing
        self.pad_id, self.length = pad_id, length
        self.step: list[tuple[list[dict], int, int]] = []  # (samples, loss count, step's) of micro-batches to come

    def __iter__(self):
        while True:
            if not self.step:
                self.step = self._next_step()
            samples, loss_count, step_loss_count = self.step.pop(0)
            yield collate_micro_batch(samples, self.packing, self.pad_id, loss_count, step_loss_count)

    def _next_step(self) -> list[tuple[list[dict], int, int]]:
        micro_batches = []
        for _ in range(self.accumulate):
            packs = [self.packs.next_pack() for _ in range(self.batch_size)]
            micro_batches.append([sample for pack in packs for sample in pack])
        counts = [sum(sample["loss_count"] for sample in samples) for samples in micro_batches]
        return [(samples, count, sum(counts)) for samples, count in zip(micro_batches, counts)]

    def __len__(self) -> int:
        return self.length

    def state_dict(self) -> dict:
        return {"step": [list(item) for item in self.step], "packs": self.packs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = [tuple(item) for item in state["step"]]
        self.packs.load_state_dict(state["packs"])


class StreamLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` over :class:`StreamedMicroBatches`, whose state is every rank's: each rank
    reads its own part of the streams, and Lightning's checkpoint holds the loader state of rank 0 only (so the
    state is gathered from all ranks when saved, and each takes its own when loaded).

    Args:
        dataset: the micro-batches.
        identity: what the micro-batches depend on (sources, batching, packing, seed); a state saved with another
            identity is refused.
        kwargs: ``StatefulDataLoader``'s (``num_workers`` 0 or 1, ``pin_memory``).
    """

    def __init__(self, dataset: StreamedMicroBatches, identity: dict, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.identity = identity

    def state_dict(self) -> dict:
        """``{"ranks": [each rank's loader state], "identity": ...}`` (a collective: every rank calls it, as Lightning
        does when it writes a checkpoint)."""
        return {"ranks": gather_objects(super().state_dict()), "identity": dict(self.identity)}

    def load_state_dict(self, state: dict) -> None:
        """This rank's loader state of ``state``.

        Raises:
            UserError: ``state`` comes from other data or settings, or from another number of ranks.
        """
        rank, world_size = _rank_and_world_size()
        saved = state.get("identity", {})
        changed = [f"{key} {saved.get(key)}, now {value}" for key, value in self.identity.items()
                   if saved.get(key) != value]  # fmt: skip
        if "ranks" not in state or len(state["ranks"]) != world_size:
            ranks = len(state.get("ranks", ()))
            changed.append(f"data-parallel ranks {ranks}, now {world_size}")
        if changed:
            raise UserError(f"--ckpt_path: the checkpoint's stream positions are for other data or settings ("
                            f"{'; '.join(changed)}); resume with the data and settings it was written with")
        super().load_state_dict(state["ranks"][rank])


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
