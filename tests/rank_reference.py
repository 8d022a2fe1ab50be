"""A frozen copy of the ranker's per-user code as it was before issue 16 vectorised a round
(`streams.rank` at commit 5ea112e: `BlendRanker.candidates`, `_features`, `rank`, `_with_tail`,
`features`, `Candidates`, `VectorRows`, `best`, and `CoOccurrence.sparse`), kept verbatim so
that tests/test_rank.py can prove the vectorised ranking identical to it on the same inputs.
Not product code: never edit it to follow `streams.rank`; the point is that it does not move.

`ReferenceRanker` is a `BlendRanker` whose ranking methods are the old ones: everything else
(the counts, co-occurrence, the model and its training, `learn`) is shared, so that two rankers
fed the same stream differ only in the code under test."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from streams.cooccur import CoOccurrence
from streams.rank import COLUMN, FEATURES, SOURCES, BlendRanker, ContentSource, Hits, ItemStats, Request


class VectorRows:
    """Item vectors of a round as one matrix indexed by catalogue row (`ItemStats` rows): a
    round's users gather their candidates' vectors with one numpy indexing each."""

    def __init__(self, stats: ItemStats, vectors: Mapping[str, np.ndarray]) -> None:
        """`vectors`: the items that have one (their rows are interned)."""
        rows = stats.intern(list(vectors))
        self.dim = next((len(v) for v in vectors.values()), 0)
        self.position = np.full(len(stats.ids), len(rows), dtype=np.int64)  # default: the zero row
        self.position[rows] = np.arange(len(rows))
        self.matrix = np.zeros((len(rows) + 1, self.dim), dtype=np.float32)
        if len(rows):
            self.matrix[: len(rows)] = np.stack([np.asarray(v, dtype=np.float32) for v in vectors.values()])

    @classmethod
    def fetch(cls, stats: ItemStats, rows: np.ndarray, content: ContentSource) -> VectorRows:
        names = stats.ids
        return cls(stats, content.vectors([names[n] for n in rows.tolist()]) if len(rows) else {})

    def has(self, rows: np.ndarray) -> np.ndarray:
        return self.position[rows] < len(self.matrix) - 1

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim), zeros for rows without a vector."""
        return self.matrix[self.position[rows]]


def _rr(rank: int) -> float:
    return 1.0 / math.log2(1.0 + rank)


_RR = np.array([_rr(rank) for rank in range(1, 1025)])


def _reciprocal_ranks(n: int) -> np.ndarray:
    """1 / log2(1 + rank) for the ranks 1..n."""
    return _RR[:n] if n <= len(_RR) else np.array([_rr(rank) for rank in range(1, n + 1)])


@dataclass
class Candidates:
    """One request's candidates as catalogue rows (ascending, distinct), with each source's
    1 / log2(1 + the candidate's best 1-based rank there) aligned with them (0: not offered)."""

    rows: np.ndarray
    rr: dict[str, np.ndarray]
    names: list[str]  # the catalogue's item ids by row (shared, read-only)
    #: catalogue rows and co-occurrence scores of the request's recent items (sparse)
    cooc: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0)))

    @classmethod
    def of(cls, offers: Mapping[str, Sequence[np.ndarray]], names: list[str], cooc: tuple[np.ndarray, np.ndarray]) -> Candidates:
        """`offers`: per source, ranked row lists (best first); an item keeps its best rank."""
        lists = [ranked for source in SOURCES for ranked in offers.get(source, ())]
        rows = np.unique(np.concatenate(lists)) if lists else np.zeros(0, np.int64)
        rr = {}
        for source in SOURCES:
            column = np.zeros(len(rows))
            for ranked in offers.get(source, ()):
                if len(ranked):
                    np.maximum.at(column, np.searchsorted(rows, ranked), _reciprocal_ranks(len(ranked)))
            rr[source] = column
        return cls(rows, rr, names, cooc)

    def __contains__(self, row: object) -> bool:
        at = int(np.searchsorted(self.rows, row))
        return at < len(self.rows) and self.rows[at] == row

    @property
    def ids(self) -> list[str]:
        """The candidates' item ids, sorted."""
        return sorted(self.names[n] for n in self.rows.tolist())

    @property
    def sources(self) -> dict[str, dict[str, float]]:
        """source -> {item it offered: its reciprocal rank there}."""
        rows = self.rows.tolist()
        return {
            source: {self.names[n]: rr for n, rr in zip(rows, column.tolist(), strict=True) if rr > 0}
            for source, column in self.rr.items()
        }

    def rr_of(self, source: str, rows: np.ndarray) -> np.ndarray:
        """The source's reciprocal ranks of `rows` (0 for rows that are not candidates)."""
        if not len(self.rows):
            return np.zeros(len(rows))
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[at] == rows, self.rr[source][at], 0.0)


def best(scores: np.ndarray, rows: np.ndarray, names: Sequence[str], n: int) -> list[int]:
    """Positions of the n highest `scores`, best first, ties by item id (`names[rows[j]]`):
    only the scores at or above the n-th are sorted in Python (a ranker calls it per user)."""
    n = min(n, len(scores))
    if n <= 0:
        return []
    cut = np.partition(scores, len(scores) - n)[len(scores) - n]
    keep = np.flatnonzero(scores >= cut)
    ranked = sorted(zip((-scores[keep]).tolist(), [names[r] for r in rows[keep].tolist()], keep.tolist(), strict=True))
    return [j for _, _, j in ranked[:n]]



def sparse(self: CoOccurrence, query: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(internal indices, scores) of the items that co-occur with a query item: the sum
    over the query items i of cooc(i, j) / sqrt(n_i n_j). Query items co-occurring with each
    other score too; the caller drops what the user has seen. Its cost follows the query
    items' neighbour lists, not the catalogue (a ranker calls it per user)."""
    users = self._users
    columns: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for item in query:
        n = self.index.get(item)
        if n is None or users[n] == 0 or not self._neighbours[n]:
            continue
        neighbours = self._neighbours[n]
        columns.append(np.fromiter(neighbours.keys(), dtype=np.int64, count=len(neighbours)))
        weights.append(np.fromiter(neighbours.values(), dtype=np.float64, count=len(neighbours)) / np.sqrt(users[n]))
    if not columns:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    found, position = np.unique(np.concatenate(columns), return_inverse=True)
    total = np.bincount(position, weights=np.concatenate(weights))
    np.divide(total, np.sqrt(users[found]), out=total, where=users[found] > 0)
    return found, total



class ReferenceRanker(BlendRanker):
    """`BlendRanker` with the per-user ranking code of commit 5ea112e."""

    #: `_features`' scatter array (set in `BlendRanker.__init__` then; a class default here, so
    #: that a ranker can be turned into a reference by setting its `__class__`)
    _scratch = np.zeros(0)
    #: `_cooc_rows`' state, likewise (`BlendRanker` keeps it elsewhere since 2026-12-04)
    _cooc_map = np.zeros(0, np.int64)
    _cooc_generation = -1

    def candidates(self, requests: Sequence[Request], content: ContentSource) -> list[Candidates]:
        """Union of the sources per request, de-duplicated, seen items dropped. One content
        search for all requests' profile vectors; the neighbour lists are turned into rows once
        per call, popular and fresh items once per moment (`ts`), shared by the requests.
        Candidates are catalogue rows (`ItemStats.intern`), so that a request costs numpy
        operations rather than a lookup per candidate."""
        c, stats = self.config, self.stats
        excluded_ids = [r.excluded() for r in requests]
        excluded = [np.unique(stats.intern(list(e))) for e in excluded_ids]
        profiled = [n for n, r in enumerate(requests) if r.profile is not None]
        hits = (
            content.search(
                np.stack([np.asarray(requests[n].profile, dtype=np.float32) for n in profiled]),
                c.content_k,
                [excluded_ids[n] for n in profiled],
            )
            if profiled
            else []
        )
        offers: list[dict[str, list[np.ndarray]]] = [{} for _ in requests]
        for n, row in zip(profiled, hits, strict=True):
            offers[n]["profile"] = [stats.intern([item for item, _ in row])]
        recent = {i for r in requests for i in r.history[-c.interests :]}
        neighbours = content.neighbours(recent, c.neighbour_depth) if recent and c.interests else {}
        near = {item: stats.intern([i for i, _ in hits]) for item, hits in neighbours.items() if hits}
        self._cooc_rows()  # interns what co-occurs, before the mask is sized
        skipped = np.zeros(len(stats.ids), dtype=bool)  # the request's excluded rows, set in turn
        ranked_fresh: list[tuple[int, np.ndarray]] = []  # (request, its fresh rows) to rank by closeness
        coocs = []
        for n, request in enumerate(requests):
            offer, skip = offers[n], excluded[n]
            skipped[skip] = True
            offer["interests"] = [
                rows[~skipped[rows]][: c.content_k]
                for item in reversed(request.history[-c.interests :])  # the latest first
                if (rows := near.get(item)) is not None
            ]
            found, scores = self._cooc(request)
            coocs.append((found, scores))
            keep = (scores > 0) & ~skipped[found]
            offer["cooc"] = [found[keep][best(scores[keep], found[keep], stats.ids, c.cooc_k)]]
            offer["popular"] = [stats.popular_rows(c.popular_k, request.ts, skipped)]
            fresh = stats.fresh_rows(request.ts, c.fresh_window_s)
            fresh = fresh[~skipped[fresh]]
            if c.fresh_k > 0 and len(fresh) and (request.profile is None or len(fresh) <= c.fresh_k):
                offer["fresh"] = [fresh[-c.fresh_k :]]
            elif c.fresh_k > 0 and len(fresh):
                ranked_fresh.append((n, fresh))
            skipped[skip] = False
        if ranked_fresh:  # the nearest fresh items to each profile, from one gather of vectors
            vectors = VectorRows.fetch(stats, np.unique(np.concatenate([f for _, f in ranked_fresh])), content)
            for n, fresh in ranked_fresh:
                fresh = fresh[vectors.has(fresh)]
                # einsum: a row's dot product does not depend on its place in the matrix, so
                # items with identical vectors tie exactly and the tie goes by item id
                closeness = np.einsum("ij,j->i", vectors.matrix, np.asarray(requests[n].profile, dtype=np.float32))
                closeness = closeness[vectors.position[fresh]].astype(np.float64)
                offers[n]["fresh"] = [fresh[best(closeness, fresh, stats.ids, c.fresh_k)]]
        return [Candidates.of(offer, stats.ids, cooc) for offer, cooc in zip(offers, coocs, strict=True)]

    def _recent_rows(self, request: Request) -> np.ndarray:
        return self.stats.intern(list(request.history[-self.config.interests :]))

    def _cooc(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue rows and co-occurrence scores of the request's recent items."""
        found, scores = sparse(self.cooc, request.history[-self.config.interests :])
        return self._cooc_rows()[found], scores

    def _cooc_rows(self) -> np.ndarray:
        """Catalogue row of each co-occurrence index (extended as it grows, rebuilt when it
        forgets items)."""
        cooc = self.cooc
        if self._cooc_generation != cooc.generation:
            self._cooc_map, self._cooc_generation = np.zeros(0, np.int64), cooc.generation
        if len(self._cooc_map) < len(cooc.ids):
            self._cooc_map = np.concatenate([self._cooc_map, self.stats.intern(cooc.ids[len(self._cooc_map) :])])
        return self._cooc_map

    def features(
        self,
        request: Request,
        ids: Sequence[str],
        vectors: Mapping[str, np.ndarray],
        pool: Candidates | None = None,
    ) -> np.ndarray:
        """(len(ids), len(FEATURES)) for one user at one moment; `pool`: the candidates the
        sources offered for this request (their ranks there are features)."""
        rows = self.stats.intern(list(ids))
        self._recent_rows(request)  # interned before the vectors' index is sized
        return self._features(request, rows, VectorRows(self.stats, vectors), pool)

    def _features(self, request: Request, rows: np.ndarray, vectors: VectorRows, pool: Candidates | None) -> np.ndarray:
        stats = self.stats
        x = np.zeros((len(rows), len(FEATURES)))
        col = COLUMN
        if vectors.dim:
            matrix = vectors.take(rows)
            if request.profile is not None:
                x[:, col["cos_mean"]] = matrix @ np.asarray(request.profile, dtype=np.float32)
            recent = self._recent_rows(request)
            recent = recent[vectors.has(recent)]
            if len(recent):
                sims = matrix @ vectors.take(recent).T
                x[:, col["cos_max"]] = sims.max(axis=1)
                if recent[-1] == stats.index[request.history[-1]]:
                    x[:, col["cos_last"]] = sims[:, -1]
        cooc_rows, cooc_scores = pool.cooc if pool is not None else self._cooc(request)
        if len(cooc_rows):  # scattered into a catalogue-sized array kept at zero between users
            if len(self._scratch) < len(stats.ids):
                self._scratch = np.zeros(2 * len(stats.ids))
            self._scratch[cooc_rows] = cooc_scores
            x[:, col["cooc_recent"]] = self._scratch[rows]
            self._scratch[cooc_rows] = 0.0
        top = x[:, col["cooc_recent"]].max(initial=0.0)
        if top > 0:
            x[:, col["cooc_rel"]] = x[:, col["cooc_recent"]] / top
        counts = stats.counts(rows)
        x[:, col["pop_count"]] = np.log1p(np.maximum(counts, 1.0))
        decayed = np.log1p(stats.decayed(rows, request.ts))
        x[:, col["pop_short"]], x[:, col["pop_long"]] = decayed[:, 0], decayed[:, 1]
        x[:, col["age"]] = stats.ages_days(rows, request.ts)
        h = math.log1p(len(request.history))
        x[:, col["hist_cos_max"]] = h * x[:, col["cos_max"]]
        x[:, col["hist_cooc"]] = h * x[:, col["cooc_recent"]]
        x[:, col["hist_pop"]] = h * x[:, col["pop_long"]]
        x[:, col["tail_cos_max"]] = np.where(counts <= 1, x[:, col["cos_max"]], 0.0)
        if pool is not None:
            same = rows is pool.rows
            for source in ("profile", "interests", "cooc", "popular"):
                x[:, col[f"rr_{source}"]] = pool.rr[source] if same else pool.rr_of(source, rows)
        return x

    def rank(self, requests: Sequence[Request], content: ContentSource, k: int) -> list[Hits]:
        """Top k (item_id, score) per request, best first, ties by item_id."""
        c, names = self.config, self.stats.ids
        pools = self.candidates(requests, content)
        wanted = [p.rows for p in pools] + [self._recent_rows(r) for r in requests]
        vectors = VectorRows.fetch(self.stats, np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, np.int64), content)
        out: list[Hits] = []
        for request, pool in zip(requests, pools, strict=True):
            if not len(pool.rows):
                out.append([])
                continue
            x = self._features(request, pool.rows, vectors, pool)
            scores = self.score(x)
            order = best(scores, pool.rows, names, k + c.tail_slots)
            tail = x[:, COLUMN["pop_count"]] <= math.log1p(1.0)
            head = self._with_tail(order, x[:, COLUMN["cos_mean"]], tail, pool.rows, min(k, c.tail_within))
            taken = set(head)
            top = head + [j for j in order if j not in taken][: k - len(head)]
            out.append([(names[pool.rows[j]], float(scores[j])) for j in top])
        return out

    def _with_tail(self, order: list[int], content: np.ndarray, tail: np.ndarray, rows: np.ndarray, k: int) -> list[int]:
        """The first k of `order`, with up to `tail_slots` of its last known items giving way
        to the tail items (at most one interaction) with the highest `content` score, when too
        few made the top k on their own. Why: a learnt blend rightly ranks by the evidence most
        targets have, which on a stream of mostly known items buries every new one; a feed of
        fresh content must show some, and for items without collaborative evidence the
        content similarity is what there is (docs/quality.md)."""
        top = order[:k]
        want = min(self.config.tail_slots, k) - int(tail[top].sum())
        if want <= 0:
            return top
        open_ = tail.copy()
        open_[top] = False
        spare = np.flatnonzero(open_)
        extra = spare[best(content[spare], rows[spare], self.stats.ids, want)].tolist()
        if not extra:
            return top
        warm = [j for j in top if not tail[j]]
        dropped = set(warm[len(warm) - len(extra) :])
        return [j for j in top if j not in dropped] + extra
