"""Offline evaluation, exactly as ../shared/EVAL.md says: a prequential leave-last-out replay.

The sorted interaction stream is walked once. State (interaction counts, a trailing window,
every user's distinct history, the user-item pairs behind item co-occurrence) grows one row at
a time; when the walk reaches a target row, every method scores every published item from the
state *before* that row, and the target's rank is recorded. Content methods rank with the
profile and ranking code of `streams.profile` (`mean_profile`, `Ranker`), the code the stream
processor runs.

Adding a method is one function `(state, target) -> scores over stream.item_ids` (higher is
better) and one entry in `METHODS`. A method that defines a fallback returns
`lexicographic(primary, fallback)`; the ranker breaks the remaining ties by item_id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streams.profile import Ranker, mean_profile
from vlm4rec.dataset import Dataset, publish_times
from vlm4rec.embedcache import EmbeddingCache, embed_items
from workers.backends.base import EmbeddingBackend
from workers.embedder import Embedder, Strategy
from workers.images import ImageLimits, ImageLoader

KS = (10, 20)
#: recent_popularity's trailing window. A week: long enough that a sparse catalogue (hm: about
#: 40 purchases a day) has counts to rank by, short enough to follow what is selling now.
WINDOW_DAYS = 7.0
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 5
#: what the `default` method is for now: the product's current ranking (issue 6 makes it a blend)
DEFAULT_IS = "describe"


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


@dataclass(frozen=True)
class Target:
    row: int
    user: int
    item: int
    ts: float
    cold: bool  # the item had no interaction before the target


def lexicographic(primary: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """One score that orders by `primary`, then by `fallback`: the dense rank of `primary`
    times a stride larger than any `fallback` (non-negative integers), exact in float64."""
    _, rank = np.unique(primary, return_inverse=True)
    return rank.reshape(-1) * (float(fallback.max(initial=0.0)) + 1.0) + fallback


# --- methods: (state, target) -> one score per item of stream.item_ids ---------------------

Scorer = Callable[[StreamState, Target], np.ndarray]


def popularity(state: StreamState, target: Target) -> np.ndarray:
    """Interactions so far, most first."""
    return state.counts


def recent_popularity(state: StreamState, target: Target) -> np.ndarray:
    """Interactions in the trailing WINDOW_DAYS, then all-time popularity."""
    return lexicographic(state.window, state.counts)


def item_knn(state: StreamState, target: Target) -> np.ndarray:
    """Item-item co-occurrence over the interactions so far (`co_occurrence`), then popularity."""
    return lexicographic(co_occurrence(state, target.user), state.counts)


def co_occurrence(state: StreamState, user: int) -> np.ndarray:
    """score(j) = sum over the user's distinct history items i of cooc(i, j) / sqrt(n_i n_j),
    where cooc(i, j) is the number of users who interacted with both so far and n_i the number
    who interacted with i: the cosine of the items' binary user vectors.

    Computed from the user-item pairs so far, without the item-item matrix (17k items squared
    would not fit): each user v weighs w_v = sum of 1/sqrt(n_i) over the history items v has,
    and score(j) = 1/sqrt(n_j) * sum of w_v over the users v of j."""
    n = len(state.counts)
    users, items = state.pair_users[: state.pairs], state.pair_items[: state.pairs]
    inv_sqrt = np.zeros(n)
    np.divide(1.0, np.sqrt(state.item_users), out=inv_sqrt, where=state.item_users > 0)
    in_history = np.zeros(n, dtype=bool)
    in_history[state.history[user]] = True
    shared = in_history[items]
    weights = np.bincount(users[shared], weights=inv_sqrt[items[shared]], minlength=len(state.history))
    return np.bincount(items, weights=weights[users], minlength=n) * inv_sqrt


def content(strategy: Strategy) -> Scorer:
    """Cosine to the mean profile of the user's distinct history items, in `strategy`'s space."""

    def score(state: StreamState, target: Target) -> np.ndarray:
        return state.content[strategy].scores(state.history[target.user])

    return score


@dataclass(frozen=True)
class Method:
    score: Scorer
    strategy: Strategy | None = None  # the item vectors the method reads, if any


METHODS: dict[str, Method] = {
    "popularity": Method(popularity),
    "recent_popularity": Method(recent_popularity),
    "item_knn": Method(item_knn),
    "image": Method(content("image"), "image"),
    "text": Method(content("text"), "text"),
    "describe": Method(content("describe"), "describe"),
    "fused": Method(content("fused"), "fused"),
    "default": Method(content(DEFAULT_IS), DEFAULT_IS),
}


def strategies_of(methods: Sequence[str]) -> list[Strategy]:
    """The embedding strategies the chosen methods need, in a stable order."""
    return list(dict.fromkeys(s for m in methods if (s := METHODS[m].strategy) is not None))


# --- the walk ----------------------------------------------------------------------------


def states(
    stream: Stream, content_indexes: Mapping[str, ContentIndex], window_days: float = WINDOW_DAYS
) -> Iterator[tuple[StreamState, Target]]:
    """Walk the stream once; at each target, yield the state just before it (every earlier row,
    same-ts rows included: EVAL.md step 4) and the target."""
    state = StreamState(stream, content_indexes, window_days)
    for row in select_targets(stream).tolist():
        state.advance(row)
        item, ts = int(stream.items[row]), float(stream.ts[row])
        state.at(ts)
        yield state, Target(row, int(stream.users[row]), item, ts, cold=bool(state.counts[item] == 0))


def recommend(state: StreamState, target: Target, method: str, ranker: Ranker, k: int = max(KS)) -> list[str]:
    """The method's top k for the target: items published up to and including the target's ts,
    the user's own history excluded, ties by item_id (the `Ranker`)."""
    stream = state.stream
    candidates = stream.published_at <= target.ts
    history = state.history[target.user]
    k = min(k, int(candidates.sum()) - int(candidates[history].sum()))
    scores = np.where(candidates, METHODS[method].score(state, target), -np.inf)
    return [item_id for item_id, _ in ranker.top_k(scores, k, [stream.item_ids[i] for i in history])]


@dataclass
class MethodResult:
    ranks: list[int]  # per target: 1-based rank in the top 20, 0 when not in it
    recommended: set[str]  # distinct items in any top 10


def walk(
    stream: Stream,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex],
    window_days: float = WINDOW_DAYS,
    progress: bool = False,
) -> tuple[list[Target], dict[str, MethodResult]]:
    """Every target scored by every method."""
    ranker = Ranker(stream.item_ids)
    results = {m: MethodResult([], set()) for m in methods}
    targets: list[Target] = []
    n_targets = len(select_targets(stream)) if progress else None
    walked = tqdm(states(stream, content_indexes, window_days), total=n_targets, desc="score", unit="target", disable=not progress)
    for state, target in walked:
        targets.append(target)
        wanted = stream.item_ids[target.item]
        for name in methods:
            top = recommend(state, target, name, ranker)
            results[name].ranks.append(top.index(wanted) + 1 if wanted in top else 0)
            results[name].recommended.update(top[: KS[0]])
    return targets, results


def bootstrap_resamples(n_targets: int, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n, n_targets) indices of targets drawn with replacement: one fixed set, shared by every
    method, so that their intervals are comparable."""
    return np.random.default_rng(seed).integers(0, n_targets, size=(n, n_targets))


def summarise(
    ranks: Sequence[int], cold: np.ndarray, recommended: set[str], published: int, resamples: np.ndarray
) -> dict[str, Any]:
    """EVAL.md's metrics for one method."""
    rank = np.asarray(ranks, dtype=np.float64)
    out: dict[str, Any] = {}
    for k in KS:
        hit = (rank > 0) & (rank <= k)
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(rank, 1) + 1), 0.0).mean())
    hit10 = ((rank > 0) & (rank <= 10)).astype(np.float64)
    out["coverage@10"] = len(recommended) / published
    low, high = np.percentile(hit10[resamples].mean(axis=1), [2.5, 97.5])
    out["HR@10_ci"] = [float(low), float(high)]
    out["HR@10_cold"] = float(hit10[cold].mean()) if cold.any() else None
    ordered = ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "coverage@10", "HR@10_ci", "HR@10_cold"]
    return {key: out[key] for key in ordered}


def evaluate(
    stream: Stream,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex],
    window_days: float = WINDOW_DAYS,
    progress: bool = False,
) -> dict[str, Any]:
    """The report of issue 5: {"dataset", "targets", "cold_targets", "default", "methods"}."""
    targets, results = walk(stream, methods, content_indexes, window_days, progress)
    if not targets:
        raise ValueError(f"{stream.name}: no user has a target (a last interaction after 2 others, not a repeat)")
    cold = np.array([t.cold for t in targets])
    published = int((stream.published_at <= targets[-1].ts).sum())
    resamples = bootstrap_resamples(len(targets))
    return {
        "dataset": stream.name,
        "targets": len(targets),
        "cold_targets": int(cold.sum()),
        "default": DEFAULT_IS,
        "methods": {
            m: summarise(results[m].ranks, cold, results[m].recommended, published, resamples) for m in methods
        },
    }


# --- output ------------------------------------------------------------------------------


def markdown_table(report: Mapping[str, Any]) -> str:
    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"{report['dataset']}: {report['targets']} targets, {report['cold_targets']} cold "
        f"(`default` = `{report['default']}`)",
        "",
        "| method | HR@10 | HR@10 95% CI | NDCG@10 | HR@20 | NDCG@20 | coverage@10 | HR@10 cold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        low, high = m["HR@10_ci"]
        lines.append(
            f"| {name} | {num(m['HR@10'])} | {num(low)}–{num(high)} | {num(m['NDCG@10'])} | "
            f"{num(m['HR@20'])} | {num(m['NDCG@20'])} | {num(m['coverage@10'])} | {num(m['HR@10_cold'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """HR@10 of every method with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    values = np.array([report["methods"][n]["HR@10"] for n in names])
    ci = np.array([report["methods"][n]["HR@10_ci"] for n in names]).reshape(-1, 2)
    errors = np.stack([values - ci[:, 0], ci[:, 1] - values])
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 4.0))
    ax.bar(names, values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylabel("HR@10 (95% bootstrap CI)")
    ax.set_title(f"{report['dataset']}: {report['targets']} targets, {report['cold_targets']} cold")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """`out` (JSON), and beside it the Markdown table (.md) and the chart (.png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table, chart = out.with_suffix(".md"), out.with_suffix(".png")
    table.write_text(markdown_table(report))
    plot(report, chart)
    return table, chart


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
