"""The Faust app: live user profiles, pushed recommendations, fresh-item fan-out, HTTP views.

Topics and agents:
- `interactions` (+ the internal `control` topic, co-partitioned): the profile agent. Batches of
  events (coalesced within a short window) update the `profiles` table once per user per batch
  and mark the users' recs as due.
- the recs refresher (a task): takes the users whose recs are due, oldest first, at most
  `refresh_max` per round, ranks them with one vector-store search for all of them, and pushes
  their `recs`. A user marked again while due keeps their place (coalescing): when interactions
  come faster than the vector store can answer, a push answers several of a user's interactions
  and the profiles still keep up with the stream. Recs are derived state: a worker that dies
  may skip a due push, and the user's next interaction or fresh item brings one. They leave
  through their own producer (confluent-kafka, batching in its own thread), not Faust's: on the
  embedded broker Faust's producer runs with one record per batch (docs/hardening.md item 3),
  which made every push wait for the previous one's round trip.
  An interaction whose item has no vector yet is deferred to the `pending` topic (keyed by item)
  and comes back through `control` once the item is embedded: no signal is lost.
- `items.embedded` (+ `pending`, co-partitioned by item_id): the item agent. It releases the
  interactions waiting for the item and fans the fresh item out to the users whose profiles are
  nearest (via the `users` collection), by sending them a refresh through `control`.

At-least-once: the profile remembers the last offset it applied per source partition, and the
origins of the deferred interactions it still awaits, so a re-delivered event or release is never
counted twice; that needs each partition's events in offset order (`_in_order`) and offsets
committed only for handled events (`streams.faust_fixes`).
Control messages go to the user's own interactions partition (stored with the user's vector),
so one worker owns all of a user's events whatever partitioner the producers use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
import weakref
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Awaitable, Sequence
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import faust_fixes, metrics
from streams.background import Backlog
from streams.popularity import RecentPopularity
from streams.profile import Profile, ProfileRule
from streams.rank import RankConfig
from streams.recommend import Observation, Recommender
from pydantic import ValidationError

from topics import DeadLetter, EventError, Interaction, ItemEmbedded, Rec, Recs, TopicNames, decode, encode
from topics.producer import EventProducer
from vectorstore import VectorStore

log = logging.getLogger("vlm4rec.streams")

LAST_RECS_KEPT = 10_000
COMMITTABLE_KEPT = 100_000
#: seconds between seeks back while a partition's next offset has not come (`_in_order`)
REWIND_EVERY_S = 2.0
#: Table keys no event can produce (ids never hold control characters): see `_fence`.
FENCE_PREFIX = "\x00fence:"
#: how far ahead of this worker's clock an interaction may be dated; later ones are read at this
#: limit, so that one event dated in the year 5000 (valid by the contract) cannot move the
#: stream clock past every other event and silence popularity and freshness for everyone
MAX_FUTURE_S = 86400.0


@dataclass(frozen=True)
class StreamsConfig:
    """Plain values the composition root hands down."""

    topics: TopicNames
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    app_id: str = "vlm4rec-streams"
    store: str = "memory://"
    session_timeout_s: float = 6.0
    partitions: int = 4
    replication: int = 1  # of the topics Faust creates itself (table changelogs)
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    k: int = 20
    fanout_users: int = 50
    batch_max: int = 1000
    batch_within_s: float = 0.05
    refresh_max: int = 256
    fetch_max_wait_ms: int = 100
    learn_max: int = 64
    background_every_s: float = 1.0  # the learner's and the saver's pace (`Backlog`)
    neighbour_ttl_s: float = 60.0
    rule: ProfileRule = field(default_factory=ProfileRule)
    popularity_half_life_s: float = 6 * 3600
    rank: RankConfig = field(default_factory=RankConfig)
    #: librdkafka settings of the recs producer (the composition root hands down the product's
    #: `kafka_config()`); empty: `bootstrap_servers` in plain text
    recs_kafka: dict[str, Any] = field(default_factory=dict)

    @property
    def pending_topic(self) -> str:
        return f"{self.app_id}-pending"

    @property
    def control_topic(self) -> str:
        return f"{self.app_id}-control"

    def internal_topics(self) -> list[str]:
        return [self.pending_topic, self.control_topic]


def _credentials(config: StreamsConfig) -> Any:
    if config.security_protocol == "PLAINTEXT":
        return None
    context = None
    if config.security_protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=config.ssl_cafile or None)
        if config.ssl_certfile:
            context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile or None)
    if config.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=config.sasl_username,
            password=config.sasl_password,
            mechanism=config.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    return faust.SSLCredentials(context)


def _in_context_of(event: faust.EventT) -> None:
    """Faust writes a table entry to the changelog partition of the *current* event; in a
    batch (take_events) there is none, so name the event whose partition owns the key."""
    _current_event.set(weakref.ref(event))


def _fence(table: Any, events: list[faust.EventT]) -> None:
    """End each changelog partition these events wrote with a throw-away record.

    Faust restores a table up to the changelog's end offset minus one, and the embedded Tansu
    broker reports end offsets one lower than Kafka does, so there the last record of every
    changelog partition is skipped at recovery (a single record: the partition is not read at
    all). Ending every write with a fence makes that skipped record a fence, not a profile;
    against Kafka it costs one small compacted record per partition and batch."""
    for partition, event in {e.message.partition: e for e in events}.items():
        _in_context_of(event)
        table[f"{FENCE_PREFIX}{partition}"] = {"fence": True}


def _source(event: faust.EventT) -> str:
    return f"{event.message.topic}:{event.message.partition}"


@dataclass
class Due:
    """A user whose recs are due: when the oldest interaction not yet answered by a push
    reached the broker (None: only a fresh item asked), when that fresh item was published,
    and the user's stream partition (kept with their vector for the fan-out)."""

    partition: int
    arrived: float | None = None
    published_at: float | None = None

    def merge(self, other: Due) -> None:
        """Keep the oldest times: latency is counted from the first unanswered event."""
        self.partition = other.partition
        if other.arrived is not None:
            self.arrived = other.arrived if self.arrived is None else min(self.arrived, other.arrived)
        if other.published_at is not None:
            self.published_at = other.published_at if self.published_at is None else min(self.published_at, other.published_at)


class StreamsApp:
    """Builds the Faust app around a `Recommender`; the app object is `self.app`."""

    def __init__(self, config: StreamsConfig, items: VectorStore, users: VectorStore) -> None:
        self.config = config
        self.items = items
        self.users = users
        self.popularity = RecentPopularity(config.popularity_half_life_s)
        self.recommender = Recommender(
            items, users, self.popularity, k=config.k, rank=config.rank, neighbour_ttl_s=config.neighbour_ttl_s
        )
        self.model = ""
        self.last_recs: OrderedDict[str, Recs] = OrderedDict()  # latest push per user, bounded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vector-store")  # calls in order
        # the profile agent's vector lookups, so that they never wait behind a refresh round
        self._fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="vector-fetch")
        self.due: OrderedDict[str, Due] = OrderedDict()  # oldest first
        # beside the hot path (streams.background): the ranker learns from the applied
        # interactions (batches in order), and changed profiles reach the users collection
        pace = config.background_every_s
        self.learner: Backlog[int, list[Observation]] = Backlog("learn", self._learn, retry=False, every_s=pace)
        self.saver: Backlog[str, tuple[Profile, int]] = Backlog("save_profiles", self._save, retry=True, every_s=pace)
        self._batches = 0
        # embedded items (item_id, created_at) not yet told to the ranker, whose state only the
        # vector-store thread touches; queued so that the item agent never waits behind a round
        self._embedded: list[tuple[str, float | None]] = []
        # (topic, partition) -> the offset after the last event handed to a handler (`_in_order`)
        self._processed: dict[tuple[str, int], int] = {}
        # partitions being read again (`_in_order`): the offset sought back to, and when
        self._rewound: dict[tuple[str, int], tuple[int | None, float]] = {}  # (None: before Faust's seek)
        # messages a handler finished and whose offsets may now be committed (faust_fixes)
        self._committable: set[tuple[str, int, int]] = set()
        self._wake = asyncio.Event()
        faust_fixes.set_fetch_wait(config.fetch_max_wait_ms)
        brokers = ";".join(f"kafka://{b.strip()}" for b in config.bootstrap_servers.split(","))
        self.app = faust.App(
            config.app_id,
            broker=brokers,
            broker_credentials=_credentials(config),
            store=config.store,
            topic_partitions=config.partitions,
            topic_replication_factor=config.replication,
            web_host=config.web_host,
            web_port=config.web_port,
            web_bind=config.web_host,
            broker_session_timeout=config.session_timeout_s,
            broker_heartbeat_interval=max(0.5, config.session_timeout_s / 3),
            producer_linger_ms=2,
            stream_wait_empty=False,
            table_cleanup_interval=60.0,
            # Faust's own views would list table contents (users' histories): off
            web_tables_enabled=False,
            web_router_enabled=False,
            web_graph_enabled=False,
            web_stats_enabled=False,
        )
        raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": config.partitions}
        t = config.topics
        self.interactions = self.app.topic(t.interactions, config.control_topic, **raw)
        self.items_topic = self.app.topic(t.items_embedded, config.pending_topic, **raw)
        self.pending = self.app.topic(config.pending_topic, **raw)
        self.control = self.app.topic(config.control_topic, **raw)
        self.interactions_dlq = self.app.topic(t.interactions_dlq, **raw)
        self.profiles = self.app.Table("profiles", default=None, partitions=config.partitions)
        self.waiting = self.app.Table("waiting", default=None, partitions=config.partitions)
        self.app.agent(self.interactions, name="profiles-agent")(self._profiles_agent)
        self.app.agent(self.items_topic, name="items-agent")(self._items_agent)
        self.app.task(self._discover_space)
        self.app.task(self._refresher)
        self.app.task(self.learner.run)
        self.app.task(self.saver.run)
        self.app.timer(5.0)(self._report_lag)
        self.app.timer(REWIND_EVERY_S)(self._reread_stalled)
        self._register_views()
        # the topics the agents consume (their offsets are what at-least-once is about)
        self.inputs = frozenset({t.interactions, t.items_embedded, *config.internal_topics()})
        faust_fixes.commit_only_handled(self.app, self._may_commit)
        faust_fixes.record_seeks()
        self.app.on_partitions_revoked.connect(self._forget_partitions)
        self.app.on_before_shutdown.connect(self._flush_recs)
        self._recs_out: EventProducer | None = None  # made at the first push (it starts threads)

    def _forget_partitions(self, sender: Any, revoked: set[Any], **_: Any) -> None:
        """A revoked partition's read position is no longer this worker's to check: when it
        comes back (after a rebalance) its reading starts again at the committed offset."""
        faust_fixes.forget_seeks(self.app.consumer, revoked)
        for tp in revoked:
            key = (tp.topic, tp.partition)
            self._processed.pop(key, None)
            self._rewound.pop(key, None)

    def _may_commit(self, message: Any) -> bool:
        """Whether an input message's offset may be committed: only once a handler finished
        it (Faust acknowledges messages it skips during a rebalance too)."""
        if message.topic not in self.inputs:
            return True
        key = (message.topic, message.partition, message.offset)
        if key in self._committable:
            self._committable.discard(key)
            return True
        log.info("not committing %s[%d]@%d: Faust skipped it (rebalance); it is read again", *key)
        return False

    async def _store(self, fn: Any, *args: Any) -> Any:
        """Vector-store calls are blocking gRPC; keep them off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _lookup(self, fn: Any, *args: Any) -> Any:
        """A vector-store lookup of the agents, on its own thread: never behind a recs round."""
        return await asyncio.get_running_loop().run_in_executor(self._fetch_pool, fn, *args)

    async def _discover_space(self) -> None:
        """The embedding workers choose the item space; the users collection follows it."""
        while True:
            try:
                space = await self._store(self.items.space)
            except Exception as exc:  # noqa: BLE001 - a task that raises crashes the whole app
                log.warning("vector store not answering (%s); asking again in 2s", exc)
                await asyncio.sleep(2.0)
                continue
            if space is not None:
                await self._store(self.users.open, *space)
                self.model = f"{space[1]}+profile-mean"
                log.info("item space: dim=%d model=%s strategy=%s", *space)
                return
            log.info("waiting for the items collection (start an embedding worker)")
            await asyncio.sleep(2.0)

    async def _report_lag(self) -> None:
        """Messages not yet processed on each input partition this worker owns: the end offset
        less the offset after the last message handed to a handler (not the consumer's fetch
        position, which runs ahead by whatever is buffered). The internal `control` and
        `pending` topics count too: a fan-out storm queues there. The embedded broker reports
        end offsets one low, so lag there reads one low per partition (clamped at zero)."""
        self.learner.report()
        self.saver.report()
        consumer = self.app.consumer
        mine = [tp for tp in consumer.assignment() if tp.topic in self.inputs]
        if not mine:
            return
        highwaters = await consumer.highwaters(*mine)
        for tp in mine:
            done = self._processed.get((tp.topic, tp.partition))
            if done is None:
                done = await consumer.position(tp)  # nothing handled yet since this worker started
            if done is not None and tp in highwaters:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwaters[tp] - done))

    # --- profiles ----------------------------------------------------------------------
    async def _profiles_agent(self, stream: faust.StreamT) -> None:
        async for events in stream.take_events(self.config.batch_max, within=self.config.batch_within_s):
            await self._handled(stream, events, "interaction batch", self._process_interactions)

    async def _handled(self, stream: faust.StreamT, events: list[faust.EventT], what: str, handler: Any) -> None:
        """Run `handler` on the events (those in order, see `_in_order`) and only then let
        their offsets be committed. Faust acks a `take_events` batch (and the current event of
        `events()`) in a `finally`, even when the worker is stopped mid-handler (SIGTERM,
        rebalance), which would commit events that were never applied; holding one extra
        reference per message until the handler is done leaves them uncommitted, so they are
        re-delivered to whoever owns the partition next."""
        events = await self._in_order(events)
        if not events:
            return
        for event in events:
            event.message.incref()
        await self._until_done(what, handler, events)
        for event in events:
            message = event.message
            if len(self._committable) > COMMITTABLE_KEPT:  # keys whose final ack never came
                self._committable.clear()  # (at worst their messages are read again: at-least-once)
            self._committable.add((message.topic, message.partition, message.offset))
            await stream.ack(event)

    async def _in_order(self, events: list[faust.EventT]) -> list[faust.EventT]:
        """The events that keep each partition in offset order. After a restart or rebalance
        Faust can deliver a fetch answered from before its seek, jumping ahead of messages it
        then drops as already read (docs/hardening.md, item 11); the profiles' offset marks
        would then skip those as duplicates. An event past the next unhandled offset is
        refused (unhandled and, by `faust_fixes`, uncommitted) and the partition is read again
        from that offset, again every `REWIND_EVERY_S` until that offset comes (here, or by
        `_reread_stalled` when nothing newer arrives): a stale fetch can also arrive after the
        seek back, and Faust then drops the re-read messages too (item 12, a stalled item
        agent). Only offsets the broker no longer holds (deleted by retention before this
        worker read them) are a real gap, accepted with an error. A partition's first event is
        judged against the offset Faust sought it to, and events fetched before that seek are
        refused (item 12)."""
        kept = []
        for event in events:
            message = event.message
            key = (message.topic, message.partition)
            expected = self._processed.get(key)
            if expected is None:
                expected = await self._start(message.tp)
                if expected is None:  # fetched before Faust sought it to its commit
                    self._rewound.setdefault(key, (None, time.monotonic()))
                    continue
            if message.offset > expected:
                now = time.monotonic()
                if now - self._rewound.get(key, (None, -math.inf))[1] < REWIND_EVERY_S:
                    continue  # a seek back is under way
                earliest = await self._earliest(message.tp)
                if earliest > expected:
                    log.error("%s[%d]: offsets %d-%d were deleted before this worker read them", *key, expected, earliest - 1)
                    self._processed[key] = expected = earliest
                if message.offset > expected:
                    log.warning("%s[%d]: offset %d arrived before %d; reading again from %d", *key, message.offset, expected, expected)
                    self._rewound[key] = (expected, now)
                    await self.app.consumer.seek(message.tp, expected)
                    continue
            self._rewound.pop(key, None)
            self._processed[key] = max(expected, message.offset + 1)
            kept.append(event)
        return kept

    async def _earliest(self, tp: TP) -> int:
        return (await self.app.consumer.earliest_offsets(tp)).get(tp, 0)

    async def _start(self, tp: TP) -> int | None:
        """Where reading `tp` started in this assignment: the offset Faust sought it to, or
        the earliest offset when nothing was committed; None before Faust's seek."""
        sought = faust_fixes.sought_offsets(self.app.consumer)
        if tp not in sought:
            return None
        if sought[tp] is None:
            sought[tp] = await self._earliest(tp)
        return sought[tp]

    async def _reread_stalled(self) -> None:
        """Seek back again a partition whose re-read offset has not come `REWIND_EVERY_S`
        after the last seek back, though no later event arrived to prompt `_in_order`: the
        re-read messages were dropped behind a stale fetch and nothing newer is coming
        (chaos seed 15: the item agent stalled on four partitions after the replay ended)."""
        now = time.monotonic()
        for (topic, partition), (offset, when) in list(self._rewound.items()):
            if now - when < REWIND_EVERY_S:
                continue
            tp = TP(topic, partition)
            if offset is None:  # events came before Faust's seek; what it sought to has not
                offset = await self._start(tp)
                if offset is None:
                    continue
            log.warning("%s[%d]: offset %d has not come; reading again from it", topic, partition, offset)
            self._rewound[(topic, partition)] = (offset, now)
            await self.app.consumer.seek(tp, offset)

    async def _until_done(self, what: str, handler: Any, *args: Any) -> None:
        """Faust acknowledges a batch even when its handler raises, so a failure here would
        drop events: retry instead (a vector store that is down is waited for). Re-running is
        safe because profiles remember which offsets they applied."""
        delay = 0.5
        while True:
            try:
                await handler(*args)
                return
            except Exception:  # noqa: BLE001 - anything; the retry is the handling
                log.exception("%s failed; retrying in %.1fs", what, delay)
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    async def _process_interactions(self, events: list[faust.EventT]) -> None:
        while not self.model:
            await asyncio.sleep(0.2)
        with metrics.STAGE_SECONDS.labels("apply").time():
            await self._apply(events)
        metrics.RECS_DUE.set(len(self.due))
        self._wake.set()

    async def _apply(self, events: list[faust.EventT]) -> None:
        """Apply a batch to the profiles and mark the users whose recs are due."""
        by_user: dict[str, list[tuple[faust.EventT, Interaction, str | None]]] = defaultdict(list)
        refresh: dict[str, tuple[faust.EventT, float | None]] = {}
        for event in events:
            parsed = await self._parse(event)
            if parsed is None:
                continue
            kind, interaction, origin, published_at = parsed
            interaction = self._dated(interaction)
            if kind == "refresh":
                refresh[interaction.user_id] = (event, published_at)
            else:
                by_user[interaction.user_id].append((event, interaction, origin))

        item_ids = {i.item_id for rows in by_user.values() for _, i, _ in rows}
        vectors = await self._lookup(self.recommender.vectors.get, item_ids) if item_ids else {}
        changed: dict[str, tuple[Profile, faust.EventT]] = {}
        arrival: dict[str, float] = {}
        deferrals: list[Awaitable[Any]] = []
        observed: list[Observation] = []
        for user_id, rows in by_user.items():
            profile = self._load(user_id)
            for event, interaction, origin in rows:
                if self._duplicate(profile, event, origin):
                    metrics.INTERACTIONS.labels("duplicate").inc()
                    continue
                vector = vectors.get(interaction.item_id)
                if vector is None:
                    deferrals.append(await self._defer(profile, event, interaction, origin))
                    metrics.INTERACTIONS.labels("deferred").inc()
                    continue
                observed.append(self.recommender.observation(profile, interaction.item_id, interaction.ts))
                profile.apply(interaction.item_id, vector, interaction.event, interaction.value, interaction.ts, self.config.rule)
                self.popularity.add(interaction.item_id, interaction.ts, 1.0)
                metrics.INTERACTIONS.labels("applied").inc()
                arrival[user_id] = min(arrival.get(user_id, event.message.timestamp), event.message.timestamp)
            changed[user_id] = (profile, rows[-1][0])
        # Deferrals are delivered before the profiles that mark their events seen: a crash in
        # between would otherwise skip the re-delivered events as duplicates and lose them.
        await asyncio.gather(*deferrals)
        for user_id, (profile, event) in changed.items():
            _in_context_of(event)
            self.profiles[user_id] = profile.to_dict()
            metrics.PROFILE_UPDATES.inc()
            self.saver.put(user_id, (profile, event.message.partition))
        _fence(self.profiles, [event for _, event in changed.values()])
        if observed:
            self._batches += 1
            self.learner.put(self._batches, observed)
        for user_id, (_, event) in changed.items():
            if user_id in arrival:
                self._mark_due(user_id, Due(event.message.partition, arrived=arrival[user_id]))
        for user_id, (event, published_at) in refresh.items():
            if user_id in changed or self.stored_profile(user_id) is not None:
                self._mark_due(user_id, Due(event.message.partition, published_at=published_at))

    def _mark_due(self, user_id: str, due: Due) -> None:
        if (queued := self.due.get(user_id)) is not None:
            queued.merge(due)
        else:
            self.due[user_id] = due

    # --- recs ----------------------------------------------------------------------------
    async def _refresher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.due or self._embedded:
                await self._until_done("recs refresh", self._refresh_round)

    async def _refresh_round(self) -> None:
        """Rank and push the oldest due users: nothing else is on this path (learning and the
        users collection are `Backlog`s beside it). A round that fails as a whole (the vector
        store does not answer) puts its users back (an older arrival wins) before it is
        retried; one user's failure only gives that user the fallback list."""
        while not self.model:
            await asyncio.sleep(0.2)
        embedded, self._embedded = self._embedded, []
        taken = [self.due.popitem(last=False) for _ in range(min(self.config.refresh_max, len(self.due)))]
        try:
            if embedded:
                await self._store(self.recommender.embedded, embedded)
            ready = [(u, d, Profile.from_dict(stored)) for u, d in taken if (stored := self.stored_profile(u)) is not None]
            with metrics.STAGE_SECONDS.labels("rank").time():
                lists = await self._store(self.recommender.recommend, [p for _, _, p in ready])
        except BaseException:
            self._embedded[:0] = embedded
            for user_id, due in reversed(taken):
                if (queued := self.due.get(user_id)) is not None:
                    due.merge(queued)
                self.due[user_id] = due
                self.due.move_to_end(user_id, last=False)
            raise
        with metrics.STAGE_SECONDS.labels("push").time():
            now = time.time()
            for (user_id, due, profile), items in zip(ready, lists, strict=True):
                trigger = "interaction" if due.arrived is not None else "fresh_item"
                if not self._push(user_id, items, trigger, answers=profile.offsets):
                    continue
                if due.arrived is not None:
                    metrics.INTERACTION_TO_RECS.observe(max(0.0, now - due.arrived))
                if due.published_at is not None:
                    metrics.FRESH_ITEM_SECONDS.observe(max(0.0, now - due.published_at))
            self._report_refused()
        metrics.RECS_DUE.set(len(self.due))

    def _learn(self, batches: Sequence[list[Observation]]) -> None:
        """The learner's batch (on its thread): the applied interactions, in order."""
        self.recommender.observe([o for batch in batches for o in batch], self.config.learn_max)

    def _save(self, saves: Sequence[tuple[Profile, int]]) -> None:
        """The users collection's batch (on its thread): the latest profile of each user."""
        self.recommender.save_profiles([p for p, _ in saves], [partition for _, partition in saves])

    @staticmethod
    def _dated(interaction: Interaction) -> Interaction:
        """The interaction with its time no later than `MAX_FUTURE_S` past the wall clock."""
        latest = time.time() + MAX_FUTURE_S
        if interaction.ts <= latest:
            return interaction
        metrics.TIMESTAMPS_CLAMPED.inc()
        log.warning("interaction of user %r dated %.0f, %.0f s ahead of the clock: read at +%.0f s",
                    interaction.user_id, interaction.ts, interaction.ts - time.time(), MAX_FUTURE_S)
        return interaction.model_copy(update={"ts": latest})

    async def _parse(self, event: faust.EventT) -> tuple[str, Interaction, str | None, float | None] | None:
        """An interaction from producers, or a control message (a released deferred interaction
        or a fresh-item refresh). Bad input goes to the dead-letter topic."""
        message = event.message
        if message.topic == self.config.control_topic:
            control = json.loads(event.value)
            interaction = Interaction.model_validate(control["interaction"])
            return control["kind"], interaction, control.get("origin"), control.get("published_at")
        try:
            return "interaction", decode(Interaction, event.value), None, None
        except EventError as exc:
            letter = DeadLetter.of(event.value, event.key, message.topic, message.partition, message.offset, exc.reason)
            await self.interactions_dlq.send(key=event.key, value=encode(letter))
            metrics.INTERACTIONS.labels("dead_letter").inc()
            metrics.DEAD_LETTERS.labels(message.topic).inc()
            log.warning("dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc.reason)
            return None

    def stored_profile(self, user_id: str) -> dict[str, Any] | None:
        """A user's profile as stored in the table (None for an unknown user or a fence key)."""
        if user_id.startswith(FENCE_PREFIX):
            return None
        return self.profiles.get(user_id)

    def _load(self, user_id: str) -> Profile:
        stored = self.stored_profile(user_id)
        return Profile.from_dict(stored) if stored is not None else Profile(user_id)

    @staticmethod
    def _duplicate(profile: Profile, event: faust.EventT, origin: str | None) -> bool:
        """Seen before (re-delivery), else remembered now (written with the profile). A
        released deferral (`origin` set) counts only if the profile still awaits it."""
        source = _source(event)
        if profile.already_seen(source, event.message.offset):
            return True
        profile.mark_seen(source, event.message.offset)
        return origin is not None and not profile.take_awaited(origin)

    async def _defer(
        self, profile: Profile, event: faust.EventT, interaction: Interaction, origin: str | None
    ) -> Awaitable[Any]:
        """Send to `pending` and let the profile await it; returns the delivery, to await
        before the profile is written. A release deferred again keeps its first origin."""
        message = event.message
        origin = origin or f"{message.topic}:{message.partition}:{message.offset}"
        profile.await_origin(origin)
        body = {"interaction": interaction.model_dump(), "origin": origin, "partition": message.partition}
        return await self.pending.send(key=interaction.item_id.encode(), value=json.dumps(body).encode())

    def _push(
        self, user_id: str, items: list[tuple[str, float]], trigger: str, answers: dict[str, int] | None = None
    ) -> bool:
        """Queue the user's recs; False when they fail the contract (logged and counted: the
        user's next change pushes a fresh list, and the rest of the round goes out).
        `answers`: the offsets of the user's events the profile had applied when ranked."""
        try:
            recs = Recs(
                user_id=user_id,
                items=[Rec(item_id=i, score=s) for i, s in items],
                trigger=trigger,
                model=self.model,
                generated_at=time.time(),
                answers=answers or {},
            )
        except ValidationError as exc:
            metrics.RECS_INVALID.inc()
            log.error("recs of user %r not pushed: %s", user_id, exc.errors()[0].get("msg", exc))
            return False
        if self._recs_out is None:
            self._recs_out = EventProducer(self.config.recs_kafka or {"bootstrap.servers": self.config.bootstrap_servers})
        self._recs_out.send(self.config.topics.recs, recs)  # queued; librdkafka batches and retries
        metrics.RECS_PUSHED.labels(trigger).inc()
        self.last_recs[user_id] = recs
        self.last_recs.move_to_end(user_id)
        if len(self.last_recs) > LAST_RECS_KEPT:
            self.last_recs.popitem(last=False)
        return True

    def _report_refused(self) -> None:
        """Recs the broker refused (after librdkafka's own retries): logged and counted; the
        user's next change pushes a fresh list."""
        if self._recs_out is not None:
            for error in self._recs_out.refused():
                metrics.RECS_REFUSED.inc()
                log.error("recs push refused: %s", error)

    async def _flush_recs(self, sender: Any, **_: Any) -> None:
        """Deliver the queued recs before the worker stops."""
        if self._recs_out is not None:
            try:
                await asyncio.to_thread(self._recs_out.flush, 10.0)
            except Exception:  # noqa: BLE001 - stopping anyway; say what was lost
                log.exception("recs still queued at shutdown were not all delivered")

    # --- items -------------------------------------------------------------------------
    async def _items_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            if event.message.topic == self.config.pending_topic:
                await self._handled(stream, [event], "pending interaction", lambda events: self._on_pending(events[0]))
            else:
                await self._handled(stream, [event], "embedded item", lambda events: self._on_embedded(events[0]))

    async def _on_pending(self, event: faust.EventT) -> None:
        body = json.loads(event.value)
        item_id = body["interaction"]["item_id"]
        state = self.waiting.get(item_id) or {"embedded": False, "waiting": []}
        if state["embedded"]:
            await self._release(body)
            return
        state["waiting"] = (state["waiting"] + [body])[-1000:]
        self.waiting[item_id] = state
        _fence(self.waiting, [event])

    async def _on_embedded(self, event: faust.EventT) -> None:
        try:
            item = decode(ItemEmbedded, event.value)
        except EventError as exc:
            log.warning("ignoring a malformed items.embedded message: %s", exc.reason)
            return
        self.recommender.vectors.forget(item.item_id)  # before its waiting interactions return
        self._embedded.append((item.item_id, item.created_at))
        self._wake.set()
        state = self.waiting.get(item.item_id) or {"embedded": False, "waiting": []}
        # delivered before the table forgets them (a crash in between re-releases them, which
        # the profiles' origins make harmless, instead of losing them)
        await asyncio.gather(*[await self._release(body) for body in state["waiting"]])
        self.waiting[item.item_id] = {"embedded": True, "waiting": []}
        _fence(self.waiting, [event])
        await self._fan_out(item)

    async def _release(self, body: dict[str, Any]) -> Awaitable[Any]:
        """Send a deferred interaction back to its user's partition; returns the delivery."""
        interaction = body["interaction"]
        control = {"kind": "interaction", "interaction": interaction, "origin": body["origin"]}
        return await self.control.send(
            key=interaction["user_id"].encode(), value=json.dumps(control).encode(), partition=body["partition"]
        )

    async def _fan_out(self, item: ItemEmbedded) -> None:
        """Push a fresh item to the users nearest it: a refresh through each user's own
        partition, where the profile agent recomputes and pushes their recs."""
        if not self.model or self.config.fanout_users <= 0:
            return
        vectors = await self._lookup(self.recommender.vectors.get, [item.item_id])
        vector = vectors.get(item.item_id)
        if vector is None:
            return
        users = await self._lookup(self.recommender.nearest_users, vector, self.config.fanout_users)
        metrics.FANOUT_USERS.observe(len(users))
        for user_id, _, partition in users:
            control = {
                "kind": "refresh",
                "interaction": {"user_id": user_id, "item_id": item.item_id, "event": "fresh_item", "ts": time.time()},
                "published_at": item.published_at,
            }
            await self.control.send(key=user_id.encode(), value=json.dumps(control).encode(), partition=partition)

    # --- HTTP --------------------------------------------------------------------------
    def _register_views(self) -> None:
        app = self.app

        @app.page("/metrics")
        async def metrics_view(web: Any, request: Any) -> Any:
            return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

        @app.page("/users/{user_id}")
        @app.table_route(table=self.profiles, match_info="user_id")
        async def user_view(web: Any, request: Any, user_id: str) -> Any:
            stored = self.stored_profile(user_id)
            if stored is None:
                return web.json({"error": f"unknown user {user_id!r}"}, status=404)
            profile = Profile.from_dict(stored)
            return web.json(
                {
                    "user_id": user_id,
                    "interactions": profile.count,
                    "updated_at": profile.updated_at,
                    "has_profile_vector": profile.vector is not None,
                    "recent": [{"item_id": i, "event": e, "ts": t} for i, e, t in reversed(profile.history)],
                }
            )

        @app.page("/users/{user_id}/recommendations")
        @app.table_route(table=self.profiles, match_info="user_id")
        async def recs_view(web: Any, request: Any, user_id: str) -> Any:
            raw_k = request.query.get("k", str(self.config.k))
            if not raw_k.isdigit() or not 1 <= int(raw_k) <= 1000:
                return web.json({"error": "k must be an integer from 1 to 1000"}, status=400)
            stored = self.stored_profile(user_id)
            if stored is None:
                return web.json({"error": f"unknown user {user_id!r}"}, status=404)
            lists = await self._store(self.recommender.recommend, [Profile.from_dict(stored)], int(raw_k))
            return web.json(
                {
                    "user_id": user_id,
                    "trigger": "request",
                    "model": self.model,
                    "items": [{"item_id": i, "score": s} for i, s in lists[0]],
                }
            )
