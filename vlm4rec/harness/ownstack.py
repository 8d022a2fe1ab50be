"""A local stack of a harness run's own: the same services as `vlm4rec up` on free ports in a
fresh folder, so that a running `vlm4rec up` and its Milvus data are never touched and every
count starts from zero (`vlm4rec chaos`, `vlm4rec soak`). Optionally the worker and the stream
processor reach Milvus through a `SlowProxy` (chaos's `slow` fault)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from vlm4rec.localstack import LocalStack, Service, StackError, parse_host_port, port_answers
from vlm4rec.settings import Settings
from vlm4rec.harness.probes import http_get
from vlm4rec.harness.slowproxy import SlowProxy


StackServices = Callable[[Settings, bool], tuple[list[Service], int]]

READY_TIMEOUT_S = 180.0  # a restarted stream processor rebuilds its tables from the changelog


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class OwnStack:
    """A running local stack started by `own_stack`, and how to reach it."""

    settings: Settings  # points at this stack
    stack: LocalStack
    run_dir: Path
    proxy: SlowProxy | None = None  # between the worker and stream processor and Milvus

    def service(self, name: str) -> Service:
        return next(s for s in self.stack.services if s.name == name)

    @property
    def web_url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}"

    def ready(self, name: str) -> bool:
        """Whether `name` is alive and answering: Milvus its API, the worker its metrics port,
        the stream processor its HTTP API."""
        service = self.service(name)
        if not service.alive():
            return False
        if name == "worker":
            return port_answers(self.settings.web_host, self.settings.worker_metrics_port)
        if name == "streams":
            return streams_answers(self.web_url)
        return service.ready()

    def wait_ready(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Supervise (restart what died) until `name` answers; returns the seconds waited."""
        started = time.monotonic()
        while not self.ready(name):
            if time.monotonic() - started > timeout_s:
                raise StackError(f"{name} did not answer within {timeout_s:.0f}s; logs in {self.run_dir / 'logs'}")
            self.stack.supervise_once()
            time.sleep(0.2)
        return time.monotonic() - started


def streams_answers(web_url: str) -> bool:
    """The stream processor's HTTP API is up when an unknown user gets its 404."""
    try:
        return http_get(f"{web_url}/users/__probe__", timeout_s=2)[0] in (200, 404)
    except OSError:
        return False


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the VLM4REC_* variable that sets it: the child processes read their
    settings from the environment, and must see exactly the values this process uses."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, (list, dict)):
            value = json.dumps(value, default=str)
        env[Settings.env_name(name)] = str(value)
    return env


def own_settings(settings: Settings, run_dir: Path, file_roots: Sequence[Path]) -> Settings:
    """`settings` moved onto free ports and into `run_dir`."""
    return settings.model_copy(
        update={
            "bootstrap_servers": f"127.0.0.1:{free_port()}",
            "milvus_uri": f"http://127.0.0.1:{free_port()}",
            "data_dir": run_dir,
            "web_host": "127.0.0.1",
            "web_port": free_port(),
            "worker_metrics_port": free_port(),
            "image_file_roots": [*settings.image_file_roots, *file_roots],
        }
    )


def own_services(
    own: Settings, stack_services: StackServices, restart_milvus: bool = False, milvus_proxy_port: int | None = None
) -> tuple[list[Service], int]:
    """The services of `vlm4rec up` for `own` settings, each given every setting in its
    environment (`settings_env`) with the service's own variables on top (`stack_services`:
    each stream processor's web port, whether it learns from the others). Every setting is
    "set" in that environment, so the other way round it overrode the choices `vlm4rec up`
    makes for settings left unset: a soak of one stream processor learnt through the shared
    observations topic, which `vlm4rec up` turns off for one."""
    services, infra = stack_services(own, False)
    env = settings_env(own)
    for service in services:
        service.env = {**env, **service.env}
        if service.name == "milvus":
            service.restart = restart_milvus
        elif milvus_proxy_port is not None and service.name in ("worker", "streams"):
            service.env["VLM4REC_MILVUS_URI"] = f"http://127.0.0.1:{milvus_proxy_port}"
    return services, infra


def _interrupt_on_sigterm() -> Any:
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so that the
    harness stops its stack in order (stream processor first, broker last). Python's default
    ends the process at once, and each child then got SIGTERM from the kernel at the same
    moment (`localstack._die_with_parent`): the broker went first and the stream processor was
    left stopping against no broker. Returns the handler it replaced (None: not the main
    thread, nothing changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def own_stack(
    settings: Settings,
    run_dir: Path,
    stack_services: StackServices,
    file_roots: Sequence[Path] = (),
    restart_milvus: bool = False,
    milvus_proxy: bool = False,
) -> Iterator[OwnStack]:
    """Start broker, Milvus Lite, worker and stream processor under `run_dir` on free ports;
    stop them all on exit. `restart_milvus`: restart Milvus when it dies, as an operator's
    supervisor would (`vlm4rec up` ends the stack instead). `milvus_proxy`: the worker and the
    stream processor reach Milvus through a `SlowProxy` (the `slow` fault)."""
    from topics.admin import create_topics

    run_dir.mkdir(parents=True, exist_ok=False)
    # models are exported once per machine, not once per run
    settings.model_cache_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "models").symlink_to(settings.model_cache_dir.resolve(), target_is_directory=True)
    own = own_settings(settings, run_dir, file_roots)
    proxy = None
    if milvus_proxy:
        host, port = parse_host_port(own.milvus_uri, 19530)
        proxy = SlowProxy(host, port)
    services, infra = own_services(own, stack_services, restart_milvus, proxy.port if proxy else None)
    stack = LocalStack(services, log_dir=run_dir / "logs")
    previous = _interrupt_on_sigterm()  # from the start: the stack starts for tens of seconds
    try:
        stack.start(
            after_infra=lambda: create_topics(own.kafka_config(), own.topic_partitions_map(), own.topic_replication, configs=own.topic_configs()),
            infra=infra,
        )
        running = OwnStack(own, stack, run_dir, proxy)
        for name in ("worker", "streams"):
            running.wait_ready(name)
        yield running
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stack.stop()
        if proxy is not None:
            proxy.close()
