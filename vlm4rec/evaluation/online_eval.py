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

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from topics import EventError, Interaction, Recs, decode
from vlm4rec.evaluation.dataset import Dataset
from streams.variants import Assignment, Variant, parse_variants
from vlm4rec.evaluation.evaluate import MethodResult, bootstrap_resamples, states, summarise, walk
from vlm4rec.evaluation.stream import KS, ContentIndex, Stream, Target, build_stream
from vlm4rec.harness.probes import http_get, metric_totals, read_topic, user_interactions
from vlm4rec.evaluation.replay import Scheduled, replay, schedule
from vlm4rec.settings import Settings


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
        from vectorstore.milvus import MilvusVectorStore

        store = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection, settings.milvus_token.get_secret_value(), 10.0)
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


# --- scoring and agreement ---------------------------------------------------------------


@dataclass
class OnlineScore:
    ranks: list[int]  # per target: 1-based rank in the push's top 20, 0 when not in it
    recommended: set[str] = field(default_factory=set)
    tops: list[list[str]] = field(default_factory=list)  # per target: the push's top 10 (none: no push)
    pushed: int = 0  # targets whose user had a push
    k: Counter = field(default_factory=Counter)  # push lengths
    triggers: Counter = field(default_factory=Counter)
    future_share: float = 0.0  # of the pushed top-10 items: published after the target's ts
    unpublished_share: float = 0.0  # of them: not in the dataset's catalogue at all


def score_pushes(stream: Stream, targets: Sequence[Target], pushes: Mapping[str, Recs]) -> OnlineScore:
    score = OnlineScore([])
    index = {item_id: n for n, item_id in enumerate(stream.item_ids)}
    future = unknown = shown = 0
    for target in targets:
        recs = pushes.get(stream.user_ids[target.user])
        if recs is None:
            score.ranks.append(0)
            score.tops.append([])
            continue
        top = [r.item_id for r in recs.items][: max(KS)]
        wanted = stream.item_ids[target.item]
        score.ranks.append(top.index(wanted) + 1 if wanted in top else 0)
        score.recommended.update(top[: KS[0]])
        score.tops.append(top[: KS[0]])
        score.pushed += 1
        score.k[len(recs.items)] += 1
        score.triggers[recs.trigger] += 1
        for item_id in top[: KS[0]]:
            shown += 1
            n = index.get(item_id)
            if n is None:
                unknown += 1
            elif stream.published_at[n] > target.ts:
                future += 1
    score.future_share = future / shown if shown else 0.0
    score.unpublished_share = unknown / shown if shown else 0.0
    return score


def hits10(ranks: Sequence[int]) -> np.ndarray:
    rank = np.asarray(ranks)
    return ((rank > 0) & (rank <= 10)).astype(np.float64)


def agreement(
    online: Sequence[int], online_summary: Mapping[str, Any], offline: Mapping[str, Sequence[int]],
    offline_summaries: Mapping[str, Mapping[str, Any]], resamples: np.ndarray,
) -> dict[str, Any]:
    """Per offline method: is online HR@10 inside its 95% interval, and the paired bootstrap
    interval (the same resamples of the same targets) of online minus offline HR@10. They
    agree when that interval contains 0."""
    out: dict[str, Any] = {}
    on = hits10(online)
    for name, ranks in offline.items():
        diff = on - hits10(ranks)
        low, high = np.percentile(diff[resamples].mean(axis=1), [2.5, 97.5])
        ci = offline_summaries[name]["HR@10_ci"]
        out[name] = {
            "offline_HR@10": offline_summaries[name]["HR@10"],
            "offline_HR@10_ci": ci,
            "online_HR@10": online_summary["HR@10"],
            "online_in_offline_ci": bool(ci[0] <= online_summary["HR@10"] <= ci[1]),
            "difference": float(diff.mean()),
            "difference_ci": [float(low), float(high)],
            "agree": bool(low <= 0.0 <= high),
            "same_top10_hit": float((on == hits10(ranks)).mean()),
        }
    return out


def explain(
    report: Mapping[str, Any], score: OnlineScore, quiet: Quiescence, settings: Settings, n_targets: int
) -> list[str]:
    """Reasons the online figures can differ from the offline ones, with this run's numbers."""
    reasons = []
    if score.future_share > 0:
        reasons.append(
            f"{score.future_share:.1%} of the pushed top-10 items were published after their target's ts: "
            "phase 1 replays every non-target row, so the online catalogue (and other users' interactions, "
            "which feed popularity and fan-out) includes the future; offline candidates stop at the target's ts"
        )
    if score.unpublished_share > 0:
        reasons.append(f"{score.unpublished_share:.1%} of the pushed top-10 items are not in this dataset's catalogue (a stack that was not fresh)")
    if score.pushed < n_targets:
        reasons.append(f"{n_targets - score.pushed} of {n_targets} target users got no push (scored as misses)")
    if quiet.behind:
        reasons.append(
            f"{len(quiet.behind)} target users had not applied all their rows when the stack went quiet "
            "(interactions on items that were never embedded stay pending; rows lost in the stack would show here too)"
        )
    short = sum(n for k, n in score.k.items() if k < max(KS))
    if short or settings.streams_k < max(KS):
        reasons.append(f"pushes carry VLM4REC_STREAMS_K = {settings.streams_k} items; {short} pushes had fewer than {max(KS)} (HR@20 counts only what was pushed)")
    if score.triggers.get("fresh_item"):
        reasons.append(
            f"{score.triggers['fresh_item']} last pushes were fresh-item fan-outs (trigger fresh_item), "
            "recomputed after later items arrived"
        )
    reasons.append(
        f"the stack ranks with its own item space (VLM4REC_EMBED_STRATEGY = {settings.embed_strategy}) and "
        "approximate/online state (recency, decayed popularity for users without a profile vector); "
        "the offline methods rank exactly from the state just before the target"
    )
    return reasons


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


def by_variant(
    stream: Stream, targets: Sequence[Target], variants: Sequence[Variant], score: OnlineScore,
    offline: Mapping[str, MethodResult], published: int,
) -> dict[str, Any]:
    """Per ranking variant, on the targets of its users: the online figures of the pushes and
    the offline figures of `default` with the variant's settings (`variant:NAME`)."""
    assignment = Assignment(variants)
    out: dict[str, Any] = {}
    for v in variants:
        chosen = [n for n, t in enumerate(targets) if assignment.of(stream.user_ids[t.user]).name == v.name]
        entry: dict[str, Any] = {"share": v.share, "overrides": dict(v.overrides), "targets": len(chosen)}
        if chosen:
            subset = [targets[n] for n in chosen]
            resamples = bootstrap_resamples(len(chosen))
            result = offline[f"variant:{v.name}"]
            entry["online"] = summarise([score.ranks[n] for n in chosen], subset, {i for n in chosen for i in score.tops[n]}, published, resamples)
            entry["offline"] = summarise([result.ranks[n] for n in chosen], subset, {i for n in chosen for i in result.tops[n]}, published, resamples)
        out[v.name] = entry
    return out


def markdown_variants(report: Mapping[str, Any]) -> str:
    """The per-variant table of an online report (empty without variants)."""
    if not report.get("by_variant"):
        return ""
    lines = [
        "", "Per ranking variant, on the targets of its users (online: the pushes; offline: `default` with the variant's settings):", "",
        "| variant | overrides | targets | online HR@10 | offline HR@10 (95% CI) | online HR@20 | offline HR@20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["by_variant"].items():
        if "online" not in v:
            lines.append(f"| {name} | {json.dumps(v['overrides'])} | 0 | n/a | n/a | n/a | n/a |")
            continue
        on, off = v["online"], v["offline"]
        lo, hi = off["HR@10_ci"]
        lines.append(
            f"| {name} | {json.dumps(v['overrides'])} | {v['targets']} | {on['HR@10']:.3f} | {off['HR@10']:.3f} ({lo:.3f}–{hi:.3f}) | "
            f"{on['HR@20']:.3f} | {off['HR@20']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_agreement(report: Mapping[str, Any]) -> str:
    lines = [
        "", "Online vs offline on the same targets (HR@10; paired bootstrap of the difference):", "",
        "| offline method | offline HR@10 (95% CI) | online HR@10 | online − offline (95% CI) | agree |",
        "|---|---|---|---|---|",
    ]
    for name, a in report["agreement"]["methods"].items():
        lo, hi = a["offline_HR@10_ci"]
        dlo, dhi = a["difference_ci"]
        lines.append(
            f"| {name} | {a['offline_HR@10']:.3f} ({lo:.3f}–{hi:.3f}) | {a['online_HR@10']:.3f} | "
            f"{a['difference']:+.3f} ({dlo:+.3f} to {dhi:+.3f}) | {'yes' if a['agree'] else 'no'} |"
        )
    lines += ["", "Why they can differ:", *[f"- {r}" for r in report["agreement"]["reasons"]]]
    return "\n".join(lines) + "\n"


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
