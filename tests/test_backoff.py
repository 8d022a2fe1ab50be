"""The one retry rule of the stream processor (`streams.backoff`)."""

from __future__ import annotations

from streams.backoff import Backoff


def test_waits_double_up_to_the_most_and_start_again_after_a_success() -> None:
    backoff = Backoff(first_s=0.5, most_s=3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5
