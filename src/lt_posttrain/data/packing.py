"""Stage 4a: samples are placed into rows of a fixed token budget."""

from bisect import bisect_left, insort


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes into the fullest row it still fits in.

    Returns rows of sample indices; every row holds at most ``capacity`` tokens. A sample longer than
    ``capacity`` gets a row of its own. The result depends only on ``lengths`` and ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for index in order:
        length = lengths[index]
        slot = bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(index)
        else:
            row, room = len(rows), capacity
            rows.append([index])
        room -= length
        if room > 0:
            insort(free, (room, row))
    return [sorted(row) for row in rows]
