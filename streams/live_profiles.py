"""Profile objects beside the profile table's stored values, so that the hot path does not parse
the same profile again and again.

The table holds each profile as its JSON-ready dict (`Profile.to_dict`: that is what its
changelog carries and what a restore brings back). Every interaction read its user's dict back
into a `Profile` (`Profile.from_dict`, 25 µs with a dozen items) to apply it, and every recs round
did so again for each user it ranked, on the event loop. Here the object written last is kept
with the dict it was written as: a read whose table value is that very dict (the in-memory store
hands back the object it was given) gets the object; any other value (restored from the
changelog, written by another path, a store that copies) is parsed as before and kept. Faust-free
and tested alone (`tests/test_live_profiles.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from streams.profile import Profile


class LiveProfiles:
    """The latest `Profile` per user with the table value it stands for; at most `size` users
    (the least recently used go first and are parsed again when read)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._live: OrderedDict[str, tuple[Mapping[str, Any], Profile]] = OrderedDict()
        self.parsed = 0  # reads that had to parse the stored value

    def read(self, user_id: str, stored: Mapping[str, Any] | None) -> Profile | None:
        """The profile that `stored` (the table's value for the user, None: unknown) holds.
        Shared: read it, or `copy` it to change it."""
        if stored is None:
            return None
        entry = self._live.get(user_id)
        if entry is not None and entry[0] is stored:
            self._live.move_to_end(user_id)
            return entry[1]
        self.parsed += 1
        profile = Profile.from_dict(stored)
        self.written(user_id, stored, profile)
        return profile

    def written(self, user_id: str, stored: Mapping[str, Any], profile: Profile) -> None:
        """`profile` was just written to the table as `stored` (its `to_dict`)."""
        self._live[user_id] = (stored, profile)
        self._live.move_to_end(user_id)
        while len(self._live) > self.size:
            self._live.popitem(last=False)

    def __len__(self) -> int:
        return len(self._live)
