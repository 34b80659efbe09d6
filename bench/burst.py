"""A burst of launches (issue 11): 200 at once against a Hub that starts 20 servers at a time.

One stack: JupyterHub with the fake spawner taking ``--spawn-seconds`` per server and
``concurrent_spawn_limit`` = ``--spawn-limit`` (more get the Hub's 429, which hublaunch waits out
with backoff), the app, a worker with ``--worker-threads`` threads, beat. ``--count`` launches are
posted as fast as one client can, then the script waits until every one is ready or failed and
reports the drain time against the ideal: count / (spawn limit per spawn time).

    .venv/bin/python -m bench.burst                 # 200 launches, limit 20, 0.5 s a server
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import httpx
import sqlalchemy as sa

from bench.common import BenchFailure, bench_database, bench_run, machine_info, print_info
from worker.db import session_scope
from worker.models import Launch, Status

TIME_LIMIT = 600.0  # the whole burst must drain within this


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--spawn-limit", type=int, default=20)
    parser.add_argument("--spawn-seconds", type=float, default=0.5)
    parser.add_argument("--worker-threads", type=int, default=32)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    with bench_run("hublaunch-bench-burst-", keep=args.keep) as run, bench_database() as db:
        stack = run.stack(
            "stack",
            db,
            env={
                "HUBLAUNCH_FAKE_START_DELAY": str(args.spawn_seconds),
                "HUBLAUNCH_HUB_CONCURRENT_SPAWN_LIMIT": str(args.spawn_limit),
            },
        )
        stack.config.worker_concurrency = args.worker_threads
        with stack.running(), httpx.Client(base_url=stack.public_url, timeout=60) as client:
            started = time.monotonic()
            ids = []
            for _ in range(args.count):
                response = client.post("/api/launches", json={"image": "default"})
                if response.status_code != 202:
                    raise BenchFailure(f"POST answered {response.status_code}: {response.text}")
                ids.append(response.json()["id"])
            posted = time.monotonic() - started
            counts: Counter[str] = Counter()
            while time.monotonic() - started < TIME_LIMIT:
                with session_scope(db.url) as s:
                    counts = Counter(
                        str(status)
                        for status in s.scalars(sa.select(Launch.status).where(Launch.id.in_(ids)))
                    )
                if counts[Status.ready] + counts[Status.failed] == len(ids):
                    break
                time.sleep(0.1)
            drained = time.monotonic() - started
            with session_scope(db.url) as s:
                hub_429 = s.scalar(
                    sa.text(
                        "SELECT count(*) FROM launch_events WHERE message LIKE "
                        "'The Hub is busy starting other servers%'"
                    )
                )
            # Leave nothing running: end every launch (the stack's stop removes the rest).
            for launch_id in ids:
                client.delete(f"/api/launches/{launch_id}")
        print()
        print_info(
            machine_info(
                ("database", db.kind),
                (
                    "hub",
                    f"fake spawner, {args.spawn_seconds} s a server, "
                    f"concurrent_spawn_limit {args.spawn_limit}",
                ),
                ("worker", f"{args.worker_threads} threads"),
            )
        )
        ideal = args.count / (args.spawn_limit / args.spawn_seconds)
        print(f"\nlaunches: {args.count}, posted in {posted:.1f} s")
        print(
            f"ready: {counts[Status.ready]}, failed: {counts[Status.failed]}, other: "
            f"{len(ids) - counts[Status.ready] - counts[Status.failed]}"
        )
        print(
            f"drained (last one ready) after {drained:.1f} s; ideal {ideal:.1f} s; "
            f"ratio {drained / ideal:.2f}"
        )
        print(f"'Hub busy' events (its 429s, waited out): {hub_429}")
        ok = counts[Status.ready] == args.count
        run.ok = True  # the figures are complete (a missed target is reported, not an error)
        print(f"target (all ready, none failed): {'met' if ok else 'NOT met'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
