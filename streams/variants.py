"""Ranking variants served side by side, and their online hit rates.

A variant is a name, a share of the users and a set of overrides of the ranker's *serving*
settings (`SERVING_FIELDS`: how many candidates each source offers, the tail slots, ...).
Learning settings are not overridable: every variant ranks with the one model the stream
trains, so a difference between variants is the difference of their serving settings alone.

Each user is in exactly one variant, chosen by a stable hash of their id (the same on every
worker and across restarts); every `recs` event names its variant. What a variant earns is
counted where the user's next interaction arrives: is its item in the list last pushed to
them (online HR@10 and HR@20)? The evaluator scores the same variants offline on the same
targets (`vlm4rec eval --variants`), so the two can be set side by side.

Faust-free and unit-tested, like `rank.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.rank import TAIL_RULES, RankConfig

#: what a variant may override: the settings that shape a list, not what the model learns
SERVING_FIELDS = ("content_k", "neighbour_depth", "interests", "cooc_k", "popular_k", "fresh_k", "fresh_window_s", "tail_slots", "tail_within", "tail_rule", "content_picks", "sequence_k", "fanout_places")
DEFAULT_VARIANT = "default"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the list positions whose hits are counted (online HR@k)
ONLINE_KS = (10, 20)


class VariantError(ValueError):
    """A variant specification that cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class Variant:
    name: str
    share: float
    overrides: Mapping[str, float] = field(default_factory=dict)

    def config(self, base: RankConfig) -> RankConfig:
        """`base` with this variant's overrides."""
        return dataclasses.replace(base, **self.overrides) if self.overrides else base


def parse_variants(spec: Sequence[Mapping[str, Any]]) -> tuple[Variant, ...]:
    """Variants from their JSON form, `[{"name": "a", "share": 0.5}, {"name": "b", "share":
    0.5, "tail_slots": 0}]`: every key besides `name` and `share` overrides that serving
    setting. None given: one variant, `default`, for everyone."""
    if not spec:
        return (Variant(DEFAULT_VARIANT, 1.0),)
    defaults = RankConfig()
    variants = []
    for n, raw in enumerate(spec):
        if not isinstance(raw, Mapping):
            raise VariantError(f"variant {n + 1} must be an object with a name and a share, not {raw!r}")
        name, share = raw.get("name"), raw.get("share")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise VariantError(f"variant {n + 1}: name must be 1-64 letters, digits, '_', '.' or '-', not {name!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise VariantError(f"variant {name}: share must be a number above 0 and at most 1, not {share!r}")
        overrides = {}
        for key, value in raw.items():
            if key in ("name", "share"):
                continue
            if key not in SERVING_FIELDS:
                raise VariantError(f"variant {name}: {key!r} cannot be overridden; a variant may set {', '.join(SERVING_FIELDS)}")
            kind = type(getattr(defaults, key))
            if key == "tail_rule":
                if value not in TAIL_RULES:
                    raise VariantError(f"variant {name}: tail_rule must be one of {', '.join(TAIL_RULES)}, not {value!r}")
                overrides[key] = value
                continue
            if kind is bool:
                if not isinstance(value, bool):
                    raise VariantError(f"variant {name}: {key} must be true or false, not {value!r}")
                overrides[key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (kind is int and value != int(value)):
                raise VariantError(f"variant {name}: {key} must be a {'whole ' if kind is int else ''}number of at least 0, not {value!r}")
            overrides[key] = kind(value)
        variants.append(Variant(name, float(share), overrides))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise VariantError(f"variant names must differ: {names}")
    total = sum(v.share for v in variants)
    if abs(total - 1.0) > 1e-6:
        raise VariantError(f"variant shares must add up to 1, not {total:g}")
    return tuple(variants)


class Assignment:
    """Which variant serves a user: a stable hash of the id, placed on the variants' shares."""

    def __init__(self, variants: Sequence[Variant]) -> None:
        self.variants = tuple(variants)
        bounds, total = [], 0.0
        for variant in self.variants[:-1]:
            total += variant.share
            bounds.append(total)
        self._bounds = bounds

    def of(self, user_id: str) -> Variant:
        if len(self.variants) == 1:
            return self.variants[0]
        digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return self.variants[bisect_right(self._bounds, int.from_bytes(digest, "big") / 2**64)]


def online_hit(shown: Sequence[str], item_id: str) -> dict[int, bool]:
    """Whether `item_id` was among the first k of the list the user was last shown, per k of
    `ONLINE_KS`."""
    place = next((n for n, shown_id in enumerate(shown) if shown_id == item_id), None)
    return {k: place is not None and place < k for k in ONLINE_KS}
