"""The stream an offline evaluation walks (../shared/EVAL.md): a dataset as arrays in time
order, its targets, the state that grows one row at a time, and the item vectors of each
embedding strategy (`ContentIndex`, `embed_content`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from streams.profile import mean_profile
from vlm4rec.evaluation.dataset import Dataset, publish_times
from vlm4rec.evaluation.embedcache import EmbeddingCache, embed_items
from workers.backends.base import EmbeddingBackend
from workers.embedder import Embedder, Strategy
from images.loader import ImageLimits, ImageLoader

KS = (10, 20)
#: recent_popularity's trailing window. A week: long enough that a sparse catalogue (hm: about
#: 40 purchases a day) has counts to rank by, short enough to follow what is selling now.
WINDOW_DAYS = 7.0
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 5
#: the embedding strategy of the product's blend (the semantic source inside `default`)
DEFAULT_STRATEGY: Strategy = "text"
#: what the `default` method is: the product's ranking (`streams.rank.BlendRanker`)
DEFAULT_IS = f"blend({DEFAULT_STRATEGY})"


@dataclass(frozen=True)
class Stream:
    """The dataset as the evaluator walks it: integer indices, interactions sorted by ts."""

    name: str
    item_ids: list[str]  # every item that is ever published; the index of an item
    published_at: np.ndarray  # float64 per item
    user_ids: list[str]
    users: np.ndarray  # int64 per row, in stream order
    items: np.ndarray  # int64 per row
    ts: np.ndarray  # float64 per row
    #: declared creation times (items.csv `created_at`) by item index; items published at
    #: their first interaction are absent
    created_at: Mapping[int, float] = field(default_factory=dict)


def build_stream(dataset: Dataset) -> Stream:
    """`dataset.interactions` is already sorted by ts, stable (EVAL.md step 1)."""
    published = publish_times(dataset.items, dataset.interactions)
    item_ids = sorted(published)
    item_index = {item_id: n for n, item_id in enumerate(item_ids)}
    user_index: dict[str, int] = {}
    for row in dataset.interactions:
        user_index.setdefault(row.user_id, len(user_index))
    rows = dataset.interactions
    return Stream(
        name=dataset.name,
        item_ids=item_ids,
        published_at=np.array([published[i] for i in item_ids], dtype=np.float64),
        user_ids=list(user_index),
        users=np.array([user_index[r.user_id] for r in rows], dtype=np.int64),
        items=np.array([item_index[r.item_id] for r in rows], dtype=np.int64),
        ts=np.array([r.ts for r in rows], dtype=np.float64),
        created_at={item_index[i.item_id]: float(i.created_at) for i in dataset.items if i.created_at is not None and i.item_id in item_index},
    )


def select_targets(stream: Stream) -> np.ndarray:
    """Row positions of the targets, ascending: each user's last row, when the user has at
    least 2 earlier rows and the last item is not among them (EVAL.md step 3)."""
    last: dict[int, int] = {}
    rows: dict[int, int] = {}
    first_pair: dict[tuple[int, int], int] = {}
    for position, (user, item) in enumerate(zip(stream.users.tolist(), stream.items.tolist(), strict=True)):
        last[user] = position
        rows[user] = rows.get(user, 0) + 1
        first_pair.setdefault((user, item), position)
    return np.array(
        sorted(
            position
            for user, position in last.items()
            if rows[user] >= 3 and first_pair[(user, int(stream.items[position]))] == position
        ),
        dtype=np.int64,
    )


class ContentIndex:
    """One strategy's item vectors (rows aligned with `stream.item_ids`; a zero row for an item
    without a vector). Identical vectors are scored once, so identical items get bit-identical
    scores and the tie rule, not floating-point noise, orders them."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.asarray(vectors, dtype=np.float32)
        unique, inverse = np.unique(self.vectors, axis=0, return_inverse=True)
        self._unique = unique
        self._inverse = inverse.reshape(-1)

    def scores(self, history: Sequence[int]) -> np.ndarray:
        """Cosine of every item to the user's profile: the mean of the distinct history items'
        unit vectors (the streams' `mean_profile`). No usable history: all zeros."""
        profile = mean_profile(self.vectors[list(history)])
        if profile is None:
            return np.zeros(len(self.vectors))
        return (self._unique @ profile)[self._inverse]


class StreamState:
    """What is known just before row `position` of the stream; `advance` folds rows in."""

    def __init__(self, stream: Stream, content: Mapping[str, ContentIndex], window_days: float) -> None:
        n_items, n_rows = len(stream.item_ids), len(stream.users)
        self.stream = stream
        self.content = content
        self.window_s = window_days * 86400.0
        self.position = 0
        self.counts = np.zeros(n_items)  # interactions so far
        self.window = np.zeros(n_items)  # interactions in the trailing window (see `at`)
        self.item_users = np.zeros(n_items)  # distinct users so far
        self.history: list[list[int]] = [[] for _ in stream.user_ids]  # distinct, oldest first
        self._seen: list[set[int]] = [set() for _ in stream.user_ids]
        # distinct (user, item) pairs in order of first occurrence; the first `pairs` are known
        self.pair_users = np.zeros(n_rows, dtype=np.int64)
        self.pair_items = np.zeros(n_rows, dtype=np.int64)
        self.pairs = 0
        self._tail = 0  # first row still inside the window

    def advance(self, to: int) -> None:
        stream = self.stream
        for position in range(self.position, to):
            user, item = int(stream.users[position]), int(stream.items[position])
            self.counts[item] += 1
            self.window[item] += 1
            if item not in self._seen[user]:
                self._seen[user].add(item)
                self.history[user].append(item)
                self.item_users[item] += 1
                self.pair_users[self.pairs] = user
                self.pair_items[self.pairs] = item
                self.pairs += 1
        self.position = max(self.position, to)

    def at(self, ts: float) -> None:
        """Shrink the window to the rows with ts > `ts` - W (EVAL.md); target times only grow
        along the walk, so rows leave it once."""
        stream = self.stream
        while self._tail < self.position and stream.ts[self._tail] <= ts - self.window_s:
            self.window[stream.items[self._tail]] -= 1
            self._tail += 1


#: a target more than this after the user's previous interaction is a later visit (EVAL.md)
LATER_VISIT_S = 3600.0


@dataclass(frozen=True)
class Target:
    row: int
    user: int
    item: int
    ts: float
    cold: bool  # the item had no interaction before the target
    later: bool = False  # more than LATER_VISIT_S after the user's previous interaction


def previous_ts(stream: Stream) -> np.ndarray:
    """Per row, the ts of the same user's previous row in the sorted stream (NaN for a
    user's first)."""
    order = np.lexsort((np.arange(len(stream.users)), stream.users))
    previous = np.full(len(order), np.nan)
    same = stream.users[order][1:] == stream.users[order][:-1]
    previous[order[1:][same]] = stream.ts[order[:-1][same]]
    return previous


def lexicographic(primary: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """One score that orders by `primary`, then by `fallback`: the dense rank of `primary`
    times a stride larger than any `fallback` (non-negative integers), exact in float64."""
    _, rank = np.unique(primary, return_inverse=True)
    return rank.reshape(-1) * (float(fallback.max(initial=0.0)) + 1.0) + fallback


def content_matrix(stream: Stream, vectors: Mapping[str, np.ndarray], dim: int) -> np.ndarray:
    """Rows aligned with `stream.item_ids`; zeros for items without a vector (cosine 0 to
    every profile, so content neither favours nor hides them)."""
    matrix = np.zeros((len(stream.item_ids), dim), dtype=np.float32)
    for n, item_id in enumerate(stream.item_ids):
        vector = vectors.get(item_id)
        if vector is not None:
            matrix[n] = vector
    return matrix



def embed_content(
    dataset: Dataset,
    stream: Stream,
    strategies: Sequence[Strategy],
    backend: EmbeddingBackend,
    cache: EmbeddingCache,
    progress: bool = False,
) -> tuple[dict[str, ContentIndex], dict[str, str]]:
    """A `ContentIndex` per strategy over the published items (cached vectors reused), and the
    items left without a vector in some strategy, with the reason. Images are read from the
    dataset folder only."""
    published = set(stream.item_ids)
    items = [item for item in dataset.items if item.item_id in published]
    loader = ImageLoader(ImageLimits(file_roots=(dataset.root,)))
    vectors, failed = embed_items(items, strategies, backend, loader, cache, progress=progress)
    indexes = {
        s: ContentIndex(content_matrix(stream, vectors[s], Embedder(backend, s).dim)) for s in strategies
    }
    return indexes, failed
