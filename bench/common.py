"""What every benchmark shares: a run's scaffolding (temp dir, SIGTERM, queues, exit code), its
throwaway database and stack, launches through the public API, and the report's tables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import jupyterhub
import redis
import sqlalchemy as sa

from hublaunch.stack import Stack, StackConfig
from worker.broker import Message
from worker.context import WorkerContext
from worker.crypto import cipher
from worker.db import utcnow
from worker.hub_client import HubClient
from worker.notify import Notifier
from worker.settings import Settings
from worker.unit_of_work import Units

# Both run on this machine for the tests too; each run makes its own database and queue.
ADMIN_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BROKER_URL = "redis://127.0.0.1:6379/14"


class BenchFailure(Exception):
    """Something the benchmark measures did not finish (a launch failed, users left, time up)."""


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    url: str
    kind: str  # what the report calls it, e.g. "PostgreSQL 15.8 (database hublaunch_bench_...)"


@dataclass
class Run:
    tmp: Path  # stacks' data directories and logs; kept unless the run succeeded
    ok: bool = False  # set by the script once its figures are complete
    queues: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def stack(
        self,
        name: str,
        database: Database,
        *,
        spawner: str = "fake",
        beat: bool = True,
        env: dict[str, str] | None = None,
        label: str = "",
        extra_hubs: int = 0,
    ) -> Stack:
        """A stack (not yet started) in ``tmp/name`` on its own queue, forgotten after the run."""
        queue = f"bench-{secrets.token_hex(6)}"
        self.queues.append(queue)
        stack = Stack(
            StackConfig(
                data_dir=self.tmp / name,
                database_url=database.url,
                broker_url=BROKER_URL,
                spawner=spawner,
                queue=queue,
                beat=beat,
                extra_hubs=extra_hubs,
                # Benchmarks measure the machinery, not the fair limits: no rate limit and
                # no cap on sessions unless a benchmark sets its own.
                env={"HUBLAUNCH_CLIENT_RATE": "0", "HUBLAUNCH_MAX_ACTIVE": "100000", **(env or {})},
            )
        )
        print(f"{label}starting the stack ({database.kind}; logs in {stack.logs}) ...", flush=True)
        return stack


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def bench_run(prefix: str, *, keep: bool = False) -> Iterator[Run]:
    """A run in a fresh temp dir; SIGTERM ends it like Ctrl-C, so the stacks are stopped."""
    signal.signal(signal.SIGTERM, _interrupt)
    run = Run(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        for queue in run.queues:
            forget_queue(queue)
        if run.ok and not keep:
            shutil.rmtree(run.tmp, ignore_errors=True)
        else:
            print(f"logs kept in {run.tmp}", file=sys.stderr)


@contextlib.contextmanager
def bench_database(sqlite_file: Path | None = None) -> Iterator[Database]:
    """A database that exists for this run only: the SQLite file, or a new PostgreSQL one."""
    if sqlite_file is not None:
        yield Database(f"sqlite:///{sqlite_file}", f"SQLite {sqlite3.sqlite_version} (file)")
        return
    name = f"hublaunch_bench_{secrets.token_hex(6)}"
    admin = sa.create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version")).scalar_one()
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            url = ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
            yield Database(url, f"PostgreSQL {version.split()[0]} (database {name})")
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def forget_queue(queue: str) -> None:
    """Remove the Redis keys of a run's queue: kombu's for it and its build queues (empty by
    now), and the stack's own (metrics, counters), which all name the queue."""
    with contextlib.suppress(redis.RedisError):
        forget_keys(redis.Redis.from_url(BROKER_URL, socket_timeout=2), queue)


def forget_keys(client: redis.Redis, marker: str) -> None:
    """Remove from ``client``'s Redis what stacks whose queue names contain ``marker`` left:
    every key naming it, and their entries in kombu's keys shared by all queues of the database
    (messages delivered but never acknowledged, by delivery tag, each naming its routing key;
    the bindings' deadlines). Other runs' entries in the shared keys stay, but for deadlines of
    bindings that no longer exist."""
    for key in client.scan_iter(match=f"*{marker}*", count=1000):
        client.delete(key)
    needle = marker.encode()
    for tag, value in client.hscan_iter("unacked", count=1000):
        if needle in value:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    for member, _ in client.zscan_iter("_kombu.binding_deadlines", count=1000):
        # Ours, or one whose bindings are gone (celery.pidbox's, shared by every worker, once
        # the last one stopped): a deadline of nothing.
        if needle in member or not client.exists(b"_kombu.binding." + member):
            client.zrem("_kombu.binding_deadlines", member)


def hub_http(stack: Stack, timeout: float, **options: Any) -> httpx.Client:
    """Plain HTTP to the stack's Hub API as its admin service (relative URLs like ``users``)."""
    return httpx.Client(
        base_url=stack.hub_api_url + "/",
        headers={"Authorization": f"token {stack.hub_token}"},
        timeout=timeout,
        **options,
    )


# -- launches through the public API ----------------------------------------------------------


def post_launch(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/api/launches", json=body)
    if response.status_code != 202:
        raise BenchFailure(f"POST /api/launches answered {response.status_code}: {response.text}")
    return str(response.json()["id"])


def wait_for_phase(client: httpx.Client, launch_id: str, phase: str, timeout: float) -> None:
    """Follow the launch's event stream until ``phase``; a failed launch raises BenchFailure.

    The app sends a keepalive comment every 15 s, so a stuck launch still reaches the deadline.
    """
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/api/launches/{launch_id}/events") as stream:
        if stream.status_code != 200:
            raise BenchFailure(f"events of {launch_id} answered {stream.status_code}")
        for line in stream.iter_lines():
            if time.monotonic() > deadline:
                raise BenchFailure(f"no {phase} event within {timeout:.0f} s")
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("phase") == phase:
                return
            if event.get("phase") == "failed":
                raise BenchFailure(f"launch {launch_id} failed: {event.get('message')}")
    raise BenchFailure(f"event stream of {launch_id} ended before {phase}")


def end_launch(client: httpx.Client, launch_id: str, timeout: float = 30.0) -> None:
    """DELETE the launch and wait until it is ``ended`` (its Hub user is gone by then)."""
    deadline = time.monotonic() + timeout
    try:
        client.delete(f"/api/launches/{launch_id}")
        while time.monotonic() < deadline:
            status = client.get(f"/api/launches/{launch_id}").json()["status"]
            if status in ("ended", "failed"):
                return
            time.sleep(0.02)
    except httpx.HTTPError as e:
        raise BenchFailure(f"ending {launch_id}: {type(e).__name__}: {e}") from e
    raise BenchFailure(f"launch {launch_id} was not ended within {timeout:.0f} s")


class CountingHub:
    """Wraps the HubClient a cleanup pass uses: counts and times each kind of call."""

    def __init__(self, hub: HubClient) -> None:
        self._hub = hub
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.first_call: dict[str, float] = {}
        self.lock = threading.Lock()  # the pass calls the Hub from several threads

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._hub, name)
        if not callable(attr) or name.startswith("_") or name == "close":
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                result = attr(*args, **kwargs)
                if name == "iter_users":
                    result = iter(list(result))  # so the listing's paging is inside the time
                return result
            finally:
                with self.lock:
                    self.calls[name] += 1
                    self.seconds[name] += time.perf_counter() - t0
                    self.first_call.setdefault(name, t0)

        return timed

    def summary(self, started: float) -> str:
        calls = ", ".join(
            f"{k} {self.calls[k]}x ({self.seconds[k]:.2f} s summed)" for k in sorted(self.calls)
        )
        writes = [
            self.first_call[k] for k in ("stop_server", "delete_user") if k in self.first_call
        ]
        prelude = f"; first stop sent {min(writes) - started:.2f} s into the pass" if writes else ""
        return f"Hub calls: {calls}{prelude}"


# -- the report ---------------------------------------------------------------------------------


def machine_info(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    """What the figures were measured on, then the script's own lines (database, spawner...)."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        (
            "machine",
            f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
            f"{mem_gib:.0f} GiB, {os_name}",
        ),
        ("python", platform.python_version()),
        ("jupyterhub", jupyterhub.__version__),
        *extra,
    ]


def print_info(info: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in info) + 2
    for key, value in info:
        print(f"{key + ':':<{width}}{value}")


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p95: float
    mean: float
    min: float


def summarize(values_ms: list[float]) -> Summary | None:
    if not values_ms:
        return None
    if len(values_ms) == 1:
        v = values_ms[0]
        return Summary(1, v, v, v, v)
    cuts = statistics.quantiles(values_ms, n=100, method="inclusive")
    return Summary(
        n=len(values_ms),
        p50=cuts[49],
        p95=cuts[94],
        mean=statistics.fmean(values_ms),
        min=min(values_ms),
    )


def header(title: str, width: int = 28) -> str:
    return f"{title:<{width}} {'n':>4} {'p50':>8} {'p95':>8} {'mean':>8} {'min':>8}"


def row(label: str, s: Summary | None, width: int = 28) -> str:
    if s is None:
        return f"{label:<{width}} {0:>4}        -        -        -        -"
    return f"{label:<{width}} {s.n:>4} {s.p50:>8.1f} {s.p95:>8.1f} {s.mean:>8.1f} {s.min:>8.1f}"


@dataclass(frozen=True)
class Comparison:
    """A measurement against its baseline, both taken in the same run on the same machine."""

    subject: Summary
    baseline: Summary

    @property
    def extra_p50(self) -> float:
        return self.subject.p50 - self.baseline.p50

    @property
    def extra_p95(self) -> float:
        return self.subject.p95 - self.baseline.p95

    @property
    def ratio(self) -> float:
        return self.subject.p50 / self.baseline.p50


def compare(
    title: str, subject: list[float], baseline: list[float], labels: tuple[str, str]
) -> Comparison | None:
    """Print one table, the subject's figures over the baseline's; None when a side is empty."""
    print(header(title))
    s, b = summarize(subject), summarize(baseline)
    print(row(labels[0], s))
    print(row(labels[1], b))
    return Comparison(s, b) if s and b else None


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


class KeptBroker:
    """A broker that keeps the messages a pass would send instead of queueing them: a bench
    pass must not start launches behind the measurement's back."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def send(self, message: Message) -> None:
        self.messages.append(message)

    def send_many(self, messages: Sequence[Message]) -> None:
        self.messages.extend(messages)


def bench_context(
    settings: Settings,
    hub: Any,
    *,
    clock: Callable[[], datetime] | None = None,
    broker: KeptBroker | None = None,
    doorbell: Callable[[str], None] | None = None,
) -> WorkerContext:
    """The worker's context for an in-process cleanup pass against a real Hub and database
    (doorbells go to Redis as the worker's do, unless ``doorbell`` replaces them)."""
    units = Units(
        settings.database_url, broker or KeptBroker(), doorbell or Notifier(settings).publish
    )
    return WorkerContext(
        settings=settings, hub=hub, cipher=cipher(settings), units=units, clock=clock or utcnow
    )
