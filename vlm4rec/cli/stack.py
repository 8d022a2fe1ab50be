"""Commands that run the product: config, topics, worker, streams, up."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import click

from vlm4rec.cli import log, main
from vlm4rec.settings import Settings


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of NAME=value lines.")
@click.pass_obj
def config(settings: Settings, as_json: bool) -> None:
    """Print the effective settings (secrets masked) and the variable that sets each."""
    shown = settings.masked()
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for name, value in shown.items():
        description = type(settings).model_fields[name].description or ""
        click.echo(f"{Settings.env_name(name)}={value}    # {description}")


@main.group()
def topics() -> None:
    """Create the product's topics; export the event JSON Schemas."""


@topics.command("create")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the broker.")
@click.pass_obj
def topics_create(settings: Settings, timeout: float) -> None:
    """Create every topic with the configured partitions (idempotent)."""
    from topics.admin import create_topics

    statuses = create_topics(
        settings.kafka_config(), settings.topic_partitions_map(), settings.topic_replication, timeout, settings.topic_configs()
    )
    for status in statuses:
        note = (
            f"  WARNING: has {status.partitions} partitions, configured {status.wanted_partitions}"
            if status.mismatch
            else ""
        )
        click.echo(f"{status.state:8s} {status.name} ({status.partitions} partitions){note}")


@topics.command("schemas")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: topics/schemas in the package).")
def topics_schemas(out: str | None) -> None:
    """Write the JSON Schema of every event, for producers in other languages."""
    from pathlib import Path

    from topics.jsonschema import SCHEMA_DIR, write_schemas

    for path in write_schemas(Path(out) if out else SCHEMA_DIR):
        click.echo(str(path))


def stack_services(settings: Settings, infra_only: bool) -> tuple[list[Any], int]:
    from vlm4rec.localstack import (
        LOCAL_HOSTS,
        StackError,
        broker_service,
        milvus_server_service,
        milvus_service,
        own_broker_service,
        parse_host_port,
    )

    broker_host, broker_port = parse_host_port(settings.bootstrap_servers.split(",")[0], 9092)
    milvus_host, milvus_port = parse_host_port(settings.milvus_uri, 19530)
    for what, host in (("VLM4REC_BOOTSTRAP_SERVERS", broker_host), ("VLM4REC_MILVUS_URI", milvus_host)):
        if host not in LOCAL_HOSTS:
            raise StackError(
                f"`vlm4rec up` runs the embedded stack on this machine, but {what} points at "
                f"{host}. Unset it, or run the product processes alone (`vlm4rec worker`)."
            )
    services = [
        (
            own_broker_service(broker_host, broker_port, settings.topic_partitions)
            if settings.local_broker == "own"
            else broker_service(broker_host, broker_port)
        ),
        (milvus_service if settings.local_milvus == "lite" else milvus_server_service)(
            milvus_host, milvus_port, settings.milvus_data_dir
        ),
    ]
    infra = len(services)
    if not infra_only:
        services.extend(_product_services(settings))
    return services, infra


def _worker_env(settings: Settings) -> dict[str, str]:
    """The embedding worker of the local stack embeds on half the cores (at least one) unless
    VLM4REC_EMBED_THREADS says otherwise: it shares the machine with the stream processor and
    its ranking process, and on two cores one thread for the worker took the serving path's
    p99 at 1,000 interactions/s from 0.42-0.60 s to 0.31-0.48 s (docs/streaming.md). A worker
    run alone (`vlm4rec worker`) keeps every core."""
    from workers.backends.cpu import usable_cores

    if settings.embed_backend != "cpu" or "embed_threads" in settings.model_fields_set:
        return {}
    return {"VLM4REC_EMBED_THREADS": str(max(1, usable_cores() // 2))}


def _product_services(settings: Settings) -> list[Any]:
    """The product's own long-running processes, each a `vlm4rec` sub-command: the embedding
    worker and `VLM4REC_LOCAL_STREAMS` stream processors. The stream processors form one Faust
    consumer group and share the partitions; each serves HTTP on its own port (the first on
    VLM4REC_WEB_PORT), and a request for a user is routed to the one that owns the user."""
    from vlm4rec.localstack import Service, StackError

    if settings.local_streams > settings.topic_partitions:
        raise StackError(
            f"VLM4REC_LOCAL_STREAMS={settings.local_streams} stream processors would share "
            f"{settings.topic_partitions} partitions (VLM4REC_TOPIC_PARTITIONS): the extra ones would sit idle"
        )
    # -P: the working directory is not put first on the children's import path, so a folder
    # named like one of the product's packages where `vlm4rec up` was started (a checkout of
    # another version, a user's own `topics/`) cannot shadow the installed code
    exe = [sys.executable, "-P", "-m", "vlm4rec"]
    host = settings.web_host
    metrics_ports = [(host, settings.worker_metrics_port)] if settings.worker_metrics_port else []
    services = [Service(name="worker", argv=[*exe, "worker"], ready=lambda: True, restart=True, ports=metrics_ports, env=_worker_env(settings))]
    # one stream processor owns every user: nothing to learn from the others (a user's own setting stands)
    shared = settings.streams_learn_from_all if "streams_learn_from_all" in settings.model_fields_set else settings.local_streams > 1
    for n in range(settings.local_streams):
        port = settings.web_port + n
        services.append(
            Service(
                name="streams" if n == 0 else f"streams-{n + 1}",
                argv=[*exe, "streams"],
                ready=lambda: True,
                restart=True,
                ports=[(host, port)],
                # the work-arounds for Tansu are the stream processor's own
                # (VLM4REC_STREAMS_BROKER_SHIMS, on when VLM4REC_LOCAL_BROKER is tansu)
                env={"VLM4REC_WEB_PORT": str(port), "VLM4REC_STREAMS_LEARN_FROM_ALL": str(shared).lower()},
            )
        )
    return services


@main.command()
@click.pass_obj
def worker(settings: Settings) -> None:
    """Run one embedding worker: items.new -> Milvus + items.embedded.

    Several workers share the partitions of items.new through their consumer group
    (VLM4REC_WORKER_GROUP). Metrics on VLM4REC_WORKER_METRICS_PORT at /metrics.
    """
    import threading

    from prometheus_client import start_http_server

    from vectorstore import CollectionMismatch
    from vlm4rec.wiring import build_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.web_host)
        log.info("metrics on http://%s:%d/metrics", settings.web_host, settings.worker_metrics_port)
    try:
        build_worker(settings).run(stop)
    except CollectionMismatch as exc:
        raise click.ClickException(str(exc)) from exc
    log.info("worker stopped")


@main.command()
@click.pass_obj
def streams(settings: Settings) -> None:
    """Run one stream-processor worker (Faust): live profiles, recs, fresh-item fan-out.

    HTTP on VLM4REC_WEB_HOST:VLM4REC_WEB_PORT: /users/{id}, /users/{id}/recommendations?k=N,
    /metrics. Several workers share the partitions (at most VLM4REC_TOPIC_PARTITIONS useful).
    """
    from topics.admin import create_topics
    from vlm4rec.evaluation.blas import single_threaded_blas
    from streams import gc_pauses, metrics
    from streams.faust_fixes import DeadlineWorker
    from vlm4rec.wiring import build_streams

    create_topics(settings.kafka_config(), settings.topic_partitions_map(), settings.topic_replication, configs=settings.topic_configs())
    service = build_streams(settings)
    gc_pauses.settle()
    gc_pauses.watch("stream processor", lambda generation, took: metrics.GC_PAUSE_SECONDS.labels(str(generation)).observe(took))
    worker = DeadlineWorker(service.app, loglevel=settings.log_level.lower(), quiet=True, stop_timeout_s=settings.streams_stop_timeout_s)
    log.info("streams HTTP on http://%s:%d", settings.web_host, settings.web_port)
    with single_threaded_blas():
        worker.execute_from_commandline()


@main.command()
@click.option("--infra-only", is_flag=True, help="Start only the broker and Milvus.")
@click.option(
    "--streams", "n_streams", type=click.IntRange(min=1), default=None,
    help="Stream processors to run, sharing the partitions (default VLM4REC_LOCAL_STREAMS, 1); "
    "HTTP on VLM4REC_WEB_PORT and the ports after it.",
)
@click.pass_obj
def up(settings: Settings, infra_only: bool, n_streams: int | None) -> None:
    """Run the embedded local stack until Ctrl-C.

    Starts a Kafka-protocol broker (VLM4REC_LOCAL_BROKER: the project's own or Tansu; both
    memory-only, so a restart loses all topics) and a Milvus Lite server (data under VLM4REC_DATA_DIR), creates the topics, then starts the
    embedding worker and the stream processor(s). Ctrl-C or SIGTERM stops everything.
    """
    if n_streams is not None:
        settings = settings.model_copy(update={"local_streams": n_streams})
    from topics.admin import create_topics
    from vlm4rec.localstack import LocalStack, StackError

    try:
        services, infra = stack_services(settings, infra_only)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    stack = LocalStack(services, log_dir=settings.data_dir / "logs")

    def make_topics() -> None:
        statuses = create_topics(
            settings.kafka_config(), settings.topic_partitions_map(), settings.topic_replication, configs=settings.topic_configs()
        )
        log.info("topics ready: %s", ", ".join(s.name for s in statuses))

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        stack.start(after_infra=make_topics, infra=infra)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("VLM4Rec local stack is up:")
    broker = "Kafka broker (own, memory-only)" if settings.local_broker == "own" else "Kafka broker (Tansu, memory-only)"
    click.echo(f"  {broker:<35}{settings.bootstrap_servers}")
    milvus = "Milvus Lite" if settings.local_milvus == "lite" else "Milvus server (standalone)"
    click.echo(f"  {milvus:<35}{settings.milvus_uri}  (data {settings.milvus_data_dir})")
    for service in services[infra:]:
        click.echo(f"  {service.name:34s} pid {service.process.pid if service.process else '?'}")
    if not infra_only:
        web = f"http://{settings.web_host}:{settings.web_port}"
        click.echo(f"  live page                          {web}/")
        click.echo(f"  HTTP API (streams)                 {web}/users/<id>/recommendations")
        click.echo(f"  metrics                            {web}/metrics, http://{settings.web_host}:{settings.worker_metrics_port}/metrics")
    click.echo(f"  logs                               {settings.data_dir / 'logs'}")
    click.echo("Press Ctrl-C to stop.", nl=True)
    sys.stdout.flush()
    try:
        while not stopping:
            stack.supervise_once()
            time.sleep(0.5)
    except StackError as exc:
        stack.stop()
        raise click.ClickException(str(exc)) from exc
    click.echo("stopping...")
    stack.stop()
    click.echo("stopped.")
