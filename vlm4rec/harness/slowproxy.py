"""A TCP proxy that can be made slow: `vlm4rec chaos`'s "slow Milvus" fault.

The worker and the stream processor of a chaos run reach Milvus through it. While it is slow,
every chunk it forwards, in either direction, waits `delay_s` first: a gRPC call then takes at
least twice that, so timeouts, retries and the back-pressure of a slow dependency are exercised
without touching Milvus itself. Connections stay open across slow and fast periods.
"""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 65536


class SlowProxy:
    """Listens on 127.0.0.1:`port` (0: a free one, see `.port`) and forwards to target."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.delay_s = 0.0
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="slow-proxy", daemon=True).start()

    def slow(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def fast(self) -> None:
        self.delay_s = 0.0

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the target is down (killed by another fault): the caller retries
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK):
                if self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)
