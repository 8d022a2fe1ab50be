"""Replay a dataset folder onto the product's topics as if it were happening now.

`schedule` decides what is sent and in which order (a pure function, tested without a broker);
`replay` sends it, paced by the events' own timestamps.

Order: by event time; at equal times items go before interactions (an item must exist before
anyone touches it), then file order. An item is published at its `created_at`, else just
before its first interaction (EVAL.md's publish rule, so that a replay and the offline
evaluation see the same catalogue). Items with neither are never published.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tqdm import tqdm

from topics import Event, Interaction, ItemNew
from vlm4rec.evaluation.dataset import publish_times


@dataclass(frozen=True)
class Scheduled:
    ts: float  # event time at which it is sent (paces the replay)
    event: ItemNew | Interaction


def schedule(
    items: Sequence[ItemNew],
    interactions: Sequence[Interaction],
    since: float | None = None,
    until: float | None = None,
) -> list[Scheduled]:
    """Everything to send, in order. `interactions` must be sorted by ts (stable).

    `since`/`until` keep the interactions with since <= ts < until. Items published before
    `since` are sent first, at `since`, so that the catalogue is complete when the window
    opens; items published at or after `until` are not sent.
    """
    published = publish_times(items, interactions)
    start = -float("inf") if since is None else since
    end = float("inf") if until is None else until
    keyed: list[tuple[float, int, int, Scheduled]] = []
    for n, item in enumerate(items):
        ts = published.get(item.item_id)
        if ts is not None and ts < end:
            ts = max(ts, start)
            keyed.append((ts, 0, n, Scheduled(ts, item)))
    for n, row in enumerate(interactions):
        if start <= row.ts < end:
            keyed.append((row.ts, 1, n, Scheduled(row.ts, row)))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


class Sender(Protocol):
    def send(self, topic: str, event: Event) -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


@dataclass(frozen=True)
class ReplayStats:
    items: int
    interactions: int
    users: int
    first_ts: float | None
    last_ts: float | None
    wall_s: float


def replay(
    events: Sequence[Scheduled],
    sender: Sender,
    items_topic: str,
    interactions_topic: str,
    speed: float | None = None,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayStats:
    """Send `events` in order. `speed`: event-time seconds per wall second (None: as fast as
    the broker takes them). The pace is kept against the start, so that slow sends do not add
    up to drift."""
    started = clock()
    first_ts = events[0].ts if events else None
    counts = {ItemNew: 0, Interaction: 0}
    users: set[str] = set()
    for scheduled in tqdm(events, desc="replay", unit="event", disable=not progress):
        if speed is not None and first_ts is not None:
            wait = started + (scheduled.ts - first_ts) / speed - clock()
            if wait > 0:
                sleep(wait)
        event = scheduled.event
        if isinstance(event, ItemNew):
            sender.send(items_topic, event)
        else:
            sender.send(interactions_topic, event)
            users.add(event.user_id)
        counts[type(event)] += 1
    sender.flush()
    return ReplayStats(
        items=counts[ItemNew],
        interactions=counts[Interaction],
        users=len(users),
        first_ts=first_ts,
        last_ts=events[-1].ts if events else None,
        wall_s=clock() - started,
    )


def parse_speed(text: str) -> float | None:
    """`--speed`: a positive factor, or `max` (None: no waiting)."""
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"speed must be a positive number or 'max', not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"speed must be a positive number or 'max', not {text!r}")
    return value
