"""Cleanup pass at scale (issue 3): does a pass over 10,000 live sessions cost the same with
100,000 rows of history in the table?

One stack (JupyterHub with the fake spawner, the app, a worker; no beat) on a throwaway
PostgreSQL database. 10,000 Hub users are created in batches (``POST /hub/api/users`` with
``{"usernames": [...]}``), each gets a (fake) server, 8 starts at a time, and 10,000 ``ready``
launch rows that own them are inserted straight into the database (``ready_at`` now,
``expires_at`` a day ahead, ``user_removed_at`` NULL). Then ``cull_pass`` runs in this process
with the real clock, so nothing is due: none expired, none idle (``idle_timeout`` is set to a
day, since the fake servers report no activity and setting up takes minutes), none stopped
(every server runs), none stuck or lost (all ready), no orphan (every user has its live
launch), no ghost (every user is there). The servers are needed because a pass ends sessions
whose server is no longer running. It is timed ``--repeat`` times in two settings:

* ``young``: ``orphan_grace`` of a day, i.e. every Hub user is younger than the grace period, as
  right after a burst of launches: the orphan check has no candidates;
* ``steady``: ``orphan_grace`` 0, i.e. every user is older than the grace period, as on a
  service that has been running a while: all 10,000 names go through the ownership check.

Then 100,000 rows of history (``ended``/``failed``, ``user_removed_at`` set) are inserted, the
table is ANALYZEd (as autovacuum would), and the same passes are timed again. Each pass is split
into the Hub listing (paged, 200 a page), the SQL statements (their execution time, from
SQLAlchemy's cursor events) and the rest. Last, every distinct statement of a pass is run again
under ``EXPLAIN (ANALYZE, BUFFERS)`` (inside a transaction that is rolled back) to show which
index it uses and how many rows it touches.

    .venv/bin/python -m bench.cull_scale
    .venv/bin/python -m bench.cull_scale --sessions 2000 --history 20000 --repeat 3

Exits non-zero when the setup failed, a pass acted on something, or the time limit was reached.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import secrets
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from bench.common import (
    BenchFailure,
    CountingHub,
    Run,
    bench_context,
    bench_database,
    bench_run,
    hub_http,
    machine_info,
    print_info,
)
from hublaunch.stack import Stack
from worker.cull import cull_pass
from worker.hub_client import HubClient
from worker.models import EndReason, Launch, Status

USER_PREFIX = "hl-"
DAY = 86400
SETTINGS = {
    "young": {"orphan_grace": DAY, "idle_timeout": DAY},
    "steady": {"orphan_grace": 0, "idle_timeout": DAY},
}
START_CONCURRENCY = 8


# -- SQL statements, timed from SQLAlchemy's cursor events --------------------------------------


@dataclass
class Statement:
    sql: str
    params: Any
    seconds: float


class SqlRecorder:
    def __init__(self) -> None:
        self.recording = False
        self.statements: list[Statement] = []

    def install(self) -> None:
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, _cursor: Any, _sql: str, _params: Any, *_: Any) -> None:
        conn.info.setdefault("bench_t0", []).append(time.perf_counter())

    def _after(self, conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        t0 = conn.info["bench_t0"].pop()
        if self.recording:
            self.statements.append(Statement(sql, params, time.perf_counter() - t0))

    @contextlib.contextmanager
    def record(self) -> Any:
        self.statements = []
        self.recording = True
        try:
            yield self.statements
        finally:
            self.recording = False


def label(sql: str) -> str:
    """Which step of the pass a statement belongs to."""
    s = " ".join(sql.split())
    if s.startswith("UPDATE"):
        if "error=" in s:
            return "stuck: fail launches past the launch timeout"
        if "expires_at <" in s:
            return "expired: claim ready sessions past expires_at"
        if "hub_user IN" in s:
            return "idle: claim sessions whose server is idle"
        if "end_reason=" in s:
            return "ghosts: mark ended"
        if "lease_until=%(lease_until)s" in s and "updated_at <" in s:
            return "owed removals: claim ended/failed rows not yet removed"
        if "SET updated_at=" in s:
            return "lost: re-send launches that made no progress"
        if "lease_until=" in s:
            return "release leases"
    if s.startswith("SELECT"):
        if "hub_user IN" in s:
            return "orphans: which candidate names a live launch owns"
        if "ready_at <" in s:
            return "ghosts: ready sessions to check against the Hub listing"
    return s[:70]


# -- setup --------------------------------------------------------------------------------------


def create_hub_users(stack: Stack, names: list[str], batch: int, deadline: float) -> None:
    with hub_http(stack, timeout=300) as http:
        for i in range(0, len(names), batch):
            if time.monotonic() > deadline:
                raise BenchFailure("time limit reached while creating Hub users")
            response = http.post("users", json={"usernames": names[i : i + batch]})
            if response.status_code != 201:
                raise BenchFailure(f"POST /users: {response.status_code} {response.text[:200]}")


def start_servers(stack: Stack, names: list[str], deadline: float) -> None:
    """A fake server for each user, ``START_CONCURRENCY`` starts at a time."""
    hub = HubClient(stack.hub_api_url, stack.hub_token, timeout=60)

    def one(name: str) -> None:
        if time.monotonic() > deadline:
            raise BenchFailure("time limit reached while starting servers")
        if not hub.start_server(name, {"image": "default"}):
            hub.wait_ready(name, timeout=60)

    try:
        with ThreadPoolExecutor(START_CONCURRENCY, thread_name_prefix="start") as pool:
            list(pool.map(one, names))
        running = sum(
            1
            for u in hub.iter_users(name_filter=USER_PREFIX)
            if u.servers.get("") and u.servers[""].ready
        )
    finally:
        hub.close()
    if running != len(names):
        raise BenchFailure(f"{running} of {len(names)} servers running after the starts")


def insert_rows(database_url: str, rows: list[dict[str, Any]], batch: int = 5000) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as db:
            for i in range(0, len(rows), batch):
                db.execute(sa.insert(Launch), rows[i : i + batch])
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.execute(sa.text("ANALYZE launches"))
    finally:
        engine.dispose()


def live_rows(names: list[str], now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "id": secrets.token_urlsafe(16),
            "status": Status.ready,
            "spec": {"image": "default"},
            "hub_user": name,
            "lifetime": 86400,
            "created_at": now - timedelta(seconds=30),
            "updated_at": now,
            "ready_at": now,
            "expires_at": now + timedelta(days=1),
            "token_ciphertext": "x" * 140,  # about the size of a real Fernet token
        }
        for name in names
    ]


def history_rows(n: int, now: datetime) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        created = now - timedelta(days=30) + timedelta(seconds=i * 25)
        failed = i % 10 == 0
        rows.append(
            {
                "id": secrets.token_urlsafe(16),
                "status": Status.failed if failed else Status.ended,
                "spec": {"image": "default"},
                "hub_user": f"{USER_PREFIX}h{i:07d}",
                "lifetime": 3600,
                "error": "The server did not start within 600 s." if failed else None,
                "end_reason": EndReason.failed if failed else EndReason.expired,
                "created_at": created,
                "updated_at": created + timedelta(hours=1),
                "ready_at": None if failed else created + timedelta(seconds=5),
                "expires_at": None if failed else created + timedelta(hours=1),
                "ended_at": created + timedelta(hours=1),
                "user_removed_at": created + timedelta(hours=1),
            }
        )
    return rows


# -- passes -------------------------------------------------------------------------------------


@dataclass
class PassTiming:
    history: int
    setting: str
    total: float
    hub_list: float
    sql: float
    statements: int
    actions: int
    by_step: dict[str, float] = field(default_factory=dict)


def run_pass(
    stack: Stack, setting: str, history: int, recorder: SqlRecorder
) -> tuple[PassTiming, list[Statement]]:
    settings = stack.settings().model_copy(update=SETTINGS[setting])
    client = HubClient(settings.hub_api_url, stack.hub_token, timeout=60)
    hub = CountingHub(client)
    ctx = bench_context(settings, hub, doorbell=lambda _launch_id: None)
    try:
        with recorder.record() as statements:
            t0 = time.perf_counter()
            actions = cull_pass(ctx)
            total = time.perf_counter() - t0
    finally:
        client.close()
    by_step: Counter[str] = Counter()
    for s in statements:
        by_step[label(s.sql)] += s.seconds
    timing = PassTiming(
        history=history,
        setting=setting,
        total=total,
        hub_list=hub.seconds["iter_users"],
        sql=sum(s.seconds for s in statements),
        statements=len(statements),
        actions=len(actions),
        by_step=dict(by_step),
    )
    if actions:
        raise BenchFailure(f"the pass acted although nothing was due: {actions[:3]}")
    return timing, list(statements)


def explain(database_url: str, statements: list[Statement]) -> list[tuple[str, int, str]]:
    """(label, executions, plan) for each distinct statement, run again under EXPLAIN ANALYZE
    inside a transaction that is rolled back."""
    seen: dict[str, int] = Counter(label(s.sql) for s in statements)
    out = []
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            done: set[str] = set()
            for s in statements:
                name = label(s.sql)
                if name in done:
                    continue
                done.add(name)
                trans = conn.begin()
                try:
                    plan = conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + s.sql, s.params
                    ).all()
                finally:
                    trans.rollback()
                out.append((name, seen[name], "\n".join(r[0] for r in plan)))
    finally:
        engine.dispose()
    return out


def plan_summary(plan: str) -> str:
    """The scan nodes of a plan, with the rows they returned, and the execution time."""
    nodes = []
    for line in plan.splitlines():
        m = re.search(r"((?:Index Only|Index|Bitmap Index|Bitmap Heap|Seq) Scan[^(]*)", line)
        if m:
            rows = re.search(r"rows=(\d+)", line)
            nodes.append(f"{m.group(1).strip()} ({rows.group(1) if rows else '?'} rows)")
    m = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return "; ".join(nodes) + (f"; {m.group(1)} ms" if m else "")


# -- the run ------------------------------------------------------------------------------------


def report(timings: list[PassTiming], sessions: int) -> None:
    print(f"\ncull_pass over {sessions} live sessions, nothing due (seconds, median of runs)")
    print(
        f"{'history rows':>12} {'setting':<8}{'runs':>5}{'total':>8}{'min':>8}"
        f"{'Hub list':>10}{'SQL':>8}{'stmts':>7}{'other':>8}"
    )
    med: dict[tuple[int, str], dict[str, float]] = {}
    for key in dict.fromkeys((t.history, t.setting) for t in timings):
        mine = [t for t in timings if (t.history, t.setting) == key]
        m = {
            "total": statistics.median(t.total for t in mine),
            "min": min(t.total for t in mine),
            "hub": statistics.median(t.hub_list for t in mine),
            "sql": statistics.median(t.sql for t in mine),
            "stmts": statistics.median(t.statements for t in mine),
        }
        m["other"] = m["total"] - m["hub"] - m["sql"]
        med[key] = m
        print(
            f"{key[0]:>12} {key[1]:<8}{len(mine):>5}{m['total']:>8.2f}{m['min']:>8.2f}"
            f"{m['hub']:>10.2f}{m['sql']:>8.3f}{m['stmts']:>7.0f}{m['other']:>8.2f}"
        )
    histories = sorted({t.history for t in timings})
    if len(histories) == 2:
        low, high = histories
        print()
        for setting in SETTINGS:
            a, b = med.get((low, setting)), med.get((high, setting))
            if a and b:
                print(
                    f"{setting}: with {high} history rows / with {low}: "
                    f"total {b['total'] / a['total']:.2f}, SQL {b['sql'] / a['sql']:.2f}"
                )
    print("\nSQL time by step (ms, median of runs)")
    steps = dict.fromkeys(k for t in timings for k in t.by_step)
    keys = list(med)
    print(f"{'step':<58}" + "".join(f"{f'{h}/{s}':>14}" for h, s in keys))
    for step in steps:
        cells = []
        for key in keys:
            values = [t.by_step.get(step, 0.0) for t in timings if (t.history, t.setting) == key]
            cells.append(f"{statistics.median(values) * 1000:>14.1f}")
        print(f"{step[:57]:<58}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000, help="live sessions (10000)")
    parser.add_argument("--history", type=int, default=100_000, help="history rows (100000)")
    parser.add_argument("--repeat", type=int, default=3, help="passes per setting (3)")
    parser.add_argument("--batch", type=int, default=500, help="Hub users per POST (500)")
    parser.add_argument("--time-limit", type=float, default=1800, help="whole run (1800 s)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.history < 0 or args.repeat < 1:
        parser.error("--sessions and --repeat at least 1, --history at least 0")

    recorder = SqlRecorder()
    recorder.install()
    timings: list[PassTiming] = []
    with bench_run("hublaunch-bench-scale-", keep=args.keep) as run:
        try:
            measure(run, args, recorder, timings)
            run.ok = True
        except BenchFailure as e:
            print(f"stopped: {e}", file=sys.stderr)
            if timings:
                report(timings, args.sessions)
    return run.exit_code


def measure(
    run: Run, args: argparse.Namespace, recorder: SqlRecorder, timings: list[PassTiming]
) -> None:
    deadline = time.monotonic() + args.time_limit
    with bench_database() as db:
        info = machine_info(("database", db.kind))
        stack = run.stack("stack", db, beat=False)
        with stack.running():
            names = [f"{USER_PREFIX}s{i:06d}" for i in range(args.sessions)]
            t0 = time.perf_counter()
            create_hub_users(stack, names, args.batch, deadline)
            print(f"{len(names)} Hub users created in {time.perf_counter() - t0:.1f} s", flush=True)
            t0 = time.perf_counter()
            start_servers(stack, names, deadline)
            print(
                f"{len(names)} fake servers started in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            t0 = time.perf_counter()
            insert_rows(db.url, live_rows(names, datetime.now(UTC)))
            print(
                f"{len(names)} ready launch rows inserted in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            last: list[Statement] = []
            for history in (0, args.history):
                if history:
                    t0 = time.perf_counter()
                    insert_rows(db.url, history_rows(history, datetime.now(UTC)))
                    print(
                        f"{history} history rows inserted and analyzed in "
                        f"{time.perf_counter() - t0:.1f} s",
                        flush=True,
                    )
                for setting in SETTINGS:
                    for _ in range(args.repeat):
                        if time.monotonic() > deadline:
                            raise BenchFailure("time limit reached")
                        timing, statements = run_pass(stack, setting, history, recorder)
                        timings.append(timing)
                        if setting == "steady":
                            last = statements
                        print(
                            f"  history {history:>6} {setting:<6}: {timing.total:.2f} s "
                            f"(Hub list {timing.hub_list:.2f} s, SQL {timing.sql:.3f} s "
                            f"in {timing.statements} statements)",
                            flush=True,
                        )
            plans = explain(db.url, last)
    print()
    print_info(info)
    report(timings, args.sessions)
    print(f"\nEXPLAIN ANALYZE of each statement of a 'steady' pass, {args.history} rows")
    for name, count, plan in plans:
        print(f"- {name} (x{count}): {plan_summary(plan)}")
    (run.tmp / "plans.txt").write_text(
        "\n\n".join(f"-- {name} (x{count})\n{plan}" for name, count, plan in plans)
    )


if __name__ == "__main__":
    sys.exit(main())
