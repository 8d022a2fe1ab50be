"""The product's ranking (`streams.rank`, `streams.cooccur`): candidates, features, the model
that the stream trains on itself, and the rule that it never learns from the future.

Synthetic worlds small enough to run in a few seconds; the content source is the online one
(`streams.recommend.StoreContent`) over the in-memory vector store."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from streams.cooccur import CoOccurrence
from streams.profile import mean_profile
from streams.rank import COLUMN, FEATURES, BlendRanker, Group, ItemStats, NeighbourList, PairwiseLogistic, RankConfig, Request, VectorRows
from streams.recommend import Recommender, StoreContent, VectorCache
from vectorstore import MemoryVectorStore, VectorRecord

N_ITEMS, DIM = 120, 16


def world(seed: int = 7) -> tuple[StoreContent, list[str], np.ndarray]:
    """Items with random unit vectors: content that says nothing about what users take next."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{n:03d}" for n in range(N_ITEMS)]
    store = MemoryVectorStore()
    store.open(DIM, "test", "text")
    store.upsert([VectorRecord(i, v) for i, v in zip(ids, vectors, strict=True)])
    return StoreContent(store, VectorCache(store)), ids, vectors


def chain_stream(ids: list[str], users: int, steps: int, seed: int) -> list[tuple[str, str, float]]:
    """Every user walks a fixed hidden chain of items (next = successor): co-occurrence with the
    last items is informative, content cosine is noise. Users interleave in time."""
    rng = np.random.default_rng(seed)
    successor = {ids[n]: ids[m] for n, m in enumerate(rng.permutation(len(ids)))}
    walks = []
    for u in range(users):
        item = ids[int(rng.integers(len(ids)))]
        walk = []
        for _ in range(steps):
            walk.append(item)
            item = successor[item]
        walks.append((f"u{u}", walk))
    rows, ts = [], 1_700_000_000.0
    for step in range(steps):
        for user, walk in walks:
            ts += 60.0
            rows.append((user, walk[step], ts))
    return rows


class Replay:
    """Feeds rows to a ranker the way the stream processor does: sampled rows become training
    groups from the state just before them, then every row is recorded."""

    def __init__(self, ranker: BlendRanker, content: StoreContent) -> None:
        self.ranker, self.content = ranker, content
        self.seen: dict[str, dict[str, None]] = {}

    def request(self, user: str, ts: float) -> Request:
        history = list(self.seen.get(user, {}))
        profile = mean_profile(self.content.vectors(history).values()) if history else None
        return Request(history, profile, ts)

    def feed(self, rows: list[tuple[str, str, float]]) -> None:
        for user, item, ts in rows:
            if self.ranker.wants_example():
                self.ranker.learn([self.request(user, ts)], [item], self.content)
            seen = self.seen.setdefault(user, {})
            self.ranker.record(list(seen), item, ts)
            seen.pop(item, None)
            seen[item] = None

    def hit_rate(self, rows: list[tuple[str, str, float]], k: int = 5) -> float:
        """Share of `rows` whose item is in the top k just before it (prequential)."""
        hits = 0
        for user, item, ts in rows:
            top = [i for i, _ in self.ranker.rank([self.request(user, ts)], self.content, k)[0]]
            hits += item in top
            self.feed([(user, item, ts)])
        return hits / len(rows)


FAST = RankConfig(train_rate=1.0, min_groups=50, refit_every=100, negatives=20, content_k=20)


# --- the model learns which source to trust ---------------------------------------------------


def test_pairwise_logistic_weighs_the_informative_feature_and_not_the_noise() -> None:
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(300):
        x = rng.normal(size=(11, 3))  # informative, noise, constant
        x[:, 2] = 1.0
        x[0, 0] += 2.0  # the positive stands out on feature 0 only
        groups.append(Group(x))
    model = PairwiseLogistic(3, l2=1.0)
    model.fit(groups)
    assert model.weights is not None
    assert model.weights[0] > 1.0
    assert abs(model.weights[1]) < 0.2 * model.weights[0]
    assert model.weights[2] == 0.0  # a feature equal on every candidate cannot matter


#: the features of each source
SIGNALS = {
    "content": ("cos_mean", "cos_max", "cos_last", "hist_cos_max", "tail_cos_max", "rr_profile", "rr_interests"),
    "cooc": ("cooc_recent", "cooc_rel", "hist_cooc", "rr_cooc"),
    "popularity": ("pop_count", "pop_short", "pop_long", "hist_pop", "rr_popular"),
    "sequence": ("seq_recent", "rr_sequence"),
}
SIGNALS["collaborative"] = SIGNALS["cooc"] + SIGNALS["sequence"]


def hit_rates_without_each_signal(rows: list[tuple[str, str, float]]) -> dict[str | None, float]:
    """Train on the first 3/4 of `rows` (bots included), then freeze the model: the prequential
    hit rate on the walkers' rest, with the learned weights and with one source's zeroed."""
    content, _, _ = world()
    split = len(rows) * 3 // 4
    test = [r for r in rows[split:] if not r[0].startswith("bot")]
    trained = Replay(BlendRanker(RankConfig(**{**FAST.__dict__, "sequence_steps": 3})), content)
    trained.feed(rows[:split])
    assert trained.ranker.fits >= 2 and trained.ranker.model.weights is not None
    rates: dict[str | None, float] = {}
    for drop in (None, *SIGNALS):
        replay = Replay(copy.deepcopy(trained.ranker), content)
        replay.seen = copy.deepcopy(trained.seen)
        replay.ranker.config = dataclasses.replace(replay.ranker.config, train_rate=0.0)  # frozen
        if drop is not None:
            weights = replay.ranker.model.weights.copy()
            weights[[FEATURES.index(f) for f in SIGNALS[drop]]] = 0.0
            replay.ranker.model.weights = weights
        rates[drop] = replay.hit_rate(test)
    prior = Replay(BlendRanker(RankConfig(train_rate=0.0, warmup_rate=0.0)), content)
    prior.feed(rows[:split])
    rates["prior"] = prior.hit_rate(test)
    return rates


def bots(rows: list[tuple[str, str, float]], ids: list[str], seed: int) -> list[tuple[str, str, float]]:
    """Interleave noise: bots hitting 5 items that no walker takes next (popularity is noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for user, item, ts in rows:
        out.append((user, item, ts))
        out.append((f"bot{int(rng.integers(50))}", ids[int(rng.integers(5))], ts + 1.0))
    return out


def test_ranker_learns_to_rely_on_co_occurrence_where_content_is_noise() -> None:
    _, ids, _ = world()
    rates = hit_rates_without_each_signal(bots(chain_stream(ids, users=60, steps=8, seed=1), ids, 1))
    assert rates[None] > 0.8 > 0.2 > rates["prior"], rates  # the paper's cosine is noise here
    assert rates["collaborative"] < 0.2, rates  # the model rests on co-occurrence and sequence ...
    assert rates["content"] > 0.7 and rates["popularity"] > 0.7, rates  # ... not on the noise


def test_ranker_learns_to_rely_on_content_where_co_occurrence_is_sparse() -> None:
    _, ids, vectors = world()
    rng = np.random.default_rng(1)
    similar = vectors @ vectors.T
    walks = []
    for u in range(60):  # each step: one of the 3 unseen items nearest the last one
        walk = [int(rng.integers(N_ITEMS))]
        for _ in range(7):
            nearest = [int(j) for j in np.argsort(-similar[walk[-1]]) if j not in walk]
            walk.append(nearest[int(rng.integers(3))])
        walks.append(walk)
    rows = [(f"u{u}", ids[walk[step]], 1e9 + 60.0 * (step * 60 + u)) for step in range(8) for u, walk in enumerate(walks)]
    rates = hit_rates_without_each_signal(bots(rows, ids, 2))
    assert rates[None] > 0.8 and rates[None] > rates["prior"] + 0.3, rates
    assert rates["content"] < rates[None] / 2, rates  # what users took next helps, content most
    assert rates["collaborative"] > 0.7 and rates["popularity"] > 0.7, rates


def test_before_the_first_fit_the_ranking_is_the_profile_cosine() -> None:
    content, ids, vectors = world()
    ranker = BlendRanker(RankConfig(min_groups=10**6))
    history = [ids[0], ids[1]]
    profile = mean_profile(vectors[:2])
    top = ranker.rank([Request(history, profile, 0.0)], content, 5)[0]
    cosine = vectors @ profile
    cosine[:2] = -np.inf
    assert [i for i, _ in top] == [ids[n] for n in np.argsort(-cosine)[:5]]


# --- never the future --------------------------------------------------------------------------


def test_a_training_group_is_built_from_the_state_before_its_interaction() -> None:
    content, ids, _ = world()
    ranker = BlendRanker(RankConfig(train_rate=1.0, warmup_rate=1.0, min_groups=10**6, negatives=5))
    replay = Replay(ranker, content)
    replay.feed([("a", ids[0], 100.0), ("a", ids[1], 160.0), ("c", ids[1], 180.0), ("b", ids[0], 200.0)])
    # b's first interaction with ids[1], about to happen: ids[1] has two earlier ones (a's, c's)
    request = replay.request("b", 260.0)
    ranker.learn([request], [ids[1]], content)
    positive = ranker.groups[-1].x[0]
    col = {f: n for n, f in enumerate(FEATURES)}
    # the decayed count sees a's and c's interactions only (100 s and 80 s ago with a 1-day
    # half-life), not b's own; co-occurrence sees a's pair (ids[0], ids[1]) only: 1 / sqrt(2 * 2)
    assert positive[col["pop_short"]] == pytest.approx(math.log1p(2 ** (-100 / 86400) + 2 ** (-80 / 86400)), rel=1e-5)
    assert positive[col["cooc_recent"]] == pytest.approx(1 / 2, rel=1e-5)
    # an item nobody touched yet looks exactly like one touched once, however recently: where
    # items are published at their first interaction, anything else singles out the target
    fresh, old = ids[50], ids[51]
    ranker.record([], old, 250.0)
    x = ranker.features(request, [fresh, old], content.vectors([fresh, old]))
    popularity = [col[f] for f in ("pop_count", "pop_short", "pop_long", "hist_pop")]
    assert np.array_equal(x[0, popularity], x[1, popularity])


def test_the_ranking_of_a_target_depends_on_earlier_rows_only(tmp_path: Path) -> None:
    """The evaluator's `default` at a target is the same whatever the target row and the rows
    after it say: it would differ if training or counts used them."""
    from vlm4rec.evaluation.methods import Blend
    from vlm4rec.evaluation.stream import ContentIndex, Stream, StreamState, Target

    content, ids, vectors = world()
    rows = chain_stream(ids, users=30, steps=6, seed=3)
    target_row = len(rows) - 10

    def stream_of(rows: list[tuple[str, str, float]]) -> Stream:
        users = sorted({u for u, _, _ in rows})
        return Stream(
            name="t",
            item_ids=ids,
            published_at=np.zeros(len(ids)),  # all published from the start: one catalogue
            user_ids=users,
            users=np.array([users.index(u) for u, _, _ in rows]),
            items=np.array([ids.index(i) for _, i, _ in rows]),
            ts=np.array([t for _, _, t in rows]),
        )

    def top_at_target(rows: list[tuple[str, str, float]], extra: int = 0) -> list[int]:
        stream = stream_of(rows)
        blend = Blend.alone(stream, ContentIndex(vectors), FAST)
        state = StreamState(stream, {}, 7.0)
        state.advance(target_row)
        blend.advance(target_row + extra)  # extra > 0: a leaky ranker that saw the target
        target = Target(target_row, int(stream.users[target_row]), int(stream.items[target_row]), float(stream.ts[target_row]), False)
        scores = blend(state, target)
        return list(np.argsort(-scores, kind="stable")[:20])

    honest = top_at_target(rows)
    assert Blend.alone(stream_of(rows), ContentIndex(vectors), FAST).ranker.config.train_rate == 1.0
    # another target item, and the future rewritten: nothing changes
    user, item, ts = rows[target_row]
    other = next(i for i in ids if i != item and i not in {r[1] for r in rows if r[0] == user})
    rewritten = rows[:target_row] + [(user, other, ts)] + [(u, ids[(ids.index(i) + 7) % N_ITEMS], t) for u, i, t in rows[target_row + 1 :]]
    assert top_at_target(rewritten) == honest
    assert top_at_target(rows[: target_row + 1]) == honest
    # the check has teeth: folding the target row in first changes the list
    assert top_at_target(rows, extra=1) != honest


def test_blends_sharing_one_walk_rank_as_each_would_alone() -> None:
    """The evaluator walks the blends of every semantic source together, sharing the counts and
    co-occurrence: each must rank exactly as it would walked alone."""
    from vlm4rec.evaluation.methods import BlendWalk
    from vlm4rec.evaluation.stream import ContentIndex, Stream, StreamState, Target

    _, ids, vectors = world()
    other = np.roll(vectors, 1, axis=1)
    rows = chain_stream(ids, users=30, steps=6, seed=4)
    users = sorted({u for u, _, _ in rows})
    stream = Stream("t", ids, np.zeros(len(ids)), users, np.array([users.index(u) for u, _, _ in rows]),
                    np.array([ids.index(i) for _, i, _ in rows]), np.array([t for _, _, t in rows]))
    targets = range(len(rows) - 30, len(rows), 7)

    def tops(indexes: list[np.ndarray]) -> list[list[list[int]]]:
        walk = BlendWalk(stream, FAST)
        blends = [walk.add(ContentIndex(v)) for v in indexes]
        state = StreamState(stream, {}, 7.0)
        out = []
        for row in targets:
            state.advance(row)
            target = Target(row, int(stream.users[row]), int(stream.items[row]), float(stream.ts[row]), False)
            out.append([list(np.argsort(-b(state, target), kind="stable")[:10]) for b in blends])
        return out

    together = tops([vectors, other])
    assert [t[0] for t in together] == [t[0] for t in tops([vectors])]
    assert [t[1] for t in together] == [t[0] for t in tops([other])]


# --- candidates -------------------------------------------------------------------------------


def test_candidates_are_the_deduplicated_union_of_the_sources_without_seen_items() -> None:
    content, ids, vectors = world()
    ranker = BlendRanker(RankConfig(content_k=5, interests=2, cooc_k=3, popular_k=4, fresh_k=2))
    history_of: dict[str, list[str]] = {}
    events = [("a", 10, 1.0), ("b", 10, 2.0), ("c", 10, 3.0), ("a", 11, 4.0), ("b", 11, 5.0), ("b", 12, 6.0), ("d", 12, 6.5), ("c", 13, 7.0), ("d", 13, 7.5)]
    for user, n, ts in events:
        history = history_of.setdefault(user, [])
        ranker.record(list(history), ids[n], ts)
        history.append(ids[n])
    ranker.stats.declare(ids[90], 7.0)  # a fresh item with a declared creation time
    ranker.stats.declare(ids[91], 7.0 - 30 * 86400)  # too old to be fresh
    history = [ids[0], ids[10]]
    request = Request(history, mean_profile(vectors[[0, 10]]), 8.0, exclude={ids[11]})
    pool = ranker.candidates([request], content)[0]
    sources = pool.sources
    assert pool.ids == sorted(set(pool.ids)), "sorted, no duplicates"
    assert set(pool.ids) == set().union(*(set(offered) for offered in sources.values()))
    assert not {ids[0], ids[10], ids[11]} & set(pool.ids), "seen and excluded items are dropped"
    assert len(sources["profile"]) == 5 and 5 <= len(sources["interests"]) <= 10
    assert set(sources["cooc"]) == {ids[12], ids[13]}  # co-occur with ids[10]; ids[11] is excluded
    assert set(sources["popular"]) == {ids[12], ids[13]}  # ids[10], ids[11]: seen / excluded; twice touched
    assert set(sources["fresh"]) == {ids[90]}
    # each source's offer carries 1 / log2(1 + rank) of its best rank
    best = sorted(range(N_ITEMS), key=lambda n: -float(vectors[n] @ request.profile))
    first = next(ids[n] for n in best if ids[n] not in {ids[0], ids[10], ids[11]})
    assert sources["profile"][first] == 1.0
    ranked = ranker.rank([request], content, 1000)[0]
    assert sorted(i for i, _ in ranked) == pool.ids


def test_a_cached_neighbour_lists_rows_are_remembered_with_the_list_and_used_again() -> None:
    content, ids, vectors = world()
    ranker = BlendRanker(RankConfig(content_k=5, interests=2))
    request = Request([ids[0], ids[10]], mean_profile(vectors[[0, 10]]), 8.0)
    first = ranker.rank([request], content, 10)
    lists = content.neighbours({ids[0], ids[10]}, ranker.config.neighbour_depth)
    assert all(isinstance(hits, NeighbourList) and hits.rows is not None and hits.rows[0] is ranker.stats for hits in lists.values())
    for item, hits in lists.items():
        assert hits.rows[1].tolist() == [ranker.stats.index[i] for i, _ in hits], item
    kept = {item: hits.rows[1] for item, hits in lists.items()}
    assert ranker.rank([request], content, 10) == first, "the remembered rows rank the same"
    assert all(content.neighbours({item}, ranker.config.neighbour_depth)[item].rows[1] is rows for item, rows in kept.items())
    other = BlendRanker(RankConfig(content_k=5, interests=2))  # another catalogue: its own rows
    other.stats.intern([ids[50]])  # so that its rows differ from the first ranker's
    assert [i for i, _ in other.rank([request], content, 10)[0]] == [i for i, _ in first[0]]
    content.forget(ids[0])  # re-embedded: a new list, rows interned again
    assert content.neighbours({ids[0]}, ranker.config.neighbour_depth)[ids[0]].rows is None


def test_neighbour_lists_are_searched_in_one_order_whatever_the_set_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of a batched matrix product can differ in its last bit with its place in the
    batch, which reorders near-ties: the same items must make the same batch."""
    content, ids, vectors = world()
    batches: list[list[int]] = []
    search = content.store.search

    def recording(queries: np.ndarray, k: int, exclude: object = None) -> list:
        batches.append([int(np.argmax(vectors @ q)) for q in queries])
        return search(queries, k, exclude)

    monkeypatch.setattr(content.store, "search", recording)
    wanted = [ids[n] for n in (31, 4, 17, 9)]
    content.cache.get([ids[31]])  # a vector already cached (the profile agent's lookups share the cache)
    content.neighbours(list(reversed(wanted)), 10)
    for item in wanted:
        content.forget(item)
    content.neighbours(wanted, 10)
    assert batches == [[4, 9, 17, 31], [4, 9, 17, 31]]


def test_cooccurrence_counts_distinct_users_within_a_window_and_stays_bounded() -> None:
    cooc = CoOccurrence(window=2, max_neighbours=3)
    cooc.add("x", [])
    cooc.add("y", ["x"])
    cooc.add("x", ["a", "b", "y"])  # a second user of x; only the last 2 earlier items count
    assert cooc.users("x") == 2 and cooc.users("y") == 1
    assert cooc.neighbours("x") == {"y": 2.0, "b": 1.0}
    assert cooc.scores(["y"]) == pytest.approx({"x": 2 / math.sqrt(1 * 2)})
    for n in range(20):  # x meets many items: its list is pruned to the strongest
        cooc.add(f"n{n}", ["x"])
    assert len(cooc.neighbours("x")) <= 2 * 3 and cooc.neighbours("x")["y"] == 2.0
    small = CoOccurrence(window=2, max_items=10)
    for n in range(30):
        small.add(f"i{n:02d}", [f"i{n - 1:02d}"] if n else [])
        small.add(f"i{n:02d}", [])  # a second user: every item has 2
    small.add("i29", [])
    assert len(small) <= 12 and small.users("i29") == 3 and small.users("i00") == 0, "the latest are kept"
    assert small.scores(["i29"]) == pytest.approx({"i28": 1 / math.sqrt(3 * 2)})


def test_item_stats_decay_and_floor() -> None:
    stats = ItemStats(short_half_life_s=100.0, long_half_life_s=1000.0)
    stats.add("a", 0.0)
    stats.add("a", 100.0)
    stats.add("b", 100.0)
    # (short, long); b, touched once, reads as never touched (no peeking through publication)
    expected = [[2**-2 + 2**-1, 2**-0.2 + 2**-0.1], [0.0, 0.0], [0.0, 0.0]]
    assert stats.decayed(stats.rows(["a", "b", "zzz"]), 200.0) == pytest.approx(np.array(expected))
    assert stats.decayed(stats.rows(["a"]), 100.0 + 100.0 * 20)[0, 0] == 0.0  # below the floor reads 0
    assert stats.popular(1, 200.0, exclude=()) == ["a"] and stats.popular(5, 200.0, exclude={"a"}) == []
    assert stats.clock == 100.0 and stats.count("a") == 2 and stats.count("zzz") == 0
    stats.add("b", 150.0)
    stats.add("b", 150.0)
    assert stats.popular(1, 200.0, exclude=()) == ["b"], "a memoised ranking follows new interactions"
    stats.declare("c", 200.0 - 86400.0)
    assert stats.ages_days(stats.rows(["c", "a", "zzz"]), 200.0) == pytest.approx([math.log1p(1.0), 0.0, 0.0])


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_model_and_ranking() -> None:
    content, ids, _ = world()
    rows = chain_stream(ids, users=40, steps=6, seed=2)

    def run(seed: int) -> tuple[dict[str, float], list]:
        replay = Replay(BlendRanker(RankConfig(train_rate=0.5, min_groups=40, refit_every=50, negatives=10, seed=seed)), content)
        replay.feed(rows[:-5])
        return replay.ranker.weights(), [replay.ranker.rank([replay.request(u, t)], content, 10)[0] for u, _, t in rows[-5:]]

    first = run(0)
    assert run(0) == first
    assert run(1)[0] != first[0]


# --- the online path ---------------------------------------------------------------------------


def test_the_stream_processors_recommender_learns_and_ranks_with_the_blend() -> None:
    """`Recommender` as the Faust app drives it: an observation taken before each profile
    update, the batch observed, then recommend. Co-occurrence items the ANN cannot reach
    (content is noise here) come first once the model has fit."""
    from streams.popularity import RecentPopularity
    from streams.profile import Profile, ProfileRule

    _, ids, vectors = world()
    items = MemoryVectorStore()
    items.open(DIM, "test", "text")
    items.upsert([VectorRecord(i, v) for i, v in zip(ids, vectors, strict=True)])
    rows = chain_stream(ids, users=60, steps=8, seed=1)
    successor = {a: b for (ua, a, _), (ub, b, _) in zip(rows, rows[60:], strict=False) if ua == ub}

    def run(rank: RankConfig) -> tuple[Recommender, list[Profile], list[list[tuple[str, float]]]]:
        recommender = Recommender(items, RecentPopularity(), k=5, rank=rank)
        profiles: dict[str, Profile] = {}
        for start in range(0, len(rows) - 60, 20):  # batches of 20 interactions, the last step held out
            batch = []
            for user, item, ts in rows[start : start + 20]:
                profile = profiles.setdefault(user, Profile(user))
                batch.append(recommender.observation(profile, item, ts))
                profile.apply(item, vectors[ids.index(item)], "click", None, ts, ProfileRule())
            recommender.observe(batch)
        last = [profiles[u] for u in sorted(profiles)]
        return recommender, last, recommender.recommend(last)

    def hits(last: list[Profile], tops: list[list[tuple[str, float]]]) -> int:
        return sum(top[0][0] == successor[p.seen[-1]] for p, top in zip(last, tops, strict=True))

    recommender, last, tops = run(FAST)
    assert recommender.ranker.fits >= 2
    _, _, prior = run(RankConfig(min_groups=10**6))  # never fits: the profile cosine
    assert hits(last, tops) > 0.5 * len(last) > 0.1 * len(last) > hits(last, prior)
    assert all(not {i for i, _ in top} & set(p.seen) for p, top in zip(last, tops, strict=True))
    assert recommender.recommend([Profile("nobody")])[0], "a user without history gets popular items"


# --- the tail slot ----------------------------------------------------------------------------


def test_a_learnt_blend_that_buries_new_items_still_shows_the_closest_one_in_the_first_ten() -> None:
    content, ids, vectors = world()
    profile = mean_profile(vectors[[0]])
    closest = sorted(range(1, N_ITEMS), key=lambda n: -float(vectors[n] @ profile))
    cold = [ids[n] for n in closest[:3]]  # never touched: the content's three best
    for config in (RankConfig(content_k=N_ITEMS), RankConfig(content_k=N_ITEMS, tail_slots=0)):
        ranker = BlendRanker(config)
        for n, item in enumerate(i for i in ids[1:] if i not in cold):
            for t in range(2 + n % 7):  # every other item is known
                ranker.record([], item, float(t))
        ranker.model.weights = np.array([1.0 if f == "pop_count" else 0.0 for f in FEATURES])  # a blend that learnt: popular first
        top = [i for i, _ in ranker.rank([Request([ids[0]], profile, 10.0)], content, 20)[0]]
        assert len(top) == 20 and len(set(top)) == 20
        if config.tail_slots:
            assert top[9] == cold[0], "the best new item by content takes the tenth place"
            assert cold[1] not in top[:10] and top[:9] == [i for i in top if i not in cold][:9]
        else:
            assert not set(cold) & set(top[:10])


def test_the_tail_slot_leaves_a_list_alone_that_already_has_a_new_item() -> None:
    ranker, two = BlendRanker(RankConfig(tail_slots=1)), BlendRanker(RankConfig(tail_slots=2))
    rows = ranker.stats.intern([f"i{n}" for n in range(5)])
    two.stats.intern([f"i{n}" for n in range(5)])
    order = [4, 2, 0, 1, 3]
    by_content = np.array([0.3, 0.4, 0.2, 0.5, 0.1])  # content order: 3, 1, 0, 2, 4
    assert ranker._with_tail(order, by_content, np.array([False, False, True, False, False]), rows, 3) == [4, 2, 0]
    assert ranker._with_tail(order, by_content, np.array([False, False, False, True, False]), rows, 3) == [4, 2, 3]
    assert ranker._with_tail(order, by_content, np.zeros(5, dtype=bool), rows, 3) == [4, 2, 0]
    tail = np.array([False, False, True, True, False])  # 2 (second place) is new, 0 is not
    assert two._with_tail(order, by_content, tail, rows, 3) == [4, 2, 3], "the lowest known item gives way"


def test_a_fan_out_places_its_item_in_the_first_ten_of_the_users_it_chose() -> None:
    """A fresh item fanned out to a user (`Request.place`) is a candidate though no source
    offers it, and takes the place of the first ten's last other item; without a fan-out, with
    `fanout_places` 0, or when the user has the item, the list is the blend's."""
    content, ids, vectors = world()
    profile = mean_profile(vectors[[0]])
    far = min(range(1, N_ITEMS), key=lambda n: float(vectors[n] @ profile))  # the item least like the user
    for config in (RankConfig(content_k=5), RankConfig(content_k=5, fanout_places=0)):
        ranker = BlendRanker(config)
        for n, item in enumerate(ids[1:]):
            for t in range(2 + n % 7):  # every item known: no tail slot
                ranker.record([], item, float(t))
        ranker.model.weights = np.array([1.0 if f == "pop_count" else 0.0 for f in FEATURES])
        plain = [i for i, _ in ranker.rank([Request([ids[0]], profile, 10.0)], content, 20)[0]]
        assert ids[far] not in plain[:10]
        placed = [i for i, _ in ranker.rank([Request([ids[0]], profile, 10.0, place=(ids[far],))], content, 20)[0]]
        if config.fanout_places:
            assert placed[:10] == plain[:9] + [ids[far]], "the fan-out's item takes the tenth place"
            assert placed[10:] == [i for i in plain if i not in placed[:10]][:10]
        else:
            assert placed == plain
        seen = [i for i, _ in ranker.rank([Request([ids[0], ids[far]], profile, 10.0, place=(ids[far],))], content, 20)[0]]
        assert ids[far] not in seen, "an item the user has is not placed again"


def test_a_fan_out_places_its_newest_items_when_several_wait() -> None:
    ranker = BlendRanker(RankConfig(fanout_places=2))
    rows = ranker.stats.intern([f"i{n}" for n in range(8)])
    head = [0, 1, 2, 3]
    request = Request([], None, 0.0, place=("i5", "i6", "i7"))
    assert ranker._with_placed(head, ranker._placed(request), rows) == [0, 1, 6, 7]
    assert ranker._with_placed(head, ranker._placed(Request([], None, 0.0, place=("i1", "i7"))), rows) == [0, 1, 2, 7]


def test_fresh_items_are_ranked_for_each_requests_own_moment_when_one_call_mixes_moments() -> None:
    """The stream processor learns from interactions of several moments in one call: each
    request's fresh items are those of its own window, ranked by closeness to its profile."""
    content, ids, vectors = world()
    ranker = BlendRanker(RankConfig(fresh_k=1, fresh_window_s=7 * 86400.0))
    day = 86400.0
    early, late = 100 * day, 101 * day
    ranker.stats.declare(ids[1], early - 6.5 * day)  # fresh at `early` only
    ranker.stats.declare(ids[2], early - 1 * day)
    ranker.stats.declare(ids[3], early - 1 * day)
    late_request = Request([ids[0]], mean_profile(vectors[[2]]), late)
    early_request = Request([ids[0]], mean_profile(vectors[[1]]), early)
    pools = ranker.candidates([late_request, early_request], content)
    assert set(pools[0].sources["fresh"]) == {ids[2]}
    assert set(pools[1].sources["fresh"]) == {ids[1]}, "an item fresh only at the earlier moment still counts there"


def test_features_of_a_user_whose_history_the_ranker_has_not_seen() -> None:
    content, ids, vectors = world()
    ranker = BlendRanker()
    request = Request([ids[5], ids[6]], mean_profile(vectors[[5, 6]]), 10.0)
    x = ranker.features(request, [ids[7], ids[8]], content.vectors([ids[7], ids[8]]))  # no history vectors
    col = {f: n for n, f in enumerate(FEATURES)}
    assert x[0, col["cos_mean"]] == pytest.approx(float(vectors[7] @ request.profile), abs=1e-5)
    assert x[0, col["cos_last"]] == 0.0 and x[0, col["cos_max"]] == 0.0


# --- one vectorised round ranks exactly as the per-user code did ------------------------------


def tie_world(seed: int = 3) -> tuple[StoreContent, list[str], np.ndarray]:
    """`world`, with exact ties and gaps: items 100-109 repeat the vectors of items 0-9, items
    150-159 have none, and item ids do not sort in the order items are first seen."""
    rng = np.random.default_rng(seed)
    n_items = 160
    vectors = rng.normal(size=(n_items, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[100:110] = vectors[0:10]
    ids = [f"t{n:03d}" for n in rng.permutation(n_items)]
    store = MemoryVectorStore()
    store.open(DIM, "test", "text")
    store.upsert([VectorRecord(i, v) for i, v in zip(ids[:150], vectors[:150], strict=True)])
    return StoreContent(store, VectorCache(store)), ids, vectors


def assert_same_round(new: Replay, old: Replay, requests: list[Request], k: int) -> list[list[tuple[str, float]]]:
    """The same candidates (rows, each source's reciprocal ranks, co-occurrence) and the same
    ranking, item ids and float scores to the bit, for the round and for each request alone."""
    content = new.content
    for mine, theirs in zip(new.ranker.candidates(requests, content), old.ranker.candidates(requests, content), strict=True):
        assert mine.rows.tolist() == theirs.rows.tolist()
        assert {s: v.tolist() for s, v in mine.rr.items()} == {s: v.tolist() for s, v in theirs.rr.items()}
        assert [a.tolist() for a in mine.cooc] == [a.tolist() for a in theirs.cooc]
    ranked = new.ranker.rank(requests, content, k)
    assert ranked == old.ranker.rank(requests, content, k)
    assert [new.ranker.rank([r], content, k)[0] for r in requests] == ranked, "a round ranks as its requests alone"
    return ranked


@pytest.mark.parametrize(
    "config",
    [
        # the sequence source and the earned tail rule came after the reference was frozen: off here
        RankConfig(min_groups=40, refit_every=60, negatives=15, content_k=8, interests=3, cooc_k=10, popular_k=6, fresh_k=2, tail_slots=2, tail_within=6, sequence_steps=0, tail_rule="fixed"),
        RankConfig(min_groups=60, train_rate=0.5, sequence_steps=0, tail_rule="fixed"),
    ],
)
def test_a_vectorised_round_ranks_exactly_as_the_per_user_reference(config: RankConfig) -> None:
    """tests/rank_reference.py is the per-user code before the round was vectorised: both
    rankers take the same stream (training groups and model included) and must rank alike,
    before and after the first fit, for users without a profile, without candidates, with
    fresh items, exact score ties and tail slots, in rounds that mix moments and exclusions."""
    from rank_reference import ReferenceRanker

    content, ids, _ = tie_world()
    new, old = Replay(BlendRanker(config), content), Replay(ReferenceRanker(config), content)
    day, start = 86400.0, 1_700_000_000.0
    rows = chain_stream(ids[:120], users=40, steps=8, seed=5)
    rows += [(f"blind{u}", ids[150 + (u + s) % 10], start + 60.0 * s + u) for u in range(4) for s in range(3)]
    rows.sort(key=lambda r: r[2])
    users = sorted({u for u, _, _ in rows}) + ["nobody"]
    ranked: list[list[tuple[str, float]]] = []

    def check(ts: float, k: int) -> None:
        requests = [new.request(u, ts) for u in users]
        assert [r.history for r in requests] == [old.request(u, ts).history for u in users]
        requests[1].exclude = set(ids[:40:3])
        requests[2].ts = ts - 3 * day  # one round, several moments
        ranked.extend(assert_same_round(new, old, requests, k))

    check(start, 10)  # nothing streamed yet: empty candidates
    for n, created in enumerate([start - 8 * day, start + 100.0, start + 200.0, start + 600.0, start + day]):
        for replay in (new, old):
            replay.ranker.stats.declare(ids[120 + n], created)
            replay.ranker.stats.declare(ids[150 + n], created)
            replay.ranker.stats.declare(ids[[3, 103][n % 2]], start + 300.0)  # same vector: closeness ties
    for part, k in zip(np.split(np.arange(len(rows)), [30, len(rows) // 2]), (5, 20, 1000), strict=True):
        chunk = [rows[n] for n in part]  # the first before the first fit
        new.feed(chunk)
        old.feed(chunk)
        assert [g.x.tolist() for g in new.ranker.groups] == [g.x.tolist() for g in old.ranker.groups]
        assert new.ranker.weights() == old.ranker.weights()
        check(chunk[-1][2] + 1.0, k)
    assert new.ranker.fits > 0
    # what the round covered
    assert any(r.profile is None and r.history for r in (new.request(u, start) for u in users))
    assert [] in ranked, "a user without candidates"
    assert sum(map(len, ranked)) > 1000
    assert any(a == b for r in ranked for (_, a), (_, b) in zip(r, r[1:])), "exact ties"
    fresh = {ids[120 + n] for n in range(5)} | {ids[150 + n] for n in range(5)}
    assert any(i in fresh for r in ranked for i, _ in r), "fresh items"
    stats = new.ranker.stats
    assert any(stats.count(i) <= 1 for r in ranked for i, _ in r[: config.tail_within]), "tail items in the head"


def test_a_vectorised_round_ranks_hm_exactly_as_the_per_user_reference(shared_data: Path) -> None:
    """A slice of hm walked as `vlm4rec bench rank` walks it (random unit vectors), by two
    blends sharing the walk: the product's ranker and the per-user reference."""
    from rank_reference import ReferenceRanker
    from vlm4rec.evaluation.dataset import load_dataset
    from vlm4rec.evaluation.methods import BlendWalk
    from vlm4rec.evaluation.stream import ContentIndex, build_stream

    stream = build_stream(load_dataset(shared_data / "hm"))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(stream.item_ids), 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    walk = BlendWalk(stream, RankConfig(sequence_steps=0, tail_rule="fixed"))  # both came after the reference
    index = ContentIndex(vectors)
    new, old = walk.add(index), walk.add(index)
    old.ranker.__class__ = ReferenceRanker
    end = 6000
    walk.advance(end)
    assert new.ranker.fits > 0 and new.ranker.weights() == old.ranker.weights()
    assert [g.x.tolist() for g in new.ranker.groups] == [g.x.tolist() for g in old.ranker.groups]
    now = float(stream.ts[end])
    new.content.ts = old.content.ts = now
    active = [u for u in range(len(stream.user_ids)) if walk.recent[u]]
    for pick in (rng.choice(active, size=300, replace=False), active[:40]):
        requests = [new.request(int(u), now) for u in pick]
        mine, theirs = new.ranker.rank(requests, new.content, 20), old.ranker.rank(requests, old.content, 20)
        assert mine == theirs
        assert sum(map(len, mine)) > 20 * len(requests) // 2


def test_a_training_group_has_the_features_its_rows_have_when_the_request_is_ranked() -> None:
    """Training and serving must see one feature the same way: a group is a few of the
    request's candidates, and `cooc_rel` was measured relative to the group's best instead of
    the best of all candidates (the positive then read 1.0 in training where ranking gave less)."""
    content, ids, _ = world()
    ranker = BlendRanker(RankConfig(**{**FAST.__dict__, "min_groups": 10**6}))
    replay = Replay(ranker, content)
    replay.feed(chain_stream(ids, users=30, steps=12, seed=4))
    checked = 0
    for user in [f"u{n}" for n in range(30)]:
        request = replay.request(user, 1_800_000_000.0)
        pool = ranker.candidates([request], content)[0]
        x = ranker._scored([request], ranker._round([request], content), content)  # noqa: SLF001 - the ranking's own features
        cooc = x[:, COLUMN["cooc_recent"]]
        if not (cooc > 0).any():
            continue
        weakest = np.flatnonzero(cooc > 0)[np.argmin(cooc[cooc > 0])]
        sample = np.array(sorted({int(weakest), 0, len(pool.rows) - 1}))  # not the best co-occurring row
        vectors = VectorRows.fetch(ranker.stats, np.concatenate([pool.rows, ranker._recent_rows(request)]), content)  # noqa: SLF001
        group = ranker._group_features(request, pool.rows[sample], vectors, pool)  # noqa: SLF001
        assert np.allclose(group, x[sample], atol=1e-6), user
        checked += cooc[sample].max() < cooc.max()
    assert checked >= 5, "groups whose best co-occurrence is not the request's best"
