"""Commands that measure quality: replay a dataset folder, evaluate offline or online."""

from __future__ import annotations

import time
from typing import Any

import click

from vlm4rec.settings import Settings

from vlm4rec.cli import main


def load_dataset_dir(dataset_dir: str, limit_users: int | None, user_shard: tuple[int, int] | None = None) -> Any:
    """The dataset folder as contract events; rows the contract refused are counted and the
    first few shown, never silently lost."""
    from vlm4rec.evaluation.dataset import load_dataset

    try:
        dataset = load_dataset(dataset_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    if user_shard is not None:
        dataset = dataset.user_shard(*user_shard)
    dataset = dataset.limit_users(limit_users)
    if dataset.rejected:
        click.echo(f"{len(dataset.rejected)} rows rejected by the event contract (left out):", err=True)
        for row in dataset.rejected[:5]:
            click.echo(f"  {row}", err=True)
    return dataset


@main.command("replay")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--speed", default="max", show_default=True, help="Event-time seconds per wall second (e.g. 1000), or max.")
@click.option("--limit-users", type=click.IntRange(min=1), default=None, help="Only the first N users (by first interaction).")
@click.option("--since", default=None, help="Skip interactions before this (unix seconds or ISO date); items published earlier are sent first.")
@click.option("--until", default=None, help="Stop before this time (unix seconds or ISO date).")
@click.pass_obj
def replay_command(
    settings: Settings, dataset_dir: str, speed: str, limit_users: int | None, since: str | None, until: str | None
) -> None:
    """Publish a dataset folder to items.new and interactions in timestamp order.

    An item is published at its created_at, else just before its first interaction; images
    become file:// URIs. Every row is validated with the event contract first.
    """
    import os
    from datetime import UTC, datetime
    from pathlib import Path

    from confluent_kafka import KafkaException

    from topics.admin import create_topics
    from topics.producer import DeliveryError, EventProducer
    from vlm4rec.evaluation.dataset import parse_time
    from vlm4rec.evaluation.replay import parse_speed, replay, schedule

    try:
        pace = parse_speed(speed)
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    dataset = load_dataset_dir(dataset_dir, limit_users)
    roots = [Path(os.path.realpath(root)) for root in settings.image_file_roots]
    if not any(dataset.root.is_relative_to(root) for root in roots):
        click.echo(
            f"hint: the embedding worker reads file:// images only under VLM4REC_IMAGE_FILE_ROOTS; "
            f"to let it read these, run it with VLM4REC_IMAGE_FILE_ROOTS='[\"{dataset.root}\"]'",
            err=True,
        )
    events = schedule(dataset.items, dataset.interactions, start, end)
    topics = settings.topics
    try:  # explicitly, with the configured partitions: a producer would create them implicitly
        create_topics(settings.kafka_config(), settings.topic_partitions_map(), settings.topic_replication, 10.0, settings.topic_configs())
    except KafkaException as exc:
        raise click.ClickException(f"no answer from the broker at {settings.bootstrap_servers} ({exc}); is it up? (`vlm4rec up`)") from exc
    try:
        with EventProducer(settings.kafka_config()) as producer:
            stats = replay(events, producer, topics.items_new, topics.interactions, pace)
    except DeliveryError as exc:
        raise click.ClickException(f"{exc} (is the broker at {settings.bootstrap_servers} up? `vlm4rec up`)") from exc

    def day(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")

    click.echo(
        f"replayed {stats.items} items to {topics.items_new} and {stats.interactions} interactions "
        f"({stats.users} users) to {topics.interactions}, event time {day(stats.first_ts)} to "
        f"{day(stats.last_ts)} UTC, in {stats.wall_s:.1f} s; {len(dataset.rejected)} rows rejected"
    )


def _shard(value: str | None) -> tuple[int, int] | None:
    """`--user-shard I/N` -> (I, N)."""
    if value is None:
        return None
    shard, _, shards = value.partition("/")
    if not (shard.strip().isdigit() and shards.strip().isdigit()) or not 0 <= int(shard) < int(shards):
        raise click.BadParameter(f"must be I/N with 0 <= I < N, e.g. 3/10, not {value!r}", param_hint="--user-shard")
    return int(shard), int(shards)


@main.command("eval")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, help="Report JSON (default eval-DATASET.json); the .md table and .png chart go beside it.")
@click.option("--methods", default=None, help="Comma-separated subset of the methods (default: all).")
@click.option("--limit-users", type=click.IntRange(min=1), default=None, help="Only the first N users (by first interaction): a quick run.")
@click.option("--user-shard", default=None, metavar="I/N", callback=lambda ctx, param, value: _shard(value),
              help="Only the users of shard I of N (0 <= I < N, by CRC32 of the user id): a smaller stream of "
              "real users where more targets are new items (docs/user-shards).")
@click.option("--online", is_flag=True, help="Replay through the running local stack and score the pushed recs (per ranking variant too, when several are set).")
@click.option("--partitions", type=click.IntRange(min=2), default=None,
              help="Also score `default` as N stream processors learn it with shared learning off "
              "(VLM4REC_STREAMS_LEARN_FROM_ALL=false): each from its own partitions' users only.")
@click.option("--variants", "with_variants", is_flag=True,
              help="Also score `default` with each ranking variant of VLM4REC_RANK_VARIANTS (its serving settings), on the same targets.")
@click.pass_obj
def eval_command(
    settings: Settings, dataset_dir: str, out: str | None, methods: str | None, limit_users: int | None,
    user_shard: tuple[int, int] | None, online: bool, with_variants: bool, partitions: int | None,
) -> None:
    """Measure recommendation quality offline, exactly as EVAL.md says.

    Prequential leave-last-out replay of the dataset; every method is scored on the same
    targets. Item vectors come from the configured embedding backend and are cached under
    VLM4REC_DATA_DIR/embeddings, so a second run only scores.
    """
    from pathlib import Path

    from vlm4rec.evaluation.embedcache import EmbeddingCache
    from streams.variants import parse_variants
    from vlm4rec.evaluation.evaluate import evaluate, markdown_table, write_outputs
    from vlm4rec.evaluation.methods import METHODS, strategies_of
    from vlm4rec.evaluation.stream import ContentIndex, build_stream, embed_content
    from vlm4rec.wiring import build_rank_config

    if online:  # replay through the running stack and score its pushes (vlm4rec/evaluation/online_eval.py)
        from vlm4rec.evaluation.online_eval import run_cli

        run_cli(settings, dataset_dir, out, methods, limit_users, lambda path, n: load_dataset_dir(path, n, user_shard))
        return
    names = list(METHODS) if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise click.BadParameter(f"unknown methods {unknown}; choose from {', '.join(METHODS)}", param_hint="--methods")
    variants = parse_variants(settings.rank_variants) if with_variants else ()
    if with_variants and not settings.rank_variants:
        raise click.UsageError("--variants scores the ranking variants of VLM4REC_RANK_VARIANTS, and none is set")
    if (variants or partitions) and "default" not in names:
        names.append("default")  # the variants rank with its model and vectors; partitions compare with it
    started = time.perf_counter()
    dataset = load_dataset_dir(dataset_dir, limit_users, user_shard)
    stream = build_stream(dataset)
    indexes: dict[str, ContentIndex] = {}
    strategies = strategies_of(names)
    if strategies:
        from vlm4rec.wiring import build_backend

        cache = EmbeddingCache(settings.data_dir / "embeddings" / "vectors.sqlite")
        try:
            indexes, failed = embed_content(dataset, stream, strategies, build_backend(settings), cache, progress=True)
        finally:
            cache.close()
        if failed:
            click.echo(f"{len(failed)} items lack a vector in some strategy (content scores them 0):", err=True)
            for item_id, reason in list(failed.items())[:5]:
                click.echo(f"  {item_id}: {reason}", err=True)
    try:
        report = evaluate(
            stream, names, indexes, progress=True, variants=variants, rank=build_rank_config(settings), partitions=partitions or 1
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if user_shard is not None:
        report["user_shard"] = f"{user_shard[0]}/{user_shard[1]}"
    path = Path(out or f"eval-{dataset.name}.json")
    table, chart = write_outputs(report, path)
    click.echo(markdown_table(report))
    written = ", ".join(str(p) for p in (path, table, chart) if p is not None)
    click.echo(f"wrote {written} in {time.perf_counter() - started:.1f} s")
