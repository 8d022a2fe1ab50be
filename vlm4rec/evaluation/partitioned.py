"""`default` as N stream processors run it (`vlm4rec up --streams N`, compose replicas): each
learns its ranker (item counts, co-occurrence, the blend's model) from the interactions of the
users on its own partitions of `interactions`, and ranks those users alone. The same targets,
each ranked by its user's partition. Users are spread by CRC32 of their id modulo the partition
count: a fixed hash, as a producer's partitioner is (the product's producers use murmur2; any
such hash spreads users alike).

Since shared learning (`streams.observations`, `VLM4REC_STREAMS_LEARN_FROM_ALL`, on by
default) every processor learns from every partition, so this is what a deployment gets with
it turned off."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from streams.rank import RankConfig
from vlm4rec.evaluation.dataset import partition_of
from vlm4rec.evaluation.stream import ContentIndex, Stream


def partitioned_ranks(
    stream: Stream,
    partitions: int,
    content_indexes: Mapping[str, ContentIndex],
    walk: Callable[..., tuple[list, dict]],
    window_days: float,
    rank: RankConfig | None,
) -> tuple[dict[int, int], set[str]]:
    """Per target (its row in `stream`): the rank `default` gave it when its user's partition
    learnt alone (`walk`: `vlm4rec.evaluation.evaluate.walk`); and the items any partition put
    in a top 10."""
    placed = np.array([partition_of(user, partitions) for user in stream.user_ids], dtype=np.int64)
    ranks: dict[int, int] = {}
    recommended: set[str] = set()
    for partition in range(partitions):
        rows = np.flatnonzero(placed[stream.users] == partition)
        if not len(rows):
            continue
        alone = dataclasses.replace(stream, users=stream.users[rows], items=stream.items[rows], ts=stream.ts[rows])
        targets, results = walk(alone, ["default"], content_indexes, window_days, False, (), rank)
        for target, found in zip(targets, results["default"].ranks, strict=True):
            ranks[int(rows[target.row])] = found
        recommended |= results["default"].recommended
    return ranks, recommended
