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

    .venv/bin/python -m bench.launch_overhead            # PostgreSQL (a throwaway database)
    .venv/bin/python -m bench.launch_overhead --sqlite   # a SQLite file in the temp directory

Exits non-zero when a launch failed or the time limit cut the run short; a missed target
(hublaunch adds <= 50 ms at p50) is reported, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import sqlalchemy as sa

from bench.common import (
    BenchFailure,
    Run,
    bench_database,
    bench_run,
    compare,
    end_launch,
    header,
    machine_info,
    post_launch,
    print_info,
    row,
    summarize,
    verdict,
    wait_for_phase,
)
from hublaunch.stack import Stack
from worker.hub_client import HubClient, HubError
from worker.hub_users import remove_hub_user

TARGET_P50_MS = 50.0
STEP_TIMEOUT = 30.0  # seconds any one launch, stream or teardown may take
MAX_FAILURES = 3  # stop early after this many failed launches: something is broken


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


def hublaunch_launch(client: httpx.Client) -> HublaunchSample:
    post_started = time.time()
    t0 = time.perf_counter()
    launch_id = post_launch(client, {"image": "default"})
    post_ms = (time.perf_counter() - t0) * 1000
    try:
        wait_for_phase(client, launch_id, "ready", STEP_TIMEOUT)
        total_ms = (time.perf_counter() - t0) * 1000
        return HublaunchSample(launch_id, total_ms, post_ms, post_started, time.time())
    except httpx.HTTPError as e:
        raise BenchFailure(f"launch {launch_id}: {type(e).__name__}: {e}") from e
    finally:
        end_launch(client, launch_id, STEP_TIMEOUT)


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


def report(results: Results, info: list[tuple[str, str]], database_url: str) -> None:
    print()
    print_info(info)
    print()
    vs_raw = compare(
        "launch until ready (ms)",
        [s.total_ms for s in results.hublaunch],
        [s.total_ms for s in results.raw],
        ("hublaunch (POST -> ready)", "raw Hub cycle"),
    )
    if vs_raw:
        print()
        print(f"difference p50: {vs_raw.extra_p50:+.1f} ms   p95: {vs_raw.extra_p95:+.1f} ms")
        print(f"ratio hublaunch/raw at p50: {vs_raw.ratio:.2f}")
        print(
            f"target (hublaunch adds <= {TARGET_P50_MS:.0f} ms at p50): "
            f"{verdict(vs_raw.extra_p50 <= TARGET_P50_MS)}"
        )
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

    started = time.monotonic()
    with bench_run("hublaunch-bench-", keep=args.keep) as run:
        run.ok = measure(run, args, started)
    return run.exit_code


def measure(run: Run, args: argparse.Namespace, started: float) -> bool:
    with bench_database(run.tmp / "hublaunch.sqlite" if args.sqlite else None) as db:
        info = machine_info(("database", db.kind), ("spawner", "fake (in the Hub process)"))
        stack = run.stack("stack", db)
        with stack.running():
            print(
                f"stack up in {time.monotonic() - started:.1f} s; "
                f"{args.warmup} warm-up + {args.n} rounds of hublaunch / raw",
                flush=True,
            )
            results = run_rounds(stack, args, started)
            report(results, info, db.url)
    return not results.failures and not results.timed_out


if __name__ == "__main__":
    sys.exit(main())
