"""A real Milvus server on this machine without Docker: Milvus 2.3 standalone (the C++ engine
with embedded etcd, rocksmq and local storage) from the `milvus` PyPI wheel.

`vlm4rec up` runs Milvus Lite by default (a small pure-Python engine, `milvus-lite server`).
With `VLM4REC_LOCAL_MILVUS=server` it runs this instead: the same gRPC protocol and client code
as a production Milvus, and a search engine that is not bound by one Python thread
(`vlm4rec bench search` on 2 cores, 17k vectors of 384 floats, 256 queries of top 100 per
call, Strong reads: Milvus Lite 251 queries/s, this server 2,285). It needs `pip install
milvus==2.3.5` (57 MB; the `milvus-server` extra) and takes about 8 s to start.

Run as `python -m vlm4rec.localstack.milvusserver --data-dir DIR --port PORT`: it prepares the server's
files under DIR, starts the server (a child in the same process group, so a SIGKILL of the
group takes both), and stops it on SIGTERM or SIGINT. Its internal ports (etcd, coordinators)
are picked free above 40000, and bound to 127.0.0.1 only where the wheel allows it: the
gRPC port listens on every interface, so keep this to development machines (docs/security.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

TIME_TICK_MS = 20
START_ATTEMPTS = 3
READY_S = 20.0
INSTALL_HINT = "the embedded Milvus server needs the `milvus` wheel: pip install 'milvus==2.3.5'"


def available() -> bool:
    """Whether the `milvus` wheel (the embedded server) is installed."""
    try:
        import milvus  # noqa: F401
    except ImportError:
        return False
    return True


def _answers(port: int, within_s: float) -> bool:
    """Whether the server answers a gRPC call within `within_s` (its /healthz can pass while
    it cannot)."""
    from vlm4rec.localstack import milvus_answers

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if milvus_answers("127.0.0.1", port):
            return True
        time.sleep(1.0)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="where the server keeps its data and logs")
    parser.add_argument("--port", type=int, default=19530, help="gRPC port clients connect to")
    args = parser.parse_args(argv)
    try:
        from milvus import MilvusServer
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    args.data_dir.mkdir(parents=True, exist_ok=True)
    server = MilvusServer()
    server.set_base_dir(str(args.data_dir.resolve()))
    server.listen_port = args.port
    # Every read of the product is Strong (vectorstore/milvus.py), which waits for the proxy's
    # next time tick: 200 ms by default. Measured here, one query: 401 ms at the default, 21 ms
    # at 20 ms (256 queries: 499 vs 135 ms), for about a tenth of a core while idle.
    server.config.extra_configs["proxy.timeTickInterval"] = TIME_TICK_MS
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for attempt in range(1, START_ATTEMPTS + 1):
        server.start()  # returns once /healthz answers
        if _answers(args.port, READY_S):
            break
        # seen about one start in four here: the embedded etcd elects its leader while the
        # root coordinator registers ("etcdserver: leader changed"), and the server never serves
        print(f"Milvus server not answering on port {args.port} after {READY_S:.0f}s "
              f"(attempt {attempt} of {START_ATTEMPTS}); restarting it", file=sys.stderr, flush=True)
        server.stop()
        if attempt == START_ATTEMPTS:
            return 1
    print(f"Milvus server listening on port {args.port} (data {args.data_dir})", flush=True)
    while not stop.wait(1.0):
        if server.server_proc is not None and server.server_proc.poll() is not None:
            print(f"Milvus server exited with code {server.server_proc.returncode}", file=sys.stderr, flush=True)
            return 1
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
