"""The embedded local stack: real Tansu broker and Milvus Lite server started by `vlm4rec up`."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from confluent_kafka import Consumer, TopicPartition

from conftest import free_port, stack_env, start_stack
from topics import DeadLetter, Interaction, ItemEmbedded, ItemNew, Recs, decode
from topics.producer import EventProducer
from vlm4rec.localstack import parse_host_port, port_answers, port_in_use

pytestmark = pytest.mark.integration


def test_up_infra_only_round_trip_and_clean_stop(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "stack", ["--infra-only"])
    children = psutil.Process(stack.process.pid).children(recursive=True)
    assert len(children) >= 2, "broker and milvus should be children of vlm4rec up"
    settings = stack.settings()
    try:
        events = {
            settings.topics.items_new: ItemNew(item_id="sku-ü", title="Red dress", image_url="https://example.com/x.jpg"),
            settings.topics.interactions: Interaction(user_id="u1", item_id="sku-ü", event="click", ts=1.0),
            settings.topics.items_embedded: ItemEmbedded(item_id="sku-ü", model="m", dim=4, embedded_at=2.0),
            settings.topics.recs: Recs(user_id="u1", items=[{"item_id": "sku-ü", "score": 0.9}], trigger="interaction", model="m", generated_at=3.0),
            settings.topics.items_new_dlq: DeadLetter.of(b"{bad", b"k", "items.new", 0, 0, "not valid JSON"),
            settings.topics.interactions_dlq: DeadLetter.of(b"[]", b"u", "interactions", 1, 5, "expected a JSON object"),
        }
        with EventProducer(settings.kafka_config()) as producer:
            for topic, event in events.items():
                producer.send(topic, event)
        consumer = Consumer(settings.consumer_config(f"t-{uuid.uuid4().hex[:8]}"))
        try:
            for topic, event in events.items():
                consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.topic_partitions)])
                got = None
                deadline = time.monotonic() + 20
                while got is None and time.monotonic() < deadline:
                    msg = consumer.poll(0.5)
                    if msg is not None and msg.error() is None:
                        got = msg
                assert got is not None, f"nothing consumed from {topic}"
                assert decode(type(event), got.value()) == event
        finally:
            consumer.close()

        from pymilvus import DataType, MilvusClient

        client = MilvusClient(uri=settings.milvus_uri)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
        index = client.prepare_index_params()
        index.add_index("v", index_type="AUTOINDEX", metric_type="COSINE")
        client.create_collection("smoke", schema=schema, index_params=index)
        vectors = np.eye(4, dtype=np.float32)
        client.insert("smoke", [{"id": i, "v": vectors[i].tolist()} for i in range(4)])
        hits = client.search("smoke", data=[vectors[2].tolist()], limit=1, consistency_level="Strong")
        assert hits[0][0]["id"] == 2
        client.close()
    finally:
        assert stack.stop() == 0
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, f"orphan {child}"
    for address in (settings.bootstrap_servers, settings.milvus_uri):
        host, port = parse_host_port(address, 0)
        assert not port_answers(host, port), f"{address} still answers"
        assert not port_in_use(host, port), f"port {port} not freed"


def test_topics_are_created_with_configured_partitions(infra) -> None:  # noqa: ANN001
    from confluent_kafka.admin import AdminClient

    settings = infra.settings()
    meta = AdminClient(settings.kafka_config()).list_topics(timeout=10)
    for name in settings.topics.all():
        assert len(meta.topics[name].partitions) == settings.topic_partitions
    from topics.admin import create_topics

    statuses = create_topics(settings.kafka_config(), settings.topic_partitions_map(), configs=settings.topic_configs())
    assert {s.state for s in statuses} == {"exists"}


def test_port_in_use_gives_a_clear_message(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    blocker = socket.socket()
    port = free_port()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        env = stack_env(tmp_path, VLM4REC_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, "-m", "vlm4rec", "up", "--infra-only"],
            env=env, capture_output=True, text=True, timeout=60,
        )
    finally:
        blocker.close()
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_refuses_remote_addresses(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = stack_env(tmp_path, VLM4REC_BOOTSTRAP_SERVERS="kafka.example.com:9092")
    result = subprocess.run([sys.executable, "-m", "vlm4rec", "up"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "points at kafka.example.com" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("poisoned", ["vlm4rec", "streams", "workers", "topics"])
def test_stack_processes_import_the_installed_code_whatever_the_working_directory(tmp_path: Path, poisoned: str) -> None:
    """`vlm4rec up` started next to a folder named like one of the product's packages (another
    checkout, a user's own `topics/`) must not run that folder: `python -m` would put the
    working directory first on the children's import path."""
    import subprocess

    from vlm4rec.cli.stack import stack_services
    from vlm4rec.settings import Settings

    (tmp_path / poisoned).mkdir()
    (tmp_path / poisoned / "__init__.py").write_text("raise SystemExit('the working directory was imported')\n")
    services, infra = stack_services(Settings(_env_file=None), infra_only=False)
    assert len(services) > infra
    for service in services[infra:]:
        done = subprocess.run([*service.argv, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "working directory was imported" not in done.stderr


def test_the_local_stacks_worker_embeds_on_half_the_cores_unless_told() -> None:
    """`vlm4rec up` runs the worker beside the serving path: half the cores (at least one),
    unless VLM4REC_EMBED_THREADS is set; a vLLM backend is not the worker's CPU to share."""
    import os

    from vlm4rec.cli.stack import stack_services
    from vlm4rec.settings import Settings

    def worker_env(settings: Settings) -> dict[str, str]:
        services, _ = stack_services(settings, infra_only=False)
        return next(s for s in services if s.name == "worker").env

    cores = len(os.sched_getaffinity(0))
    assert worker_env(Settings(_env_file=None)) == {"VLM4REC_EMBED_THREADS": str(max(1, cores // 2))}
    assert worker_env(Settings(_env_file=None, embed_threads=3)) == {}
    assert worker_env(Settings(_env_file=None, embed_backend="vllm-http")) == {}


def test_a_harness_stack_runs_what_vlm4rec_up_runs(tmp_path: Path) -> None:
    """The soak, chaos and demo stacks hand every setting to their children, which made each
    one "set": the stack's choices for settings left unset were overridden, and a soak of one
    stream processor learnt through the shared observations topic (JSON round trips of every
    interaction's last 50 items through the broker) that `vlm4rec up` turns off for one."""
    from vlm4rec.cli.stack import stack_services
    from vlm4rec.harness.ownstack import own_services, own_settings
    from vlm4rec.settings import Settings

    def streams_env(settings: Settings) -> list[dict[str, str]]:
        services, _ = own_services(own_settings(settings, tmp_path, ()), stack_services)
        return [s.env for s in services if s.name.startswith("streams")]

    (one,) = streams_env(Settings(_env_file=None))
    assert one["VLM4REC_STREAMS_LEARN_FROM_ALL"] == "false"
    two = streams_env(Settings(_env_file=None, local_streams=2))
    assert [env["VLM4REC_STREAMS_LEARN_FROM_ALL"] for env in two] == ["true", "true"]
    assert len({env["VLM4REC_WEB_PORT"] for env in two}) == 2, "each stream processor on a port of its own"
    (told,) = streams_env(Settings(_env_file=None, streams_learn_from_all=True))
    assert told["VLM4REC_STREAMS_LEARN_FROM_ALL"] == "true", "a user's own setting stands"
    assert one["VLM4REC_BOOTSTRAP_SERVERS"].startswith("127.0.0.1:"), "every other setting is handed down"


def test_sigterm_stops_a_harness_stack_in_order() -> None:
    """Within `own_stack`, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so the stack is
    stopped in order (stream processor first, broker last) rather than every child told by the
    kernel at once; the handler before it comes back afterwards."""
    import os
    import signal

    from vlm4rec.harness.ownstack import _interrupt_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    previous = _interrupt_on_sigterm()
    try:
        assert previous is before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signal.getsignal(signal.SIGTERM) is before
