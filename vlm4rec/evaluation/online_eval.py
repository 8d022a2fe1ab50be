"""Online evaluation: replay a dataset through the *running* local stack and score the `recs`
it actually pushed, on the targets and with the metrics of the offline protocol (EVAL.md).

How (honest and simple, see docs/online_eval.md):
1. The targets are `vlm4rec.evaluation.evaluate.select_targets` of the dataset (same `--limit-users` cut).
2. Phase 1 replays every row except the targets (`vlm4rec.evaluation.replay`; every item is published at
   its EVAL.md publish time, computed over the whole dataset, so a target's item is in the
   catalogue even when the target is its only interaction).
3. It waits until the stack is quiescent: every target user's profile (`/users/{id}`) has
   applied all of that user's replayed rows, and the worker's and stream processor's counters
   (`/metrics`) have stopped moving.
4. Each target user's LAST push on the `recs` topic is "what the system would have shown just
   before the target"; the target's rank in it gives HR/NDCG exactly as offline
   (`vlm4rec.evaluation.evaluate.summarise`, same bootstrap resamples).
5. The same targets are scored offline (`vlm4rec.evaluation.evaluate.walk`) with the methods compared,
   and a paired bootstrap of the per-target HR@10 difference says whether they agree.

The stack must be fresh (no interactions seen yet): a second run on the same stack would
apply every row twice. The broker of `vlm4rec up` is memory-only, so restarting it is enough
for the topics; give it a fresh VLM4REC_DATA_DIR (or VLM4REC_MILVUS_COLLECTION) so that Milvus
holds no items of another dataset.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from topics import EventError, Interaction, Recs, decode
from vlm4rec.evaluation.dataset import Dataset
from streams.variants import parse_variants
from vlm4rec.evaluation.evaluate import bootstrap_resamples, states, summarise, walk
from vlm4rec.evaluation.stream import ContentIndex, Stream, Target, build_stream
from vlm4rec.harness.probes import http_get, metric_totals, read_topic, user_interactions
from vlm4rec.evaluation.replay import Scheduled, replay, schedule
from vlm4rec.settings import Settings
from vlm4rec.evaluation.online_scoring import agreement, by_variant, explain, markdown_agreement, markdown_variants, score_pushes


class OnlineError(RuntimeError):
    """The online evaluation cannot run; the message says what to do."""


# --- preconditions -----------------------------------------------------------------------


def check_file_roots(settings: Settings, dataset: Dataset) -> None:
    """The worker reads file:// images only under VLM4REC_IMAGE_FILE_ROOTS. The stack reads
    the same VLM4REC_* environment as this command, so check it here, before replaying."""
    roots = [Path(os.path.realpath(root)) for root in settings.image_file_roots]
    if not any(dataset.root.is_relative_to(root) for root in roots):
        raise OnlineError(
            f"the embedding worker may not read the images of {dataset.root}: it reads file:// "
            f"images only under VLM4REC_IMAGE_FILE_ROOTS (now {[str(r) for r in roots]}). Start "
            f"`vlm4rec up` and this command with VLM4REC_IMAGE_FILE_ROOTS='[\"{dataset.root}\"]'"
        )


def web_url(settings: Settings) -> str:
    host = settings.web_host if settings.web_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings.web_port}"


def check_stack(settings: Settings, wait_s: float = 60.0) -> None:
    """The broker answers, the stream processor's HTTP answers (within `wait_s`), and the
    stack is fresh."""
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({**settings.kafka_config(), "log_level": 0}).list_topics(timeout=10.0)
    except Exception as exc:  # noqa: BLE001 - any failure: the broker is not there
        raise OnlineError(f"no answer from the broker at {settings.bootstrap_servers} ({exc}); is `vlm4rec up` running?") from exc
    deadline = time.monotonic() + wait_s  # `vlm4rec up` says "up" before the streams' HTTP listens
    while True:
        try:
            status, _ = http_get(f"{web_url(settings)}/metrics")
        except OSError as exc:
            status = f"{exc}"  # type: ignore[assignment]
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if status != 200:
        raise OnlineError(
            f"the stream processor does not answer at {web_url(settings)}/metrics ({status}): online "
            f"evaluation needs the full local stack (`vlm4rec up`, not --infra-only) with the same VLM4REC_* settings"
        )
    seen = read_topic(settings.kafka_config(), settings.topics.interactions, idle_s=2.0)
    if seen:
        raise OnlineError(
            f"the stack has already seen {len(seen)} interactions on {settings.topics.interactions!r}: online "
            f"evaluation needs a fresh stack (every row would be applied again). Restart `vlm4rec up` (the "
            f"broker is memory-only) with a fresh VLM4REC_DATA_DIR, or run both with fresh VLM4REC_TOPIC_*, "
            f"VLM4REC_STREAMS_APP_ID and VLM4REC_MILVUS_COLLECTION names"
        )


def items_in_store(settings: Settings) -> int | None:
    """Vectors in the items collection now (None: no collection yet / unreachable)."""
    try:
        from vlm4rec.wiring import build_store

        store = build_store(settings, timeout_s=10.0)
        try:
            return store.count() if store.space() is not None else None
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


# --- the split and the replay ------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    stream: Stream
    targets: list[Target]
    events: list[Scheduled]  # everything but the target rows, in replay order
    expected: dict[str, int]  # per user: interactions replayed


def split(dataset: Dataset) -> Split:
    """The offline protocol's targets, and the replay without them. Items keep the publish
    times of the whole dataset (a target's item is in the catalogue)."""
    stream = build_stream(dataset)
    targets = [target for _, target in states(stream, {})]
    target_rows = {id(dataset.interactions[t.row]) for t in targets}
    events = [s for s in schedule(dataset.items, dataset.interactions) if id(s.event) not in target_rows]
    expected = Counter(s.event.user_id for s in events if isinstance(s.event, Interaction))
    return Split(stream, targets, events, dict(expected))


@dataclass
class Quiescence:
    caught_up: int  # target users whose profile applied every replayed row
    behind: dict[str, tuple[int, int]]  # user -> (applied, replayed)
    wall_s: float
    reason: str  # "caught up" | "idle" | "timeout"


def wait_quiescent(
    settings: Settings,
    expected: Mapping[str, int],
    quiet_s: float = 5.0,
    idle_s: float = 90.0,
    timeout_s: float = 1800.0,
    poll_s: float = 2.0,
    echo: Callable[[str], None] = lambda _: None,
) -> Quiescence:
    """Until every user of `expected` applied all its rows and the counters stayed still for
    `quiet_s`; or nothing moved for `idle_s` (items that can never be embedded keep their
    interactions pending); or `timeout_s`."""
    base = web_url(settings)
    worker = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics" if settings.worker_metrics_port else None
    started = changed = time.monotonic()
    signature: tuple[float, ...] = ()
    users = list(expected)
    reported = -1
    while True:
        counts = user_interactions(base, users) or {}
        behind = {u: (counts.get(u, 0), n) for u, n in expected.items() if counts.get(u, 0) < n}
        totals = metric_totals(f"{base}/metrics", ["vlm4rec_streams_interactions", "vlm4rec_streams_recs_pushed"])
        if worker:
            totals.update(metric_totals(worker, ["vlm4rec_worker_items"]))
        now_signature = (*sorted(totals.values()), *sorted(counts.values()))
        now = time.monotonic()
        if now_signature != signature:
            signature, changed = now_signature, now
        caught = len(users) - len(behind)
        if caught != reported:
            echo(f"  {caught}/{len(users)} target users caught up")
            reported = caught
        if not behind and now - changed >= quiet_s:
            return Quiescence(caught, behind, now - started, "caught up")
        if now - changed >= idle_s:
            return Quiescence(caught, behind, now - started, "idle")
        if now - started >= timeout_s:
            return Quiescence(caught, behind, now - started, "timeout")
        time.sleep(poll_s)


def last_pushes(settings: Settings, users: set[str]) -> tuple[dict[str, Recs], int]:
    """Each user's latest push (by generated_at) on the recs topic; and all pushes read."""
    latest: dict[str, Recs] = {}
    messages = read_topic(settings.kafka_config(), settings.topics.recs)
    for msg in messages:
        try:
            recs = decode(Recs, msg.value())
        except EventError:
            continue
        if recs.user_id in users and (recs.user_id not in latest or recs.generated_at >= latest[recs.user_id].generated_at):
            latest[recs.user_id] = recs
    return latest, len(messages)


@dataclass
class OnlineResult:
    report: dict[str, Any]
    quiescence: Quiescence
    replay_s: float


def run_online(
    settings: Settings,
    dataset: Dataset,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex] | Callable[[Stream], Mapping[str, ContentIndex]],
    echo: Callable[[str], None] = print,
    progress: bool = True,
    idle_s: float = 90.0,
    timeout_s: float = 1800.0,
) -> OnlineResult:
    """The whole online evaluation against the running stack; the report has the offline
    shape plus {"mode": "online", "agreement", "online"} ("methods" holds "online" beside the
    offline methods, scored on the same targets)."""
    from topics.producer import EventProducer

    check_file_roots(settings, dataset)
    check_stack(settings)
    before = items_in_store(settings)
    plan = split(dataset)
    if not plan.targets:
        raise OnlineError(f"{dataset.name}: no user has a target (a last interaction after 2 others, not a repeat)")
    target_users = {plan.stream.user_ids[t.user] for t in plan.targets}
    echo(
        f"online: replaying {len(plan.events)} events ({len(dataset.interactions) - len(plan.targets)} interactions, "
        f"the {len(plan.targets)} targets held back) to {settings.bootstrap_servers}"
    )
    started = time.perf_counter()
    with EventProducer(settings.kafka_config()) as producer:
        stats = replay(plan.events, producer, settings.topics.items_new, settings.topics.interactions, None, progress)
    replay_s = time.perf_counter() - started
    echo(f"online: replayed in {replay_s:.1f} s; waiting for the stack to apply it")
    quiet = wait_quiescent(
        settings, {u: plan.expected.get(u, 0) for u in target_users}, idle_s=idle_s, timeout_s=timeout_s, echo=echo
    )
    echo(f"online: {quiet.reason} after {quiet.wall_s:.0f} s; reading {settings.topics.recs}")
    pushes, n_pushes = last_pushes(settings, target_users)
    score = score_pushes(plan.stream, plan.targets, pushes)
    variants = parse_variants(settings.rank_variants)
    compared = [f"variant:{v.name}" for v in variants] if len(variants) > 1 else []

    indexes = content_indexes(plan.stream) if callable(content_indexes) else content_indexes
    walked, results = walk(plan.stream, list(methods) + compared, indexes, progress=progress, variants=variants)
    assert [t.row for t in walked] == [t.row for t in plan.targets]
    published = int((plan.stream.published_at <= plan.targets[-1].ts).sum())
    resamples = bootstrap_resamples(len(plan.targets))
    online_summary = summarise(score.ranks, plan.targets, score.recommended, published, resamples)
    offline = {m: summarise(results[m].ranks, plan.targets, results[m].recommended, published, resamples) for m in methods}
    from vlm4rec.evaluation.stream import DEFAULT_IS

    report: dict[str, Any] = {
        "dataset": dataset.name,
        "targets": len(plan.targets),
        "cold_targets": sum(t.cold for t in plan.targets),
        "later_targets": sum(t.later for t in plan.targets),
        "default": DEFAULT_IS,
        "methods": {"online": online_summary, **offline},
        "mode": "online",
    }
    report["agreement"] = {
        "methods": agreement(score.ranks, online_summary, {m: results[m].ranks for m in methods}, offline, resamples),
        "reasons": explain(report, score, quiet, settings, len(plan.targets)),
    }
    if compared:
        report["by_variant"] = by_variant(plan.stream, plan.targets, variants, score, results, published)
    report["online"] = {
        "targets_with_push": score.pushed,
        "pushes_read": n_pushes,
        "push_lengths": {str(k): n for k, n in sorted(score.k.items())},
        "last_push_triggers": dict(score.triggers),
        "top10_published_after_target": score.future_share,
        "top10_not_in_catalogue": score.unpublished_share,
        "quiescence": {"reason": quiet.reason, "wall_s": round(quiet.wall_s, 1), "target_users_caught_up": quiet.caught_up,
                       "behind": {u: list(v) for u, v in list(quiet.behind.items())[:20]}},
        "replay": {"items": stats.items, "interactions": stats.interactions, "users": stats.users, "wall_s": round(replay_s, 2)},
        "items_in_store_before": before,
        "items_in_store_after": items_in_store(settings),
        "settings": {"embed_strategy": settings.embed_strategy, "streams_k": settings.streams_k,
                     "topics": settings.topics.all(), "streams_app_id": settings.streams_app_id,
                     "milvus_collection": settings.milvus_collection},
    }
    return OnlineResult(report, quiet, replay_s)


def default_methods(settings: Settings) -> list[str]:
    """What the online figures are compared with: the popularity baseline, the content method
    of the stack's own embedding strategy, and the offline `default`."""
    return list(dict.fromkeys(["popularity", settings.embed_strategy, "default"]))


def run_cli(
    settings: Settings, dataset_dir: str, out: str | None, methods: str | None, limit_users: int | None,
    load: Callable[[str, int | None], Dataset],
) -> None:
    """`vlm4rec eval DATASET_DIR --online`: the command's body (click errors, outputs)."""
    import click

    from vlm4rec.evaluation.embedcache import EmbeddingCache
    from vlm4rec.evaluation.evaluate import markdown_table, write_outputs
    from vlm4rec.evaluation.methods import METHODS, strategies_of
    from vlm4rec.evaluation.stream import embed_content

    names = default_methods(settings) if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise click.BadParameter(f"unknown methods {unknown}; choose from {', '.join(METHODS)}", param_hint="--methods")
    started = time.perf_counter()
    dataset = load(dataset_dir, limit_users)

    def indexes(stream: Stream) -> Mapping[str, ContentIndex]:
        strategies = strategies_of(names)
        if not strategies:
            return {}
        from vlm4rec.wiring import build_backend

        click.echo(f"offline: embedding for {', '.join(strategies)} (cached under {settings.data_dir / 'embeddings'})")
        cache = EmbeddingCache(settings.data_dir / "embeddings" / "vectors.sqlite")
        try:
            found, _ = embed_content(dataset, stream, strategies, build_backend(settings), cache, progress=True)
        finally:
            cache.close()
        return found

    try:
        result = run_online(settings, dataset, names, indexes, echo=click.echo)
    except OnlineError as exc:
        raise click.ClickException(str(exc)) from exc
    report = result.report
    path = Path(out or f"eval-online-{dataset.name}.json")
    table, chart = write_outputs(report, path)
    text = markdown_table(report) + markdown_agreement(report) + markdown_variants(report)
    table.write_text(text)
    click.echo(text)
    click.echo(f"wrote {path}, {table}, {chart} in {time.perf_counter() - started:.1f} s")
