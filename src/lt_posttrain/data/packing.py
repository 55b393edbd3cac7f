"""Stage 4a: samples are placed into packs of a fixed token budget."""

from bisect import bisect_left, insort


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes into the fullest pack it still fits in.

    Returns packs of sample indices; every pack holds at most ``capacity`` tokens. A sample longer than
    ``capacity`` gets a pack of its own. The result depends only on ``lengths`` and ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, pack), sorted
    for index in order:
        length = lengths[index]
        slot = bisect_left(free, (length, -1))
        if slot < len(free):
            room, pack = free.pop(slot)
            packs[pack].append(index)
        else:
            pack, room = len(packs), capacity
            packs.append([index])
        room -= length
        if room > 0:
            insort(free, (room, pack))
    return [sorted(pack) for pack in packs]
