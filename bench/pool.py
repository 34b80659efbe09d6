"""Warm pool (issue 12): time to ready of a pool hit against a cold launch and the raw Hub
cycle, all in one run.

Each stack on its own throwaway PostgreSQL database, Redis, beat off (the script runs the
pool's passes itself, in-process, as beat would):

* pooled: the sandboxed spawner (real ``jupyterhub-singleuser`` servers),
  ``HUBLAUNCH_POOL=default=<size>``;
* plain: the same with no pool.

1. ``--cold`` rounds, each of three launches, in the order A B C, then C B A, and so on, so
   drift is shared; each timed to ready, then ended before the next starts:

   A. miss: a launch on the pooled stack while its pool is still empty (nothing has filled it
      yet), POST -> ``ready``. A miss asks for no refill: the pool is checked to have stayed
      empty (no pooled launch at all), the run fails otherwise;
   B. cold: a launch on the plain stack, POST -> ``ready``;
   C. raw Hub cycle on the plain stack's Hub, as its admin service: create user -> start server
      -> wait until ready -> token (``bench.launch_overhead.raw_cycle``). It is what BinderHub's
      launcher does against a Hub, so it is the floor of BinderHub's launch figure; BinderHub
      itself cannot be installed here (PyPI holds only its 0.1.0 of 2018).

2. The plain stack stopped, the pool filled; what it costs at rest: the resident memory of the
   pooled servers' processes (``/proc``), per server.
3. ``--hits`` hits on the pooled stack, each once the pool is full again, POST -> ``ready``.
4. fake: a stack with the in-Hub fake spawner (no process per server) and the same pool, the same
   hits.

Prints p50/min/max of each, the hit against its target (<= 100 ms at p50, >= 35x faster than
cold), raw/hit, the miss against cold (the "no extra delay" claim, no target), and one JSON line
of the medians. Every step is bounded by STEP_TIMEOUT; a failed step ends the run non-zero.

    .venv/bin/python -m bench.pool   # 6-7 minutes on a busy 2-core machine (a real server
                                     # ready in ~9 s); shorter where servers start faster
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.common import (
    BenchFailure,
    Run,
    bench_database,
    bench_run,
    end_launch,
    machine_info,
    post_launch,
    print_info,
    wait_for_phase,
)
from bench.launch_overhead import raw_cycle
from hublaunch.stack import Stack
from worker import pool
from worker.context import WorkerContext, build_context
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Launch, Status

TARGET_HIT_MS = 100.0
TARGET_SPEEDUP = 35.0
STEP_TIMEOUT = 120.0  # seconds any one launch, teardown or pool fill may take


def pooled(stack: Stack) -> int:
    with session_scope(stack.config.database_url) as db:
        return int(db.scalar(sa.select(sa.func.count()).where(Launch.status == Status.pooled)) or 0)


def pool_launches(stack: Stack) -> int:
    """Launches the pool ever made on this stack (any status): a refill leaves one at least."""
    with session_scope(stack.config.database_url) as db:
        query = sa.select(sa.func.count()).where(Launch.pool_key.is_not(None))
        return int(db.scalar(query) or 0)


def check_empty(stack: Stack, when: str) -> None:
    made = pool_launches(stack)
    if made:
        raise BenchFailure(
            f"{when}: the pool was refilled ({made} pooled launch(es)) although nothing asked "
            "for it; a miss must not refill, and the misses are no longer misses"
        )


def wait_full(stack: Stack, size: int) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while pooled(stack) < size:
        if time.monotonic() > deadline:
            raise BenchFailure(f"the pool did not fill to {size} in {STEP_TIMEOUT:.0f} s")
        time.sleep(0.1)


def timed_launch(client: httpx.Client) -> tuple[str, float]:
    started = time.monotonic()
    launch_id = post_launch(client, {"image": "default"})
    wait_for_phase(client, launch_id, "ready", STEP_TIMEOUT)
    return launch_id, (time.monotonic() - started) * 1000


def launch_and_end(client: httpx.Client) -> float:
    launch_id, took = timed_launch(client)
    end_launch(client, launch_id, STEP_TIMEOUT)
    return took


def server_memory() -> tuple[int, int]:
    """(processes, resident bytes) of the running single-user servers."""
    count, total = 0, 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            # The server's Python (``python -m jupyterhub.singleuser``), not its sandbox's
            # wrappers (bwrap, setpriv).
            if b"jupyterhub.singleuser" not in argv or b"python" not in argv[0]:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
        except OSError:
            continue
    return count, total


def context(stack: Stack, size: int) -> WorkerContext:
    """The worker's context in this process, with the stack's pool and (lifted) cap."""
    return build_context(stack.settings(pool=f"default={size}", max_active=100000))


def hits(stack: Stack, client: httpx.Client, n: int, size: int) -> list[float]:
    ctx = context(stack, size)
    times = []
    for _ in range(n):
        pool.maintain(ctx)
        wait_full(stack, size)
        times.append(launch_and_end(client))
    return times


def ms(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):8.1f} ms  (min {min(values):.1f}, max {max(values):.1f})"
    )


def rounds(
    pooled_stack: Stack,
    pooled_client: httpx.Client,
    plain_client: httpx.Client,
    hub: HubClient,
    n: int,
) -> dict[str, list[float]]:
    """``n`` rounds of miss / cold / raw, the order reversed every other round."""

    def miss() -> float:
        if pooled(pooled_stack):
            raise BenchFailure("the pool is not empty before a miss")
        took = launch_and_end(pooled_client)
        check_empty(pooled_stack, "after a miss")
        return took

    sides: dict[str, Callable[[], float]] = {
        "miss": miss,
        "cold": lambda: launch_and_end(plain_client),
        "raw": lambda: raw_cycle(hub).total_ms,
    }
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(n):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        for side in order:
            times[side].append(sides[side]())
        took = ", ".join(f"{side} {times[side][-1]:.0f}" for side in order)
        print(f"  round {i + 1}/{n}: {took} ms", flush=True)
    return times


def measure(run: Run, args: argparse.Namespace) -> None:
    env = {"HUBLAUNCH_POOL": f"default={args.size}"}
    with bench_database() as pooled_db, bench_database() as plain_db:
        info = machine_info(
            ("databases", f"{pooled_db.kind}, {plain_db.kind}"),
            ("pool", f"default={args.size}"),
        )
        pooled_stack = run.stack("pooled", pooled_db, spawner="sandbox", beat=False, env=env)
        plain = run.stack("plain", plain_db, spawner="sandbox", beat=False)
        with (
            pooled_stack.running(),
            httpx.Client(base_url=pooled_stack.public_url, timeout=30) as pooled_client,
        ):
            with (
                plain.running(),
                httpx.Client(base_url=plain.public_url, timeout=30) as plain_client,
                contextlib.closing(HubClient(plain.hub_api_url, plain.hub_token)) as hub,
            ):
                print(f"{args.cold} rounds of miss / cold / raw Hub cycle", flush=True)
                times = rounds(pooled_stack, pooled_client, plain_client, hub, args.cold)
            check_empty(pooled_stack, "after the rounds")
            print(f"filling the pool, then {args.hits} hits", flush=True)
            before = server_memory()
            pool.maintain(context(pooled_stack, args.size))
            wait_full(pooled_stack, args.size)
            time.sleep(2)  # settled: the servers' start-up allocations are done
            after = server_memory()
            real_hits = hits(pooled_stack, pooled_client, args.hits, args.size)
    with bench_database() as fake_db:
        fake = run.stack("fake", fake_db, spawner="fake", beat=False, env=env)
        with fake.running(), httpx.Client(base_url=fake.public_url, timeout=30) as client:
            fake_hits = hits(fake, client, args.hits, args.size)

    raw, cold, miss = times["raw"], times["cold"], times["miss"]
    print()
    print_info(info)
    print()
    print(f"raw Hub cycle, real servers ({len(raw)}):  {ms(raw)}")
    print(f"cold launch, no pool ({len(cold)}):        {ms(cold)}")
    print(f"miss, pool empty ({len(miss)}):            {ms(miss)}")
    print(f"pool hit, real servers ({len(real_hits)}):     {ms(real_hits)}")
    print(f"pool hit, fake spawner ({len(fake_hits)}):     {ms(fake_hits)}")
    processes, rss = after[0] - before[0], after[1] - before[1]
    per_server_mib = rss / processes / 2**20 if processes > 0 else None
    if per_server_mib is not None:
        print(
            f"at rest: {processes} pooled server processes, {rss / 2**20:.0f} MiB resident, "
            f"{per_server_mib:.0f} MiB each"
        )
    else:
        print("at rest: no pooled server process found in /proc")
    p50 = {
        "raw": statistics.median(raw),
        "cold": statistics.median(cold),
        "miss": statistics.median(miss),
        "hit": statistics.median(real_hits),
        "hit_fake": statistics.median(fake_hits),
    }
    hit = p50["hit"]
    print(f"\nhit p50: {hit:.1f} ms (target <= {TARGET_HIT_MS:.0f} ms)")
    print(f"cold/hit: {p50['cold'] / hit:.1f}x (target >= {TARGET_SPEEDUP:.0f}x)")
    print(f"raw/hit: {p50['raw'] / hit:.1f}x (raw Hub cycle: the floor of BinderHub's launcher)")
    print(
        f"miss - cold at p50: {p50['miss'] - p50['cold']:+.1f} ms, "
        f"miss/cold {p50['miss'] / p50['cold']:.3f} (a miss adds no delay: no target)"
    )
    figures: dict[str, float | None] = {f"{k}_p50_ms": round(v, 1) for k, v in p50.items()}
    figures["rest_mib_per_server"] = None if per_server_mib is None else round(per_server_mib, 1)
    print(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5, help="rounds of miss / cold / raw (5)")
    parser.add_argument("--hits", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args()
    if args.size < 1 or args.cold < 1 or args.hits < 1:
        parser.error("--size, --cold and --hits must be at least 1")
    with bench_run("hublaunch-bench-pool-", keep=args.keep) as run:
        try:
            measure(run, args)
            run.ok = True
        except BenchFailure as e:
            print(f"FAILED: {e}", file=sys.stderr)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
