"""Profile objects beside the table's stored values (`streams/live_profiles.py`) and the
profile's remembered direction (`Profile.as_array`, `Profile.copy`)."""

from __future__ import annotations

import numpy as np
import pytest

from streams.live_profiles import LiveProfiles
from streams.profile import Profile, ProfileRule


def profile(user: str, *items: str) -> Profile:
    p = Profile(user)
    for n, item in enumerate(items):
        p.apply(item, np.eye(4)[n % 4], "click", None, float(n), ProfileRule())
    return p


def test_the_value_written_last_reads_back_as_its_object_and_any_other_is_parsed() -> None:
    live = LiveProfiles()
    p = profile("u", "a", "b")
    stored = p.to_dict()
    live.written("u", stored, p)
    assert live.read("u", stored) is p and live.parsed == 0
    restored = dict(stored)  # the same content as another object: restored from the changelog
    again = live.read("u", restored)
    assert again is not p and again == p and live.parsed == 1
    assert live.read("u", restored) is again and live.parsed == 1, "kept once parsed"
    assert live.read("nobody", None) is None


def test_the_least_recently_used_go_first() -> None:
    live = LiveProfiles(size=2)
    values = {u: profile(u, "a") for u in "xyz"}
    stored = {u: p.to_dict() for u, p in values.items()}
    live.written("x", stored["x"], values["x"])
    live.written("y", stored["y"], values["y"])
    live.read("x", stored["x"])
    live.written("z", stored["z"], values["z"])
    assert len(live) == 2
    assert live.read("x", stored["x"]) is values["x"]
    assert live.read("y", stored["y"]) is not values["y"], "y was the least recently used"


def test_a_copy_changes_alone_and_the_direction_follows_the_vector() -> None:
    p = profile("u", "a")
    first = p.as_array()
    assert first is not None and np.allclose(first, [1, 0, 0, 0])
    assert p.as_array() is first, "remembered until the vector moves"
    with pytest.raises(ValueError):
        first[0] = 2.0  # shared with every reader: read-only
    twin = p.copy()
    twin.apply("b", np.eye(4)[1], "click", None, 5.0, ProfileRule())
    twin.mark_seen("interactions:0", 9)
    assert p.seen == ["a"] and p.offsets == {} and p.as_array() is first, "the original is untouched"
    moved = twin.as_array()
    assert moved is not None and np.allclose(moved, np.array([1, 1, 0, 0]) / np.sqrt(2))
    assert twin.seen == ["a", "b"] and Profile.from_dict(twin.to_dict()) == twin
