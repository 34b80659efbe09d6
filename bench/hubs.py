"""Launch throughput with 1, 2 and 3 Hubs behind one intake (issue 14), and failover time.

Each configuration is its own stack (one app, one worker with ``--worker-threads`` threads, beat;
JupyterHubs with the fake spawner taking ``--spawn-seconds`` a server and
``concurrent_spawn_limit`` = ``--spawn-limit``), in the same run, one after the other: ``--count``
launches are posted at once and the script waits until every one is ready. The ratio is each
configuration's throughput over the one-Hub configuration's, measured minutes apart on the same
machine. Then, on the 2-Hub stack: kill the second Hub and launch every 0.2 s; failover time is
from the kill to the first launch ready on the surviving Hub after a launch was placed on the
dead one (and put back in line), and to the health check marking it down.

    .venv/bin/python -m bench.hubs                    # 300 launches, 1/2/3 Hubs
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import httpx
import sqlalchemy as sa

from bench.common import (
    BenchFailure,
    Database,
    Run,
    bench_database,
    bench_run,
    machine_info,
    print_info,
)
from hublaunch.stack import Stack
from worker.db import session_scope
from worker.models import HubHealth, Launch, Status

TIME_LIMIT = 600.0  # one configuration's launches must all be ready within this


def stack_for(run: Run, db: Database, hubs: int, args: argparse.Namespace) -> Stack:
    stack = run.stack(
        f"hubs-{hubs}",
        db,
        env={
            "HUBLAUNCH_FAKE_START_DELAY": str(args.spawn_seconds),
            "HUBLAUNCH_HUB_CONCURRENT_SPAWN_LIMIT": str(args.spawn_limit),
            "HUBLAUNCH_HUB_HEALTH_INTERVAL": "1",
        },
        label=f"{hubs} Hub(s): ",
    )
    stack.config.worker_concurrency = args.worker_threads
    stack.config.extra_hubs = hubs - 1
    return stack


def statuses(db: Database, ids: list[str]) -> Counter[str]:
    with session_scope(db.url) as s:
        query = sa.select(Launch.status).where(Launch.id.in_(ids))
        return Counter(str(status) for status in s.scalars(query))


def throughput(stack: Stack, db: Database, count: int) -> tuple[float, Counter[str]]:
    """Seconds from the first POST until all ``count`` launches are ready; where they went."""
    with httpx.Client(base_url=stack.app_url, timeout=60) as client:
        started = time.monotonic()
        ids = []
        for _ in range(count):
            response = client.post("/api/launches", json={"image": "default"})
            if response.status_code != 202:
                raise BenchFailure(f"POST answered {response.status_code}: {response.text}")
            ids.append(response.json()["id"])
        while True:
            counts = statuses(db, ids)
            if counts[Status.failed]:
                raise BenchFailure(f"{counts[Status.failed]} launches failed")
            if counts[Status.ready] == count:
                break
            if time.monotonic() - started > TIME_LIMIT:
                raise BenchFailure(f"not all ready after {TIME_LIMIT} s: {dict(counts)}")
            time.sleep(0.1)
        took = time.monotonic() - started
        with session_scope(db.url) as s:
            spread = Counter(
                str(hub) for hub in s.scalars(sa.select(Launch.hub).where(Launch.id.in_(ids)))
            )
        for launch_id in ids:
            client.delete(f"/api/launches/{launch_id}")
    return took, spread


def failover(stack: Stack, db: Database) -> tuple[float, float]:
    """(seconds from the kill to the first launch ready elsewhere after one was put back,
    seconds from the kill to the health check marking the Hub down)."""
    ids: list[str] = []
    with httpx.Client(base_url=stack.app_url, timeout=60) as client:
        stack.kill("hub-2")
        killed = time.monotonic()
        first_ready = marked = None
        while first_ready is None or marked is None:
            if time.monotonic() - killed > 120:
                raise BenchFailure("no failover within 120 s")
            response = client.post("/api/launches", json={"image": "default"})
            ids.append(response.json()["id"])
            with session_scope(db.url) as s:
                bounced = s.scalars(
                    sa.text(
                        "SELECT launch_id FROM launch_events WHERE message LIKE "
                        "'hub-2 did not answer%'"
                    )
                ).all()
                if first_ready is None and bounced:
                    ready = s.scalars(
                        sa.select(Launch.id).where(
                            Launch.id.in_(bounced), Launch.status == Status.ready
                        )
                    ).first()
                    if ready is not None:
                        first_ready = time.monotonic() - killed
                health = s.get(HubHealth, "hub-2")
                if marked is None and health is not None and not health.healthy:
                    marked = time.monotonic() - killed
            time.sleep(0.2)
        for launch_id in ids:
            client.delete(f"/api/launches/{launch_id}")
    return first_ready, marked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--spawn-limit", type=int, default=20)
    parser.add_argument("--spawn-seconds", type=float, default=0.5)
    parser.add_argument("--worker-threads", type=int, default=32)
    parser.add_argument("--hubs", default="1,2,3")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    results: dict[int, tuple[float, Counter[str]]] = {}
    failed_over: tuple[float, float] | None = None
    with bench_run("hublaunch-bench-hubs-", keep=args.keep) as run:
        for hubs in (int(n) for n in args.hubs.split(",")):
            with bench_database() as db:
                stack = stack_for(run, db, hubs, args)
                with stack.running():
                    results[hubs] = throughput(stack, db, args.count)
                    print(f"{hubs} Hub(s): {results[hubs][0]:.1f} s", flush=True)
                    if hubs == 2:
                        failed_over = failover(stack, db)
        print()
        print_info(
            machine_info(
                (
                    "hubs",
                    f"fake spawner, {args.spawn_seconds} s a server, concurrent_spawn_limit "
                    f"{args.spawn_limit} each",
                ),
                ("worker", f"one, {args.worker_threads} threads"),
            )
        )
        base = results.get(1)
        print(f"\n{args.count} launches, posted at once; time until all are ready:")
        for hubs, (took, spread) in results.items():
            ratio = f"{base[0] / took:.2f}x the 1-Hub throughput" if base else ""
            rate = args.count / took
            where = ", ".join(f"{name}: {n}" for name, n in sorted(spread.items()))
            print(f"  {hubs} Hub(s): {took:6.1f} s  {rate:6.1f} launches/s  {ratio}  ({where})")
        if failed_over is not None:
            print(
                f"failover (2 Hubs, one killed): first launch ready elsewhere after one was put "
                f"back: {failed_over[0]:.1f} s; the dead Hub marked down: {failed_over[1]:.1f} s"
            )
        run.ok = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
