"""What a batch of the profile agent's events does to the profiles, free of Faust, so that it is
tested without a broker (`tests/test_profile_updates.py`); `streams.app` reads the events,
delivers the deferrals, writes the profiles and marks the users due, in that order.

At-least-once: each profile remembers the last offset it applied per source partition and the
origins of the deferred interactions it still awaits (`streams.profile.Profile`), so a
re-delivered event or a second release of a deferral is a duplicate, never counted twice. That
holds only if each partition's events come in offset order (`streams.delivery`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from streams.profile import Profile, ProfileRule
from streams.recommend import Observation
from topics import Interaction

#: the caller's handle on an event (the Faust event in `streams.app`): handed back with the
#: profile it changed, whose table write belongs to that event's partition
E = TypeVar("E")


class Shared:
    """One string object per distinct value, for the strings profiles keep (the items in
    `seen` and `history`, the event names in `history`): every event is decoded from JSON into
    strings of its own, and the profiles of 2,000 users kept one per entry, the stream
    processor's main process growing about 1 MB/min over a soak while their seen lists filled
    (docs/hardening.md). At most `size` values are held: past it the table starts again, so
    that odd ids cannot grow it (sharing is only a saving, never needed)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        shared = self._values.get(value)
        if shared is None:
            if len(self._values) >= self.size:
                self._values.clear()
            shared = self._values[value] = value
        return shared


@dataclass(frozen=True)
class Received(Generic[E]):
    """One event of a batch, as plain values: an interaction (from producers, or a released
    deferral with its `origin`) or a fresh item's refresh of a user's recs."""

    kind: str  # "interaction" or "refresh"
    interaction: Interaction
    topic: str
    partition: int
    offset: int
    #: when it reached the broker: interaction-to-recs latency counts from the oldest one
    timestamp: float
    event: E
    #: a released deferral: "topic:partition:offset" where the interaction first arrived
    origin: str | None = None
    #: a refresh: when its fresh item was published
    published_at: float | None = None

    @property
    def source(self) -> str:
        """The "topic:partition" it was read from: one user's events always share a partition,
        so an offset within it tells a re-delivery."""
        return f"{self.topic}:{self.partition}"


@dataclass(frozen=True)
class Deferral:
    """An interaction whose item has no vector yet, for the `pending` topic: it comes back,
    through the user's `partition`, as a release of `origin` once the item is embedded."""

    interaction: Interaction
    origin: str
    partition: int


@dataclass
class BatchUpdate(Generic[E]):
    """What a batch decided, for the caller to carry out in this order: deliver `deferred`,
    write `profiles`, then mark `arrived` and `refreshed` users due."""

    #: user -> the profile to write (also when only its offset marks moved), with the user's
    #: last event of the batch, whose partition owns the table key
    profiles: dict[str, tuple[Profile, E]] = field(default_factory=dict)
    #: deferrals, to deliver before the profiles that await them are written: a crash in
    #: between would otherwise skip the re-delivered events as duplicates and lose them
    deferred: list[Deferral] = field(default_factory=list)
    #: applied interactions in order (popularity counts them)
    applied: list[Interaction] = field(default_factory=list)
    #: the ranker's view of each applied interaction, taken just before it was applied
    observed: list[Observation] = field(default_factory=list)
    duplicates: int = 0
    #: user -> when the oldest interaction applied for them reached the broker
    arrived: dict[str, float] = field(default_factory=dict)
    #: user with a profile -> (the refresh's partition, when its fresh item was published)
    refreshed: dict[str, tuple[int, float | None]] = field(default_factory=dict)


class ProfileUpdater:
    """Applies batches of `Received` events to profiles. `stored(user_id)`: the user's profile
    as stored (None: unknown); `observe(profile, item_id, ts)`: the ranker's observation of an
    interaction, taken before `profile` applies it (`Recommender.observation`)."""

    def __init__(
        self,
        rule: ProfileRule,
        stored: Callable[[str], Profile | None],
        observe: Callable[[Profile, str, float], Observation],
    ) -> None:
        self.rule = rule
        self.stored = stored
        self.observe = observe
        # only items with a vector are applied, so the items table follows the catalogue
        self.items = Shared(1_000_000)
        self.events = Shared(1_000)

    @staticmethod
    def items_needed(batch: Sequence[Received[Any]]) -> set[str]:
        """The items whose vectors `update` needs: those of the batch's interactions."""
        return {r.interaction.item_id for r in batch if r.kind == "interaction"}

    def update(self, batch: Sequence[Received[E]], vectors: Mapping[str, Any]) -> BatchUpdate[E]:
        """Apply the batch's interactions, grouped by user in order, to their profiles, with
        `vectors` (item_id -> vector; an item missing has none yet and its interactions are
        deferred). Profiles are loaded here and not written: the result says what to write."""
        by_user: dict[str, list[Received[E]]] = defaultdict(list)
        refresh: dict[str, Received[E]] = {}
        for received in batch:
            if received.kind == "refresh":
                refresh[received.interaction.user_id] = received  # the latest one counts
            else:
                by_user[received.interaction.user_id].append(received)

        result: BatchUpdate[E] = BatchUpdate()
        for user_id, rows in by_user.items():
            profile = self.stored(user_id) or Profile(user_id)
            for received in rows:
                if self._duplicate(profile, received):
                    result.duplicates += 1
                    continue
                interaction = received.interaction
                vector = vectors.get(interaction.item_id)
                if vector is None:
                    result.deferred.append(self._defer(profile, received))
                    continue
                item_id = self.items(interaction.item_id)
                result.observed.append(self.observe(profile, item_id, interaction.ts))
                profile.apply(item_id, vector, self.events(interaction.event), interaction.value, interaction.ts, self.rule)
                result.applied.append(interaction)
                result.arrived[user_id] = min(result.arrived.get(user_id, received.timestamp), received.timestamp)
            result.profiles[user_id] = (profile, rows[-1].event)
        for user_id, received in refresh.items():
            if user_id in result.profiles or self.stored(user_id) is not None:
                result.refreshed[user_id] = (received.partition, received.published_at)
        return result

    @staticmethod
    def _duplicate(profile: Profile, received: Received[Any]) -> bool:
        """Seen before (re-delivery), else remembered now (written with the profile). A
        released deferral (`origin` set) counts only if the profile still awaits it."""
        if profile.already_seen(received.source, received.offset):
            return True
        profile.mark_seen(received.source, received.offset)
        return received.origin is not None and not profile.take_awaited(received.origin)

    @staticmethod
    def _defer(profile: Profile, received: Received[Any]) -> Deferral:
        """Let the profile await the interaction's release. A release deferred again keeps
        its first origin."""
        origin = received.origin or f"{received.source}:{received.offset}"
        profile.await_origin(origin)
        return Deferral(received.interaction, origin, received.partition)
