"""How long to wait before trying again something that failed: `first_s`, doubling up to
`most_s`. One rule for every retry in the stream processor (a handler whose store is down,
a changelog batch the producer refused, a feed whose broker is away, a ranking process whose
store is not up yet): quick after a blip, never hammering what is down."""

from __future__ import annotations


class Backoff:
    def __init__(self, first_s: float = 0.5, most_s: float = 30.0) -> None:
        self.first_s, self.most_s = first_s, most_s
        self.delay_s = first_s

    def next(self) -> float:
        """The wait before the next try; the one after it is twice as long (at most `most_s`)."""
        delay, self.delay_s = self.delay_s, min(self.most_s, self.delay_s * 2)
        return delay

    def reset(self) -> None:
        """It worked: the next failure waits `first_s` again."""
        self.delay_s = self.first_s
