"""Prometheus metrics of the stream processor (served on the Faust web server's /metrics)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

# Fine between 50 ms and 1 s, where the hot path's p99 lives: a quantile is interpolated
# linearly inside its bucket, so with a 100-250 ms bucket a p99 that moves from 99 to 105 ms
# read as 95 -> 150 ms (histogram_quantile, Grafana and the soak all read these buckets).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)

INTERACTIONS = Counter(
    "vlm4rec_streams_interactions_total",
    "Interactions consumed, by outcome",
    ["outcome"],  # applied | duplicate | deferred | dead_letter
)
PROFILE_UPDATES = Counter("vlm4rec_streams_profile_updates_total", "Profile table writes (coalesced per user and batch)")
SEARCH_BATCH = Histogram(
    "vlm4rec_streams_search_batch_size",
    "Queries per vector-store search call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
SEARCH_SECONDS = Histogram(
    "vlm4rec_streams_search_seconds",
    "The vector-store work of one ranking round, per ranking variant: the batched profile "
    "search, the vectors it needs and the neighbour searches of recent items not cached",
    ["collection"],
    buckets=LATENCY_BUCKETS,
)
RECS_PUSHED = Counter("vlm4rec_streams_recs_pushed_total", "Recommendation lists pushed to the recs topic", ["trigger"])
RECS_REFUSED = Counter("vlm4rec_streams_recs_refused_total", "Recommendation lists the broker refused (after retries)")
FANOUT_USERS = Histogram(
    "vlm4rec_streams_fanout_users",
    "Users a fresh item was pushed to",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500),
)
INTERACTION_TO_RECS = Histogram(
    "vlm4rec_streams_interaction_to_recs_seconds",
    "From an interaction's arrival on the topic (Kafka timestamp) to its user's recs published",
    buckets=LATENCY_BUCKETS,
)
INTERACTION_PATH = Histogram(
    "vlm4rec_streams_interaction_path_seconds",
    "From an interaction's arrival on the topic (Kafka timestamp) to each point of the hot "
    "path, so that the slowest hop is named: received (Faust's consumer handed it to the "
    "stream; one sample per event), taken (its batch reached the profile agent; one "
    "sample per event), then per user, from the oldest interaction not yet answered: applied "
    "(its profile written in memory, recs due), ranking (the round that serves it began), "
    "ranked (its list is ready); interaction_to_recs is the last hop, the push. A batch or "
    "round that is retried is counted again",
    ["point"],
    buckets=LATENCY_BUCKETS,
)
FRESH_ITEM_SECONDS = Histogram(
    "vlm4rec_streams_fresh_item_seconds",
    "From an item's publish on items.new to its first push to users (embedding included)",
    buckets=LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "vlm4rec_streams_consumer_lag",
    "Messages behind the end of the topic, per partition (the embedded broker reports one low)",
    ["topic", "partition"],
)
RECS_DUE = Gauge("vlm4rec_streams_recs_due", "Users whose recs are due (waiting for a refresh round)")
GC_PAUSE_SECONDS = Histogram(
    "vlm4rec_streams_gc_pause_seconds",
    "Python garbage collections of the stream processor's main process, by generation: each "
    "stops every thread, the hot path's included (streams.gc_pauses)",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
STAGE_SECONDS = Histogram(
    "vlm4rec_streams_stage_seconds",
    "Time per batch or round in each stage. The hot path: apply (profile agent: parse, "
    "vectors, profiles, table), rank (candidates incl. searches, features, scores), push. "
    "rank_wait is the part of rank spent waiting for the ranker's lock, held by the learner; "
    "apply_lookup and apply_write the parts of apply spent on the item vectors it needs and on "
    "handing the profiles' changelog records to the producer (streams.changelog). "
    "Beside it: learn (training groups and counts), refit (fitting a candidate model)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
BACKGROUND_LAG = Gauge(
    "vlm4rec_streams_background_lag_seconds",
    "How stale the work beside the hot path is: age of the oldest applied interaction not yet "
    "learnt from (learn); 0 when caught up",
    ["task"],
)
REFITS = Counter(
    "vlm4rec_streams_refits_total",
    "Ranking-model refits, by outcome: accepted, or the reason the current model stayed",
    ["outcome"],
)
TRAINING_GROUPS_REFUSED = Counter(
    "vlm4rec_streams_training_groups_refused_total", "Training groups dropped for non-finite features"
)
RANKER_INTERACTIONS = Counter(
    "vlm4rec_streams_ranker_interactions_total",
    "Interactions folded into this processor's ranker (with shared learning: every processor's)",
)
OBSERVATIONS_REFUSED = Counter(
    "vlm4rec_streams_observations_refused_total", "Observation batches from the observations topic that could not be read"
)
LEARN_FAILURES = Counter(
    "vlm4rec_streams_learn_failures_total",
    "Learner batches whose training groups could not be built (their interactions are still counted)",
)
RANK_FALLBACKS = Counter(
    "vlm4rec_streams_rank_fallbacks_total",
    "Users whose ranking failed or gave non-finite scores, served the fallback list (content, else popular)",
)
RECS_INVALID = Counter(
    "vlm4rec_streams_recs_invalid_total", "Recommendation lists not pushed because they failed the Recs contract"
)
TIMESTAMPS_CLAMPED = Counter(
    "vlm4rec_streams_timestamps_clamped_total",
    "Interactions dated further ahead of the wall clock than allowed, read at the allowed limit",
)
FRESH_PLACES = Gauge(
    "vlm4rec_streams_fresh_places",
    "Of the first 10 places, what the stream has earned items with at most one interaction, by tail rule: "
    "places merged from content's ranking of them (earned), and content's own picks among them every list keeps "
    "(content_picks) so that recs find at least the new items content alone would (streams/fresh_slots.py)",
    ["rule", "kind"],
)
DEAD_LETTERS = Counter("vlm4rec_streams_dead_letters_total", "Events sent to a dead-letter topic", ["topic"])
PROFILES = Gauge("vlm4rec_streams_profiles", "User profiles held by this worker")
REPLICA_ITEMS = Gauge("vlm4rec_streams_item_replica_items", "Items in this worker's in-process replica of the items collection")
REPLICA_LAG = Gauge(
    "vlm4rec_streams_item_replica_lag_seconds",
    "Age of the oldest items.embedded event not yet in the replica (0: caught up); the replica's staleness",
)
REPLICA_REFRESHES = Counter(
    "vlm4rec_streams_item_replica_refreshes_total", "Replica loads and refreshes", ["kind", "outcome"]
)
ONLINE_JUDGED = Counter(
    "vlm4rec_streams_online_judged_total",
    "Positive interactions of users who had been pushed a list, by the list's ranking variant (the denominator of online HR@k)",
    ["variant"],
)
ONLINE_HITS = Counter(
    "vlm4rec_streams_online_hits_total",
    "Of those, interactions whose item was in the first k of the list last pushed to the user, by variant and k",
    ["variant", "k"],
)
RANKING_RESTARTS = Counter(
    "vlm4rec_streams_ranking_restarts_total",
    "Ranking processes started again because the previous one exited (its learnt state starts over)",
)


def relayable() -> list[Metric]:
    """This process's product metrics (`vlm4rec_*`), for another process to serve with its
    own (`exposition`): the ranking process's counters reach /metrics this way."""
    return [family for family in REGISTRY.collect() if family.name.startswith("vlm4rec_")]


class _Families:
    """A collector of families already collected."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def exposition(relayed: Sequence[Metric] = ()) -> bytes:
    """This process's metrics in Prometheus text, with `relayed` (`relayable` of another
    process) added sample by sample. Sums are right because each process counts its own
    work from zero and every gauge is set in one process only; a series' creation time is
    this process's."""
    if not relayed:
        return generate_latest()
    families = {family.name: family for family in REGISTRY.collect()}
    for other in relayed:
        family = families.setdefault(other.name, other)
        if family is other:
            continue
        index = {(s.name, tuple(sorted(s.labels.items()))): n for n, s in enumerate(family.samples)}
        for sample in other.samples:
            n = index.get((sample.name, tuple(sorted(sample.labels.items()))))
            if n is None:
                family.samples.append(sample)
            elif not sample.name.endswith("_created"):
                family.samples[n] = family.samples[n]._replace(value=family.samples[n].value + sample.value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)
