"""`vlm4rec demo [DATASET_DIR]`: the one command a newcomer runs to see the product work.

It starts the same local stack as `vlm4rec up` (broker, Milvus Lite, embedding worker, stream
processor) and feeds it while the page at the printed address fills with pictures, until Ctrl-C:

- without a folder, the simulated shop of `vlm4rec.harness.simulated` (drawn pictures, users with
  distinct tastes acting on their feeds), live and endless, with a line every few seconds
  saying how much of each user's feed matches their taste;
- with a dataset folder, a replay of its first users with event time compressed into a couple
  of minutes, behind a progress bar; the folder is added to the file roots of the processes
  that read item pictures.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import click

from topics import Event, Interaction
from vlm4rec.evaluation.dataset import load_dataset
from vlm4rec.localstack import LocalStack, Service
from vlm4rec.evaluation.replay import Scheduled, Sender, replay, schedule
from vlm4rec.settings import Settings
from vlm4rec.harness.probes import http_get
from vlm4rec.harness.simulated import TASTES, Shop, item_event, user_id

StackServices = Callable[[Settings, bool], tuple[list[Service], int]]

PAGE_WAIT_S = 120.0
#: The simulated shop: items at the start, seconds between fresh items, between two actions
#: of the same user, and between progress lines.
#: Fresh items come faster than a user who likes one colour (an eighth of them) uses them up.
INITIAL_ITEMS = 256
FRESH_EVERY_S = 1.0
ACT_EVERY_S = 4.0
REPORT_EVERY_S = 15.0


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
        return http_get(url, timeout_s=2)[0] == 200
    except OSError:
        return False


Feed = Callable[[Settings, str, threading.Event, list[str]], None]


def run_demo(settings: Settings, dataset_dir: Path | None, limit_users: int, duration_s: float, stack_services: StackServices) -> None:
    """Start the stack, feed it (the dataset's replay, else the simulated shop), keep running
    until Ctrl-C or SIGTERM.

    `stack_services` is the function behind `vlm4rec up` that lists the stack's processes."""
    if dataset_dir is None:
        names = list(TASTES)[:limit_users]
        intro = [f"  {name}, who likes {TASTES[name].name}: {{page}}ui/users/{quote(user_id(name), safe='')}" for name in names]
        intro.append(
            f"Simulating {len(names)} users on a shop of {INITIAL_ITEMS} drawn items, with a new item every "
            f"{FRESH_EVERY_S:.0f} s; each user clicks what they like in their feed and hides what they do not.\n"
        )
        _run_stack(settings, stack_services, intro, lambda s, page, stop, out: simulate(s, page, names, stop, out))
        return
    dataset = load_dataset(dataset_dir).limit_users(limit_users)
    if dataset.rejected:
        click.echo(f"{len(dataset.rejected)} rows rejected by the event contract (left out), e.g. {dataset.rejected[0]}", err=True)
    events = schedule(dataset.items, dataset.interactions)
    settings.image_file_roots = [*settings.image_file_roots, dataset.root]
    user = most_active_user(dataset.interactions)
    intro = [] if user is None else [f"  the most active user: {{page}}ui/users/{quote(user, safe='')}"]
    intro.append(
        f"Replaying {len(dataset.interactions)} interactions of {limit_users} users and their items from "
        f"{dataset.name} in about {duration_s:.0f} s; the worker embeds each item's picture as it arrives.\n"
    )
    _run_stack(settings, stack_services, intro, lambda s, page, stop, out: _replay(s, events, duration_s, stop, out))


def _run_stack(settings: Settings, stack_services: StackServices, intro: list[str], feed: Feed) -> None:
    """The stack's processes under supervision, the page's address, then `feed` in a thread
    until Ctrl-C or SIGTERM; everything is stopped on the way out."""
    from topics.admin import create_topics

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
        after_infra=lambda: create_topics(settings.kafka_config(), settings.topic_partitions_map(), settings.topic_replication, configs=settings.topic_configs()),
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
        click.echo(f"\nThe live page: {page}")
        for line in intro:
            click.echo(line.format(page=page))
        outcome: list[str] = []
        thread = threading.Thread(target=feed, args=(settings, page, stop, outcome), daemon=True)
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


def current_recs(page: str, user: str) -> list[str]:
    """The item ids the page shows as `user`'s recommendations, best first; none while the
    user has no push yet or the page does not answer (the simulated user then browses)."""
    try:
        status, raw = http_get(f"{page}ui/api/users/{quote(user, safe='')}", timeout_s=2)
        body = json.loads(raw) if status == 200 else None
    except (OSError, ValueError):
        return []
    recs = body.get("recs") if isinstance(body, dict) else None
    return [str(card["item_id"]) for card in (recs or {}).get("items", []) if isinstance(card, dict) and "item_id" in card]


def simulate(settings: Settings, page: str, names: Sequence[str], stop: threading.Event, outcome: list[str], seed: int = 0) -> None:
    """The simulated shop's thread: publish the first items, then one user acts per tick
    (round robin, on what their feed shows now), a fresh item every `FRESH_EVERY_S`, and a
    line every `REPORT_EVERY_S` saying how much of each user's list matches their taste."""
    from topics.producer import DeliveryError, EventProducer

    topics = settings.topics
    shop = Shop(random.Random(seed), names)
    sent = 0
    try:
        with EventProducer(settings.kafka_config()) as producer:
            for design in shop.publish(INITIAL_ITEMS):
                producer.send(topics.items_new, item_event(design, time.time()))
            producer.flush()
            fresh_due = time.monotonic() + FRESH_EVERY_S
            report_due = time.monotonic() + REPORT_EVERY_S
            users = itertools.cycle(names)
            while not stop.wait(ACT_EVERY_S / len(names)):
                name = next(users)
                event = shop.act(name, current_recs(page, user_id(name)), time.time())
                if event is not None:
                    producer.send(topics.interactions, event)
                    sent += 1
                if time.monotonic() >= fresh_due:
                    fresh_due += FRESH_EVERY_S
                    for design in shop.publish(1):
                        producer.send(topics.items_new, item_event(design, time.time()))
                if time.monotonic() >= report_due:
                    report_due += REPORT_EVERY_S
                    shares = ", ".join(f"{n} {shop.share_liked(n, current_recs(page, user_id(n))):.0%}" for n in names)
                    click.echo(f"{len(shop.published)} items, {sent} interactions sent; share of each feed the user likes: {shares}")
    except DeliveryError as exc:
        outcome.append(f"Simulation stopped: {exc}.")


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
