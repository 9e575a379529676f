"""`ordered_map`'s byte budget: the items pulled from the source but not yet returned never weigh
more than the budget plus one item, with worker processes or without, and the output is unchanged."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from aigc_pipeline.data.parallel import ordered_map
from aigc_pipeline.data.records import EncodedSample
from aigc_pipeline.data.validate import DecodeSpec, in_memory_bytes, process_chunk

MIB = 2**20


@pytest.mark.parametrize("workers", [1, 2])
def test_items_in_flight_stay_within_the_budget(workers: int) -> None:
    pulled = [0]

    def source() -> Iterator[EncodedSample]:
        for i in range(40):
            item = EncodedSample(f"{i:02d}.png", None, data=bytes([i]) * MIB)  # not an image: rejected fast
            pulled[0] += in_memory_bytes(item)
            yield item

    fn = functools.partial(process_chunk, spec=DecodeSpec(size=8, channels=1))
    returned, worst, keys = 0, 0, []
    for outcome in ordered_map(
        fn, source(), workers=workers, chunk=8, min_parallel=0, weight=in_memory_bytes, budget=4 * MIB
    ):
        worst = max(worst, pulled[0] - returned)
        returned += MIB
        keys.append(outcome.key)
    assert keys == [f"{i:02d}.png" for i in range(40)]
    assert worst <= 5 * MIB, f"{worst / MIB:.0f} MiB pulled but not yet returned (budget 4 MiB + one item)"
    # Without a budget the chunks of 8 (and 2 * workers of them) would all be pulled first.
    returned, worst = 0, 0
    pulled[0] = 0
    for _ in ordered_map(fn, source(), workers=workers, chunk=8, min_parallel=0):
        worst = max(worst, pulled[0] - returned)
        returned += MIB
    assert worst >= 8 * MIB
