"""Warm pool (issue 12): time to ready of a pool hit against a cold launch, same run.

Two stacks on PostgreSQL and Redis, ``HUBLAUNCH_POOL=default=<size>``, beat off (the script runs
the pool's passes itself, in-process, as beat would):

* real: the sandboxed spawner starting real ``jupyterhub-singleuser`` servers;
  - cold: ``--cold`` launches while the pool is still empty (a miss asks for no refill), each
    POST -> ``ready`` on its event stream, then ended;
  - the pool filled; what it costs at rest: the resident memory of the pooled servers'
    processes (``/proc``), per server;
  - hits: ``--hits`` launches, each once the pool is full again, POST -> ``ready``;
* fake: the in-Hub fake spawner (no process per server), the same hits.

    .venv/bin/python -m bench.pool        # about 2 minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.common import (
    BenchFailure,
    bench_database,
    bench_run,
    end_launch,
    machine_info,
    post_launch,
    print_info,
    wait_for_phase,
)
from hublaunch.stack import Stack
from worker import pool
from worker.context import WorkerContext, build_context
from worker.db import session_scope
from worker.models import Launch, Status

TARGET_HIT_MS = 100.0
TARGET_SPEEDUP = 35.0
STEP_TIMEOUT = 120.0


def pooled(stack: Stack) -> int:
    with session_scope(stack.config.database_url) as db:
        return int(db.scalar(sa.select(sa.func.count()).where(Launch.status == Status.pooled)) or 0)


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
        launch_id, ms = timed_launch(client)
        times.append(ms)
        end_launch(client, launch_id)
    return times


def ms(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):8.1f} ms  (min {min(values):.1f}, max {max(values):.1f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--hits", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args()
    env = {"HUBLAUNCH_POOL": f"default={args.size}"}
    with bench_run("hublaunch-bench-pool-", keep=args.keep) as run, bench_database() as db:
        info = machine_info(("database", db.kind), ("pool", f"default={args.size}"))
        real = run.stack("real", db, spawner="sandbox", beat=False, env=env)
        with real.running(), httpx.Client(base_url=real.public_url, timeout=30) as client:
            cold = []
            for _ in range(args.cold):
                launch_id, took = timed_launch(client)
                cold.append(took)
                end_launch(client, launch_id)
            before = server_memory()
            pool.maintain(context(real, args.size))
            wait_full(real, args.size)
            time.sleep(2)  # settled: the servers' start-up allocations are done
            after = server_memory()
            real_hits = hits(real, client, args.hits, args.size)
        with bench_database() as fake_db:
            fake = run.stack("fake", fake_db, spawner="fake", beat=False, env=env)
            with fake.running(), httpx.Client(base_url=fake.public_url, timeout=30) as client:
                fake_hits = hits(fake, client, args.hits, args.size)
        print()
        print_info(info)
        print(f"\ncold launch, real servers ({len(cold)}):  {ms(cold)}")
        print(f"pool hit, real servers ({len(real_hits)}):    {ms(real_hits)}")
        print(f"pool hit, fake spawner ({len(fake_hits)}):    {ms(fake_hits)}")
        processes, rss = after[0] - before[0], after[1] - before[1]
        if processes > 0:
            print(
                f"at rest: {processes} pooled server processes, {rss / 2**20:.0f} MiB resident, "
                f"{rss / processes / 2**20:.0f} MiB each"
            )
        hit = statistics.median(real_hits)
        speedup = statistics.median(cold) / hit
        print(f"\nhit p50: {hit:.1f} ms (target <= {TARGET_HIT_MS:.0f} ms)")
        print(f"cold/hit: {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x)")
        run.ok = True
        return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
