"""The ranker in a process of its own, beside the stream processor's event loop.

Why: a stream processor is one interpreter, and its event loop (Kafka, the profile agent, the
changelog) and its ranking rounds took turns at the GIL. At 1,000 interactions/s on two cores
the process used 68 % of a core in all while clicks waited 1.5 s for a round: the ranking thread
spent 1.2 ms a user in the stream against 0.74 ms on a core of its own (`vlm4rec bench rank`,
`serving_ms_per_user`), and the loop's hop from broker to agent grew to 0.2 s
(docs/streaming.md). In a process of its own the ranker has a core of its own and the loop
keeps its interpreter.

`RankingProcess` (in the stream processor) answers for the `Recommender` the stream processor
used in-process: `recommend`, `embedded`, `forget`, `observe`, `popular`, `warm_up`,
`observation`, `variant_of`, and `vectors` (the stream processor's own cache of item vectors,
for its profile updates and fan-out). What it is told goes to the child in order, over one pipe,
from one sender thread, so that the event loop never waits on the pipe and the child has taken
in every item and interaction handed over before it ranks the round asked after them. Answers
come back on a reader thread.

The child (`serve`) builds its `Recommender` from a `RankerSpec`: its own client of the items
collection and, with the item replica on, its own replica, loaded at start and then handed the
vectors of every item the stream processor's item feed takes in (the two search the same
items). It learns on a thread of its own, as the stream processor did. Its `vlm4rec_*` metrics
are relayed every second and served with the stream processor's (`streams.metrics.exposition`).

A child that exits is started again with the next message (its learnt state starts over, as a
restarted stream processor's does); the calls it had not answered raise `RankingUnavailable`,
which the refresh round retries like a vector store that does not answer."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from prometheus_client.metrics_core import Metric

from streams import gc_pauses, metrics
from streams.backoff import Backoff
from streams.popularity import RecentPopularity
from streams.profile import Profile
from streams.rank import RankConfig
from streams.recommend import Observation, Recommender, VectorCache, observation_of
from streams.variants import Assignment, Variant, parse_variants
from vectorstore import ReplicaVectorStore, VectorStore

log = logging.getLogger("vlm4rec.streams")

#: how often the child relays its metrics and whether its ranker has a model
STATUS_EVERY_S = 1.0


class RankingUnavailable(RuntimeError):
    """The ranking process exited or stopped answering before it answered a call."""


class RankingFailed(RuntimeError):
    """The call raised in the ranking process (the message says what, as it was raised there)."""


@dataclass(frozen=True)
class RankerSpec:
    """What a ranking process needs to build its `Recommender`: plain values and a picklable
    factory of the items collection's store (a process is started with these, not with
    objects holding connections)."""

    store: Callable[[], VectorStore]
    replica: bool = True  # search an in-process replica of the items (`vectorstore.replica`)
    k: int = 20
    rank: RankConfig = RankConfig()
    neighbour_ttl_s: float = 60.0
    variants: tuple[Variant, ...] = ()
    popularity_half_life_s: float = 6 * 3600

    def recommender(self, items: VectorStore) -> Recommender:
        return Recommender(
            items, RecentPopularity(self.popularity_half_life_s), k=self.k, rank=self.rank,
            neighbour_ttl_s=self.neighbour_ttl_s, variants=self.variants,
        )


class RankingProcess:
    """The stream processor's side of its ranking process (see the module's docstring).
    `items` is the stream processor's own store of the items (its replica), for `vectors`.
    A call that the child has not answered `call_timeout_s` after it was ready stops the
    child (it is started again with the next message)."""

    def __init__(self, spec: RankerSpec, items: VectorStore, call_timeout_s: float = 120.0) -> None:
        self.spec = spec
        self.items = items
        self.vectors = VectorCache(items)
        self.call_timeout_s = call_timeout_s
        self.assignment = Assignment(spec.variants or parse_variants([]))
        self._draw = random.Random(spec.rank.seed)  # as `Recommender.observation` draws
        self._fitted = False  # the child's ranker has a model (reported with its status)
        self._relayed: list[Metric] = []
        self._outbox: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._pending: dict[int, tuple[float, Future[Any]]] = {}  # sent at (monotonic), answer
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the child and its pipe
        self._child: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None  # the one thread that waits on the child
        self._ready = threading.Event()
        self._starts = 0
        self._closed = False
        self._sender = threading.Thread(target=self._send_loop, name="ranking-sender", daemon=True)
        self._sender.start()
        threading.Thread(target=self._watch, name="ranking-watchdog", daemon=True).start()

    # --- what the stream processor asks ---------------------------------------------------
    def recommend(
        self, profiles: Sequence[Profile], k: int | None = None, places: Sequence[Sequence[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """`Recommender.recommend`, in the ranking process."""
        return self.submit_recommend(profiles, k, places).result()

    def submit_recommend(
        self, profiles: Sequence[Profile], k: int | None = None, places: Sequence[Sequence[str]] | None = None
    ) -> Future[list[list[tuple[str, float]]]]:
        """`recommend`, answered later: the stream processor sends the next round while the
        child ranks this one (the child ranks them in the order they were sent)."""
        return self._submit("recommend", [p.for_ranking() for p in profiles], k, [list(p) for p in places] if places else None)

    def warm_up(self) -> None:
        self._submit("warm_up").result()

    def embedded(self, items: Sequence[tuple[str, float | None]]) -> None:
        self._tell("embedded", list(items))

    def forget(self, item_ids: Sequence[str]) -> None:
        """Items (re-)embedded: what this process cached of them is dropped, and the child is
        handed their vectors (with the replica on) and drops what it cached."""
        for item_id in item_ids:
            self.vectors.forget(item_id)
        vectors = self.items.get_vectors(item_ids) if self.spec.replica and item_ids else {}
        self._tell("forget", list(item_ids), vectors)

    def observe(self, observations: Sequence[Observation], learn_max: int | None = None) -> None:
        self._tell("observe", list(observations), learn_max)

    def popular(self, taken: Sequence[tuple[str, float]]) -> None:
        self._tell("popular", list(taken))

    def observation(self, profile: Profile, item_id: str, ts: float) -> Observation:
        """`Recommender.observation`, sampled at the child's rate (its last status)."""
        rank = self.spec.rank
        return observation_of(profile, item_id, ts, self._draw.random() < rank.sample_rate(self._fitted), rank.lookback())

    def variant_of(self, user_id: str) -> str:
        return self.assignment.of(user_id).name

    def relayed(self) -> list[Metric]:
        """The child's metrics as it last sent them (`streams.metrics.exposition`)."""
        return self._relayed

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (it finishes what it was doing) and the sender; the child's reader
        thread reaps it, so that once this returns the child is gone and `is_alive` says so."""
        self._closed = True
        self._outbox.put(None)
        self._sender.join(timeout_s)
        with self._lock:
            child, conn, reader = self._child, self._conn, self._reader
        if child is None:
            return
        if not _exited(child, timeout_s):  # it ignores SIGTERM (`serve`)
            log.warning("ranking process (pid %d) did not stop in %.0f s; killing it", child.pid, timeout_s)
            child.kill()
        if reader is not None:
            reader.join(timeout_s)  # the child's end is closed: it reads the end and reaps
        if conn is not None:
            conn.close()

    # --- the pipe ------------------------------------------------------------------------
    def _submit(self, name: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if self._closed:
            future.set_exception(RankingUnavailable("the ranking process was closed"))
            return future
        call_id = next(self._ids)
        self._pending[call_id] = (time.monotonic(), future)
        future.add_done_callback(lambda _: self._pending.pop(call_id, None))
        self._outbox.put(("call", call_id, name, args))
        return future

    def _watch(self) -> None:
        """Stop a child that left a call unanswered `call_timeout_s` (not counting the time it
        takes to load the items at start): the call fails and the next message starts a new one."""
        while not self._closed:
            time.sleep(1.0)
            oldest = min((sent for sent, _ in list(self._pending.values())), default=None)
            if self._ready.is_set() and oldest is not None and time.monotonic() - oldest > self.call_timeout_s:
                self._stop_child(f"a call unanswered after {self.call_timeout_s:.0f} s")

    def _tell(self, name: str, *args: Any) -> None:
        if not self._closed:
            self._outbox.put(("tell", name, args))

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                with self._lock:
                    if self._conn is not None:
                        self._send(self._conn, ("stop",))
                return
            with self._lock:
                conn = self._conn if self._child is not None and not _exited(self._child) else self._start()
            if not self._send(conn, message) and message[0] == "call":
                self._fail(message[1], RankingUnavailable("the ranking process exited before the call was sent"))

    @staticmethod
    def _send(conn: Connection, message: tuple[Any, ...]) -> bool:
        try:
            conn.send(message)
            return True
        except (OSError, EOFError, ValueError) as exc:  # the child is gone; its reader notices
            log.warning("ranking process message %r not sent: %s", message[1] if len(message) > 1 else message[0], exc)
            return False

    def _start(self) -> Connection:
        """A new child (under `_lock`); the previous one's unanswered calls have failed."""
        context = multiprocessing.get_context("spawn")  # forking a process with threads copies held locks
        ours, theirs = context.Pipe()
        self._ready.clear()
        level = logging.getLogger().getEffectiveLevel()  # the stream processor's (VLM4REC_LOG_LEVEL)
        child = context.Process(target=serve, args=(theirs, self.spec, level), name="vlm4rec-ranking", daemon=True)
        child.start()
        theirs.close()
        if self._starts:
            metrics.RANKING_RESTARTS.inc()
            log.warning("ranking process started again (pid %d); its ranker learns again from what arrives", child.pid)
        else:
            log.info("ranking process started (pid %d)", child.pid)
        self._starts += 1
        self._child, self._conn = child, ours
        self._reader = threading.Thread(target=self._read_loop, args=(child, ours), name="ranking-reader", daemon=True)
        self._reader.start()
        return ours

    def _read_loop(self, child: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "reply":
                _, call_id, ok, value = message
                if ok:
                    self._answer(call_id, value)
                else:
                    self._fail(call_id, RankingFailed(value))
            elif kind == "status":
                _, self._fitted, self._relayed = message
            elif kind == "ready":
                self._ready.set()
        if not _exited(child, 1.0):  # its pipe closed, but it did not exit: it is of no use
            log.error("ranking process (pid %s) closed its pipe but did not exit; stopping it", child.pid)
            child.kill()
        child.join()  # the only wait on the child (see `_exited`)
        if not self._closed:
            log.error("ranking process (pid %s) exited with code %s", child.pid, child.exitcode)
        for call_id in list(self._pending):
            self._fail(call_id, RankingUnavailable(f"the ranking process exited (code {child.exitcode})"))

    def _answer(self, call_id: int, value: Any) -> None:
        _, future = self._pending.get(call_id, (0.0, None))
        if future is not None and not future.done():
            future.set_result(value)

    def _fail(self, call_id: int, error: Exception) -> None:
        _, future = self._pending.get(call_id, (0.0, None))
        if future is not None and not future.done():
            future.set_exception(error)

    def _stop_child(self, why: str) -> None:
        with self._lock:
            child = self._child
        if child is not None and not _exited(child):
            log.error("stopping the ranking process (pid %d): %s", child.pid, why)
            child.kill()


def _exited(child: multiprocessing.process.BaseProcess, timeout_s: float = 0.0) -> bool:
    """Whether the child has exited (waiting up to `timeout_s`), without reaping it.

    Why: `Process.is_alive` and `join` reap the child with `waitpid`, and two threads doing so
    race: the loser gets ECHILD, which `multiprocessing` reads as "still running" (until the
    winner, waiting for the GIL, records the exit code). `close` saw a stopped child "alive" that
    way, and a child thought alive after it was reaped could be signalled under a reused pid. So
    the reader thread alone reaps (`join`); everyone else watches the process's sentinel, which
    is readable from the moment the child exits, reaped or not."""
    return bool(wait([child.sentinel], timeout_s))


# --- the child -------------------------------------------------------------------------------
class _Child:
    """The ranking process's state: the recommender, its learner thread and the pipe."""

    recommender: Recommender  # built by `run`, before any message is read

    def __init__(self, conn: Connection, spec: RankerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.replica: ReplicaVectorStore | None = None
        self._send_lock = threading.Lock()
        self._learning: queue.Queue[tuple[float, list[Observation], int | None]] = queue.Queue()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def build(self) -> Recommender:
        """The recommender over the items collection (and the whole collection in the
        replica), tried again until the store answers."""
        backoff = Backoff()
        while True:
            try:
                source = self.spec.store()
                replica = ReplicaVectorStore(source) if self.spec.replica else None
                if replica is not None:
                    log.info("ranking process: %d items loaded", replica.load())
                self.replica = replica
                return self.spec.recommender(replica if replica is not None else source)
            except Exception as exc:  # noqa: BLE001 - the store may not be up yet
                delay = backoff.next()
                log.warning("ranking process: items collection not reached (%s); again in %.1f s", exc, delay)
                time.sleep(delay)

    def run(self) -> None:
        self.recommender = self.build()
        gc_pauses.settle()  # what it loaded stays: the collector need not walk it again
        threading.Thread(target=self._learn_loop, name="ranking-learner", daemon=True).start()
        threading.Thread(target=self._status_loop, name="ranking-status", daemon=True).start()
        self.send(("ready",))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the stream processor is gone
            if message[0] == "stop":
                return
            if message[0] == "call":
                _, call_id, name, args = message
                try:
                    self.send(("reply", call_id, True, getattr(self, "_" + name)(*args)))
                except Exception as exc:  # noqa: BLE001 - the caller decides (a round is retried)
                    self.send(("reply", call_id, False, f"{type(exc).__name__}: {exc}"))
            else:
                _, name, args = message
                try:
                    getattr(self, "_" + name)(*args)
                except Exception:  # noqa: BLE001 - one message never stops the ranking
                    log.exception("ranking process: %s failed", name)

    # calls and tells, by name
    def _recommend(self, profiles: list[Profile], k: int | None, places: list[list[str]] | None) -> list[list[tuple[str, float]]]:
        return self.recommender.recommend(profiles, k, places)

    def _warm_up(self) -> None:
        self.recommender.warm_up()

    def _embedded(self, items: list[tuple[str, float | None]]) -> None:
        self.recommender.embedded(items)

    def _forget(self, item_ids: list[str], vectors: dict[str, Any]) -> None:
        if self.replica is not None and vectors:
            self.replica.put(vectors)
        self.recommender.forget(item_ids)

    def _observe(self, observations: list[Observation], learn_max: int | None) -> None:
        self._learning.put((time.time(), observations, learn_max))

    def _popular(self, taken: list[tuple[str, float]]) -> None:
        self.recommender.popular(taken)

    def _learn_loop(self) -> None:
        """Whatever is queued, learnt as one batch (`learn_max` of its groups at most: a
        learner that fell behind catches up, and every interaction is still counted)."""
        lag = metrics.BACKGROUND_LAG.labels("ranking_learn")
        while True:
            batches = [self._learning.get()]
            while not self._learning.empty():
                batches.append(self._learning.get_nowait())
            lag.set(time.time() - batches[0][0])
            observations = [o for _, batch, _ in batches for o in batch]
            limits = [limit for _, _, limit in batches if limit is not None]
            try:
                self.recommender.observe(observations, max(limits) if limits else None)
            except Exception:  # noqa: BLE001 - learning is best effort
                metrics.LEARN_FAILURES.inc()
                log.exception("ranking process: %d observations not learnt", len(observations))
            lag.set(0.0)

    def _status_loop(self) -> None:
        while True:
            try:
                self.send(("status", self.recommender.ranker.fits > 0, metrics.relayable()))
            except (OSError, EOFError, ValueError):
                return
            time.sleep(STATUS_EVERY_S)


def serve(conn: Connection, spec: RankerSpec, level: int = logging.INFO) -> None:
    """The ranking process's main (`RankingProcess` starts it), logging at the stream
    processor's level (a spawned process starts without its logging set up).

    It ignores SIGTERM and SIGINT: they come to the whole process group (`vlm4rec up` stopping
    the stream processor, Ctrl-C in a terminal), and the stream processor stops its child itself
    (`RankingProcess.close`) once it has stopped asking; a child that died first was logged as
    a crash at every shutdown. It still exits when its pipe closes, and SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [ranking] %(name)s: %(message)s")
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")  # as the stream processor (vlm4rec.evaluation.blas)
    except ImportError:  # pragma: no cover - only slower
        pass
    _Child(conn, spec).run()
