"""Garbage-collector pauses are timed and start-up objects are kept out of full collections."""

from __future__ import annotations

import gc

from streams import gc_pauses


def test_every_collection_is_timed_by_generation() -> None:
    seen: list[tuple[int, float]] = []
    before = list(gc.callbacks)
    try:
        gc_pauses.watch("test", lambda generation, took: seen.append((generation, took)))
        gc.collect(1)
        gc.collect(2)
    finally:
        gc.callbacks[:] = before
    assert [g for g, _ in seen][-2:] == [1, 2]
    assert all(took >= 0 for _, took in seen)


def test_settle_moves_what_is_alive_out_of_the_collectors_reach() -> None:
    kept = [[n] for n in range(1000)]
    try:
        gc_pauses.settle()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
