"""Observations shared between stream processors, so that each learns from the whole stream.

With `--streams N` each stream processor owns a share of the users, and its ranker used to
learn only from them: `vlm4rec eval --partitions 4` measured what that costs (ml100k HR@10
0.176 -> 0.145). Learning needs the user's state just before each interaction, which only the
owner has; so the owner publishes each applied batch's observations (`Observation`: the
sampled training requests, and for every interaction the last items that co-occurrence and
transitions read) to the internal `<app id>-observations` topic, and every processor follows
every partition of it (`ObservationFeed`) and learns from all of it, its own included.

Learning stays best effort and beside the hot path: a message that cannot be read is logged,
counted and skipped; the feed starts at the topic's end (a restarted processor learns again
from what arrives, as before)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from confluent_kafka import Message

from streams import metrics
from streams.follow import EveryPartition
from streams.rank import Request
from streams.recommend import Observation

log = logging.getLogger("vlm4rec.streams")

VERSION = 1


def encode(observations: Sequence[Observation]) -> bytes:
    """One batch as JSON: profile vectors as the base64 of their float32 bytes."""
    rows = []
    for o in observations:
        request = None
        if o.request is not None:
            r = o.request
            profile = None if r.profile is None else base64.b64encode(np.asarray(r.profile, dtype="<f4").tobytes()).decode()
            request = [list(r.history), profile, r.ts]
        rows.append([o.item, o.ts, o.new, o.recent, request])
    return json.dumps({"v": VERSION, "o": rows}, separators=(",", ":")).encode()


def decode(value: bytes) -> list[Observation]:
    """`encode`'s batch; ValueError for anything else."""
    try:
        body = json.loads(value)
        if not isinstance(body, dict) or body.get("v") != VERSION:
            raise ValueError(f"not an observations batch of version {VERSION}")
        return [_observation(row) for row in body["o"]]
    except (KeyError, TypeError, IndexError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed observations batch: {type(exc).__name__}: {exc}") from exc


def _observation(row: Sequence[Any]) -> Observation:
    item, ts, new, recent, request = row
    if not isinstance(item, str) or not isinstance(new, bool) or not _ids(recent):
        raise ValueError("an observation needs an item id, a new flag and a list of item ids before it")
    ts = float(ts)
    if not np.isfinite(ts):
        raise ValueError("an observation's ts must be finite")
    parsed = None
    if request is not None:
        history, profile, at = request
        if not _ids(history):
            raise ValueError("a training request needs a list of item ids")
        vector = None if profile is None else np.frombuffer(base64.b64decode(profile), dtype="<f4")
        if vector is not None and not np.isfinite(vector).all():
            vector = None  # no direction: ranked by what else the user has
        at = float(at)
        if not np.isfinite(at):
            raise ValueError("a training request's ts must be finite")
        parsed = Request(history, vector, at)
    return Observation(parsed, list(recent), new, item, ts)


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, str) for i in value)


class ObservationFeed(EveryPartition):
    """Follows every partition of the observations topic from its end and hands each batch
    read, decoded, to `on_observed` (on the feed's thread)."""

    thread_name = "observation-feed"

    def __init__(
        self, topic: str, kafka: Mapping[str, Any], group_id: str, on_observed: Callable[[list[Observation]], None], **kwargs: Any
    ) -> None:
        super().__init__(topic, kafka, group_id, **kwargs)
        self.on_observed = on_observed

    def follow(self, messages: list[Message]) -> None:
        observed: list[Observation] = []
        for message in messages:
            if message.error() is not None:
                log.warning("observation feed: %s", message.error())
                continue
            try:
                observed.extend(decode(message.value()))
            except ValueError as exc:
                metrics.OBSERVATIONS_REFUSED.inc()
                log.warning("observation batch at %s[%d]@%d skipped: %s", message.topic(), message.partition(), message.offset(), exc)
        if observed:
            try:
                self.on_observed(observed)
            except Exception:  # noqa: BLE001 - the feed (all learning) must outlive one batch
                metrics.LEARN_FAILURES.inc()
                log.exception("%d observations not handed to the learner", len(observed))
