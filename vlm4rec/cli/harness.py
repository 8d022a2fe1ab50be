"""Commands that drive a whole stack from outside: bench, demo, chaos, soak."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from vlm4rec.settings import Settings

from vlm4rec.cli import main, needs
from vlm4rec.cli.stack import stack_services


@main.group()
def bench() -> None:
    """Benchmarks that print figures (embedding throughput; search; ranking cost; streaming latency)."""


@bench.command("embed")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--limit", default=512, show_default=True, help="Items to embed per run.")
@click.option("--batch", default=32, show_default=True, help="Micro-batch size.")
@click.option("--strategies", default="describe,image,text,fused", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="bench-embed.json", show_default=True)
@click.pass_obj
def bench_embed_cmd(settings: Settings, dataset_dir: str, limit: int, batch: int, strategies: str, out: str) -> None:
    """Embed items of a dataset folder through the configured backend, per strategy.

    Writes {"runs": [{"backend", "strategy", "batch", "items_per_s", "p50_ms", "p99_ms",
    "stages_ms"}]} (stages per item: decode, image_model [+ describer], text_model, upsert).
    Vectors go to a throw-away collection on the configured Milvus when it answers, else to the
    in-memory store (said in the output).
    """
    from pathlib import Path

    from vectorstore import MemoryVectorStore
    from vlm4rec.wiring import build_store
    from vlm4rec.harness.bench import bench_embed
    from vlm4rec.evaluation.dataset import read_items
    from vlm4rec.localstack import parse_host_port, port_answers
    from vlm4rec.wiring import build_backend, build_loader
    from workers.embedder import Embedder

    root = Path(dataset_dir).resolve()
    items = read_items(root)[0][:limit]
    settings.image_file_roots = [*settings.image_file_roots, root]
    loader = build_loader(settings)
    backend = build_backend(settings)
    milvus_up = port_answers(*parse_host_port(settings.milvus_uri, 19530))
    runs = []
    for strategy in [s.strip() for s in strategies.split(",") if s.strip()]:
        embedder = Embedder(backend, strategy)  # type: ignore[arg-type]
        embedder.embed([_content(items[0], loader)])  # warm-up: load the models outside the timing
        if milvus_up:
            store = build_store(settings, f"bench_{strategy}_{int(time.time())}")
        else:
            store = MemoryVectorStore()
        run = bench_embed(items, embedder, loader, store, batch, settings.worker_fetch_threads)
        run["store"] = "milvus" if milvus_up else "memory"
        store.drop()
        runs.append(run)
        stages = " ".join(f"{k}={v}" for k, v in run["stages_ms"].items())
        click.echo(f"{run['backend']:10s} {strategy:9s} {run['items_per_s']:7.1f} items/s  p50 {run['p50_ms']:7.1f} ms  p99 {run['p99_ms']:7.1f} ms  per item: {stages}")
    Path(out).write_text(json.dumps({"runs": runs, "dataset": root.name, "cpu_cores": os.cpu_count()}, indent=2))
    click.echo(f"wrote {out}")


def _content(item: Any, loader: Any) -> Any:
    from workers.embedder import ItemContent

    image = loader.load(item.image_url) if item.image_url else None
    return ItemContent(item.item_id, item.title, item.text, image)


@bench.command("search")
@click.option("--items", type=click.IntRange(min=1), default=17_000, show_default=True, help="Random vectors to insert (the hm catalogue has 17,033 items).")
@click.option("--dim", type=click.IntRange(min=2), default=384, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True, help="Queries per call (the recs refresher's round).")
@click.option("--out", type=click.Path(dir_okay=False), default="bench-search.json", show_default=True)
@click.pass_obj
def bench_search_cmd(settings: Settings, items: int, dim: int, batch: int, out: str) -> None:
    """Search latency of the Milvus at VLM4REC_MILVUS_URI (start one with `vlm4rec up
    --infra-only`), in a throw-away collection of random vectors: one query per call and
    BATCH per call, top 100, Strong consistency, through the product's own client."""
    import uuid
    from pathlib import Path

    from vlm4rec.harness.bench import bench_search
    from vlm4rec.wiring import build_store

    store = build_store(settings, f"bench_{uuid.uuid4().hex[:8]}")
    try:
        result = bench_search(store, items, dim, batch)
    finally:
        store.drop()
        store.close()
    result["milvus"] = _milvus_kind(settings)
    Path(out).write_text(json.dumps(result, indent=2))
    click.echo(json.dumps(result, indent=2))
    click.echo(f"wrote {out}")


@bench.command("rank")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--users", type=click.IntRange(min=1), default=256, show_default=True, help="Users per round (the refresher's round size).")
@click.option("--rounds", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="bench-rank.json", show_default=True)
def bench_rank_cmd(dataset_dir: str, users: int, rounds: int, out: str) -> None:
    """CPU cost of the product's ranker per user: streams the dataset through it (training
    included), then times refresh rounds of random users, the exact in-process content search
    excluded. Needs no running stack. Writes {"rank_ms_per_user", "users_per_s_one_core",
    "candidates_per_user", ...}."""
    from pathlib import Path

    from vlm4rec.harness.bench import bench_rank
    from vlm4rec.evaluation.dataset import load_dataset

    result = bench_rank(load_dataset(dataset_dir), users, rounds)
    Path(out).write_text(json.dumps(result, indent=2))
    click.echo(json.dumps(result, indent=2))
    click.echo(f"wrote {out}")


@bench.command("stream")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--rates", default="250,500,1000,2000,3000", show_default=True, help="Interactions/s per step.")
@click.option("--step-s", default=10.0, show_default=True, help="Seconds per rate step.")
@click.option("--users", default=5000, show_default=True, help="Distinct users drawn from.")
@click.option("--seed-items", default=500, show_default=True, help="Items embedded before the run.")
@click.option("--fresh-items", default=200, show_default=True, help="New items published during the run, evenly spread (each timed to the first pushed list that holds it; an item no list takes is not timed).")
@click.option("--out", type=click.Path(dir_okay=False), default="bench-stream.json", show_default=True)
@click.pass_obj
def bench_stream_cmd(settings: Settings, dataset_dir: str, rates: str, step_s: float, users: int, seed_items: int, fresh_items: int, out: str) -> None:
    """Drive interactions (and new items) through the running local stack (`vlm4rec up`).

    Items are published with their images inline (data: URIs), so the worker needs no file
    roots. Writes {"interactions_per_s", "p50_ms", "p99_ms", "fresh_item_p50_ms",
    "fresh_item_p99_ms", "ceiling_per_s", ...}: the highest step answered (>= 95% of
    interactions pushed) with p99 <= 500 ms; the ceiling is a bare confluent-kafka consumer
    reading the same topic in the same run, and the Milvus search ceiling is measured too.

    An interaction is answered by the first push of its user whose `answers` offsets cover it
    (its profile had applied it when the list was ranked); latency runs from its scheduled
    send time; one unanswered 3 s after its step ends counts as 10 s in p50/p99. Each step
    also reports per-process CPU (% of a core) and the stream processors' time per stage.
    The metrics of every local stream processor (`vlm4rec up --streams N`) are read.
    """
    import base64
    from pathlib import Path

    needs("psutil", "measure", "`vlm4rec bench stream` (per-process CPU)")
    from vlm4rec.harness.bench_stream import bench_stream
    from vlm4rec.wiring import build_store
    from vlm4rec.evaluation.dataset import read_items

    root = Path(dataset_dir).resolve()
    items = read_items(root)[0][: seed_items + fresh_items]

    def inline(item: Any) -> Any:
        if not item.image_url or not item.image_url.startswith("file://"):
            return item
        data = Path(item.image_url.removeprefix("file://")).read_bytes()
        return item.model_copy(update={"image_url": "data:image/jpeg;base64," + base64.b64encode(data).decode()})

    items = [inline(i) for i in items]
    seed, fresh = items[:seed_items], items[seed_items:]
    store = build_store(settings)
    from topics.producer import EventProducer

    with EventProducer(settings.kafka_config()) as producer:
        for item in seed:
            producer.send(settings.topics.items_new, item)
    deadline = time.time() + 600
    with tqdm_bar(len(seed), "seeding items") as bar:
        while time.time() < deadline:
            have = len(store.get_vectors([i.item_id for i in seed])) if store.space() else 0
            bar.n = have
            bar.refresh()
            if have >= len(seed):
                break
            time.sleep(1)
    item_ids = [i.item_id for i in seed]
    result = bench_stream(
        settings.kafka_config(), settings.topics.interactions, settings.topics.items_new, settings.topics.recs,
        settings.topic_partitions, item_ids, fresh, [int(r) for r in rates.split(",")], step_s, users, store,
        search_batch=min(256, settings.streams_refresh_max),
        scrape_streams=lambda: _scrape_stream_processors(settings),
    )
    result["milvus"] = _milvus_kind(settings)
    Path(out).write_text(json.dumps(result, indent=2))
    click.echo(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
    click.echo(f"wrote {out}")


def _scrape_stream_processors(settings: Settings) -> list[Any]:
    """The metrics of every local stream processor: `vlm4rec up --streams N` serves them on
    consecutive ports from the web port, so they are read until one does not answer (the
    bench cannot know N: it was given to `up`)."""
    from vlm4rec.harness.soak import scrape

    scrapes = []
    for n in range(settings.topic_partitions):
        try:
            scrapes.append(scrape(f"http://{settings.web_host}:{settings.web_port + n}/metrics"))
        except OSError:
            break
    return scrapes


def _milvus_kind(settings: Settings) -> str:
    """Which Milvus a figure was measured against, with the version it reports."""
    from vlm4rec.localstack import LOCAL_HOSTS, parse_host_port
    from vlm4rec.wiring import build_milvus_client

    client = build_milvus_client(settings, 10)
    try:
        version = client.get_server_version()
    except Exception:  # noqa: BLE001 - only a label
        version = "unknown version"
    finally:
        client.close()
    if parse_host_port(settings.milvus_uri, 19530)[0] not in LOCAL_HOSTS:
        return f"Milvus at {settings.milvus_uri} {version}"
    return {"lite": "Milvus Lite", "server": "Milvus standalone (embedded server)"}[settings.local_milvus] + f" {version}"


def tqdm_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item")


@main.command()
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--limit-users", type=click.IntRange(min=1), default=50, show_default=True,
              help="Replay only the first N users (by first interaction); without DATASET_DIR, simulate at most N of the 8 users.")
@click.option("--duration", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Wall seconds the replay of DATASET_DIR takes: event time is compressed to fit.")
@click.pass_obj
def demo(settings: Settings, dataset_dir: str | None, limit_users: int, duration: float) -> None:
    """See it work: the local stack, a live feed and the page, until Ctrl-C.

    Starts what `vlm4rec up` starts and prints the page's address. Without DATASET_DIR it
    runs a simulated shop that needs no data: items whose pictures are drawn by code (a red
    star on grey dots, ...), a new one every few seconds, and eight users who each like one
    thing and act on what their feed shows; every few seconds a line says how much of each
    feed matches its user's taste. With DATASET_DIR (a folder as described in
    ../shared/data/README.md) it replays the folder's first users behind a progress bar,
    with the folder readable for item pictures.
    """
    from pathlib import Path

    from vlm4rec.harness.demo import run_demo
    from vlm4rec.localstack import StackError

    try:
        run_demo(settings, Path(dataset_dir) if dataset_dir else None, limit_users, duration, stack_services)
    except (StackError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("chaos")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--limit-users", type=click.IntRange(min=1), default=20, show_default=True, help="Replay only the first N users (by first interaction).")
@click.option("--faults", type=click.IntRange(min=0), default=6, show_default=True, help="Faults, shared among worker, streams and Milvus and among the kinds.")
@click.option("--kinds", default="kill,pause,slow", show_default=True,
              help="Fault kinds: kill (SIGKILL, restart), pause (SIGSTOP, SIGCONT after 10-30 s), slow (Milvus behind a proxy holding every chunk 0.2-1 s for 10-30 s).")
@click.option("--seed", default=0, show_default=True, help="Seeds the fault times, targets and kinds and the re-published items.")
@click.option("--duration", type=click.FloatRange(min=1), default=60.0, show_default=True, help="Wall seconds the replay takes; the faults fall within it.")
@click.option("--timeout", type=click.FloatRange(min=10), default=600.0, show_default=True, help="Seconds to wait for the stack to catch up afterwards.")
@click.option("--out", type=click.Path(dir_okay=False), default="chaos.json", show_default=True)
@click.pass_obj
def chaos_command(
    settings: Settings, dataset_dir: str, limit_users: int, faults: int, kinds: str, seed: int, duration: float,
    timeout: float, out: str,
) -> None:
    """Replay DATASET_DIR while killing, pausing and slowing the worker, the stream processor and Milvus Lite.

    Starts a local stack of its own (free ports, a fresh folder under VLM4REC_DATA_DIR/chaos),
    replays the slice, kills and restarts, pauses and resumes the processes and slows Milvus at
    seeded random moments, then checks:
    every item in Milvus once with its latest content, every interaction counted once, recs
    resume for every active user. Writes {"ok", "violations", "faults", "items_published",
    "items_in_milvus", "item_duplicates", "interactions_published", "interactions_counted",
    "users_with_recs", "active_users", "fault_details", ...}; exits 1 when an invariant fails,
    after dumping the topics that decide them to <run folder>/dump (see docs/hardening.md).
    """
    from pathlib import Path

    from vlm4rec.harness.chaos import run_chaos
    from vlm4rec.localstack import StackError

    try:
        report = run_chaos(
            settings, Path(dataset_dir), stack_services, limit_users=limit_users, faults=faults,
            seed=seed, duration_s=duration, timeout_s=timeout, log=click.echo,
            kinds=[k.strip() for k in kinds.split(",") if k.strip()],
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kinds") from exc
    except (StackError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    keys = ("faults", "faults_by_kind", "faults_recovered", "items_published", "items_in_milvus", "item_duplicates",
            "interactions_published", "interactions_counted", "users_with_recs", "active_users")
    click.echo(json.dumps({k: report.get(k) for k in keys}))
    click.echo(f"wrote {out}")
    if not report["ok"]:
        raise click.ClickException("invariants violated: " + "; ".join(report["violations"]))


@main.command("soak")
@click.option("--minutes", type=click.FloatRange(min=0.5), default=10.0, show_default=True, help="Length of the steady phase; then it stops by itself.")
@click.option("--rate", type=click.FloatRange(min=1), default=None, help="Interactions/s (default: 80% of the capacity measured by a short ramp first).")
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True, help="Distinct users the interactions come from.")
@click.option("--items", type=click.IntRange(min=1), default=300, show_default=True, help="Items embedded before the load starts.")
@click.option("--fresh-per-s", type=click.FloatRange(min=0), default=0.5, show_default=True, help="New items published per second during the soak.")
@click.option("--sample-s", type=click.FloatRange(min=1), default=10.0, show_default=True, help="Seconds between samples.")
@click.option("--out", type=click.Path(dir_okay=False), default="soak.json", show_default=True, help="Figures (JSON); the plot is written beside it (.png).")
@click.pass_obj
def soak_command(
    settings: Settings, minutes: float, rate: float | None, users: int, items: int, fresh_per_s: float, sample_s: float, out: str
) -> None:
    """A bounded soak at a steady rate near capacity, on a local stack of its own.

    Samples consumer lag (vlm4rec_streams_consumer_lag), the resident memory and CPU of every
    process, p99 latencies and the machine's own pace (a canary: CPU ms of fixed work, since a
    shared host's speed changes by itself) every --sample-s seconds. Writes {"rate_per_s",
    "capacity_steps", "samples": [{"t_s", "lag_interactions", "rss_mb", "p99_ms", "canary_ms",
    ...}], "summary": {"lag", "rss", "p99", "machine"}} and a PNG plot. SIGTERM stops the stack
    in order, as Ctrl-C does.
    """
    from pathlib import Path

    needs("psutil", "measure", "`vlm4rec soak` (memory and CPU of every process)")
    needs("matplotlib", "measure", "`vlm4rec soak` (its plot)")
    from vlm4rec.localstack import StackError
    from vlm4rec.harness.soak import run_soak
    from vlm4rec.harness.soak_report import write

    try:
        figures = run_soak(
            settings, stack_services, minutes, rate=rate, users=users, items=items,
            fresh_per_s=fresh_per_s, sample_s=sample_s, log=click.echo,
        )
    except (StackError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from exc
    picture = write(figures, Path(out))
    click.echo(json.dumps(figures["summary"], indent=2))
    click.echo(f"wrote {out} and {picture}")


if __name__ == "__main__":
    main()
