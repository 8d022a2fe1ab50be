"""images.loader: the safe image loader. Fast and offline: real HTTP(S) servers on 127.0.0.1 in
threads, admitted with allowed_hosts for the positive cases; a fake resolver where a test needs a
host name other than localhost."""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from images.loader import ImageError, ImageLimits, ImageLoader, blocked_address_reason

LOCAL = ("127.0.0.1",)
METADATA = "a cloud metadata address (never admitted)"
LOOPBACK = "a loopback address (not in allowed_hosts)"
UNRECOGNISED = "cannot decode image: not one of PNG, JPEG, GIF, WEBP, BMP, AVIF"


# -- image bytes -------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


RED_PNG = encode(Image.new("RGB", (8, 6), (255, 0, 0)), "PNG")
BLUE_JPEG = encode(Image.new("RGB", (16, 12), (0, 0, 255)), "JPEG")
NOISE_PNG = encode(Image.effect_noise((64, 64), 64), "PNG")  # incompressible: cut it and pixels are missing


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@cache
def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: tiny on the wire, width*height pixels once decoded (a
    20000x20000 one is ~50 KB and would take 1.2 GB as RGB)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- local servers -----------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler, dict[str, list[str]]], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64  # the default 5 makes concurrent clients wait for SYN retries
    routes: dict[str, Route]
    requests: list[tuple[str, dict[str, str]]]

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hang up on purpose (limits, timeouts): not an error here."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, dict(self.headers)))
        parts = urlsplit(self.path)
        route = self.server.routes.get(parts.path)
        if route is None:
            send(self, b"not found", "text/plain", status=404)
        else:
            route(self, parse_qs(parts.query))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def send(
    handler: BaseHTTPRequestHandler,
    body: bytes,
    content_type: str | None = "image/png",
    *,
    status: int = 200,
    length: int | None = -1,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """A response; `length` -1 means the true Content-Length, None none (body ends at close)."""
    handler.send_response(status)
    if content_type is not None:
        handler.send_header("Content-Type", content_type)
    if length is not None:
        handler.send_header("Content-Length", str(len(body) if length == -1 else length))
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


def trickle(handler: BaseHTTPRequestHandler, data: bytes, pause_s: float = 0.05) -> None:
    """Send one byte at a time, each well inside any per-receive timeout, until the client
    hangs up (or 5 s pass)."""
    give_up = time.monotonic() + 5
    for byte in data:
        if time.monotonic() > give_up:
            return
        try:
            handler.wfile.write(bytes([byte]))
        except OSError:
            return
        time.sleep(pause_s)


@dataclass
class LocalServer:
    server: _Server
    scheme: str = "http"
    host: str = "127.0.0.1"
    routes: dict[str, Route] = field(init=False)

    def __post_init__(self) -> None:
        self.routes = self.server.routes

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    @property
    def requests(self) -> list[tuple[str, dict[str, str]]]:
        return self.server.requests


def start_server(wrap: Callable[[socket.socket], socket.socket] | None = None) -> _Server:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.routes, server.requests = {}, []
    if wrap is not None:
        server.socket = wrap(server.socket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def redirect(handler: BaseHTTPRequestHandler, location: str) -> None:
    send(handler, b"", None, status=302, headers=(("Location", location),))


@pytest.fixture(scope="module")
def http_server() -> Iterator[LocalServer]:
    server = start_server()
    local = LocalServer(server)
    port = local.port
    png_head = RED_PNG[:33]  # signature + IHDR: enough for the header check, then trickle
    routes: dict[str, Route] = {
        "/red.png": lambda h, q: send(h, RED_PNG),
        "/blue.jpg": lambda h, q: send(h, BLUE_JPEG, "image/jpeg"),
        "/octet.png": lambda h, q: send(h, RED_PNG, "application/octet-stream"),
        "/untyped.png": lambda h, q: send(h, RED_PNG, None),
        "/octet.txt": lambda h, q: send(h, b"just text", "application/octet-stream"),
        "/page.html": lambda h, q: send(h, b"<html></html>", "text/html; charset=utf-8"),
        "/drawing.svg": lambda h, q: send(h, b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
        "/corrupt.png": lambda h, q: send(h, b"\x89PNG\r\n\x1a\n" + os.urandom(200)),
        "/truncated.png": lambda h, q: send(h, NOISE_PNG[: len(NOISE_PNG) // 2]),
        "/gzip.png": lambda h, q: send(h, zlib.compress(RED_PNG), headers=(("Content-Encoding", "gzip"),)),
        "/missing.png": lambda h, q: send(h, b"gone", "text/plain", status=404),
        "/bomb.png": lambda h, q: send(h, bilevel_png(20000, 20000)),
        "/declared-big.png": lambda h, q: send(h, RED_PNG, length=10**9),
        "/streamed-big.png": lambda h, q: send(h, RED_PNG + b"\0" * 5000, length=None),
        "/short.png": lambda h, q: send(h, RED_PNG, length=len(RED_PNG) + 100),
        "/trickle-body.png": lambda h, q: (
            h.send_response(200),
            h.send_header("Content-Type", "image/png"),
            h.send_header("Content-Length", "1000"),
            h.end_headers(),
            trickle(h, png_head + b"\0" * 967),
        ),
        "/trickle-headers.png": lambda h, q: trickle(h, b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 500),
        "/redirect": lambda h, q: redirect(h, q["to"][0]),
        "/loop": lambda h, q: redirect(h, "/loop"),
        "/no-location": lambda h, q: send(h, b"", None, status=302),
    }
    for hops in range(1, 5):
        routes[f"/hops/{hops}"] = lambda h, q, n=hops: redirect(
            h, "/red.png" if n == 1 else f"http://127.0.0.1:{port}/hops/{n - 1}"
        )
    server.routes.update(routes)
    yield local
    server.shutdown()
    server.server_close()


@dataclass
class FakeDns:
    """Host names this test answers itself; every answer is recorded."""

    table: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    dns = FakeDns()
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host not in dns.table:
            return real(host, port, *args, **kwargs)
        dns.lookups.append(host)
        answers = []
        for ip in dns.table[host]:
            if ":" in ip:
                answers.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                answers.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return answers

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return dns


def loader(**limits: object) -> ImageLoader:
    return ImageLoader(ImageLimits(**limits))  # type: ignore[arg-type]


def refused(load: Callable[[str], object], uri: str) -> str:
    with pytest.raises(ImageError) as caught:
        load(uri)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# -- http: the happy paths -----------------------------------------------------------------


def test_png_over_http(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL)
    image = images.load(http_server.url("/red.png"))
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (8, 6), (255, 0, 0))
    assert images.load_bytes(http_server.url("/red.png")) == (RED_PNG, "image/png")


def test_jpeg_over_http(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL)
    image = images.load(http_server.url("/blue.jpg"))
    assert (image.mode, image.size) == ("RGB", (16, 12))
    r, g, b = image.getpixel((8, 6))
    assert b > 200 and r < 40 and g < 40
    assert images.load_bytes(http_server.url("/blue.jpg")) == (BLUE_JPEG, "image/jpeg")


def test_connects_to_the_checked_address_and_sends_the_original_host(
    http_server: LocalServer, fake_dns: FakeDns
) -> None:
    """The name resolves once, by the check; the connection goes to that address (the real
    resolver knows no `images.test`), and the server still sees the name in Host."""
    fake_dns.table["images.test"] = ["127.0.0.1"]
    images = loader(allowed_hosts=("images.test",))
    assert images.load_bytes(http_server.url("/red.png?size=large", host="images.test"))[0] == RED_PNG
    assert fake_dns.lookups == ["images.test"]
    path, headers = http_server.requests[-1]
    assert path == "/red.png?size=large"
    assert headers["Host"] == f"images.test:{http_server.port}"


def test_allowed_name_does_not_admit_its_address_by_other_names(
    http_server: LocalServer, fake_dns: FakeDns
) -> None:
    fake_dns.table["other.test"] = ["127.0.0.1"]
    images = loader(allowed_hosts=("images.test",))
    assert "127.0.0.1 is a loopback address" in refused(images.load, http_server.url("/red.png"))
    assert "other.test resolves to 127.0.0.1" in refused(images.load, http_server.url("/red.png", "other.test"))


def test_allowed_cidr_admits_resolved_addresses(http_server: LocalServer, fake_dns: FakeDns) -> None:
    fake_dns.table["cdn.test"] = ["127.0.0.1"]
    assert loader(allowed_hosts=("127.0.0.0/8",)).load(http_server.url("/red.png", "cdn.test")).size == (8, 6)


def test_localhost_is_loopback_unless_allowed(http_server: LocalServer) -> None:
    reason = refused(loader().load, http_server.url("/red.png", host="localhost"))
    assert reason.startswith("image host localhost resolves to ")
    assert reason.endswith("a loopback address (not in allowed_hosts)")
    # allowed: any of localhost's addresses (::1 and/or 127.0.0.1) that answers is used
    images = loader(allowed_hosts=("localhost",))
    assert images.load(http_server.url("/red.png", host="localhost")).size == (8, 6)


def test_octet_stream_and_untyped_bodies_are_accepted_when_they_are_images(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL)
    assert images.load_bytes(http_server.url("/octet.png")) == (RED_PNG, "image/png")
    assert images.load_bytes(http_server.url("/untyped.png")) == (RED_PNG, "image/png")
    assert refused(images.load_bytes, http_server.url("/octet.txt")).startswith("cannot decode image")


def test_redirects_are_followed_up_to_the_limit(http_server: LocalServer) -> None:
    def follow(path: str, max_redirects: int) -> tuple[int, int] | str:
        return _outcome(loader(allowed_hosts=LOCAL, max_redirects=max_redirects).load, http_server.url(path))

    assert follow("/hops/3", 3) == (8, 6)
    assert follow("/hops/3", 2) == "too many redirects"
    assert follow("/hops/1", 0) == "too many redirects"
    assert follow("/loop", 3) == "too many redirects"


def test_concurrent_loads_share_one_loader(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL)
    paths = ["/red.png", "/blue.jpg", "/hops/2", "/page.html"] * 16
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: _outcome(images.load, http_server.url(p)), paths))
    assert results == [(8, 6), (16, 12), (8, 6), "content type text/html is not an image"] * 16


def _outcome(load: Callable[[str], Image.Image], uri: str) -> tuple[int, int] | str:
    try:
        return load(uri).size
    except ImageError as exc:
        return exc.reason


# -- http: refusals ------------------------------------------------------------------------


def test_loopback_refused_without_allowlist(http_server: LocalServer) -> None:
    assert refused(loader().load, http_server.url("/red.png")) == (
        "image host 127.0.0.1 is a loopback address (not in allowed_hosts)"
    )


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://10.0.0.5/a.png", "image host 10.0.0.5 is a private address (not in allowed_hosts)"),
        ("https://192.168.1.20/a.png", "image host 192.168.1.20 is a private address (not in allowed_hosts)"),
        ("http://169.254.10.1/", "image host 169.254.10.1 is a link-local address (not in allowed_hosts)"),
        ("http://[fe80::1]/", "image host fe80::1 is a link-local address (not in allowed_hosts)"),
        ("http://169.254.169.254/latest/meta-data/", f"image host 169.254.169.254 is {METADATA}"),
        ("http://[fd00:ec2::254]/", f"image host fd00:ec2::254 is {METADATA}"),
        ("http://100.100.100.200/", f"image host 100.100.100.200 is {METADATA}"),
        ("http://[::ffff:169.254.169.254]/", f"image host ::ffff:169.254.169.254 is {METADATA}"),
        ("http://[::ffff:10.0.0.5]/", "image host ::ffff:10.0.0.5 is a private address (not in allowed_hosts)"),
        ("http://100.64.1.1/", "image host 100.64.1.1 is a shared (CGNAT) address (not in allowed_hosts)"),
        ("http://0.0.0.0:8080/", "image host 0.0.0.0 is an unspecified address (not in allowed_hosts)"),
        ("http://224.0.0.1/", "image host 224.0.0.1 is a multicast address (not in allowed_hosts)"),
        # other spellings of 127.0.0.1 are caught because the check is on the resolved address
        ("http://2130706433/", f"image host 2130706433 resolves to 127.0.0.1, {LOOPBACK}"),
        ("http://0x7f.1/", f"image host 0x7f.1 resolves to 127.0.0.1, {LOOPBACK}"),
    ],
)
def test_non_public_addresses_refused(uri: str, reason: str) -> None:
    assert refused(loader().load, uri) == reason


def test_metadata_address_refused_even_when_allowlisted() -> None:
    images = loader(allowed_hosts=("169.254.0.0/16", "169.254.169.254"))
    assert refused(images.load, "http://169.254.169.254/").endswith("(never admitted)")


def test_one_private_address_among_public_ones_refuses_the_host(fake_dns: FakeDns) -> None:
    fake_dns.table["mixed.test"] = ["93.184.216.34", "10.1.2.3"]
    assert refused(loader().load, "http://mixed.test/a.png") == (
        "image host mixed.test resolves to 10.1.2.3, a private address (not in allowed_hosts)"
    )


def test_unresolvable_host() -> None:
    assert refused(loader().load, "http://images.invalid/a.png") == "cannot resolve image host images.invalid"


@pytest.mark.parametrize(
    ("blocked", "reason"),
    [
        ("10.0.0.5", "a private address"),
        ("172.16.4.4", "a private address"),
        ("192.168.0.1", "a private address"),
        ("fc00::1", "a private address"),
        ("127.0.0.1", "a loopback address"),
        ("127.8.8.8", "a loopback address"),
        ("::1", "a loopback address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.170.2", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("::ffff:169.254.169.254", "a cloud metadata address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::ffff:192.168.0.1", "a private address"),
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", "a loopback address"),  # 6to4 of 127.0.0.1
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("224.0.0.251", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("fec0::1", "a site-local address"),
        ("192.0.2.10", "a private address"),  # documentation range
    ],
)
def test_blocked_address_reason(blocked: str, reason: str) -> None:
    assert blocked_address_reason(ipaddress.ip_address(blocked)) == reason


@pytest.mark.parametrize(
    "public", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(public: str) -> None:
    assert blocked_address_reason(ipaddress.ip_address(public)) is None


def test_redirect_to_a_refused_address_is_refused(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL)
    elsewhere = f"http://127.0.0.2:{http_server.port}/red.png"  # loopback, but not 127.0.0.1
    cases = {
        elsewhere: "image host 127.0.0.2 is a loopback address (not in allowed_hosts)",
        "http://10.0.0.5/a.png": "image host 10.0.0.5 is a private address (not in allowed_hosts)",
        "http://169.254.169.254/latest/meta-data/": f"image host 169.254.169.254 is {METADATA}",
        "file:///etc/passwd": "redirect to unsupported scheme 'file'",
        data_uri(RED_PNG): "redirect to unsupported scheme 'data'",
    }
    for target, reason in cases.items():
        assert refused(images.load, http_server.url(f"/redirect?to={target}")) == reason


def test_redirect_without_location(http_server: LocalServer) -> None:
    reason = refused(loader(allowed_hosts=LOCAL).load, http_server.url("/no-location"))
    assert reason == "redirect without a Location header"


def test_byte_limit(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL, max_bytes=len(RED_PNG) + 100)
    assert images.load(http_server.url("/red.png")).size == (8, 6)
    too_large = f"image larger than {len(RED_PNG) + 100} bytes"
    assert refused(images.load, http_server.url("/declared-big.png")) == too_large  # by Content-Length
    assert refused(images.load, http_server.url("/streamed-big.png")) == too_large  # counted while reading


def test_body_shorter_than_its_content_length(http_server: LocalServer) -> None:
    reason = refused(loader(allowed_hosts=LOCAL).load_bytes, http_server.url("/short.png"))
    assert reason == "image download ended early"


@pytest.mark.parametrize("path", ["/trickle-body.png", "/trickle-headers.png"])
def test_trickling_server_hits_the_total_read_timeout(http_server: LocalServer, path: str) -> None:
    """Bytes arrive every 50 ms, far inside any per-receive timeout: only a deadline ends it."""
    images = loader(allowed_hosts=LOCAL, read_timeout_s=0.4)
    started = time.monotonic()
    assert refused(images.load, http_server.url(path)) == "image download took longer than 0.4 s"
    assert time.monotonic() - started < 1.5


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        reason = refused(loader(allowed_hosts=LOCAL).load, f"http://127.0.0.1:{port}/a.png")
    assert reason.startswith("cannot connect to image host 127.0.0.1: ")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/page.html", "content type text/html is not an image"),
        ("/missing.png", "image server answered HTTP 404"),
        ("/gzip.png", "content encoding gzip is not supported"),
    ],
)
def test_refused_responses(http_server: LocalServer, path: str, reason: str) -> None:
    assert refused(loader(allowed_hosts=LOCAL).load, http_server.url(path)) == reason


@pytest.mark.parametrize("path", ["/corrupt.png", "/drawing.svg"])
def test_bytes_that_are_not_an_image(http_server: LocalServer, path: str) -> None:
    images = loader(allowed_hosts=LOCAL)
    assert refused(images.load_bytes, http_server.url(path)).startswith("cannot decode image: ")
    assert refused(images.load, http_server.url(path)).startswith("cannot decode image: ")


def test_truncated_image_fails_to_decode(http_server: LocalServer) -> None:
    images = loader(allowed_hosts=LOCAL)
    assert images.load_bytes(http_server.url("/truncated.png"))[1] == "image/png"  # the header is fine
    assert refused(images.load, http_server.url("/truncated.png")).startswith("cannot decode image: ")


# -- https ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path, list[str]]]:
    """A TLS server whose certificate names only `images.test`; yields it, its CA file and the
    SNI names it was sent."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str] = []

    def remember_server_name(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        server_names.append(name or "")

    context.sni_callback = remember_server_name  # type: ignore[assignment]
    server = start_server(wrap=lambda sock: context.wrap_socket(sock, server_side=True))
    server.routes["/red.png"] = lambda h, q: send(h, RED_PNG)
    yield LocalServer(server, scheme="https"), cert, server_names
    server.shutdown()
    server.server_close()


def test_https_verifies_the_certificate_against_the_host_name(
    https_server: tuple[LocalServer, Path, list[str]], fake_dns: FakeDns
) -> None:
    server, ca_file, server_names = https_server
    fake_dns.table["images.test"] = ["127.0.0.1"]
    images = ImageLoader(
        ImageLimits(allowed_hosts=("images.test", "127.0.0.1")),
        ssl_context=ssl.create_default_context(cafile=str(ca_file)),
    )
    assert images.load_bytes(server.url("/red.png", host="images.test")) == (RED_PNG, "image/png")
    assert server_names[-1] == "images.test"
    assert server.requests[-1][1]["Host"] == f"images.test:{server.port}"
    # same server and address, but by IP: the certificate does not name it
    reason = refused(images.load, server.url("/red.png"))
    assert reason.startswith("cannot connect to image host 127.0.0.1: ")
    assert "CERTIFICATE_VERIFY_FAILED" in reason


def test_https_with_default_trust_refuses_a_self_signed_certificate(
    https_server: tuple[LocalServer, Path, list[str]], fake_dns: FakeDns
) -> None:
    server, _, _ = https_server
    fake_dns.table["images.test"] = ["127.0.0.1"]
    reason = refused(loader(allowed_hosts=("images.test",)).load, server.url("/red.png", host="images.test"))
    assert "CERTIFICATE_VERIFY_FAILED" in reason


# -- data: URIs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("GIF", "image/gif"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
    ],
)
def test_data_uri_formats(fmt: str, content_type: str) -> None:
    data = encode(Image.new("RGB", (5, 4), (0, 128, 0)), fmt)
    images = loader()
    assert images.load_bytes(data_uri(data, "image/whatever")) == (data, content_type)
    assert images.load(data_uri(data)).size == (5, 4)


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_formats_outside_the_web_set_are_refused(fmt: str) -> None:
    data = encode(Image.new("RGB", (5, 4)), fmt)
    assert refused(loader().load, data_uri(data)) == UNRECOGNISED


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("data:text/plain;base64,aGVsbG8=", "data URI type text/plain is not an image"),
        ("data:;base64,aGVsbG8=", "data URI type (none) is not an image"),
        ("data:image/png,rawbytes", "data URI must be data:image/<type>;base64,<payload>"),
        ("data:image/png;base64", "data URI must be data:image/<type>;base64,<payload>"),
        ("data:image/png;base64,not base64!", "data URI payload is not valid base64"),
        ("data:image/png;base64,aGVsbG8", "data URI payload is not valid base64"),
        ("data:image/png;base64,aGVsbG8=", UNRECOGNISED),
    ],
)
def test_bad_data_uris(uri: str, reason: str) -> None:
    assert refused(loader().load, uri) == reason


def test_data_uri_byte_limit() -> None:
    limit = len(RED_PNG)
    assert loader(max_bytes=limit).load(data_uri(RED_PNG)).size == (8, 6)
    reason = refused(loader(max_bytes=limit - 1).load, data_uri(RED_PNG))
    assert reason == f"image larger than {limit - 1} bytes"
    huge = "data:image/png;base64," + "A" * (10 * limit)  # refused before decoding
    assert refused(loader(max_bytes=limit).load, huge) == f"image larger than {limit} bytes"


# -- file: URIs ----------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): root holds `in root.png`; outside holds `secret.png`."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "in root.png").write_bytes(RED_PNG)
    (outside / "secret.png").write_bytes(BLUE_JPEG)
    return root, outside


def test_file_inside_root(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    images = loader(file_roots=(root,))
    assert images.load((root / "in root.png").as_uri()).size == (8, 6)
    assert images.load_bytes(f"file://localhost{root}/in%20root.png") == (RED_PNG, "image/png")
    (root / "alias.png").symlink_to(root / "in root.png")  # a symlink that stays inside is fine
    assert images.load((root / "alias.png").as_uri()).size == (8, 6)


def test_root_given_through_a_symlink(roots: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = roots
    (tmp_path / "root-link").symlink_to(root)
    images = loader(file_roots=(tmp_path / "root-link",))
    assert images.load((tmp_path / "root-link" / "in root.png").as_uri()).size == (8, 6)
    assert images.load((root / "in root.png").as_uri()).size == (8, 6)


def test_file_outside_root(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    images = loader(file_roots=(root,))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "door").symlink_to(outside)
    cases = {
        "file:///etc/passwd": "/etc/passwd",
        (outside / "secret.png").as_uri(): f"{outside}/secret.png",
        f"file://{root}/../outside/secret.png": f"{root}/../outside/secret.png",
        f"file://{root}/%2E%2E/outside/secret.png": f"{root}/../outside/secret.png",
        (root / "escape.png").as_uri(): f"{root}/escape.png",
        f"file://{root}/door/secret.png": f"{root}/door/secret.png",
    }
    for uri, shown in cases.items():
        assert refused(images.load, uri) == f"file path {shown} is outside the allowed roots"


def test_file_uris_refused_without_roots(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    reason = refused(loader().load, (root / "in root.png").as_uri())
    assert reason == "file URIs are refused (no file_roots configured)"


@pytest.mark.parametrize(
    ("make_uri", "reason"),
    [
        (lambda root: "file:relative.png", "file path must be absolute"),
        (lambda root: f"file://fileserver{root}/in%20root.png", "file URI host 'fileserver' is not supported"),
        (lambda root: f"file://{root}/absent.png", "file {root}/absent.png does not exist"),
        (lambda root: f"file://{root}", "file path {root} is not a regular file"),
        (lambda root: f"file://{root}/pipe", "file path {root}/pipe is not a regular file"),
        (lambda root: f"file://{root}/a%00b.png", "file path contains a NUL byte"),
    ],
)
def test_bad_file_uris(roots: tuple[Path, Path], make_uri: Callable[[Path], str], reason: str) -> None:
    root, _ = roots
    os.mkfifo(root / "pipe")  # opening it for reading would wait for a writer forever
    assert refused(loader(file_roots=(root,)).load, make_uri(root)) == reason.format(root=root)


def test_file_byte_limit(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    limit = len(RED_PNG)
    assert loader(file_roots=(root,), max_bytes=limit).load((root / "in root.png").as_uri()).size == (8, 6)
    reason = refused(loader(file_roots=(root,), max_bytes=limit - 1).load, (root / "in root.png").as_uri())
    assert reason == f"image larger than {limit - 1} bytes"


# -- schemes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("ftp://example.com/a.png", "unsupported image URI scheme 'ftp'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "unsupported image URI scheme 'gopher'"),
        ("javascript:alert(1)", "unsupported image URI scheme 'javascript'"),
        ("/var/images/a.png", "image URI has no scheme"),
        ("", "image URI has no scheme"),
        ("http:///a.png", "image URI has no host"),
        ("http://[::1/a.png", "malformed image URI: Invalid IPv6 URL"),
        ("http://example.com:99999/", "malformed image URI: Port out of range 0-65535"),
        ("http://exa mple.com/", "invalid image host 'exa mple.com'"),
    ],
)
def test_refused_uris(uri: str, reason: str) -> None:
    assert refused(loader().load, uri) == reason


# -- pixels --------------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header() -> None:
    images = loader(max_pixels=100)
    assert images.load(data_uri(bilevel_png(10, 10))).size == (10, 10)
    for load in (images.load, images.load_bytes):
        reason = refused(load, data_uri(bilevel_png(11, 10)))
        assert reason == "image is 11x10 pixels, above the 100 pixel limit"


def test_decompression_bombs_are_refused_before_decoding(http_server: LocalServer) -> None:
    pil_global = Image.MAX_IMAGE_PIXELS
    images = loader(allowed_hosts=LOCAL)
    # 64 M pixels: under Pillow's own guard, over ours
    reason = refused(images.load, data_uri(bilevel_png(8000, 8000)))
    assert reason == "image is 8000x8000 pixels, above the 40000000 pixel limit"
    # 400 M pixels, ~50 KB: Pillow's guard already refuses it in Image.open
    assert len(bilevel_png(20000, 20000)) < 100_000
    for load in (images.load, images.load_bytes):
        reason = refused(load, http_server.url("/bomb.png"))
        assert reason.startswith("image exceeds Pillow's decompression-bomb limit: ")
    assert Image.MAX_IMAGE_PIXELS == pil_global


# -- decoding --------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    """A 40x20 picture, left half red and right half blue, stored with orientation 6 ("rotate
    90 degrees clockwise to view"): it comes back 20x40, red on top."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = loader().load(data_uri(encode(stored, "JPEG", exif=exif, quality=95), "image/jpeg"))
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("image", "corner", "centre"),
    [
        (Image.new("L", (4, 4), 128), (128, 128, 128), (128, 128, 128)),
        (Image.new("1", (4, 4), 1), (255, 255, 255), (255, 255, 255)),
        (Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), (0, 0, 255), (0, 0, 255)),
        (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0), (255, 0, 0)),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255), (255, 255, 255)),  # transparent: white
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255), (255, 255, 255)),
        (_palette_with_transparency(), (255, 255, 255), (255, 0, 0)),
    ],
    ids=["L", "1", "P", "RGBA-opaque", "RGBA-transparent", "LA-transparent", "P-transparency"],
)
def test_modes_come_back_rgb(
    image: Image.Image, corner: tuple[int, int, int], centre: tuple[int, int, int]
) -> None:
    loaded = loader().load(data_uri(encode(image, "PNG")))
    assert loaded.mode == "RGB"
    assert (loaded.getpixel((0, 0)), loaded.getpixel((1, 1))) == (corner, centre)


def test_cmyk_jpeg_comes_back_rgb() -> None:
    loaded = loader().load(data_uri(encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), "image/jpeg"))
    assert loaded.mode == "RGB"


def test_bad_allowlist_entry_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="not a valid CIDR"):
        loader(allowed_hosts=("10.0.0.0/33",))


@pytest.mark.parametrize(
    "limits",
    [{"connect_timeout_s": 0}, {"read_timeout_s": -1}, {"max_bytes": 0}, {"max_pixels": 0}, {"max_redirects": -1}],
)
def test_limits_are_validated(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="ImageLimits"):
        ImageLimits(**limits)  # type: ignore[arg-type]


def test_loader_is_a_context_manager() -> None:
    with loader() as images:
        assert images.load(data_uri(RED_PNG)).size == (8, 6)


# -- property ------------------------------------------------------------------------------

_PREFIXES = [
    "", "http://", "https://", "HTTP://", "http://[", "http://127.0.0.1:", "http://user@", "file:", "file://",
    "file:///", "file://localhost/", "file://[", "data:", "data:image/png;base64,",
    "data:image/png;base64,iVBORw0KGgo",
    "ftp://", "javascript:",
]  # fmt: skip
_PNG_HEAD = bilevel_png(4, 4)[:33]
uris = st.one_of(
    st.text(),
    st.builds(str.__add__, st.sampled_from(_PREFIXES), st.text()),
    st.binary(max_size=300).map(lambda tail: data_uri(_PNG_HEAD + tail)),  # fuzzes Pillow's PNG reader
    st.binary(max_size=300).map(lambda raw: data_uri(raw, "image/jpeg")),
)


@pytest.fixture
def property_loader(roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> ImageLoader:
    """Every name resolves to loopback, which is refused: nothing leaves the machine."""
    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return loader(file_roots=(roots[0],), max_pixels=10_000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uri=uris)
def test_any_string_fails_only_with_image_error(uri: str, property_loader: ImageLoader) -> None:
    for load in (property_loader.load, property_loader.load_bytes):
        try:
            load(uri)
        except ImageError as exc:
            assert exc.reason
