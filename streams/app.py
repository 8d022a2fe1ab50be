"""The Faust app: live user profiles, pushed recommendations, fresh-item fan-out, HTTP views.

Topics and agents:
- `interactions` (+ the internal `control` topic, co-partitioned): the profile agent. Batches of
  events (coalesced within a short window) update the `profiles` table once per user per batch
  and mark the users' recs as due.
- the recs refresher (a task): takes the users whose recs are due, oldest first, at most
  `refresh_max` per round, ranks them with one vector-store search for all of them, and pushes
  their `recs`. The ranking runs in a process of its own (`streams.ranking_process`, with two
  rounds in flight) or, with `ranking_process` off, on a thread of this one. A user marked again while due keeps their place (coalescing): when interactions
  come faster than the vector store can answer, a push answers several of a user's interactions
  and the profiles still keep up with the stream. Recs are derived state: a worker that dies
  may skip a due push, and the user's next interaction or fresh item brings one. They leave
  through their own producer (confluent-kafka, batching in its own thread), not Faust's: Faust's
  producer carries the tables' changelogs (`streams.changelog`) and is flushed before every
  offset commit, and a push must not wait for that.
  An interaction whose item has no vector yet is deferred to the `pending` topic (keyed by item)
  and comes back through `control` once the item is embedded: no signal is lost.
- `items.embedded` (+ `pending`, co-partitioned by item_id): the item agent. It releases the
  interactions waiting for the item.
- `items.embedded`, every partition: the item feed (`streams.item_feed`, a thread of its own)
  keeps this worker's in-process replica of the items collection current, so that the hot path
  searches memory instead of Milvus (`item_replica`), tells the ranker's fresh source of every
  item, and fans each fresh item out to this worker's share of the users nearest it
  (`streams.user_index`): their recs are marked due here, with no message in between.

At-least-once: the profile remembers the last offset it applied per source partition, and the
origins of the deferred interactions it still awaits, so a re-delivered event or release is never
counted twice (`streams.profile_updates`, free of Faust); that needs each partition's events in
offset order and offsets committed only for handled events (`streams.delivery`, which also holds
the embedded broker's work-arounds, behind `StreamsConfig.broker_shims`).

Control messages go to the user's own interactions partition (stored with the user's vector),
so one worker owns all of a user's events whatever partitioner the producers use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
from aiokafka.errors import IllegalStateError, KafkaError
from prometheus_client import CONTENT_TYPE_LATEST

from streams import metrics
from streams.backoff import Backoff
from streams.background import Backlog
from streams.changelog import ChangelogWriter
from streams.delivery import FENCE_PREFIX, BrokerShims, Delivery
from streams.faust_fixes import SourceKeyRouter
from streams.item_feed import ItemFeed
from streams.observations import ObservationFeed
from streams.observations import encode as encode_observations
from streams.live_profiles import LiveProfiles
from streams.profile import Profile, ProfileRule
from streams.shown import Shown
from streams.profile_updates import Deferral, ProfileUpdater, Received
from streams.user_index import UserIndex, fanout_share
from streams.rank import RankConfig
from streams.ranking_process import RankerSpec, RankingProcess
from streams.recommend import Observation, Recommender
from streams.variants import DEFAULT_VARIANT, Variant, online_hit
from pydantic import ValidationError

from topics import DeadLetter, EventError, Interaction, ItemEmbedded, Rec, Recs, TopicNames, decode, encode
from topics.connection import KafkaConnection
from topics.producer import EventProducer
from vectorstore import ReplicaVectorStore, VectorStore

log = logging.getLogger("vlm4rec.streams")

LAST_RECS_KEPT = 10_000
#: fresh items a due user keeps from their fan-outs (the ranker places the newest few)
FRESH_KEPT = 10
#: the largest message of the observations topic: half of Kafka's default 1 MB limit
OBSERVATIONS_MESSAGE_BYTES = 512 * 1024
#: how far ahead of this worker's clock an interaction may be dated; later ones are read at this
#: limit, so that one event dated in the year 5000 (valid by the contract) cannot move the
#: stream clock past every other event and silence popularity and freshness for everyone
MAX_FUTURE_S = 86400.0


@dataclass(frozen=True)
class StreamsConfig:
    """Plain values the composition root hands down."""

    topics: TopicNames
    #: how the stream processor (Faust), its recs producer and its item feed (librdkafka) reach the brokers
    connection: KafkaConnection = field(default_factory=KafkaConnection)
    app_id: str = "vlm4rec-streams"
    store: str = "memory://"
    #: Faust's own folder (its table stores and version marker); empty: "<app_id>-data" in the
    #: working directory, Faust's default, which litters wherever the command was started
    data_dir: str = ""
    session_timeout_s: float = 6.0
    partitions: int = 4
    replication: int = 1  # of the topics Faust creates itself (table changelogs)
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    k: int = 20
    fanout_users: int = 50
    batch_max: int = 1000
    batch_within_s: float = 0.01  # 0.05 cost 30 ms of every interaction below 500/s (docs/streaming.md)
    refresh_max: int = 256
    fetch_max_wait_ms: int = 100
    learn_max: int = 32
    learn_every_s: float = 1.0  # the learner's pace (`Backlog`)
    neighbour_ttl_s: float = 60.0
    rule: ProfileRule = field(default_factory=ProfileRule)
    popularity_half_life_s: float = 6 * 3600
    rank: RankConfig = field(default_factory=RankConfig)
    variants: tuple[Variant, ...] = ()  # ranking variants served side by side (`streams.variants`)
    #: learn from every stream processor's observations, not only this one's users'
    #: (`streams.observations`)
    learn_from_all: bool = False
    #: search an in-process replica of the items collection (vectorstore/replica.py) instead
    #: of the vector store; off for catalogues beyond this worker's memory
    item_replica: bool = True
    #: rank in a process of its own (`streams.ranking_process`), not on a thread of this one
    ranking_process: bool = False
    #: the embedded broker's work-arounds (`streams.delivery.BrokerShims`); off against Kafka
    broker_shims: bool = True
    #: the largest record batch of Faust's producer (table changelogs, deferrals). aiokafka
    #: sends at most one batch per partition in a request and one request at a time per
    #: broker, so a burst of profile writes moves one batch per partition per round trip:
    #: Faust's 16 KB default let a 1,000/s stream's changelog fall behind (tests/test_changelog_batching.py)
    producer_batch_bytes: int = 512 * 1024

    @property
    def pending_topic(self) -> str:
        return f"{self.app_id}-pending"

    @property
    def control_topic(self) -> str:
        return f"{self.app_id}-control"

    @property
    def observations_topic(self) -> str:
        return f"{self.app_id}-observations"

    def internal_topics(self) -> list[str]:
        return [self.pending_topic, self.control_topic]


def _partition_of(stored: Any) -> int | None:
    """A stored profile's stream partition: the one its events came through ("topic:partition"
    keys of its offsets; the user's interactions and control messages share it)."""
    offsets = stored.get("offsets") if isinstance(stored, dict) else None
    for source in offsets or ():
        return int(str(source).rsplit(":", 1)[1])
    return None


@dataclass
class Due:
    """A user whose recs are due: when the oldest interaction not yet answered by a push
    reached the broker (None: only a fresh item asked), when that fresh item was published,
    the fresh items fanned out to the user (oldest first: `Request.place`), and the user's
    stream partition (kept with their vector for the fan-out)."""

    partition: int
    arrived: float | None = None
    published_at: float | None = None
    fresh: tuple[str, ...] = ()

    def merge(self, other: Due) -> None:
        """Keep the oldest times: latency is counted from the first unanswered event. `other`
        is the newer."""
        self.partition = other.partition
        self.fresh = (self.fresh + other.fresh)[-FRESH_KEPT:]
        if other.arrived is not None:
            self.arrived = other.arrived if self.arrived is None else min(self.arrived, other.arrived)
        if other.published_at is not None:
            self.published_at = other.published_at if self.published_at is None else min(self.published_at, other.published_at)


class StreamsApp:
    """Builds the Faust app around a `Recommender`, in this process or a ranking process of
    its own (`config.ranking_process`, which needs `store`: a picklable factory of another
    client of the items collection, for that process); the app object is `self.app`."""

    def __init__(self, config: StreamsConfig, items: VectorStore, store: Callable[[], VectorStore] | None = None) -> None:
        self.config = config
        replica = ReplicaVectorStore(items) if config.item_replica else None
        items = items if replica is None else replica
        self.items = items
        if config.ranking_process and store is None:
            raise ValueError("a ranking process needs a factory of the items store")
        spec = RankerSpec(
            store or (lambda: items), replica=config.item_replica, k=config.k, rank=config.rank,
            neighbour_ttl_s=config.neighbour_ttl_s, variants=config.variants,
            popularity_half_life_s=config.popularity_half_life_s,
        )
        self.ranking: Recommender | RankingProcess = (
            RankingProcess(spec, items) if config.ranking_process else spec.recommender(items)
        )
        # this worker's users, for the fan-out of every fresh item (streams.item_feed)
        self.user_index = UserIndex()
        self.item_feed = ItemFeed(
            replica, config.topics.items_embedded, self._kafka(), f"{config.app_id}-item-feed", self._on_items
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fanout_share = 0  # of `fanout_users`, by the interactions partitions this worker owns
        self.model = ""
        self.last_recs: OrderedDict[str, Shown] = OrderedDict()  # latest push per user, bounded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vector-store")  # calls in order
        # the profile agent's vector lookups, so that they never wait behind a refresh round
        self._fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="vector-fetch")
        self.due: OrderedDict[str, Due] = OrderedDict()  # oldest first
        # beside the hot path (streams.background): the ranker learns from the applied
        # interactions (batches in order)
        self.learner: Backlog[int, list[Observation]] = Backlog("learn", self._learn, retry=False, every_s=config.learn_every_s)
        self._batches = 0
        # with shared learning the learner is fed by the observations topic, this worker's own included
        self.observation_feed = (
            ObservationFeed(config.observations_topic, self._kafka(), f"{config.app_id}-observation-feed", self._on_observed)
            if config.learn_from_all
            else None
        )
        self._observations_out: EventProducer | None = None
        # embedded items (item_id, created_at) not yet told to the ranker, whose state only the
        # vector-store thread touches; queued so that the item feed never waits behind a round
        self._embedded: list[tuple[str, float | None]] = []
        self.live = LiveProfiles()  # the table's profiles as objects, not parsed again per read
        self.updater = ProfileUpdater(config.rule, self._stored, self.ranking.observation)
        self._wake = asyncio.Event()
        self.shims = BrokerShims(config.broker_shims, config.fetch_max_wait_ms)
        self.shims.install()
        self.changelog = ChangelogWriter(last_alone=self.shims.enabled)
        self.app = faust.App(
            config.app_id,
            broker=config.connection.faust_broker(),
            broker_credentials=config.connection.faust_credentials(),
            store=config.store,
            **({"datadir": self._faust_dir(config)} if config.data_dir else {}),
            topic_partitions=config.partitions,
            topic_replication_factor=config.replication,
            web_host=config.web_host,
            web_port=config.web_port,
            web_bind=config.web_host,
            broker_session_timeout=config.session_timeout_s,
            broker_heartbeat_interval=max(0.5, config.session_timeout_s / 3),
            producer_linger_ms=2,
            producer_max_batch_size=config.producer_batch_bytes,
            stream_wait_empty=False,
            table_cleanup_interval=60.0,
            Router=SourceKeyRouter,  # user requests reach the worker that holds the user (see there)
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
        self.app.task(self._start_feeds)
        self.app.task(self._refresher)
        self.app.task(self.learner.run)
        self.app.timer(5.0)(self._report_lag)
        self._register_views()
        # the topics the agents consume (their offsets are what at-least-once is about)
        self.inputs = frozenset({t.interactions, t.items_embedded, *config.internal_topics()})
        self.delivery = Delivery(self.app, self.inputs)
        self.delivery.install()
        self.app.on_before_shutdown.connect(self._flush_recs)
        self.app.on_before_shutdown.connect(self._stop_feeds)
        self.app.on_partitions_revoked.connect(self._users_revoked)
        self.app.on_rebalance_complete.connect(self._users_assigned)
        self._recs_out: EventProducer | None = None  # made at warm-up or the first push (it starts threads)

    async def _store(self, fn: Any, *args: Any) -> Any:
        """Vector-store calls are blocking gRPC; keep them off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _lookup(self, fn: Any, *args: Any) -> Any:
        """A vector-store lookup of the agents, on its own thread: never behind a recs round."""
        return await asyncio.get_running_loop().run_in_executor(self._fetch_pool, fn, *args)

    async def _start_feeds(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.item_feed.start()
        if self.observation_feed is not None:
            self.observation_feed.start()

    async def _stop_feeds(self, sender: Any, **_: Any) -> None:
        await asyncio.to_thread(self.item_feed.stop)
        if isinstance(self.ranking, RankingProcess):
            await asyncio.to_thread(self.ranking.close)
        if self.observation_feed is not None:
            await asyncio.to_thread(self.observation_feed.stop)
        if self._observations_out is not None:
            try:
                await asyncio.to_thread(self._observations_out.flush, 5.0)
            except Exception as exc:  # noqa: BLE001 - learning is best effort; stopping goes on
                log.warning("observations not all published at shutdown: %s", exc)

    async def _discover_space(self) -> None:
        """The embedding workers choose the item space; the stream processor reads it."""
        while True:
            try:
                space = await self._store(self.items.space)
            except Exception as exc:  # noqa: BLE001 - a task that raises crashes the whole app
                log.warning("vector store not answering (%s); asking again in 2s", exc)
                await asyncio.sleep(2.0)
                continue
            if space is not None:
                self.model = f"{space[1]}+profile-mean"
                log.info("item space: dim=%d model=%s strategy=%s", *space)
                await self._warm_up()
                return
            log.info("waiting for the items collection (start an embedding worker)")
            await asyncio.sleep(2.0)

    async def _warm_up(self) -> None:
        """Run the hot path once before the first interaction needs it: the recs producer's
        connection (metadata, idempotent producer id) and one ranking over stored items (the
        store's and the ranker's first calls). Without it the first pushes after a start took
        1.3 s, 0.8 s and 0.3 s, against about 80 ms at idle after them."""
        try:
            await asyncio.to_thread(self._recs_producer().connect)
            await self._store(self.ranking.warm_up)
        except Exception as exc:  # noqa: BLE001 - only the first round pays for it
            log.warning("warm-up ranking failed (%s); the first round pays for it", exc)

    @staticmethod
    def _faust_dir(config: StreamsConfig) -> str:
        """Faust makes only the last level of its folder; the levels above are ours."""
        folder = Path(config.data_dir) / config.app_id
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def _kafka(self) -> dict[str, Any]:
        return self.config.connection.librdkafka()

    def _recs_producer(self) -> EventProducer:
        if self._recs_out is None:
            self._recs_out = EventProducer(self._kafka())
        return self._recs_out

    async def _report_lag(self) -> None:
        """Messages not yet processed on each input partition this worker owns: the end offset
        less the offset after the last message handed to a handler (not the consumer's fetch
        position, which runs ahead by whatever is buffered). The internal `control` and
        `pending` topics count too: a fan-out storm queues there. The embedded broker reports
        end offsets one low, so lag there reads one low per partition (clamped at zero)."""
        self.learner.report()
        await self._report_lag_of(self.app.consumer)

    async def _report_lag_of(self, consumer: Any) -> None:
        """`_report_lag` for `consumer`. A rebalance may take a partition away between the
        assignment read here and the calls after it (aiokafka then raises IllegalStateError,
        which once crashed the stream processor from this timer while a second one joined):
        a report is best effort, so such a partition is skipped and a failed call leaves the
        gauges as they were until the next report."""
        mine = [tp for tp in consumer.assignment() if tp.topic in self.inputs]
        if not mine:
            return
        try:
            highwaters = await consumer.highwaters(*mine)
        except KafkaError as exc:
            log.info("consumer lag not reported this time: %s", exc)
            return
        for tp in mine:
            done = self.delivery.processed(tp)
            if done is None:
                try:
                    done = await consumer.position(tp)  # nothing handled yet since this worker started
                except IllegalStateError:  # no longer this worker's
                    continue
            if done is not None and tp in highwaters:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwaters[tp] - done))

    # --- profiles ----------------------------------------------------------------------
    async def _profiles_agent(self, stream: faust.StreamT) -> None:
        async for events in stream.take_events(self.config.batch_max, within=self.config.batch_within_s):
            await self._handled(stream, events, "interaction batch", self._process_interactions)

    async def _handled(self, stream: faust.StreamT, events: list[faust.EventT], what: str, handler: Any) -> None:
        """Run `handler` on the events (those in offset order, `Delivery.arrived`) and only
        then let their offsets be committed (`Delivery.handled`). Faust acks a `take_events`
        batch (and the current event of `events()`) in a `finally`, even when the worker is
        stopped mid-handler (SIGTERM, rebalance), which would commit events that were never
        applied; holding one extra reference per message until the handler is done leaves them
        uncommitted, so they are re-delivered to whoever owns the partition next."""
        events = await self.delivery.arrived(events)
        if not events:
            return
        for event in events:
            event.message.incref()
        await self._until_done(what, handler, events)
        for event in events:
            self.delivery.handled(event.message)
            await stream.ack(event)

    async def _until_done(self, what: str, handler: Any, *args: Any) -> None:
        """Faust acknowledges a batch even when its handler raises, so a failure here would
        drop events: retry instead (a vector store that is down is waited for). Re-running is
        safe because profiles remember which offsets they applied."""
        backoff = Backoff()
        while True:
            try:
                await handler(*args)
                return
            except Exception:  # noqa: BLE001 - anything; the retry is the handling
                delay = backoff.next()
                log.exception("%s failed; retrying in %.1fs", what, delay)
                await asyncio.sleep(delay)

    async def _process_interactions(self, events: list[faust.EventT]) -> None:
        while not self.model:
            await asyncio.sleep(0.2)
        taken, clock = time.time(), time.monotonic()
        received, took = metrics.INTERACTION_PATH.labels("received"), metrics.INTERACTION_PATH.labels("taken")
        for event in events:
            message = event.message
            took.observe(max(0.0, taken - message.timestamp))
            if message.time_in is not None:  # Faust's monitor stamps it (monotonic) as the consumer hands it over
                received.observe(max(0.0, taken - (clock - message.time_in) - message.timestamp))
        with metrics.STAGE_SECONDS.labels("apply").time():
            await self._apply(events)
        metrics.RECS_DUE.set(len(self.due))
        self._wake.set()

    async def _apply(self, events: list[faust.EventT]) -> None:
        """Apply a batch to the profiles (`ProfileUpdater`) and mark the users whose recs are due."""
        batch: list[Received[faust.EventT]] = []
        for event in events:
            parsed = await self._parse(event)
            if parsed is None:
                continue
            kind, interaction, origin, published_at = parsed
            message = event.message
            batch.append(
                Received(
                    kind, self._dated(interaction), message.topic, message.partition, message.offset,
                    message.timestamp, event, origin, published_at,
                )
            )
        item_ids = self.updater.items_needed(batch)
        with metrics.STAGE_SECONDS.labels("apply_lookup").time():
            vectors = await self._lookup(self.ranking.vectors.get, item_ids) if item_ids else {}
        update = self.updater.update(batch, vectors)
        metrics.INTERACTIONS.labels("duplicate").inc(update.duplicates)
        metrics.INTERACTIONS.labels("deferred").inc(len(update.deferred))
        metrics.INTERACTIONS.labels("applied").inc(len(update.applied))
        self.ranking.popular([(interaction.item_id, interaction.ts) for interaction in update.applied])
        for interaction in update.applied:
            self._judge(interaction)
        # Deferrals are delivered before the profiles that mark their events seen: a crash in
        # between would otherwise skip the re-delivered events as duplicates and lose them.
        await asyncio.gather(*[await self._defer(deferral) for deferral in update.deferred])
        writes = []
        for user_id, (profile, event) in update.profiles.items():
            stored = profile.to_dict()
            writes.append((event.message.partition, user_id, stored))
            self.live.written(user_id, stored, profile)
            metrics.PROFILE_UPDATES.inc()
            self.user_index.put(user_id, profile.as_array(), event.message.partition)
        if update.observed:
            self._observed(update.observed)
        applied: list[Due] = []
        for user_id, (_, event) in update.profiles.items():
            if user_id in update.arrived:
                applied.append(Due(event.message.partition, arrived=update.arrived[user_id]))
                self._mark_due(user_id, applied[-1])
        self._path("applied", applied)
        for user_id, (partition, published_at) in update.refreshed.items():
            self._mark_due(user_id, Due(partition, published_at=published_at))
        # recs need the profiles in the store, which `write` sets before it first waits; not
        # their changelog: a round may rank while the records are handed to a busy producer
        self._wake.set()
        with metrics.STAGE_SECONDS.labels("apply_write").time():
            await self.changelog.write(self.app.producer, self.profiles, writes)

    def _judge(self, interaction: Interaction) -> None:
        """Online HR@k per ranking variant: was a positive interaction's item in the list last
        pushed to its user? Users this worker has pushed nothing to (new, or before a
        rebalance gave it their partition) are not judged."""
        shown = self.last_recs.get(interaction.user_id)
        if shown is None or self.config.rule.weight(interaction.event, interaction.value) <= 0:
            return
        variant = shown.variant or DEFAULT_VARIANT
        metrics.ONLINE_JUDGED.labels(variant).inc()
        for k, hit in online_hit(shown.item_ids, interaction.item_id).items():
            if hit:
                metrics.ONLINE_HITS.labels(variant, str(k)).inc()

    def _mark_due(self, user_id: str, due: Due) -> None:
        if (queued := self.due.get(user_id)) is not None:
            queued.merge(due)
        else:
            self.due[user_id] = due

    # --- recs ----------------------------------------------------------------------------
    async def _refresher(self) -> None:
        """Rounds one after the other; with a ranking process, two at a time: the next round
        is sent while the child ranks this one, and this one is pushed while it ranks the next
        (the child ranks them in order, so a user's pushes keep their order)."""
        in_flight: set[asyncio.Future[Any]] = set()
        most = 2 if isinstance(self.ranking, RankingProcess) else 1
        try:
            while True:
                if len(in_flight) < most and (self.due or self._embedded):
                    in_flight.add(asyncio.ensure_future(self._until_done("recs refresh", self._refresh_round)))
                    await asyncio.sleep(0)  # the round takes its users before the next is started
                    continue
                woken = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait(in_flight | {woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                self._wake.clear()
                in_flight -= done
        finally:  # stopping: the rounds in flight stop with the refresher (their users are put back)
            for round_ in in_flight:
                round_.cancel()

    async def _refresh_round(self) -> None:
        """Rank and push the oldest due users: nothing else is on this path (learning is a
        `Backlog` beside it, the item feed a thread of its own). A round that fails as a whole (the vector
        store does not answer) puts its users back (an older arrival wins) before it is
        retried; one user's failure only gives that user the fallback list."""
        while not self.model:
            await asyncio.sleep(0.2)
        embedded, self._embedded = self._embedded, []
        taken = [self.due.popitem(last=False) for _ in range(min(self.config.refresh_max, len(self.due)))]
        try:
            if embedded:
                await self._store(self.ranking.embedded, embedded)
            ready = [(u, d, profile) for u, d in taken if (profile := self.live.read(u, self.stored_profile(u))) is not None]
            self._path("ranking", [d for _, d, _ in ready])
            with metrics.STAGE_SECONDS.labels("rank").time():
                lists = await self._ranked([p for _, _, p in ready], [d.fresh for _, d, _ in ready])
            self._path("ranked", [d for _, d, _ in ready])
        except BaseException:
            self._embedded[:0] = embedded
            self._put_back(taken)
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

    async def _ranked(self, profiles: list[Profile], places: list[tuple[str, ...]]) -> list[list[tuple[str, float]]]:
        if isinstance(self.ranking, RankingProcess):
            return await asyncio.wrap_future(self.ranking.submit_recommend(profiles, None, places))
        return await self._store(self.ranking.recommend, profiles, None, places)

    def _put_back(self, taken: Sequence[tuple[str, Due]]) -> None:
        """Users of a round that failed go back to the front of the queue, merged with
        anything that made them due since."""
        for user_id, due in reversed(taken):
            if (queued := self.due.get(user_id)) is not None:
                due.merge(queued)
            self.due[user_id] = due
            self.due.move_to_end(user_id, last=False)

    @staticmethod
    def _path(point: str, dues: Sequence[Due]) -> None:
        """How long after their interactions reached the broker the due users got to `point`."""
        now, hop = time.time(), metrics.INTERACTION_PATH.labels(point)
        for due in dues:
            if due.arrived is not None:
                hop.observe(max(0.0, now - due.arrived))

    def _observed(self, observations: list[Observation]) -> None:
        """A batch's observations: to this worker's learner, or with shared learning to the
        observations topic, which every worker's learner follows (`_on_observed`)."""
        if self.observation_feed is None:
            self._batches += 1
            self.learner.put(self._batches, observations)
            return
        if self._observations_out is None:
            self._observations_out = EventProducer(self._kafka())
        self._publish_observations(observations)
        for error in self._observations_out.refused():
            metrics.LEARN_FAILURES.inc()
            log.warning("observations not published (learning is best effort): %s", error)

    def _publish_observations(self, observations: list[Observation]) -> None:
        """In messages of at most `OBSERVATIONS_MESSAGE_BYTES` (halved until they fit; a sampled
        observation carries the user's whole seen list, and until the first fit every one is
        sampled). Whatever cannot be sent is counted and logged, never raised: the batch's
        profiles are written, and learning is best effort."""
        assert self._observations_out is not None
        value = encode_observations(observations)
        if len(value) > OBSERVATIONS_MESSAGE_BYTES and len(observations) > 1:
            half = len(observations) // 2
            self._publish_observations(observations[:half])
            self._publish_observations(observations[half:])
            return
        try:
            self._observations_out.send_raw(self.config.observations_topic, value)
        except Exception as exc:  # noqa: BLE001 - e.g. one observation beyond the broker's message size
            metrics.LEARN_FAILURES.inc()
            log.warning("%d observations not published (learning is best effort): %s", len(observations), exc)

    def _on_observed(self, observations: list[Observation]) -> None:
        """The observation feed's batch (on its thread), for the learner on the event loop."""
        assert self._loop is not None

        def put() -> None:
            self._batches += 1
            self.learner.put(self._batches, observations)

        self._loop.call_soon_threadsafe(put)

    def _learn(self, batches: Sequence[list[Observation]]) -> None:
        """The learner's batch (on its thread): the applied interactions, in order."""
        self.ranking.observe([o for batch in batches for o in batch], self.config.learn_max)

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

    def _stored(self, user_id: str) -> Profile | None:
        """The user's profile for the updater to change: a copy, so that a batch that fails
        half-way leaves what the table and `live` hold as they were."""
        profile = self.live.read(user_id, self.stored_profile(user_id))
        return None if profile is None else profile.copy()

    async def _defer(self, deferral: Deferral) -> Awaitable[Any]:
        """Send to `pending`; returns the delivery, to await before the profile that awaits
        the deferral is written."""
        interaction = deferral.interaction
        body = {"interaction": interaction.model_dump(), "origin": deferral.origin, "partition": deferral.partition}
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
                variant=self.ranking.variant_of(user_id),
            )
        except ValidationError as exc:
            metrics.RECS_INVALID.inc()
            log.error("recs of user %r not pushed: %s", user_id, exc.errors()[0].get("msg", exc))
            return False
        self._recs_producer().send(self.config.topics.recs, recs)  # queued; librdkafka batches and retries
        metrics.RECS_PUSHED.labels(trigger).inc()
        self.last_recs[user_id] = Shown.of(recs)
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
        await self.changelog.write(self.app.producer, self.waiting, [(event.message.partition, item_id, state)])

    async def _on_embedded(self, event: faust.EventT) -> None:
        try:
            item = decode(ItemEmbedded, event.value)
        except EventError as exc:
            log.warning("ignoring a malformed items.embedded message: %s", exc.reason)
            return
        self.ranking.vectors.forget(item.item_id)  # before its waiting interactions return
        state = self.waiting.get(item.item_id) or {"embedded": False, "waiting": []}
        # delivered before the table forgets them (a crash in between re-releases them, which
        # the profiles' origins make harmless, instead of losing them)
        await asyncio.gather(*[await self._release(body) for body in state["waiting"]])
        await self.changelog.write(self.app.producer, self.waiting, [(event.message.partition, item.item_id, {"embedded": True, "waiting": []})])

    async def _release(self, body: dict[str, Any]) -> Awaitable[Any]:
        """Send a deferred interaction back to its user's partition; returns the delivery."""
        interaction = body["interaction"]
        control = {"kind": "interaction", "interaction": interaction, "origin": body["origin"]}
        return await self.control.send(
            key=interaction["user_id"].encode(), value=json.dumps(control).encode(), partition=body["partition"]
        )

    def _on_items(self, items: list[ItemEmbedded]) -> None:
        """Every embedded item, from the item feed's thread: what was cached of it is stale,
        the ranker's fresh source is told, and a fresh item goes to this worker's share of the
        users nearest it (`streams.user_index`), whose recs are marked due on the loop."""
        ids = [item.item_id for item in items]
        self.ranking.forget(ids)
        share = self._fanout_share if self.model else 0
        vectors = self.ranking.vectors.get(ids) if share else {}
        targets = [
            (item, self.user_index.nearest(vectors[item.item_id], share) if item.item_id in vectors else [])
            for item in items
        ]
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fanned_out, targets)

    def _fanned_out(self, targets: list[tuple[ItemEmbedded, list[tuple[str, float, int]]]]) -> None:
        for item, users in targets:
            self._embedded.append((item.item_id, item.created_at))
            metrics.FANOUT_USERS.observe(len(users))
            for user_id, _, partition in users:
                self._mark_due(user_id, Due(partition, published_at=item.published_at, fresh=(item.item_id,)))
        metrics.RECS_DUE.set(len(self.due))
        self._wake.set()

    async def _users_revoked(self, sender: Any, revoked: set[Any], **_: Any) -> None:
        self.user_index.drop_partitions({tp.partition for tp in revoked if tp.topic == self.config.topics.interactions})

    async def _users_assigned(self, sender: Any, **_: Any) -> None:
        """After a rebalance and the tables' recovery: the index holds the users of the
        partitions this worker owns now, read from the profile table."""
        owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.config.topics.interactions}
        self._fanout_share = fanout_share(self.config.fanout_users, len(owned), self.config.partitions)
        entries = []
        for user_id, stored in list(self.profiles.items()):
            partition = _partition_of(stored)
            if partition in owned and not str(user_id).startswith(FENCE_PREFIX):
                profile = self.live.read(str(user_id), stored)
                entries.append((str(user_id), profile.as_array() if profile is not None else None, partition))
        self.user_index.replace(entries)
        log.info("fan-out: %d users on partitions %s, %d per fresh item", len(self.user_index), sorted(owned), self._fanout_share)

    # --- HTTP --------------------------------------------------------------------------
    def _register_views(self) -> None:
        app = self.app

        @app.page("/metrics")
        async def metrics_view(web: Any, request: Any) -> Any:
            relayed = self.ranking.relayed() if isinstance(self.ranking, RankingProcess) else []
            return web.bytes(metrics.exposition(relayed), content_type=CONTENT_TYPE_LATEST.split(";")[0])

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
            lists = await self._store(self.ranking.recommend, [Profile.from_dict(stored)], int(raw_k))
            return web.json(
                {
                    "user_id": user_id,
                    "trigger": "request",
                    "model": self.model,
                    "items": [{"item_id": i, "score": s} for i, s in lists[0]],
                }
            )
