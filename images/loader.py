"""Safe loading of item images from URIs that come from untrusted catalogue data.

An item's image URI is attacker-controlled input: it can point at internal services (SSRF,
including the cloud metadata endpoint), at files on the worker's disk, at endless or
trickling responses, or at decompression bombs. `ImageLoader` admits `https://`, `http://`,
`file://` and `data:image/...;base64,` URIs and refuses everything unsafe with an `ImageError`
whose short `reason` goes to the dead-letter topic.

HTTP is done with `http.client` on a socket this module connects itself, to the address it
has just validated: the host name is resolved once, every resolved address is checked, and
the connection goes to a checked address (a second lookup could be answered differently —
DNS rebinding). The original name is still sent as Host header and, for https, used for SNI
and certificate verification. Redirects are followed by hand and every hop is checked again.

Only web raster formats are decoded (PNG, JPEG, GIF, WebP, BMP, AVIF), which keeps Pillow's
riskier plugins (EPS runs Ghostscript; TIFF, PSD and friends have long CVE lists) out of
reach of untrusted bytes, and means the bytes served by a thumbnail page are ones browsers
display. The content type `load_bytes` reports is the one of the format found in the bytes,
not the one the server declared, so a page serving them cannot be tricked into serving
`text/html` or `image/svg+xml` (scriptable) content.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from PIL import Image, ImageOps

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = tuple[socket.AddressFamily, tuple[Any, ...]]  # (family, sockaddr) as getaddrinfo gives


class ImageError(ValueError):
    """An image URI was refused or its content is not a usable image.

    `reason` is short and human-readable; the worker puts it on the dead-letter topic.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What an image fetch may cost and where it may go.

    `read_timeout_s` bounds the whole HTTP fetch — every redirect hop's connect, request,
    response headers and body — so a slow or trickling server cannot hold a worker thread
    longer than that; `connect_timeout_s` additionally bounds each connection attempt. Host
    name resolution uses the system resolver and its own timeouts.
    """

    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    max_bytes: int = 10 * 1024 * 1024
    #: decompression-bomb guard: width * height, checked from the header before decoding
    max_pixels: int = 40_000_000
    max_redirects: int = 3
    #: host names or CIDRs (a bare IP is a /32 or /128) admitted even if private or loopback
    allowed_hosts: tuple[str, ...] = ()
    #: file:// URIs are served only from under these directories (none: file:// refused)
    file_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        # a zero timeout would make sockets non-blocking rather than impatient
        if min(self.connect_timeout_s, self.read_timeout_s, self.max_bytes, self.max_pixels) <= 0:
            raise ValueError("ImageLimits timeouts and sizes must be positive")
        if self.max_redirects < 0:
            raise ValueError("ImageLimits.max_redirects must not be negative")


#: Pillow formats that may be opened, with the content type reported for each. Pillow's
#: JPEG plugin also yields MPO (the multi-picture JPEG phones write), which browsers show
#: as a JPEG.
_CONTENT_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "AVIF": "image/avif",
}
Image.init()  # register every plugin now, not lazily from several worker threads at once
_OPEN_FORMATS = tuple(name for name in _CONTENT_TYPES if name in Image.OPEN)

#: Declared content types whose bytes are accepted when they turn out to be an image:
#: generic binary (S3 and many object stores serve uploads as such) or no type at all.
_UNTYPED_CONTENT = frozenset({"application/octet-stream", "binary/octet-stream", ""})

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_HOST_NAME = re.compile(r"[A-Za-z0-9._:-]+")  # after IDNA encoding; also guards the Host header
_CHUNK_BYTES = 64 * 1024

_METADATA = "a cloud metadata address"
#: Instance-metadata endpoints (AWS/GCP/Azure/OpenStack, AWS ECS and IPv6, Alibaba, Oracle
#: Classic). Refused even when `allowed_hosts` admits them: no image lives there, and they
#: hand out cloud credentials.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 host an IPv6 address reaches: IPv4-mapped (::ffff:a.b.c.d), NAT64
    (64:ff9b::a.b.c.d) or 6to4 (2002:aabb:ccdd::). Without this, ::ffff:127.0.0.1 would be
    judged as an IPv6 address and slip past the loopback check."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour


def blocked_address_reason(ip: IPAddress) -> str | None:
    """Why an image fetch must not connect to `ip` (e.g. "a loopback address"), or None for a
    public unicast address. IPv6 forms of an IPv4 host are judged as that host."""
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        return blocked_address_reason(embedded)
    if ip in _METADATA_ADDRESSES:
        return _METADATA
    checks = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
        (ip in _CGNAT, "a shared (CGNAT) address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "a non-public address"),
    )
    return next((reason for blocked, reason in checks if blocked), None)


@dataclass(frozen=True)
class _Allowlist:
    """`ImageLimits.allowed_hosts`, parsed once: exact host names and networks."""

    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> _Allowlist:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry:  # meant as a CIDR: a typo must not silently admit nothing
                    raise ValueError(f"allowed_hosts entry {entry!r} is not a valid CIDR") from None
                names.add(_normalise_host_name(entry))
        return cls(frozenset(names), tuple(networks))

    def admits(self, host: str, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # the same host as its IPv4 form
        return _normalise_host_name(host) in self.names or any(ip in network for network in self.networks)


def _normalise_host_name(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True)
class _HttpTarget:
    """One http(s) URL, split into what the connection and the request line need."""

    scheme: str
    host: str  # ASCII (IDNA-encoded); IPv6 literals without brackets
    port: int
    request_target: str  # path and query, percent-encoded

    @classmethod
    def parse(cls, url: str) -> _HttpTarget:
        try:
            parts = urlsplit(url)
            port = parts.port
            path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
            query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
        except ValueError as exc:  # bad brackets or port; UnicodeEncodeError for lone surrogates
            raise ImageError(f"malformed image URI: {exc}") from None
        if not parts.hostname:
            raise ImageError("image URI has no host")
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not _HOST_NAME.fullmatch(host):
            raise ImageError(f"invalid image host {parts.hostname[:64]!r}")
        scheme = parts.scheme.lower()
        port = _DEFAULT_PORTS[scheme] if port is None else port
        return cls(scheme, host, port, path + (f"?{query}" if query else ""))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def request(self) -> bytes:
        # Connection: close — one request per connection, no pool shared between threads.
        # Accept-Encoding: identity — the byte limit then applies to the image itself.
        return (
            f"GET {self.request_target} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "User-Agent: vlm4rec-image-loader\r\n"
            "Accept: image/*\r\n"
            "Accept-Encoding: identity\r\n"
            "Connection: close\r\n"
            "\r\n"
        ).encode("ascii")


class _DeadlineSocket:
    """Hands `http.client.HTTPResponse` (which only calls `makefile`) a reader whose every
    receive may wait only for the time left before `deadline`. A plain socket timeout is per
    receive: a server sending one byte just before each timeout would hold the worker forever.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str) -> io.BufferedReader:  # mode is always "rb"
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        # TimeoutError rather than ImageError: http.client turns ValueErrors met while reading
        # chunk sizes into IncompleteRead, which would lose the reason.
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class ImageLoader:
    """Fetches and decodes images under `ImageLimits`.

    Thread-safe: it holds only immutable configuration and an `ssl.SSLContext` (safe to share);
    every fetch opens and closes its own connection.
    """

    def __init__(self, limits: ImageLimits, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context` overrides the default (system CAs, hostname checking) — for a private
        CA, and for tests."""
        self._limits = limits
        self._allowlist = _Allowlist.parse(limits.allowed_hosts)
        self._file_roots = tuple(Path(os.path.realpath(root)) for root in limits.file_roots)
        self._ssl = ssl_context or ssl.create_default_context()

    def load_bytes(self, uri: str) -> tuple[bytes, str]:
        """The raw image bytes and their content type (of the format found in the bytes),
        after every check `load` makes short of decoding the pixels."""
        data = self._fetch(uri)
        with self._open(data) as image:
            return data, _CONTENT_TYPES[image.format or ""]

    def load(self, uri: str) -> Image.Image:
        """The decoded image, turned upright per its EXIF orientation, as RGB."""
        with self._open(self._fetch(uri)) as image:
            try:
                return _to_rgb(ImageOps.exif_transpose(image))
            except Exception as exc:  # Pillow's decoders raise many types on hostile input
                raise ImageError(f"cannot decode image: {exc}") from None

    def close(self) -> None:
        """Nothing to release (no pooled connections); kept so callers manage the loader as a
        resource and a pooling loader could replace it without changing them."""

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- fetching ------------------------------------------------------------------------

    def _fetch(self, uri: str) -> bytes:
        uri = uri.strip()
        match = _SCHEME.match(uri)
        if match is None:
            raise ImageError("image URI has no scheme")
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            return self._fetch_http(uri)
        if scheme == "file":
            return self._read_file(uri)
        if scheme == "data":
            return self._decode_data_uri(uri)
        raise ImageError(f"unsupported image URI scheme {scheme[:32]!r}")

    def _fetch_http(self, url: str) -> bytes:
        deadline = time.monotonic() + self._limits.read_timeout_s
        for _ in range(self._limits.max_redirects + 1):
            target = _HttpTarget.parse(url)
            addresses = self._resolve(target.host, target.port)
            try:
                with self._connect(target, addresses, deadline) as sock:
                    sock.settimeout(_time_left(deadline))
                    sock.sendall(target.request())
                    reader = _DeadlineSocket(sock, deadline)
                    response = http.client.HTTPResponse(reader, method="GET")  # type: ignore[arg-type]
                    response.begin()
                    if response.status not in _REDIRECT_STATUSES:
                        return self._read_response(response)
                    url = _redirect_target(url, response.getheader("Location"))
            except TimeoutError:
                raise ImageError(f"image download took longer than {self._limits.read_timeout_s} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise ImageError(f"image download from {target.host} failed: {exc!r}") from None
        raise ImageError("too many redirects")

    def _resolve(self, host: str, port: int) -> list[_Address]:
        """Every address `host` resolves to, each checked against the SSRF rules: one bad
        address refuses the host, as the connection could be steered to any of them."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            raise ImageError(f"cannot resolve image host {host}") from None
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = []
        for family, _, _, _, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            reason = blocked_address_reason(ip)
            if reason is not None and (reason == _METADATA or not self._allowlist.admits(host, ip)):
                where = f"is {reason}" if ip == literal else f"resolves to {ip}, {reason}"
                note = "never admitted" if reason == _METADATA else "not in allowed_hosts"
                raise ImageError(f"image host {host} {where} ({note})")
            addresses.append((family, sockaddr))
        if not addresses:
            raise ImageError(f"cannot resolve image host {host}")
        return addresses

    def _connect(
        self, target: _HttpTarget, addresses: list[_Address], deadline: float
    ) -> socket.socket:
        """A connected (and for https, TLS-verified) socket to the first checked address that
        answers. Never connects by name: that would resolve again."""
        error: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(self._limits.connect_timeout_s, _time_left(deadline)))
                sock.connect(sockaddr)
                if target.scheme == "https":
                    sock.settimeout(_time_left(deadline))
                    return self._ssl.wrap_socket(sock, server_hostname=target.host)
                return sock
            except OSError as exc:  # includes timeouts and certificate failures
                sock.close()
                error = exc
        raise ImageError(f"cannot connect to image host {target.host}: {error}")

    def _read_response(self, response: http.client.HTTPResponse) -> bytes:
        if response.status != 200:
            raise ImageError(f"image server answered HTTP {response.status}")
        content_type = (response.getheader("Content-Type") or "").partition(";")[0].strip().lower()
        if not content_type.startswith("image/") and content_type not in _UNTYPED_CONTENT:
            raise ImageError(f"content type {content_type[:64]} is not an image")
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise ImageError(f"content encoding {encoding[:32]} is not supported")
        if response.length is not None and response.length > self._limits.max_bytes:
            raise ImageError(self._too_large())
        body = bytearray()
        while chunk := response.read1(_CHUNK_BYTES):
            body += chunk
            if len(body) > self._limits.max_bytes:
                raise ImageError(self._too_large())
        if response.length:  # the server closed before sending its Content-Length
            raise ImageError("image download ended early")
        return bytes(body)

    def _read_file(self, uri: str) -> bytes:
        if not self._file_roots:
            raise ImageError("file URIs are refused (no file_roots configured)")
        try:
            parts = urlsplit(uri)
        except ValueError as exc:  # unbalanced brackets in the host part
            raise ImageError(f"malformed image URI: {exc}") from None
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file URI host {parts.netloc[:64]!r} is not supported")
        path = unquote(parts.path)
        if not os.path.isabs(path):
            raise ImageError("file path must be absolute")
        shown = path[:256]
        try:
            # realpath follows symlinks and removes "..": the check is on the file that opens
            real = Path(os.path.realpath(path))
        except ValueError:  # a NUL byte
            raise ImageError("file path contains a NUL byte") from None
        if not any(real.is_relative_to(root) for root in self._file_roots):
            raise ImageError(f"file path {shown} is outside the allowed roots")
        try:
            # O_NONBLOCK: opening a FIFO placed under a root must not wait for a writer
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ImageError(f"file {shown} does not exist") from None
        except OSError as exc:
            raise ImageError(f"cannot open file {shown}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would block or never end
            os.close(fd)
            raise ImageError(f"file path {shown} is not a regular file")
        with open(fd, "rb") as file:
            try:
                data = file.read(self._limits.max_bytes + 1)
            except OSError as exc:
                raise ImageError(f"cannot read file {shown}: {exc.strerror}") from None
        if len(data) > self._limits.max_bytes:
            raise ImageError(self._too_large())
        return data

    def _decode_data_uri(self, uri: str) -> bytes:
        header, comma, payload = uri[len("data:") :].partition(",")
        params = [param.strip().lower() for param in header.split(";")]
        if not comma or len(params) < 2 or params[-1] != "base64":
            raise ImageError("data URI must be data:image/<type>;base64,<payload>")
        if not params[0].startswith("image/"):
            raise ImageError(f"data URI type {params[0][:64] or '(none)'} is not an image")
        if len(payload) > 4 * -(-self._limits.max_bytes // 3):  # longer than max_bytes encoded
            raise ImageError(self._too_large())
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII payload
            raise ImageError("data URI payload is not valid base64") from None
        if len(data) > self._limits.max_bytes:
            raise ImageError(self._too_large())
        return data

    def _too_large(self) -> str:
        return f"image larger than {self._limits.max_bytes} bytes"

    # -- decoding ------------------------------------------------------------------------

    def _open(self, data: bytes) -> Image.Image:
        """The image with only its header parsed, refused if it has too many pixels.

        The size comes from the header, before any pixel is decoded; Pillow's own global guard
        (which raises from `Image.open` far above our default limit) is left as it is.
        """
        try:
            image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # the Warning only arrives as an exception when warnings are turned into errors
            raise ImageError(f"image exceeds Pillow's decompression-bomb limit: {exc}") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"cannot decode image: not one of {', '.join(_OPEN_FORMATS)}") from None
        except Exception as exc:  # Pillow's header parsers raise many types on hostile input
            raise ImageError(f"cannot decode image: {exc}") from None
        width, height = image.size
        if width * height > self._limits.max_pixels:
            image.close()
            raise ImageError(
                f"image is {width}x{height} pixels, above the {self._limits.max_pixels} pixel limit"
            )
        return image


def _redirect_target(url: str, location: str | None) -> str:
    if not location:
        raise ImageError("redirect without a Location header")
    try:
        target = urljoin(url, location.strip())
        scheme = urlsplit(target).scheme.lower()
    except ValueError:
        raise ImageError("malformed redirect Location") from None
    if scheme not in ("http", "https"):
        raise ImageError(f"redirect to unsupported scheme {scheme[:32]!r}")
    return target


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white: transparent pixels in product shots are
    background, and a plain RGBA->RGB conversion would show their colour channels (usually
    black)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")
