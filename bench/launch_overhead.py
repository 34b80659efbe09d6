"""Launch overhead (issue 2): what does hublaunch add on top of the Hub itself?

One stack (JupyterHub with the in-process fake spawner, the HTTP app, a Celery worker, beat) is
started on a fresh database. Then, interleaved, after a few uncounted warm-up rounds:

* a hublaunch launch, as a client sees it: from just before ``POST /api/launches`` until the
  ``ready`` event arrives on ``GET /api/launches/{id}/events``;
* a raw Hub cycle, as hublaunch itself does it: create user -> start server -> wait until ready
  -> issue a token, with ``worker.hub_client.HubClient``.

After each timed launch it is torn down (DELETE, then wait for ``ended``; or remove the raw user)
so every launch starts from a quiet system. Prints p50/p95/mean/min of both sides, their
difference and ratio, and where hublaunch's time goes (from the timestamps it stores).

    .venv/bin/python bench/launch_overhead.py            # PostgreSQL (a throwaway database)
    .venv/bin/python bench/launch_overhead.py --sqlite   # a SQLite file in the temp directory

Exits non-zero when a launch failed or the time limit cut the run short; a missed target
(hublaunch adds <= 50 ms at p50) is reported, not an error.
"""

from __future__ import annotations

import argparse
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import httpx
import redis
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hublaunch.stack import Stack, StackConfig  # noqa: E402
from worker.hub_client import HubClient, HubError  # noqa: E402
from worker.launcher import remove_hub_user  # noqa: E402

ADMIN_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BROKER_URL = "redis://127.0.0.1:6379/14"
TARGET_P50_MS = 50.0
STEP_TIMEOUT = 30.0  # seconds any one launch, stream or teardown may take
MAX_FAILURES = 3  # stop early after this many failed launches: something is broken


class BenchFailure(Exception):
    """A launch or a raw cycle did not reach ready (or did not go away again)."""


# -- numbers -------------------------------------------------------------------------------


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


def row(label: str, s: Summary | None, width: int = 28) -> str:
    if s is None:
        return f"{label:<{width}} {0:>4}        -        -        -        -"
    return f"{label:<{width}} {s.n:>4} {s.p50:>8.1f} {s.p95:>8.1f} {s.mean:>8.1f} {s.min:>8.1f}"


def header(title: str, width: int = 28) -> str:
    return f"{title:<{width}} {'n':>4} {'p50':>8} {'p95':>8} {'mean':>8} {'min':>8}"


# -- the two sides ---------------------------------------------------------------------------


@dataclass
class HublaunchSample:
    launch_id: str
    total_ms: float
    post_ms: float  # until POST /api/launches answered
    post_started: float  # wall clock (time.time()), to compare with stored timestamps
    ready_seen: float  # wall clock when the client read the ready event


@dataclass
class RawSample:
    total_ms: float
    steps_ms: dict[str, float]


def read_events(stream: httpx.Response, deadline: float) -> Iterator[dict[str, object]]:
    """The JSON payloads of a Server-Sent Events response, until ``deadline`` (monotonic).

    The app sends a keepalive comment every 15 s, so a stuck launch still gets us here.
    """
    for line in stream.iter_lines():
        if time.monotonic() > deadline:
            raise BenchFailure(f"no ready event within {STEP_TIMEOUT:.0f} s")
        if line.startswith("data:"):
            yield json.loads(line[5:])


def hublaunch_launch(client: httpx.Client) -> HublaunchSample:
    post_started = time.time()
    t0 = time.perf_counter()
    response = client.post("/api/launches", json={"image": "default"})
    post_ms = (time.perf_counter() - t0) * 1000
    if response.status_code != 202:
        raise BenchFailure(f"POST /api/launches answered {response.status_code}: {response.text}")
    launch_id = str(response.json()["id"])
    try:
        with client.stream("GET", f"/api/launches/{launch_id}/events") as stream:
            if stream.status_code != 200:
                raise BenchFailure(f"events of {launch_id} answered {stream.status_code}")
            for event in read_events(stream, time.monotonic() + STEP_TIMEOUT):
                if event.get("phase") == "ready":
                    total_ms = (time.perf_counter() - t0) * 1000
                    return HublaunchSample(launch_id, total_ms, post_ms, post_started, time.time())
                if event.get("phase") == "failed":
                    raise BenchFailure(f"launch {launch_id} failed: {event.get('message')}")
        raise BenchFailure(f"event stream of {launch_id} ended before ready")
    except httpx.HTTPError as e:
        raise BenchFailure(f"launch {launch_id}: {type(e).__name__}: {e}") from e
    finally:
        end_launch(client, launch_id)


def end_launch(client: httpx.Client, launch_id: str) -> None:
    """DELETE the launch and wait until it is ``ended`` (its Hub user is gone by then)."""
    deadline = time.monotonic() + STEP_TIMEOUT
    try:
        client.delete(f"/api/launches/{launch_id}")
        while time.monotonic() < deadline:
            status = client.get(f"/api/launches/{launch_id}").json()["status"]
            if status in ("ended", "failed"):
                return
            time.sleep(0.02)
    except httpx.HTTPError as e:
        raise BenchFailure(f"ending {launch_id}: {type(e).__name__}: {e}") from e
    raise BenchFailure(f"launch {launch_id} was not ended within {STEP_TIMEOUT:.0f} s")


def raw_cycle(hub: HubClient) -> RawSample:
    name = f"raw-{secrets.token_hex(8)}"
    steps: dict[str, float] = {}

    def step(label: str, call: Callable[[], object]) -> object:
        t = time.perf_counter()
        result = call()
        steps[label] = (time.perf_counter() - t) * 1000
        return result

    t0 = time.perf_counter()
    try:
        step("create user", lambda: hub.create_user(name))
        ready = step("start server", lambda: hub.start_server(name, {"image": "default"}))
        if not ready:
            step("wait ready", lambda: hub.wait_ready(name, timeout=STEP_TIMEOUT))
        step(
            "create token",
            lambda: hub.create_token(
                name, scopes=[f"access:servers!user={name}"], expires_in=3600, note="bench"
            ),
        )
        total_ms = (time.perf_counter() - t0) * 1000
    except HubError as e:
        raise BenchFailure(f"raw cycle {name}: {e.message}") from e
    finally:
        remove_raw_user(hub, name)
    return RawSample(total_ms, steps)


def remove_raw_user(hub: HubClient, name: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    try:
        while not remove_hub_user(hub, name):
            if time.monotonic() > deadline:
                raise BenchFailure(f"raw user {name} was not removed in {STEP_TIMEOUT:.0f} s")
            time.sleep(0.02)
    except HubError as e:
        raise BenchFailure(f"removing raw user {name}: {e.message}") from e


# -- where hublaunch's time goes, from the timestamps it stores -------------------------------


def stages(database_url: str, samples: list[HublaunchSample]) -> dict[str, list[float]]:
    """Split each launch at the stored timestamps (all on this machine's clock).

    api      POST sent -> launch row created (proxy, app, validation)
    queue    row created -> worker recorded "launching" (commit, enqueue, Celery pickup, read)
    hub      "launching" -> token issued (the same Hub calls as the raw cycle, plus DB writes)
    deliver  token issued -> client read ready (commit, notify, event stream, proxy)
    """
    out: dict[str, list[float]] = {k: [] for k in ("api", "queue", "hub", "deliver")}
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as db:
            for s in samples:
                created = db.execute(
                    sa.text("SELECT created_at FROM launches WHERE id = :id"), {"id": s.launch_id}
                ).scalar_one()
                times: dict[str, datetime | str] = dict(
                    db.execute(
                        sa.text(
                            "SELECT phase, MIN(created_at) FROM launch_events "
                            "WHERE launch_id = :id GROUP BY phase"
                        ),
                        {"id": s.launch_id},
                    ).all()
                )
                t_created = _epoch(created)
                t_launching = _epoch(times["launching"])
                t_ready = _epoch(times["ready"])
                out["api"].append((t_created - s.post_started) * 1000)
                out["queue"].append((t_launching - t_created) * 1000)
                out["hub"].append((t_ready - t_launching) * 1000)
                out["deliver"].append((s.ready_seen - t_ready) * 1000)
    finally:
        engine.dispose()
    return out


def _epoch(value: datetime | str) -> float:
    if isinstance(value, str):  # SQLite through a plain text() query
        value = datetime.fromisoformat(value)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


# -- the database ----------------------------------------------------------------------------


@contextlib.contextmanager
def bench_database(use_sqlite: bool, tmp: Path) -> Iterator[tuple[str, str]]:
    """Yield (SQLAlchemy URL, description) of a database that exists for this run only."""
    if use_sqlite:
        yield f"sqlite:///{tmp / 'hublaunch.sqlite'}", f"SQLite {sqlite3.sqlite_version} (file)"
        return
    name = f"hublaunch_bench_{secrets.token_hex(6)}"
    admin = sa.create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version")).scalar_one()
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            url = ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
            yield url, f"PostgreSQL {version.split()[0]} (database {name})"
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def forget_queue(queue: str) -> None:
    """Remove the Redis keys kombu keeps for the run's queue (the queue itself is empty)."""
    with contextlib.suppress(redis.RedisError):
        r = redis.Redis.from_url(BROKER_URL, socket_timeout=2)
        r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    hublaunch: list[HublaunchSample] = field(default_factory=list)
    raw: list[RawSample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rounds_planned: int = 0
    timed_out: bool = False


def run_rounds(stack: Stack, args: argparse.Namespace, started: float) -> Results:
    results = Results(rounds_planned=args.n)
    deadline = started + args.time_limit
    with (
        httpx.Client(base_url=stack.public_url, timeout=STEP_TIMEOUT) as client,
        contextlib.closing(HubClient(stack.hub_api_url, stack.hub_token)) as hub,
    ):
        for i in range(args.warmup + args.n):
            counted = i >= args.warmup
            if time.monotonic() > deadline:
                results.timed_out = True
                break
            for side in ("hublaunch", "raw"):
                try:
                    if side == "hublaunch":
                        sample = hublaunch_launch(client)
                        if counted:
                            results.hublaunch.append(sample)
                    else:
                        raw = raw_cycle(hub)
                        if counted:
                            results.raw.append(raw)
                except BenchFailure as e:
                    results.failures.append(f"round {i + 1} {side}: {e}")
                    print(f"  FAILED: {results.failures[-1]}", flush=True)
            if len(results.failures) >= MAX_FAILURES:
                print(f"  stopping after {len(results.failures)} failures", flush=True)
                break
            if counted and (i + 1 - args.warmup) % 10 == 0:
                done = i + 1 - args.warmup
                print(f"  {done}/{args.n} rounds ({time.monotonic() - started:.0f} s)", flush=True)
    return results


def machine_info(db_kind: str) -> list[tuple[str, str]]:
    import jupyterhub

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
        ("database", db_kind),
        ("spawner", "fake (in the Hub process)"),
    ]


def report(results: Results, info: list[tuple[str, str]], database_url: str) -> None:
    hl = summarize([s.total_ms for s in results.hublaunch])
    raw = summarize([s.total_ms for s in results.raw])
    print()
    for key, value in info:
        print(f"{key + ':':<12}{value}")
    print()
    print(header("launch until ready (ms)"))
    print(row("hublaunch (POST -> ready)", hl))
    print(row("raw Hub cycle", raw))
    if hl and raw:
        d50, d95 = hl.p50 - raw.p50, hl.p95 - raw.p95
        verdict = "met" if d50 <= TARGET_P50_MS else "NOT met"
        print()
        print(f"difference p50: {d50:+.1f} ms   p95: {d95:+.1f} ms")
        print(f"ratio hublaunch/raw at p50: {hl.p50 / raw.p50:.2f}")
        print(f"target (hublaunch adds <= {TARGET_P50_MS:.0f} ms at p50): {verdict}")
    print()
    print(header("hublaunch stages (ms)"))
    print(row("  POST answered", summarize([s.post_ms for s in results.hublaunch])))
    try:
        for name, values in stages(database_url, results.hublaunch).items():
            print(row(f"  {name}", summarize(values)))
    except Exception as e:  # the breakdown is a bonus, never a failure of the run
        print(f"  (no breakdown: {type(e).__name__}: {e})")
    print(header("raw Hub cycle steps (ms)"))
    step_names = dict.fromkeys(k for s in results.raw for k in s.steps_ms)
    for name in step_names:
        values = [s.steps_ms[name] for s in results.raw if name in s.steps_ms]
        print(row(f"  {name}", summarize(values)))
    if results.timed_out:
        print(
            f"\ntime limit reached after {len(results.hublaunch)} of "
            f"{results.rounds_planned} rounds"
        )
    if results.failures:
        print(f"\n{len(results.failures)} failure(s):")
        for failure in results.failures:
            print(f"  {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="counted rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted rounds (default 3)")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument(
        "--time-limit", type=float, default=600, help="stop after this many seconds (600)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be at least 1 and --warmup at least 0")

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="hublaunch-bench-"))
    queue = f"bench-{secrets.token_hex(6)}"
    ok = False
    try:
        with bench_database(args.sqlite, tmp) as (database_url, db_kind):
            info = machine_info(db_kind)
            stack = Stack(
                StackConfig(
                    data_dir=tmp / "stack",
                    database_url=database_url,
                    broker_url=BROKER_URL,
                    spawner="fake",
                    queue=queue,
                )
            )
            print(f"starting the stack ({db_kind}; logs in {stack.logs}) ...", flush=True)
            with stack.running():
                print(
                    f"stack up in {time.monotonic() - started:.1f} s; "
                    f"{args.warmup} warm-up + {args.n} rounds of hublaunch / raw",
                    flush=True,
                )
                results = run_rounds(stack, args, started)
                report(results, info, database_url)
            ok = not results.failures and not results.timed_out
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        forget_queue(queue)
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
