"""Best-fit packing of samples into packs, and the epoch plan: micro-batches, ranks and optimizer steps."""

import random

import pytest
from torch.utils.data.distributed import DistributedSampler

from lt_posttrain.data.packing import pack_best_fit
from lt_posttrain.data.plan import MicroBatch, PlanSampler, plan_epoch

# ---------------------------------------------------------------- packing


def random_lengths(seed: int, count: int, high: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, high) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_packing_places_every_sample_once_within_capacity(seed):
    capacity = 64
    lengths = random_lengths(seed, 200, 80)  # some samples longer than a pack
    packs = pack_best_fit(lengths, capacity)
    placed = sorted(index for pack in packs for index in pack)
    assert placed == list(range(len(lengths)))
    for pack in packs:
        assert pack == sorted(pack)
        total = sum(lengths[index] for index in pack)
        if total > capacity:
            assert len(pack) == 1, f"pack {pack} of {total} tokens holds an over-long sample with others"
    over_long = [index for index, length in enumerate(lengths) if length > capacity]
    assert over_long, "the test needs over-long samples"
    for index in over_long:
        assert [index] in packs
    # best fit packs well: at most one pack per capacity of tokens, plus the over-long ones and one spare
    fitting = sum(length for length in lengths if length <= capacity)
    assert len(packs) - len(over_long) <= 2 * fitting // capacity + 1


def test_packing_is_deterministic():
    lengths = random_lengths(7, 300, 50)
    assert pack_best_fit(lengths, 100) == pack_best_fit(list(lengths), 100)
    assert pack_best_fit(lengths, 100) != pack_best_fit(lengths, 99)


def test_best_fit_puts_a_sample_into_the_fullest_row_it_fits():
    # longest first: 7 (index 2) opens pack A with 3 free; 4 (index 0) does not fit, opens pack B with 6 free;
    # 4 (index 3) goes to B (2 free); 1 (index 1) fits both A (3 free) and B (2 free): best fit picks B, the fuller.
    # (First fit would put it into A.)
    assert pack_best_fit([4, 1, 7, 4], 10) == [[2], [0, 1, 3]]


def test_best_fit_ties_and_exact_fits():
    # 6 and 6 open two packs with 4 free each; 4 fills the first exactly; 3 goes into the second; 1 goes with it
    assert pack_best_fit([6, 6, 4, 3, 1], 10) == [[0, 2], [1, 3, 4]]
    # an over-long sample gets a pack of its own and takes nothing else; a full pack takes nothing more
    assert pack_best_fit([12, 3, 10, 5], 10) == [[0], [2], [1, 3]]
    assert pack_best_fit([], 10) == []
    assert pack_best_fit([5], 10) == [[0]]


def test_best_fit_matches_a_straightforward_reference():
    def reference(lengths, capacity):
        packs, free = [], []
        for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            fits = [r for r in range(len(packs)) if free[r] >= lengths[index]]
            if fits:
                pack = min(fits, key=lambda r: (free[r], r))
                packs[pack].append(index)
                free[pack] -= lengths[index]
            else:
                packs.append([index])
                free.append(capacity - lengths[index] if lengths[index] <= capacity else -1)
        return [sorted(pack) for pack in packs]

    for seed in range(20):
        lengths = random_lengths(seed, 60, 40)
        assert pack_best_fit(lengths, 48) == reference(lengths, 48), seed


# ---------------------------------------------------------------- plan

CONFIGS = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)]  # batch_size, accumulate, world_size


def make_packs(count: int) -> tuple[list[list[int]], list[int]]:
    """``count`` packs of one to three samples each, and each sample's loss count (all different)."""
    rng = random.Random(1)
    packs, next_index = [], 0
    for _ in range(count):
        size = rng.randint(1, 3)
        packs.append(list(range(next_index, next_index + size)))
        next_index += size
    loss_counts = [3 + 7 * index + index * index for index in range(next_index)]
    return packs, loss_counts


def steps_of(packs, loss_counts, batch_size, accumulate, world_size, **kwargs) -> list[dict]:
    """Per optimizer step: the packs over all ranks and the loss count the model sums over ranks."""
    steps: list[dict] = []
    for rank in range(world_size):
        plan = plan_epoch(packs, loss_counts, batch_size, accumulate, rank, world_size, **kwargs)
        for position, micro_batch in enumerate(plan):
            k = position // accumulate
            while len(steps) <= k:
                steps.append({"packs": [], "loss": 0, "rank_loss": {}})
            steps[k]["packs"].extend(micro_batch.packs)
            steps[k]["rank_loss"][rank] = micro_batch.step_loss_count
    for step in steps:
        step["loss"] = sum(step.pop("rank_loss").values())
    return steps


@pytest.mark.parametrize("shuffle", [True, False])
def test_optimizer_steps_cover_the_same_rows_whatever_the_split(shuffle):
    packs, loss_counts = make_packs(24)
    reference = None
    for batch_size, accumulate, world_size in CONFIGS:
        steps = steps_of(packs, loss_counts, batch_size, accumulate, world_size, shuffle=shuffle, seed=3, epoch=1)
        assert len(steps) == 6
        covered = [sorted(step["packs"]) for step in steps]
        for step, step_rows in zip(steps, covered):
            assert len(step_rows) == 4
            assert step["loss"] == sum(loss_counts[i] for pack in step_rows for i in pack)
        # every pack exactly once over the epoch
        assert sorted(pack for step_rows in covered for pack in step_rows) == sorted(tuple(pack) for pack in packs)
        if reference is None:
            reference = (covered, [step["loss"] for step in steps])
        else:
            assert (covered, [step["loss"] for step in steps]) == reference, (batch_size, accumulate, world_size)
    if not shuffle:
        assert reference[0][0] == sorted(tuple(pack) for pack in packs[:4])


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_micro_batch_knows_its_whole_step_in_one_order_whatever_the_split(shuffle):
    """``step_packs``: the step's packs on every rank, in one order for every split; ``step_micro_batches``: this
    rank's micro-batches of the step, in the order they run, the first of them ``first_of_step``."""
    packs, loss_counts = make_packs(24)
    reference = None
    for batch_size, accumulate, world_size in CONFIGS:
        steps: dict[int, list[tuple]] = {}
        for rank in range(world_size):
            plan = plan_epoch(packs, loss_counts, batch_size, accumulate, rank, world_size, shuffle=shuffle, seed=3)
            for start in range(0, len(plan), accumulate):
                window = plan[start : start + accumulate]
                assert all(micro_batch.step_micro_batches == tuple(m.packs for m in window) for micro_batch in window)
                assert [micro_batch.first_of_step for micro_batch in window] == [True] + [False] * (len(window) - 1)
                assert len({micro_batch.step_packs for micro_batch in window}) == 1
                mine = [pack for micro_batch in window for pack in micro_batch.packs]
                assert set(mine) <= set(window[0].step_packs)
                steps.setdefault(start // accumulate, []).append(window[0].step_packs)
        assert all(len(set(ranks)) == 1 for ranks in steps.values())  # every rank sees the same step
        in_order = [ranks[0] for _, ranks in sorted(steps.items())]
        assert reference is None or in_order == reference, (batch_size, accumulate, world_size)
        reference = in_order
    if not shuffle:
        assert reference[0] == tuple(tuple(pack) for pack in packs[:4])
    assert MicroBatch(((1, 2),), 3, 3).first_of_step  # made outside a plan: a step of its own


def test_full_optimizer_steps_agree_when_the_rows_do_not_divide_evenly():
    packs, loss_counts = make_packs(14)
    full_steps = 14 // 4
    plans = [steps_of(packs, loss_counts, *config, seed=5) for config in CONFIGS]
    for steps in plans:
        assert len(steps) >= full_steps
    for k in range(full_steps):
        assert len({tuple(sorted(steps[k]["packs"])) for steps in plans}) == 1, k


def test_shuffled_steps_are_not_trivially_in_order():
    packs, loss_counts = make_packs(24)
    steps = steps_of(packs, loss_counts, 4, 1, 1, seed=3, epoch=1)
    assert [pack for step in steps for pack in step["packs"]] != [tuple(pack) for pack in packs]


@pytest.mark.parametrize("batch_size,accumulate,world_size", CONFIGS + [(3, 2, 2), (2, 3, 3)])
def test_step_loss_count_is_the_sum_over_the_accumulation_window(batch_size, accumulate, world_size):
    packs, loss_counts = make_packs(31)
    for rank in range(world_size):
        plan = plan_epoch(packs, loss_counts, batch_size, accumulate, rank, world_size, seed=2, epoch=4)
        assert plan and all(isinstance(micro_batch, MicroBatch) for micro_batch in plan)
        for micro_batch in plan:
            assert 1 <= len(micro_batch.packs) <= batch_size
            assert micro_batch.loss_count == sum(loss_counts[i] for pack in micro_batch.packs for i in pack)
        for start in range(0, len(plan), accumulate):
            window = plan[start : start + accumulate]
            total = sum(micro_batch.loss_count for micro_batch in window)
            assert [micro_batch.step_loss_count for micro_batch in window] == [total] * len(window)
        # each micro-batch is counted in exactly one window
        totals = [plan[start].step_loss_count for start in range(0, len(plan), accumulate)]
        assert sum(totals) == sum(micro_batch.loss_count for micro_batch in plan)


def order_of(plan: list[MicroBatch]) -> list[tuple[int, ...]]:
    return [pack for micro_batch in plan for pack in micro_batch.packs]


def test_shuffle_depends_on_seed_plus_epoch_and_is_deterministic():
    packs, loss_counts = make_packs(40)

    def order(**kwargs):
        return order_of(plan_epoch(packs, loss_counts, batch_size=2, **kwargs))

    assert order(seed=0, epoch=0) == order(seed=0, epoch=0)
    assert order(seed=0, epoch=0) != order(seed=0, epoch=1)
    assert order(seed=0, epoch=0) != order(seed=1, epoch=0)
    assert order(seed=1, epoch=2) == order(seed=2, epoch=1) == order(seed=3, epoch=0)
    assert sorted(order(seed=4, epoch=4)) == sorted(tuple(pack) for pack in packs)
    assert order(shuffle=False, seed=0, epoch=0) == [tuple(pack) for pack in packs]
    assert order(shuffle=False, seed=9, epoch=3) == [tuple(pack) for pack in packs]


@pytest.mark.parametrize("count,batch_size,world_size", [(11, 2, 3), (11, 2, 4), (10, 3, 2), (7, 1, 4), (9, 2, 2)])
def test_even_gives_every_rank_the_same_number_of_micro_batches(count, batch_size, world_size):
    packs, loss_counts = make_packs(count)
    plans = [plan_epoch(packs, loss_counts, batch_size, 1, rank, world_size, seed=1) for rank in range(world_size)]
    global_batches = -(-count // batch_size)
    assert {len(plan) for plan in plans} == {global_batches // world_size}
    seen = [pack for plan in plans for pack in order_of(plan)]
    assert len(seen) == len(set(seen))  # no pack twice

    uneven = [plan_epoch(packs, loss_counts, batch_size, 1, rank, world_size, seed=1, even=False) for rank in range(world_size)]
    assert sum(len(plan) for plan in uneven) == global_batches
    assert sorted(pack for plan in uneven for pack in order_of(plan)) == sorted(tuple(pack) for pack in packs)
    # the even plan is the uneven one with the last global micro-batches left out
    for plan, full in zip(plans, uneven):
        assert plan == full[: len(plan)]


def test_ranks_get_interleaved_global_micro_batches():
    packs, loss_counts = make_packs(12)
    single = plan_epoch(packs, loss_counts, batch_size=2, seed=6)
    for world_size in (2, 3):
        for rank in range(world_size):
            mine = plan_epoch(packs, loss_counts, batch_size=2, rank=rank, world_size=world_size, seed=6)
            assert [micro_batch.packs for micro_batch in mine] == [micro_batch.packs for micro_batch in single[rank::world_size]]


@pytest.mark.parametrize(
    "count,batch_size,accumulate,world_size,even",
    [(20, 3, 2, 1, True), (20, 3, 1, 3, True), (20, 3, 1, 3, False), (7, 2, 2, 4, True), (7, 2, 1, 4, False), (5, 8, 1, 1, True)],
)
def test_plan_sampler_length_matches_its_iteration(count, batch_size, accumulate, world_size, even):
    packs, loss_counts = make_packs(count)
    for rank in range(world_size):
        sampler = PlanSampler(packs, loss_counts, batch_size, accumulate, rank, world_size, seed=3, even=even)
        assert isinstance(sampler, DistributedSampler)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            plan = list(sampler)
            assert len(sampler) == len(plan)
            expected = plan_epoch(packs, loss_counts, batch_size, accumulate, rank, world_size, seed=3, epoch=epoch, even=even)
            assert plan == expected


def test_plan_sampler_set_epoch_changes_the_order():
    packs, loss_counts = make_packs(30)
    sampler = PlanSampler(packs, loss_counts, batch_size=2, seed=0)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(order_of(second)) == sorted(order_of(first))
    sampler.set_epoch(0)
    assert list(sampler) == first
    fixed = PlanSampler(packs, loss_counts, batch_size=2, shuffle=False)
    fixed.set_epoch(5)
    assert order_of(list(fixed)) == [tuple(pack) for pack in packs]
