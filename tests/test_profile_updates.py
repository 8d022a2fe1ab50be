"""The profile agent's batch logic (streams/profile_updates.py) without a broker: grouping,
duplicates, deferrals and their releases, and which users become due."""

from __future__ import annotations

from typing import Any

import numpy as np

from streams.profile import Profile, ProfileRule
from streams.profile_updates import Deferral, ProfileUpdater, Received
from topics import Interaction

X, Y = np.array([1.0, 0.0]), np.array([0.0, 1.0])
VECTORS = {"a": X, "b": Y}


class Store:
    """Stored profiles, handed out as copies as the table's JSON values are; and the
    observations taken, with the history each profile had when it was taken."""

    def __init__(self, *profiles: Profile) -> None:
        self.table = {p.user_id: p.to_dict() for p in profiles}
        self.observed: list[tuple[list[str], str, float]] = []

    def stored(self, user_id: str) -> Profile | None:
        return Profile.from_dict(self.table[user_id]) if user_id in self.table else None

    def observe(self, profile: Profile, item_id: str, ts: float) -> Any:
        self.observed.append((list(profile.seen), item_id, ts))
        return (None, list(profile.seen), item_id, ts)

    def updater(self, rule: ProfileRule | None = None) -> ProfileUpdater:
        return ProfileUpdater(rule or ProfileRule(), self.stored, self.observe)


def click(
    user: str, item: str, offset: int, *, partition: int = 1, topic: str = "interactions", ts: float = 10.0,
    event: str = "click", origin: str | None = None, arrived: float | None = None,
) -> Received[str]:
    return Received(
        "interaction", Interaction(user_id=user, item_id=item, event=event, ts=ts), topic, partition, offset,
        arrived if arrived is not None else ts, f"{topic}:{partition}@{offset}", origin,
    )


def refresh(user: str, item: str, offset: int, published_at: float, partition: int = 1) -> Received[str]:
    interaction = Interaction(user_id=user, item_id=item, event="fresh_item", ts=50.0)
    return Received("refresh", interaction, "control", partition, offset, 50.0, f"control:{partition}@{offset}", None, published_at)


def test_a_batch_is_applied_per_user_in_order_and_nothing_is_written_by_it() -> None:
    store = Store()
    batch = [click("u", "a", 3, arrived=7.0), click("v", "b", 4, partition=2), click("u", "b", 5, arrived=6.0)]
    update = store.updater().update(batch, VECTORS)
    assert list(update.profiles) == ["u", "v"] and store.table == {}, "the caller writes"
    u, last = update.profiles["u"]
    assert u.count == 2 and u.seen == ["a", "b"] and u.offsets == {"interactions:1": 5}
    assert last == "interactions:1@5", "the user's last event owns the table key"
    assert np.allclose(u.as_array(), [2**-0.5, 2**-0.5])
    assert [i.item_id for i in update.applied] == ["a", "b", "b"] and update.duplicates == 0
    assert store.observed == [([], "a", 10.0), (["a"], "b", 10.0), ([], "b", 10.0)], "taken before each apply"
    assert len(update.observed) == 3
    assert update.arrived == {"u": 6.0, "v": 10.0}, "latency counts from the oldest arrival"


def test_re_delivered_events_are_duplicates() -> None:
    seen = Profile("u")
    seen.mark_seen("interactions:1", 5)
    store = Store(seen)
    update = store.updater().update([click("u", "a", 4), click("u", "a", 5), click("u", "b", 6), click("u", "b", 6)], VECTORS)
    profile, _ = update.profiles["u"]
    assert update.duplicates == 3 and [i.item_id for i in update.applied] == ["b"] and profile.count == 1
    assert update.arrived == {"u": 10.0}


def test_an_interaction_without_a_vector_is_deferred_and_awaited() -> None:
    store = Store()
    update = store.updater().update([click("u", "new", 8, partition=3)], VECTORS)
    interaction = Interaction(user_id="u", item_id="new", event="click", ts=10.0)
    assert update.deferred == [Deferral(interaction, "interactions:3:8", 3)]
    profile, _ = update.profiles["u"]
    assert profile.awaiting == ["interactions:3:8"] and profile.count == 0
    assert profile.offsets == {"interactions:3": 8}, "written with the profile, after the deferral is delivered"
    assert not update.applied and not update.observed and update.arrived == {}, "nothing to push yet"
    assert store.updater().items_needed([click("u", "new", 8), refresh("u", "fresh", 1, 40.0)]) == {"new"}


def test_a_release_counts_once_and_only_if_still_awaited() -> None:
    waiting = Profile("u")
    waiting.mark_seen("interactions:3", 8)
    waiting.await_origin("interactions:3:8")
    store = Store(waiting)
    release = click("u", "new", 20, topic="control", partition=3, origin="interactions:3:8")
    update = store.updater().update([release], {"new": X})
    profile, _ = update.profiles["u"]
    assert profile.count == 1 and profile.awaiting == [] and update.duplicates == 0
    store.table["u"] = profile.to_dict()
    again = click("u", "new", 21, topic="control", partition=3, origin="interactions:3:8")
    update = store.updater().update([again], {"new": X})
    assert update.duplicates == 1 and update.profiles["u"][0].count == 1, "a second release is a duplicate"
    applied_directly = click("u", "new", 22, topic="control", partition=3, origin="interactions:3:9")
    assert store.updater().update([applied_directly], {"new": X}).duplicates == 1, "never deferred, or applied since"


def test_a_release_deferred_again_keeps_its_first_origin() -> None:
    waiting = Profile("u")
    waiting.await_origin("interactions:3:8")
    store = Store(waiting)
    release = click("u", "new", 20, topic="control", partition=3, origin="interactions:3:8")
    update = store.updater().update([release], {})  # the item's vector is gone again
    assert [d.origin for d in update.deferred] == ["interactions:3:8"]
    assert update.profiles["u"][0].awaiting == ["interactions:3:8"]


def test_a_negative_event_is_applied_and_pulls_the_profile_away() -> None:
    store = Store()
    rule = ProfileRule(weights={"hide": -1.0}, distinct=False)
    batch = [click("u", "a", 1), click("u", "b", 2), click("u", "b", 3, event="hide")]
    profile, _ = store.updater(rule).update(batch, VECTORS).profiles["u"]
    assert profile.count == 3 and profile.history[-1] == ("b", "hide", 10.0)
    assert np.allclose(profile.as_array(), X), "liked b, then hid it: a alone is left"


def test_refreshes_ask_for_recs_of_users_with_a_profile_only() -> None:
    store = Store(Profile("known"))
    batch = [
        refresh("known", "fresh", 1, 40.0, partition=2),
        refresh("stranger", "fresh", 2, 40.0),
        refresh("new", "fresh", 3, 40.0),
        click("new", "a", 4),
        refresh("known", "fresher", 5, 45.0, partition=2),
    ]
    update = store.updater().update(batch, VECTORS)
    assert update.refreshed == {"known": (2, 45.0), "new": (1, 40.0)}, "the latest refresh of a user counts"
    assert list(update.profiles) == ["new"], "a refresh changes no profile"


def test_profiles_share_one_string_per_item_and_event() -> None:
    """Each decoded event brings strings of its own; the profiles keep one object per item and
    event name, not one per interaction (the main process grew ~1 MB/min while 2,000 seen
    lists filled with copies)."""
    def fresh(text: str) -> str:
        return "".join(list(text))  # an equal string, another object (as JSON decoding makes)

    vectors = {fresh("item-a"): X}
    batch = [click(user, fresh("item-a"), n, event=fresh("click")) for n, user in enumerate(["u", "v", "w"])]
    assert batch[0].interaction.item_id is not batch[1].interaction.item_id
    update = Store().updater().update(batch, vectors)
    profiles = [update.profiles[u][0] for u in ("u", "v", "w")]
    assert len({id(p.seen[0]) for p in profiles}) == 1 and profiles[0].seen == ["item-a"]
    assert len({id(p.history[0][0]) for p in profiles}) == 1 and len({id(p.history[0][1]) for p in profiles}) == 1


def test_the_shared_strings_table_is_bounded() -> None:
    from streams.profile_updates import Shared

    shared = Shared(3)
    first = shared("".join(list("a")))
    assert shared("".join(list("a"))) is first
    values = [shared(f"id-{n}") for n in range(10)]
    assert values == [f"id-{n}" for n in range(10)] and len(shared._values) <= 3, "odd ids cannot grow it"
