"""The ranker in a process of its own (`streams.ranking_process`): it answers as the in-process
`Recommender` does, relays its metrics, and a ranking process that dies or fails costs a round
a retry, not the feed.

Each test starts real child processes (spawned interpreters), over the in-memory vector store
that the factories below fill the same way in the test and in the child."""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from streams import metrics
from streams.popularity import RecentPopularity
from streams.profile import Profile, ProfileRule
from streams.rank import RankConfig
from streams.ranking_process import RankerSpec, RankingFailed, RankingProcess, RankingUnavailable
from streams.recommend import Recommender
from threadpoolctl import threadpool_limits

from vectorstore import MemoryVectorStore, ReplicaVectorStore, VectorRecord

N_ITEMS, DIM, SEED = 60, 8, 5
NOW = 1_700_000_000.0
FAST = RankConfig(train_rate=1.0, warmup_rate=1.0, min_groups=5, refit_every=5, negatives=5, content_k=10)
IDS = [f"i{n:02d}" for n in range(N_ITEMS)]


def _vectors() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def filled_store() -> MemoryVectorStore:
    """The catalogue, built the same way in every process (a ranking process's store factory)."""
    store = MemoryVectorStore()
    store.open(DIM, "test", "text")
    store.upsert([VectorRecord(i, v, created_at=NOW) for i, v in zip(IDS, _vectors(), strict=True)])
    return store


class DownStore(MemoryVectorStore):
    """A store that does not answer (Milvus down)."""

    def space(self) -> tuple[int, str, str] | None:
        raise ConnectionError("items collection unreachable")

    def search(self, queries: np.ndarray, k: int) -> list:
        raise ConnectionError("items collection unreachable")


def down_store() -> DownStore:
    return DownStore()


def profiles(count: int, seed: int = 0) -> list[Profile]:
    """Users with a few interactions each, applied as the profile agent does."""
    rng = np.random.default_rng(seed)
    vectors = dict(zip(IDS, _vectors(), strict=True))
    rule = ProfileRule()
    out = []
    for n in range(count):
        profile = Profile(f"u{n}")
        for m, item in enumerate(rng.choice(IDS, size=int(rng.integers(1, 6)), replace=False)):
            profile.apply(str(item), vectors[str(item)], "click", None, NOW + n + m / 10, rule)
        out.append(profile)
    return out


def spec(store=filled_store, replica: bool = True) -> RankerSpec:  # noqa: ANN001 - a factory
    return RankerSpec(store, replica=replica, k=5, rank=FAST)


@pytest.fixture(scope="module")
def process() -> Iterator[RankingProcess]:
    ranking = RankingProcess(spec(), filled_store())
    yield ranking
    ranking.close()


def test_it_ranks_what_the_in_process_recommender_ranks(process: RankingProcess) -> None:
    """Same catalogue, same popularity and fresh items, same users: the same lists, to the
    last bit of every score (the ranking process changes where ranking runs, not what it says)."""
    replica = ReplicaVectorStore(filled_store())
    replica.load()
    local = Recommender(replica, RecentPopularity(), k=5, rank=FAST)
    taken = [(IDS[n % 7], NOW + n) for n in range(30)]
    fresh = [(IDS[-1], NOW), (IDS[-2], NOW - 10)]
    for ranking in (local, process):
        ranking.popular(taken)
        ranking.embedded(fresh)
    users = profiles(12)
    with threadpool_limits(limits=1, user_api="blas"):  # as the child (and the stream processor)
        assert process.recommend(users) == local.recommend(users)
        assert process.recommend(users[:1], 3) == local.recommend(users[:1], 3)
        places = [[IDS[-1]] if n % 2 else [] for n in range(len(users))]  # fan-outs' items travel too
        placed = local.recommend(users, 3, places)
        assert process.recommend(users, 3, places) == placed
        chosen = [(user, top) for user, top, place in zip(users, placed, places, strict=True) if place and IDS[-1] not in user.seen]
        assert chosen and all(IDS[-1] in {i for i, _ in top} for _, top in chosen)


def test_it_learns_beside_the_rounds_and_relays_its_metrics(process: RankingProcess) -> None:
    """Observations reach the child's learner; its first fit shows in the rate at which the
    stream processor samples observations, and its counters in the stream processor's /metrics."""
    users = profiles(40, seed=1)
    vectors = dict(zip(IDS, _vectors(), strict=True))
    observations = []
    for n, profile in enumerate(users):
        item = IDS[(7 * n) % N_ITEMS]
        observations.append(process.observation(profile, item, NOW + 100 + n))
        profile.apply(item, vectors[item], "click", None, NOW + 100 + n, ProfileRule())
    process.observe(observations)
    process.recommend(users[:4])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not process._fitted:
        time.sleep(0.1)
    assert process._fitted, "the child's ranker never reported a fit"
    assert process.observation(users[0], IDS[0], NOW + 200).request is not None or FAST.train_rate < 1
    text = metrics.exposition(process.relayed()).decode()
    fed = [line for line in text.splitlines() if line.startswith("vlm4rec_streams_ranker_interactions_total ")]
    assert fed and float(fed[0].split()[1]) >= len(observations)


def test_new_items_reach_the_childs_replica_before_the_next_round(process: RankingProcess) -> None:
    """An item the stream processor's feed took in is handed to the child with `forget`: the
    next round finds it, though the child's own store never had it (the user has seen every
    other item)."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0] = 1.0
    parent = process.items
    assert isinstance(parent, MemoryVectorStore)
    parent.upsert([VectorRecord("brand-new", vector, created_at=NOW)])
    process.forget(["brand-new"])
    user = Profile("fan", vector=vector.copy(), updated_at=NOW, seen=list(IDS))
    assert [item for item, _ in process.recommend([user])[0]] == ["brand-new"]


def test_a_killed_child_is_started_again_and_the_round_retried_succeeds() -> None:
    ranking = RankingProcess(spec(), filled_store())
    try:
        users = profiles(5)
        first = ranking.recommend(users)
        restarts = metrics.RANKING_RESTARTS._value.get()
        assert ranking._child is not None and ranking._child.pid is not None
        os.kill(ranking._child.pid, signal.SIGKILL)
        multiprocessing.connection.wait([ranking._child.sentinel], 10)  # the reader thread reaps it
        deadline = time.monotonic() + 60
        while True:  # as `_until_done` retries a round
            try:
                again = ranking.recommend(users)
                break
            except RankingUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert again == first
        assert metrics.RANKING_RESTARTS._value.get() == restarts + 1
    finally:
        ranking.close()


def test_a_call_that_raises_in_the_child_raises_here_and_the_child_goes_on() -> None:
    """The store down: the round's error comes back (the stream processor retries the round),
    and the same child answers the next call."""
    ranking = RankingProcess(spec(down_store, replica=False), down_store())
    try:
        with pytest.raises(RankingFailed, match="unreachable"):
            ranking.recommend(profiles(2))
        pid = ranking._child.pid if ranking._child is not None else None
        with pytest.raises(RankingFailed, match="unreachable"):
            ranking.warm_up()
        assert ranking._child is not None and ranking._child.pid == pid and ranking._child.is_alive()
    finally:
        ranking.close()
    assert ranking._child is not None and not ranking._child.is_alive()


def test_a_stopped_child_is_not_alive_after_close_whichever_thread_reaps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads reaping one child race: the loser's `waitpid` gets ECHILD, which
    `multiprocessing` reads as "running". Here the reader thread reaps and is slow to record it
    (as when it waits for the GIL): `close` must still leave a child that `is_alive` calls
    stopped, and signal nothing (before the fix it sent SIGTERM and SIGKILL to a reaped pid)."""
    real_waitpid = os.waitpid

    def slow_after_reaping(pid: int, options: int) -> tuple[int, int]:
        answer = real_waitpid(pid, options)
        if answer[0] == pid and threading.current_thread().name == "ranking-reader":
            time.sleep(1.0)
        return answer

    monkeypatch.setattr(os, "waitpid", slow_after_reaping)
    signalled: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append(sig))
    ranking = RankingProcess(spec(), filled_store())
    try:
        ranking.recommend(profiles(1))
    finally:
        ranking.close(timeout_s=5.0)
    assert ranking._child is not None and not ranking._child.is_alive() and ranking._child.exitcode == 0
    assert signalled == []


def test_the_child_outlives_a_sigterm_to_its_group_and_stops_when_closed() -> None:
    """SIGTERM to the process group (`vlm4rec up` stopping the stream processor) must leave the
    stream processor to stop its child itself, in order, rather than find it dead mid-call."""
    ranking = RankingProcess(spec(), filled_store())
    try:
        first = ranking.recommend(profiles(2))
        assert ranking._child is not None and ranking._child.pid is not None
        os.kill(ranking._child.pid, signal.SIGTERM)
        os.kill(ranking._child.pid, signal.SIGINT)
        assert ranking.recommend(profiles(2)) == first
    finally:
        ranking.close()
    assert ranking._child.exitcode == 0


def test_a_closed_ranking_process_refuses_calls() -> None:
    ranking = RankingProcess(spec(), filled_store())
    ranking.close()
    with pytest.raises(RankingUnavailable):
        ranking.recommend(profiles(1))


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_the_child_logs_at_the_stream_processors_level(level: int, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawned child starts without logging set up: it takes the parent's level
    (VLM4REC_LOG_LEVEL), so its INFO lines (the items it loaded) show only at INFO."""
    monkeypatch.setattr(logging.getLogger(), "level", level)
    ranking = RankingProcess(spec(), filled_store())
    try:
        ranking.recommend(profiles(1))
    finally:
        ranking.close()
    loaded = "items loaded" in capfd.readouterr().err
    assert loaded == (level == logging.INFO)
