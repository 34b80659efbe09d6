"""Sockets inside a box's network namespace, and the forwarders built on them.

A box's network namespace has only loopback: nothing on the machine is reachable from it, and it
is reachable from nowhere. A root process (the Hub, a build's worker) holding a descriptor of
that namespace can still make sockets there: ``setns`` moves only the calling thread, for the
moment ``socket()`` takes, and the socket stays in the namespace it was made in. So the host
reaches a box's server by connecting such a socket to the box's own 127.0.0.1, and a box reaches
exactly one host endpoint through a listener made inside it — no veth, address, route or
firewall rule, and nothing to leave behind when the box ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator

CLONE_NEWNET = 0x40000000
BUFFER = 64 * 1024

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(ns_fd: int) -> Iterator[None]:
    """Run the block with this thread in the namespace; never await inside it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(ns_fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def socket_in(ns_fd: int) -> socket.socket:
    """A non-blocking TCP socket in the namespace of ``ns_fd``."""
    with entered(ns_fd):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def listener_in(ns_fd: int, port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` inside the namespace."""
    sock = socket_in(ns_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Copy bytes both ways until both sides have finished, then close both."""
    try:
        await asyncio.gather(_pump(a[0], b[1]), _pump(b[0], a[1]))
    finally:
        for _, writer in (a, b):
            writer.close()


class _Relay(asyncio.Protocol):
    """One end of a forwarded connection: what it receives, its peer sends. Flow control
    crosses over (a slow reader pauses the other side's reads); EOF is passed on as EOF."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None
        self.early: list[bytes] = []  # received before the peer was connected
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError(f"a stream transport was expected, got {type(transport).__name__}")
        self.transport = transport

    def link(self, peer: _Relay) -> None:
        self.peer, peer.peer = peer, self
        for side in (self, peer):
            for data in side.early:
                side.peer.send(data)  # type: ignore[union-attr]
            side.early.clear()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.send(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.eof:
            self.close_both()
            return False
        if peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # half-closed: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_both()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def close_both(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


Connect = Callable[[], Awaitable[socket.socket]]


class Bridge:
    """The forwarders of one box, in the caller's event loop; ``close()`` ends them all."""

    def __init__(self, ns_fd: int) -> None:
        self.ns_fd = ns_fd
        self._servers: list[asyncio.Server] = []
        self._connecting: set[asyncio.Task[None]] = set()

    async def _serve(self, sock: socket.socket | None, connect: Connect, port: int = 0) -> int:
        loop = asyncio.get_running_loop()

        async def join(near: _Relay) -> None:
            try:
                upstream = await connect()
                _, far = await loop.create_connection(_Relay, sock=upstream)
            except OSError:  # the other side is not listening (yet, or any more)
                near.close_both()
                return
            if near.transport is None or near.transport.is_closing():
                far.close_both()  # the client left while we connected
                return
            near.link(far)

        def accepted() -> _Relay:
            near = _Relay()
            task = loop.create_task(join(near))
            self._connecting.add(task)  # a reference until it is done
            task.add_done_callback(self._connecting.discard)
            return near

        if sock is None:
            server = await loop.create_server(accepted, "127.0.0.1", port)
        else:
            server = await loop.create_server(accepted, sock=sock)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def expose(self, inner_port: int, host_port: int = 0) -> int:
        """Listen on the host's 127.0.0.1 (``host_port``, 0 for any) and forward each
        connection to the box's 127.0.0.1:``inner_port``; returns the host port."""

        async def connect() -> socket.socket:
            sock = socket_in(self.ns_fd)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", inner_port))
            except OSError:
                sock.close()
                raise
            return sock

        return await self._serve(None, connect, host_port)

    async def provide(self, inner_port: int, target: tuple[str, int]) -> None:
        """Listen on the box's 127.0.0.1:``inner_port`` and forward each connection to
        ``target`` on the host: the one host endpoint the box can reach."""

        async def connect() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, target)
            except OSError:
                sock.close()
                raise
            return sock

        await self._serve(listener_in(self.ns_fd, inner_port), connect)

    async def serve_in(
        self,
        inner_port: int,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        """Listen on the box's 127.0.0.1:``inner_port`` with a handler of the caller's."""
        server = await asyncio.start_server(handler, sock=listener_in(self.ns_fd, inner_port))
        self._servers.append(server)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
