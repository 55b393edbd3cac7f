"""Stage 4b: packs are grouped into micro-batches, dealt to ranks, and each knows its optimizer step's loss count.

The plan of an epoch is a pure function of the packs, the seed and the epoch. Global micro-batch ``g`` goes to rank
``g % world_size``; with ``accumulate`` micro-batches per optimizer step, step ``k`` covers global micro-batches
``[k * accumulate * world_size, (k + 1) * accumulate * world_size)`` whatever the split into micro-batch size,
accumulation and ranks: the same packs give the same optimizer steps.

``PlanSampler`` remembers how far into its epoch it is (``state_dict``), so that a resumed run continues at the next
micro-batch of the same epoch's plan.
"""

import math
import random
from dataclasses import dataclass

from torch.utils.data.distributed import DistributedSampler

from lt_posttrain.errors import UserError


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch holds: ``packs`` of sample indices; ``loss_count`` loss tokens of its own and
    ``step_loss_count`` in this rank's share of its optimizer step (the model sums the latter over ranks).

    The whole optimizer step, for a loss that needs more of it than one micro-batch before the first backward pass
    (KTO's KL estimate is over the step's samples): ``step_packs``, every pack of the step on every rank in the plan's
    order (the same packs in the same order whatever the split into batch size, accumulation and ranks), and
    ``step_micro_batches``, this rank's micro-batches of the step (each its packs) in the order they run, this one
    among them. Both are empty for a micro-batch made outside a plan: it is then a step of its own.
    """

    packs: tuple[tuple[int, ...], ...]
    loss_count: int
    step_loss_count: int
    step_packs: tuple[tuple[int, ...], ...] = ()
    step_micro_batches: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @property
    def first_of_step(self) -> bool:
        """Whether this is the first micro-batch of its optimizer step on this rank (the first to run)."""
        return not self.step_micro_batches or self.step_micro_batches[0] == self.packs


def plan_epoch(
    packs: list[list[int]],
    loss_counts: list[int],
    batch_size: int,
    accumulate: int = 1,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    even: bool = True,
) -> list[MicroBatch]:
    """This rank's micro-batches of one epoch.

    Args:
        packs: sample indices per pack (the samples of one packed row; one sample per pack when not packing).
        loss_counts: loss tokens of each sample.
        batch_size: packs per micro-batch.
        accumulate: micro-batches per optimizer step.
        shuffle, seed, epoch: the packs are shuffled with ``seed + epoch``.
        even: drop the last global micro-batches that do not fill one per rank, so every rank runs the same
            number of steps (training); keep them for evaluation.
    """
    order = list(range(len(packs)))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if even:
        chunks = chunks[: len(chunks) // world_size * world_size]
    plan = []
    per_step = accumulate * world_size  # global micro-batch g runs on rank g % world_size
    for start in range(0, len(chunks), per_step):
        step = [tuple(tuple(packs[pack]) for pack in chunk) for chunk in chunks[start : start + per_step]]
        step_packs = tuple(pack for micro_batch in step for pack in micro_batch)
        mine = tuple(step[rank::world_size])
        counts = [sum(loss_counts[i] for pack in chunk for i in pack) for chunk in mine]
        for chunk, count in zip(mine, counts):
            plan.append(MicroBatch(chunk, count, sum(counts), step_packs, mine))
    return plan


_PLAN_NAMES = {
    "packs": "packs of training samples", "loss_tokens": "loss tokens", "batch_size": "data.batch_size",
    "accumulate": "trainer.accumulate_grad_batches", "world_size": "ranks", "shuffle": "data.shuffle",
    "seed": "data.seed",
}  # fmt: skip


class PlanSampler(DistributedSampler):
    """Yields this rank's :class:`MicroBatch` es for the epoch set by ``set_epoch``.

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of injecting its own; it shards by itself.
    It is stateful (``state_dict``/``load_state_dict``, which torchdata's ``StatefulDataLoader`` saves and restores):
    the state is the epoch and the number of micro-batches yielded in it, so the next iteration after a load starts at
    the next micro-batch. Every rank runs the same number of micro-batches, so one rank's state fits them all.
    """

    def __init__(self, packs, loss_counts, batch_size, accumulate=1, rank=0, world_size=1, shuffle=True, seed=0, even=True):
        self.plan_args = dict(
            packs=packs, loss_counts=loss_counts, batch_size=batch_size, accumulate=accumulate, rank=rank,
            world_size=world_size, shuffle=shuffle, seed=seed, even=even,
        )  # fmt: skip
        self.num_replicas, self.rank, self.shuffle, self.seed, self.epoch = world_size, rank, shuffle, seed, 0
        global_batches = math.ceil(len(packs) / batch_size)
        self.num_samples = global_batches // world_size if even else len(range(rank, global_batches, world_size))
        self.total_size = self.num_samples * world_size
        self.plan_identity = {
            "packs": len(packs), "loss_tokens": sum(loss_counts), "batch_size": batch_size, "accumulate": accumulate,
            "world_size": world_size, "shuffle": shuffle, "seed": seed,
        }  # fmt: skip
        self.yielded = 0  # micro-batches of the current epoch handed out so far
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        return self._count_out(plan_epoch(**self.plan_args, epoch=self.epoch)[start:])

    def _count_out(self, micro_batches: list[MicroBatch]):
        for micro_batch in micro_batches:
            self.yielded += 1
            yield micro_batch

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.yielded = 0
        super().set_epoch(epoch)

    def state_dict(self) -> dict:
        """``epoch``, the micro-batches ``yielded`` in it, and ``plan``: what the plan was made from (sizes, batching,
        ranks, seed), to refuse a state that belongs to another plan."""
        return {"epoch": self.epoch, "yielded": self.yielded, "plan": dict(self.plan_identity)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from :meth:`state_dict`) was taken: the next iteration runs its epoch from the
        next micro-batch on (or the next epoch, if that one was complete).

        Raises:
            UserError: ``state`` comes from a plan of other data, batching, ranks or seed.
        """
        saved = {("packs" if key == "rows" else key): value for key, value in state["plan"].items()}  # older name
        changed = [
            f"{_PLAN_NAMES[key]} {saved.get(key)}, now {value}"
            for key, value in self.plan_identity.items()
            if saved.get(key) != value
        ]
        if changed:
            raise UserError(
                f"--ckpt_path: the checkpoint's data position is for another data plan ({'; '.join(changed)}); resume "
                "with the data and settings it was written with"
            )
        epoch, yielded = state["epoch"], state["yielded"]
        if yielded >= self.num_samples:
            epoch, yielded = epoch + 1, 0
        self.epoch, self._resume_at, self.yielded = epoch, yielded, yielded
