"""The only way out of a box: an HTTP forward proxy that lets through an allowlist.

A box has nothing but loopback (``sandbox.netns``). The process that owns the box (the worker
for a build, the Hub for a session whose operator allows outbound traffic) serves this proxy on
the box's own 127.0.0.1 (``Bridge.serve_in``) and points the box's git and pip at it
(``http_proxy``/``https_proxy``). HTTPS goes through ``CONNECT host:port`` tunnels (the traffic
is not inspected), plain HTTP as absolute-form requests (``GET http://host:port/path``), one
upstream connection per client connection.

Each box (each step of a build) has its own allowlist of ``host:port`` destinations:

- the fetch reaches the repository's host, connecting only to the addresses
  ``worker.repos.check_host`` already resolved and checked (pinned: a DNS change between the
  check and the connection cannot lead anywhere else);
- pip reaches the package index hosts, resolved here and refused when any of their addresses is
  internal (loopback, private, link-local...), so no name can be pointed at the machine's
  neighbours.

Anything else gets 403 and one warning line naming the refused destination. The proxy opens
connections only to allowed destinations, so nothing a box sends reaches the service's ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sandbox.netns import Bridge, splice

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 30.0  # seconds a client may take to send its request head
CONNECT_TIMEOUT = 30.0  # seconds to open the upstream connection
HOST_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]{2,45})\]|([A-Za-z0-9._-]{1,253}))$")
# Headers that describe one hop, not the request: never forwarded upstream.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
}

# Addresses a box must never reach: the machine itself and its neighbours. Not ipaddress's
# ``is_global``: that also refuses the documentation ranges (192.0.2.0/24, 198.51.100.0/24,
# 203.0.113.0/24), which no internet route leads to, so an address there is reachable only where
# an operator routed it on purpose (CI machines that mirror the package index do).
INTERNAL_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: cloud metadata services answer here
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/128",
        "::1/128",
        "::/96",  # IPv4-compatible (deprecated)
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): the operator's own translator
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
]
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def leads_to(address: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address connecting to it reaches: an IPv6 address can carry
    one (IPv4-mapped, NAT64, 6to4, Teredo). Python's ``is_global`` and network membership look
    at the IPv6 range only, so every check of an address must look at all of these."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        found += [a for a in (address.ipv4_mapped, address.sixtofour, *(address.teredo or ())) if a]
        if address in NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_internal(address: str) -> bool:
    """Whether connecting to ``address`` could reach this machine or its private networks,
    IPv6 addresses that lead to an IPv4 one (mapped, NAT64, 6to4, Teredo) included."""
    candidates = leads_to(ipaddress.ip_address(address.split("%")[0]))
    return any(
        a in net for a in candidates for net in INTERNAL_NETWORKS if a.version == net.version
    )


def normalize_host(host: str) -> str | None:
    """The host as the allowlist holds it (lower case, no trailing dot, IPv6 compressed and
    unbracketed), or None if it is not a host name or address."""
    match = HOST_RE.match(host)
    if match is None:
        return None
    literal = match.group(1)
    if literal is not None:
        try:
            return ipaddress.IPv6Address(literal).compressed
        except ValueError:
            return None
    return host.lower().rstrip(".") or None


@dataclass(frozen=True)
class Destination:
    """One ``host:port`` a step may reach. ``pinned``: the only addresses to connect to (checked
    by the caller); empty: resolve here and refuse internal addresses."""

    host: str
    port: int
    pinned: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``host:port`` or ``[v6]:port``, as the settings spell destinations."""
        host, sep, port = text.strip().rpartition(":")
        name = normalize_host(host)
        if not sep or name is None or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        return cls(name, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Refused(Exception):
    """The destination is not allowed; the message says why (it is logged and answered)."""


class Proxy:
    """Serves one box (one step of a build, or a session); ``label`` names it in log lines (no
    secret in it)."""

    def __init__(self, destinations: Iterable[Destination], label: str) -> None:
        self._allowed = {(d.host, d.port): d for d in destinations}
        self.label = label
        self.refused: list[str] = []  # what was refused, in order (the tests read it)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, OSError):
            pass  # the box or the destination hung up
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        """End the connections still open (the box is ending)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        target = _target(parts) if len(parts) == 3 else None
        if target is None:
            log.warning("egress (%s): refused a malformed request", self.label)
            await _answer(writer, 400, "Bad Request", "this proxy takes CONNECT or http:// URLs")
            return
        host, port, origin_form = target
        shown = str(Destination(host, port))
        try:
            destination = self._allowed.get((host, port))
            if destination is None:
                raise Refused("not on this step's allowlist")
            upstream = await self._open(destination)
        except Refused as e:
            self.refused.append(shown)
            log.warning("egress (%s): refused %s: %s", self.label, shown, e)
            await _answer(writer, 403, "Forbidden", f"{shown} is not reachable from here")
            return
        except (OSError, TimeoutError):
            await _answer(writer, 502, "Bad Gateway", f"{shown} did not answer")
            return
        if origin_form is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream[1].write(_forwarded_head(parts[0], origin_form, lines[1:]))
        await splice((reader, writer), upstream)

    async def _open(
        self, destination: Destination
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addresses = list(destination.pinned)
        if not addresses:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    destination.host, destination.port, type=socket.SOCK_STREAM
                )
            except socket.gaierror as e:
                raise OSError(f"{destination.host} does not resolve") from e
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            internal = [a for a in addresses if is_internal(a)]
            if internal:
                raise Refused(f"it resolves to an internal address ({internal[0]})")
        error: Exception = OSError("no address")
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(address, destination.port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                error = e
        raise error


def _target(parts: list[str]) -> tuple[str, int, str | None] | None:
    """(host, port, the origin-form path for plain HTTP or None for CONNECT), None if bad."""
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        return None
    if method == "CONNECT":
        host, sep, port = target.rpartition(":")
        name = normalize_host(host)
        if not sep or name is None or not port.isdigit() or not 0 < int(port) < 65536:
            return None
        return name, int(port), None
    if not target.lower().startswith("http://") or not re.fullmatch(r"[A-Z]{1,20}", method):
        return None
    try:
        url = urlsplit(target)
        url_port = url.port
    except ValueError:
        return None
    netloc = url.netloc.rpartition("@")[2]  # never forward credentials in a URL
    host = netloc[: -len(f":{url_port}")] if url_port is not None else netloc
    name = normalize_host(host)
    if name is None:
        return None
    return name, url_port or 80, urlunsplit(("", "", url.path or "/", url.query, ""))


def _forwarded_head(method: str, path: str, headers: list[str]) -> bytes:
    kept = [h for h in headers if h and h.split(":", 1)[0].strip().lower() not in HOP_BY_HOP]
    # One request per upstream connection: a later request on the same client connection could
    # name another host, and must not be sent here.
    lines = [f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str, text: str) -> None:
    body = f"{text}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(head.encode() + body)
        await writer.drain()
    writer.close()


@contextlib.contextmanager
def serving(ns_fd: int, port: int, proxy: Proxy) -> Iterator[None]:
    """Serve ``proxy`` on 127.0.0.1:``port`` inside the network namespace of ``ns_fd`` for the
    length of the block. The build code is synchronous, so the proxy gets an event loop in a
    thread of its own; the block's end closes the listener and every open connection."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"egress {proxy.label}", daemon=True)
    thread.start()
    try:
        bridge = Bridge(ns_fd)
        asyncio.run_coroutine_threadsafe(bridge.serve_in(port, proxy.handle), loop).result(30)
        try:
            yield
        finally:

            async def stop() -> None:
                bridge.close()
                await proxy.close()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
