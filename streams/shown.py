"""The latest list pushed to each user, as the stream processor keeps it: for online hit rates
(was the user's next item in it?) and the web UI's user page.

Why not the pushed `topics.Recs` itself: a pydantic model of 20 `Rec` holds about 40 objects
the garbage collector tracks (each model and its set of fields set), and at 2,000 users they
were 82,000 of the stream processor's 140,000 tracked objects, replaced with every push, so
every generation-1 collection walked them (60-90 ms every few seconds in the 20-minute soak,
docs/hardening.md). A `Shown` is one tracked object; its tuples of strings and floats the
collector stops tracking after it first sees them."""

from __future__ import annotations

from dataclasses import dataclass

from topics import Recs


@dataclass(frozen=True, slots=True)
class Shown:
    items: tuple[tuple[str, float], ...]  # (item_id, score), best first
    trigger: str
    generated_at: float
    variant: str

    @classmethod
    def of(cls, recs: Recs) -> Shown:
        """What was pushed, as the contract cleaned it (the ids the next interactions carry)."""
        return cls(tuple((r.item_id, r.score) for r in recs.items), recs.trigger, recs.generated_at, recs.variant)

    @property
    def item_ids(self) -> list[str]:
        return [item_id for item_id, _ in self.items]
