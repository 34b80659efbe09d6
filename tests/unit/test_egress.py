"""The egress proxy of boxes: what it lets through, what it refuses, and how it is served."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from hublaunch.stack import free_port
from sandbox.egress import Destination, Proxy, is_internal, serving


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::1",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo to 10.0.0.1
        "::127.0.0.1",  # IPv4-compatible
    ],
)
def test_internal_addresses_are_recognized(address: str) -> None:
    assert is_internal(address)


@pytest.mark.parametrize(
    "address", ["151.101.0.223", "2a04:4e42::223", "203.0.113.80", "64:ff9b::9765:df"]
)
def test_public_addresses_are_not_internal(address: str) -> None:
    # 203.0.113.80: documentation range, routed only where an operator routes it (CI mirrors).
    assert not is_internal(address)


def test_destinations_parse_as_the_settings_spell_them() -> None:
    assert Destination.parse("PyPI.org.:443") == Destination("pypi.org", 443)
    assert Destination.parse("[::1]:8080") == Destination("::1", 8080)
    assert str(Destination.parse("[0:0::1]:8080")) == "[::1]:8080"
    for bad in ("pypi.org", "pypi.org:0", "pypi.org:65536", "a b:1", ":443", "[zz]:1", "x:y"):
        with pytest.raises(ValueError, match="host:port"):
            Destination.parse(bad)


@dataclass
class Upstream:
    """A server on 127.0.0.1 that records every connection and what it was sent first."""

    port: int = 0
    received: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        self.received.append(data)
        if data.startswith(b"ping"):  # through a tunnel
            writer.write(b"pong")
        else:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.port = up.server.sockets[0].getsockname()[1]
    yield up
    up.server.close()


async def start_proxy(proxy: Proxy) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, request: bytes, then: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if then:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(then)
        await writer.drain()
        answer = head + await asyncio.wait_for(reader.read(), 10)
    else:
        answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_connect_reaches_an_allowed_destination_at_its_pinned_address(
    upstream: Upstream,
) -> None:
    # The name does not resolve anywhere: the pinned address is all the proxy connects to.
    proxy = Proxy([Destination("git.invalid", upstream.port, ("127.0.0.1",))], "test")
    server, port = await start_proxy(proxy)
    answer = await exchange(
        port, f"CONNECT git.invalid:{upstream.port} HTTP/1.1\r\n\r\n".encode(), then=b"ping"
    )
    server.close()
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert answer.endswith(b"pong")
    assert upstream.received == [b"ping"] and proxy.refused == []


async def test_plain_http_is_forwarded_in_origin_form_without_credentials_or_proxy_headers(
    upstream: Upstream,
) -> None:
    proxy = Proxy([Destination("127.0.0.1", upstream.port, ("127.0.0.1",))], "test")
    server, port = await start_proxy(proxy)
    request = (
        f"GET http://user:pw@127.0.0.1:{upstream.port}/x.git/info/refs?service=a HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
        "Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    answer = await exchange(port, request.encode())
    server.close()
    assert answer.endswith(b"hello")
    [sent] = upstream.received
    assert sent.startswith(b"GET /x.git/info/refs?service=a HTTP/1.1\r\n")
    assert b"Accept: */*\r\n" in sent and sent.endswith(b"Connection: close\r\n\r\n")
    assert b"pw" not in sent and b"Proxy-" not in sent and b"keep-alive" not in sent


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT 127.0.0.1:{port} HTTP/1.1",  # not on the allowlist
        "GET http://127.0.0.1:{port}/simple/ HTTP/1.1",
        "CONNECT [::1]:{port} HTTP/1.1",
        "CONNECT pypi.org:80 HTTP/1.1",  # an allowed host, another port
        "CONNECT localhost:{port} HTTP/1.1",  # allowed, but resolves to loopback
    ],
)
async def test_everything_else_gets_403_and_one_log_line_and_no_connection(
    upstream: Upstream, request_line: str, caplog: pytest.LogCaptureFixture
) -> None:
    allowed = [Destination("pypi.org", 443), Destination("localhost", upstream.port)]
    proxy = Proxy(allowed, "pip install, build-x")
    server, port = await start_proxy(proxy)
    line = request_line.format(port=upstream.port)
    with caplog.at_level(logging.WARNING, logger="sandbox.egress"):
        answer = await exchange(port, f"{line}\r\nHost: x\r\n\r\n".encode())
    server.close()
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert upstream.received == []
    [refused] = proxy.refused
    [record] = caplog.records
    assert refused in record.getMessage() and "pip install, build-x" in record.getMessage()
    if line.startswith("CONNECT localhost"):
        assert "internal address (127.0.0.1)" in record.getMessage()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /simple/ HTTP/1.1\r\n\r\n",  # origin-form: not a proxy request
        b"CONNECT pypi.org HTTP/1.1\r\n\r\n",
        b"CONNECT evil\r\nhost:443 HTTP/1.1\r\n\r\n",
        b"GET https://pypi.org/simple/ HTTP/1.1\r\n\r\n",  # https goes through CONNECT
        b"CONNECT pypi.org:443 SMTP\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400(
    request_head: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy([Destination("pypi.org", 443)], "test")
    server, port = await start_proxy(proxy)
    with caplog.at_level(logging.WARNING, logger="sandbox.egress"):
        answer = await exchange(port, request_head)
    server.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert [r.getMessage() for r in caplog.records] == [
        "egress (test): refused a malformed request"
    ]


async def test_an_allowed_destination_that_refuses_gets_502() -> None:
    closed = free_port()
    proxy = Proxy([Destination("127.0.0.1", closed, ("127.0.0.1",))], "test")
    server, port = await start_proxy(proxy)
    answer = await exchange(port, f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n".encode())
    server.close()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_serving_listens_inside_the_namespace_for_the_block_only(echo: int) -> None:
    # Our own network namespace stands in for a box's: the listener is made in whatever
    # namespace the descriptor names, by the proxy's own thread.
    ns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    port = free_port()
    proxy = Proxy([Destination("127.0.0.1", echo, ("127.0.0.1",))], "test")
    try:
        with serving(ns_fd, port, proxy):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
            assert client.recv(4096) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            client.sendall(b"through")
            assert client.recv(4096) == b"through"
        # The block's end closed the open tunnel and the listener.
        assert client.recv(4096) == b""
        client.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10)
    finally:
        os.close(ns_fd)
