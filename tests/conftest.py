"""Shared fixtures. Integration tests start the real embedded stack (`vlm4rec up
--infra-only`: the broker VLM4REC_LOCAL_BROKER names + Milvus Lite server) on free ports, once per
session; `tansu_broker` and `own_broker` start one broker alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningStack:
    """A `vlm4rec up` child process and the environment that points at it."""

    def __init__(self, env: dict[str, str], process: subprocess.Popen[str], log_path: Path) -> None:
        self.env = env
        self.process = process
        self.log_path = log_path

    @property
    def bootstrap(self) -> str:
        return self.env["VLM4REC_BOOTSTRAP_SERVERS"]

    @property
    def milvus_uri(self) -> str:
        return self.env["VLM4REC_MILVUS_URI"]

    def settings(self, **overrides: str):
        from vlm4rec.settings import Settings

        env = {**self.env, **{f"VLM4REC_{k.upper()}": v for k, v in overrides.items()}}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return Settings()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout_s)


def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "VLM4REC_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "VLM4REC_MILVUS_URI": f"http://127.0.0.1:{free_port()}",
        "VLM4REC_DATA_DIR": str(data_dir),
        "VLM4REC_TOPIC_PARTITIONS": "2",
        "VLM4REC_WEB_PORT": str(free_port()),
        "VLM4REC_WORKER_METRICS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def start_stack(data_dir: Path, args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120.0) -> RunningStack:
    """Run `vlm4rec up ARGS` and wait for its 'is up' line."""
    env = env or stack_env(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "up.out"
    out = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm4rec", "up", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "Press Ctrl-C to stop." in text:
            return RunningStack(env, process, log_path)
        if process.poll() is not None:
            raise RuntimeError(f"vlm4rec up exited with {process.returncode}:\n{text}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"vlm4rec up did not come up in {timeout_s}s:\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Broker + Milvus Lite for the whole test session."""
    stack = start_stack(tmp_path_factory.mktemp("infra"), ["--infra-only"])
    yield stack
    stack.stop()


def _broker_alone(service_for, tmp: Path) -> Iterator[str]:
    from vlm4rec.localstack import LocalStack

    port = free_port()
    stack = LocalStack([service_for("127.0.0.1", port)], tmp / "logs")
    stack.start()
    yield f"127.0.0.1:{port}"
    stack.stop()


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Tansu broker alone (whatever VLM4REC_LOCAL_BROKER says), for the tests that show its
    misbehaviours; yields its bootstrap address."""
    from vlm4rec.localstack import broker_service

    yield from _broker_alone(broker_service, tmp_path_factory.mktemp("tansu"))


@pytest.fixture(scope="session")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project's own broker alone (`vlm4rec.localstack.broker`); yields its bootstrap address."""
    from vlm4rec.localstack import own_broker_service

    yield from _broker_alone(lambda host, port: own_broker_service(host, port, 1), tmp_path_factory.mktemp("own-broker"))


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Milvus 2.3 standalone server (`vlm4rec.localstack.milvusserver`, the `milvus` wheel that
    the dev extra installs); yields its URI."""
    from vlm4rec.localstack import LocalStack, milvus_server_service, milvusserver

    if not milvusserver.available():
        pytest.skip(milvusserver.INSTALL_HINT)
    port = free_port()
    data_dir = tmp_path_factory.mktemp("milvus-server")
    stack = LocalStack([milvus_server_service("127.0.0.1", port, data_dir / "data")], data_dir / "logs")
    stack.start()
    yield f"http://127.0.0.1:{port}"
    stack.stop()


@pytest.fixture
def shared_data() -> Path:
    """The real datasets beside the project; tests that need them skip without them."""
    if not (SHARED_DATA / "hm" / "items.csv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def read_topic(kafka_config: dict, topic: str, want: int, timeout_s: float = 60.0, partitions: int = 2) -> list:
    """Every message of `topic` from the beginning, waiting until at least `want` arrived."""
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**kafka_config, "group.id": f"reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < want and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None:
                    messages.append(msg)
    finally:
        consumer.close()
    return messages


def isolate(infra: RunningStack, uid: str, **extra: str) -> RunningStack:
    """The session's broker and Milvus with topics, collections, groups and ports named by
    `uid` (created here); `extra` adds or overrides settings."""
    from topics.admin import create_topics

    env = {
        **infra.env,
        "VLM4REC_TOPIC_ITEMS_NEW": f"items.new.{uid}",
        "VLM4REC_TOPIC_INTERACTIONS": f"interactions.{uid}",
        "VLM4REC_TOPIC_ITEMS_EMBEDDED": f"items.embedded.{uid}",
        "VLM4REC_TOPIC_RECS": f"recs.{uid}",
        "VLM4REC_MILVUS_COLLECTION": f"items_{uid}",
        "VLM4REC_WORKER_GROUP": f"embedders-{uid}",
        "VLM4REC_WORKER_METRICS_PORT": "0",
        "VLM4REC_STREAMS_APP_ID": f"streams-{uid}",
        "VLM4REC_WEB_PORT": str(free_port()),
        **extra,
    }
    stack = RunningStack(env, infra.process, infra.log_path)
    settings = stack.settings()
    create_topics(settings.kafka_config(), settings.topic_partitions_map(), configs=settings.topic_configs())
    return stack


@pytest.fixture
def isolated(infra: RunningStack) -> RunningStack:
    """The session's broker and Milvus with this test's own topics and collection."""
    import uuid

    return isolate(infra, uuid.uuid4().hex[:8])
