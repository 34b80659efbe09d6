"""HTTP for hostile hosts: every connection, each redirect hop's included, is held to the SSRF
rules of git URLs (``worker.repos.check_host``).

The check sits in httpcore's network backend, the one place that opens TCP connections: it
resolves the host, refuses any non-public address (unless ``allow_local_repos``) and connects to
the checked address itself, so a DNS answer that changes between check and connect cannot lead
inside. TLS still verifies (and sends SNI for) the URL's host name: httpcore starts TLS on the
stream with the origin's host. A request hook holds every URL, redirect targets included, to
the scheme rules (https only; http too when local) and refuses credentials in URLs.

Errors, all with a message a visitor may read (no query strings: signed URLs carry tokens)::

    FetchError          cannot read a URL (unreachable, timeout, not JSON, ...)
    ├── UnsafeURL       the URL or its host's address is refused (SSRF rules, scheme)
    ├── BadStatus       a non-2xx answer; ``.status`` holds the code
    └── TooLarge        more bytes than allowed
"""

from __future__ import annotations

import functools
import hashlib
import json
import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import httpcore
import httpx

from worker.repos import SpecError, check_host, split_url
from worker.settings import Settings

USER_AGENT = "hublaunch"
MAX_REDIRECTS = 5
JSON_LIMIT = 10 * 2**20
CHUNK = 2**16


class FetchError(Exception):
    """A URL could not be read; ``str(e)`` says why, for the visitor."""


class UnsafeURL(FetchError):
    """The URL's scheme, credentials or host address is refused."""


class BadStatus(FetchError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class TooLarge(FetchError):
    """The answer holds more bytes than the limit."""


def describe(url: str | httpx.URL) -> str:
    """The URL without its query and fragment (where signed URLs keep their tokens)."""
    try:
        parsed = httpx.URL(str(url))
        text = str(parsed.copy_with(query=None, fragment=None, username=None, password=None))
    except (httpx.InvalidURL, TypeError):
        return "a URL that cannot be read"
    return text if len(text) <= 200 else text[:197] + "..."


def check_url(url: str, settings: Settings) -> None:
    """Scheme and form rules, without network: https (http too when local repositories are
    allowed, so an https to http redirect is refused in production), a host, no credentials."""
    allowed = {"https", "http"} if settings.allow_local_repos else {"https"}
    try:
        parts = split_url(url)
    except SpecError as e:
        raise UnsafeURL(f"{url[:100]!r} is not a URL that can be fetched") from e
    if parts.scheme not in allowed:
        raise UnsafeURL(
            f"{parts.scheme or 'scheme-less'} URLs are not fetched (only "
            f"{' or '.join(sorted(allowed))}): {parts.hostname or url[:100]!r}"
        )
    if not parts.hostname:
        raise UnsafeURL(f"{url[:100]!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL(f"URLs with credentials are not fetched ({parts.hostname})")


class _CheckedBackend(httpcore.NetworkBackend):
    """The default sync backend, connecting only to addresses the SSRF rules let through."""

    def __init__(self, settings: Settings) -> None:
        self._inner = httpcore.SyncBackend()
        self._settings = settings

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        literal = f"[{host}]" if ":" in host else host
        try:
            addresses = check_host(f"https://{literal}:{port}/", self._settings)
        except SpecError as e:
            raise UnsafeURL(str(e).replace("repo host", "host")) from e
        error: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                # The checked address itself, not the name: no second lookup to race with.
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as e:
                error = e
        raise error or httpcore.ConnectError(f"{host} has no address")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise UnsafeURL("Unix sockets are never used")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@functools.cache
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle costs tens of milliseconds; one context serves every client.
    return httpx.create_ssl_context()


class _CheckedTransport(httpx.HTTPTransport):
    def __init__(self, settings: Settings) -> None:
        super().__init__(verify=_tls(), trust_env=False)
        # httpx has no parameter for httpcore's network backend; its transport sends every
        # request through _pool, so the pool is replaced by one built on the checked backend.
        self._pool = httpcore.ConnectionPool(
            ssl_context=_tls(),
            max_connections=10,
            max_keepalive_connections=5,
            network_backend=_CheckedBackend(settings),
        )


def client(settings: Settings) -> httpx.Client:
    """A client whose every connection and URL is checked; redirects followed up to
    MAX_REDIRECTS, each hop held to the same rules. No proxy, netrc or credentials from the
    environment (trust_env off)."""

    def hop(request: httpx.Request) -> None:
        check_url(str(request.url), settings)

    return httpx.Client(
        transport=_CheckedTransport(settings),
        headers={"User-Agent": USER_AGENT},
        timeout=httpx.Timeout(settings.resolve_timeout),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        event_hooks={"request": [hop]},
    )


@contextmanager
def _errors(url: str) -> Iterator[None]:
    """httpx's errors said as FetchError, with the host, never the query."""
    try:
        yield
    except httpx.TooManyRedirects as e:
        raise FetchError(f"{describe(url)} redirects more than {MAX_REDIRECTS} times") from e
    except httpx.TimeoutException as e:
        raise FetchError(f"{describe(url)} did not answer in time") from e
    except httpx.ConnectError as e:
        raise FetchError(f"cannot connect to {describe(url)}") from e
    except httpx.InvalidURL as e:
        raise UnsafeURL(f"{describe(url)} leads to a URL that cannot be read") from e
    except httpx.HTTPError as e:
        raise FetchError(f"cannot read {describe(url)}: {type(e).__name__}") from e


def _check_status(response: httpx.Response, url: str) -> None:
    if not 200 <= response.status_code < 300:
        raise BadStatus(f"{describe(url)} answered {response.status_code}", response.status_code)


def _declared_over(response: httpx.Response, limit: int) -> bool:
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) > limit


def get_json(
    http: httpx.Client, url: str, *, limit: int = JSON_LIMIT, deadline: float | None = None
) -> object:
    """GET and parse a JSON answer of at most ``limit`` bytes (counted as read, decoded),
    within ``deadline`` s in all (default: the client's timeout), so a slow drip cannot hold
    a worker."""
    total_time = deadline if deadline is not None else http.timeout.read or 30.0
    ends = time.monotonic() + total_time
    body = bytearray()
    with _errors(url), http.stream("GET", url, headers={"Accept": "application/json"}) as r:
        _check_status(r, url)
        if _declared_over(r, limit):
            raise TooLarge(f"{describe(url)} answered more than {limit} bytes")
        for chunk in r.iter_bytes(CHUNK):
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{describe(url)} answered more than {limit} bytes")
            if time.monotonic() > ends:
                raise FetchError(f"{describe(url)} did not answer within {total_time:g} s")
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as e:
        raise FetchError(f"{describe(url)} did not answer JSON") from e


def redirect_target(http: httpx.Client, url: str) -> str:
    """The absolute URL a 3xx answer at ``url`` points to, not followed (the caller checks
    where it leads before going there)."""
    # Streamed and never read: only the status and Location matter, whatever the body's size.
    with _errors(url), http.stream("GET", url, follow_redirects=False) as response:
        if not response.is_redirect:
            _check_status(response, url)
            raise FetchError(f"{describe(url)} did not redirect")
        return str(response.url.join(response.headers["Location"]))


def stream_to_file(
    http: httpx.Client,
    url: str,
    out: BinaryIO,
    *,
    limit: int,
    digest: str | None = None,
    ends: float | None = None,
) -> tuple[int, str | None]:
    """Stream ``url`` into ``out``; returns the bytes written and, when ``digest`` names a
    hashlib algorithm, the content's hex digest. Raises TooLarge past ``limit`` bytes, and
    FetchError past ``ends`` (``time.monotonic()``): a slow drip cannot hold a build."""
    hasher = hashlib.new(digest, usedforsecurity=False) if digest else None
    written = 0
    # identity: the bytes counted and hashed are the file's own, not a transfer encoding's.
    headers = {"Accept-Encoding": "identity"}
    with _errors(url), http.stream("GET", url, headers=headers) as response:
        _check_status(response, url)
        if _declared_over(response, limit):
            raise TooLarge(f"{describe(url)} is larger than {limit} bytes")
        for chunk in response.iter_bytes(CHUNK):
            written += len(chunk)
            if written > limit:
                raise TooLarge(f"{describe(url)} is larger than {limit} bytes")
            out.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
            if ends is not None and time.monotonic() > ends:
                raise FetchError(f"{describe(url)} took longer than the build may")
    return written, hasher.hexdigest() if hasher is not None else None
