"""`vlm4rec demo DATASET_DIR`: the one command a newcomer runs to see the product work.

It starts the same local stack as `vlm4rec up` (broker, Milvus Lite, embedding worker, stream
processor), with the dataset's folder added to the file roots of the processes that read item
pictures (the worker embeds them, the page serves thumbnails of them). Then it replays the
first users of the dataset with event time compressed into a couple of minutes, behind a
progress bar, while the page at the printed address fills with pictures, and keeps everything
running until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import click

from topics import Event, Interaction
from vlm4rec.dataset import load_dataset
from vlm4rec.localstack import LocalStack, Service
from vlm4rec.replay import Scheduled, Sender, replay, schedule
from vlm4rec.settings import Settings

StackServices = Callable[[Settings, bool], tuple[list[Service], int]]

PAGE_WAIT_S = 120.0


class Stopped(Exception):
    """Ctrl-C arrived during the replay."""


class StoppableSender:
    """Ends a replay promptly on Ctrl-C: the next send raises instead of publishing."""

    def __init__(self, sender: Sender, stop: threading.Event) -> None:
        self.sender = sender
        self.stop = stop

    def send(self, topic: str, event: Event) -> None:
        if self.stop.is_set():
            raise Stopped
        self.sender.send(topic, event)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.sender.flush(timeout_s)


def replay_speed(events: Sequence[Scheduled], duration_s: float) -> float | None:
    """Event-time seconds per wall second that fit the whole replay into about `duration_s`
    (datasets span months or years); None (as fast as possible) when all share one time."""
    span = events[-1].ts - events[0].ts if events else 0.0
    return span / duration_s if span > 0 else None


def most_active_user(interactions: Sequence[Interaction]) -> str | None:
    """The user with the most interactions: the page worth opening first."""
    counts = Counter(row.user_id for row in interactions)
    return counts.most_common(1)[0][0] if counts else None


def page_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_demo(settings: Settings, dataset_dir: Path, limit_users: int, duration_s: float, stack_services: StackServices) -> None:
    """Start the stack, replay the dataset, keep running until Ctrl-C or SIGTERM.

    `stack_services` is the function behind `vlm4rec up` that lists the stack's processes."""
    from topics.admin import create_topics

    dataset = load_dataset(dataset_dir).limit_users(limit_users)
    if dataset.rejected:
        click.echo(f"{len(dataset.rejected)} rows rejected by the event contract (left out), e.g. {dataset.rejected[0]}", err=True)
    events = schedule(dataset.items, dataset.interactions)
    settings.image_file_roots = [*settings.image_file_roots, dataset.root]
    services, infra = stack_services(settings, False)
    roots = json.dumps([str(root) for root in settings.image_file_roots])
    for service in services[infra:]:
        service.env["VLM4REC_IMAGE_FILE_ROOTS"] = roots
    stack = LocalStack(services, log_dir=settings.data_dir / "logs")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"starting the local stack (logs in {settings.data_dir / 'logs'}) ...")
    stack.start(
        after_infra=lambda: create_topics(settings.kafka_config(), settings.topic_partitions_map(), settings.topic_replication),
        infra=infra,
    )
    try:
        page = f"http://{settings.web_host}:{settings.web_port}/"
        deadline = time.monotonic() + PAGE_WAIT_S
        while not stop.is_set() and not page_answers(page) and time.monotonic() < deadline:
            stack.supervise_once()
            stop.wait(0.5)
        if stop.is_set():
            return
        user = most_active_user(dataset.interactions)
        click.echo(f"\nThe live page: {page}")
        if user is not None:
            click.echo(f"  the most active user: {page}ui/users/{quote(user, safe='')}")
        click.echo(
            f"Replaying {len(dataset.interactions)} interactions of {limit_users} users and their items from "
            f"{dataset.name} in about {duration_s:.0f} s; the worker embeds each item's picture as it arrives.\n"
        )
        outcome: list[str] = []
        thread = threading.Thread(target=_replay, args=(settings, events, duration_s, stop, outcome), daemon=True)
        thread.start()
        while not stop.is_set():
            stack.supervise_once()
            if outcome:
                click.echo(f"{outcome.pop()} The stack keeps running: browse {page} ; Ctrl-C stops everything.")
            stop.wait(0.5)
        thread.join(5)
    finally:
        click.echo("stopping...")
        stack.stop()
        click.echo("stopped.")


def _replay(settings: Settings, events: list[Scheduled], duration_s: float, stop: threading.Event, outcome: list[str]) -> None:
    """The replay thread (the main thread supervises the stack meanwhile); appends one line
    saying how it ended."""
    from topics.producer import DeliveryError, EventProducer

    topics = settings.topics
    try:
        with EventProducer(settings.kafka_config()) as producer:
            stats = replay(
                events, StoppableSender(producer, stop), topics.items_new, topics.interactions,
                replay_speed(events, duration_s), sleep=stop.wait,
            )
        outcome.append(f"Replay done: {stats.items} items, {stats.interactions} interactions in {stats.wall_s:.0f} s.")
    except Stopped:
        pass
    except DeliveryError as exc:
        outcome.append(f"Replay failed: {exc}.")
