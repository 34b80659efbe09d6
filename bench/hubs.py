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
import os
import sys
import time
from collections import Counter
from pathlib import Path

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
        extra_hubs=hubs - 1,
    )
    stack.config.worker_concurrency = args.worker_threads
    return stack


def statuses(db: Database, ids: list[str]) -> Counter[str]:
    with session_scope(db.url) as s:
        query = sa.select(Launch.status).where(Launch.id.in_(ids))
        return Counter(str(status) for status in s.scalars(query))


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU time used so far by each child's process group (a Hub with its proxy, the app, the
    worker, beat), from /proc: what a configuration spends its cores on."""
    groups = {proc.pid: name for name, proc in stack.procs.items()}
    used = dict.fromkeys(groups.values(), 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        group = int(fields[2])  # pgrp (fields after the command: state, ppid, pgrp, ...)
        if group in groups:
            used[groups[group]] += (int(fields[11]) + int(fields[12])) / TICKS
    return used


def throughput(
    stack: Stack, db: Database, count: int
) -> tuple[float, Counter[str], dict[str, float]]:
    """Seconds from the first POST until all ``count`` launches are ready; where they went;
    the CPU seconds each child used meanwhile."""
    before = cpu_seconds(stack)
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
        after = cpu_seconds(stack)
        cpu = {name: after[name] - before.get(name, 0.0) for name in after}
        with session_scope(db.url) as s:
            spread = Counter(
                str(hub) for hub in s.scalars(sa.select(Launch.hub).where(Launch.id.in_(ids)))
            )
        for launch_id in ids:
            client.delete(f"/api/launches/{launch_id}")
    return took, spread, cpu


def failover(stack: Stack, db: Database, seconds: float = 10.0) -> dict[str, float]:
    """Kill the second Hub, then post a launch every 0.2 s for ``seconds``: how long until the
    dead Hub is marked down, until the first launch posted after the kill is ready, how many
    were placed on the dead Hub and put back in line, and whether every one got ready
    elsewhere."""
    ids: list[str] = []
    marked: float | None = None
    first_ready: float | None = None
    # The earlier launches' users gone first: both Hubs empty, so placement alternates and
    # launches are placed on the dead Hub until it is known to be down.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with session_scope(db.url) as s:
            left = s.scalar(sa.select(sa.func.count()).where(Launch.user_removed_at.is_(None)))
        if not left:
            break
        time.sleep(0.2)
    with httpx.Client(base_url=stack.app_url, timeout=60) as client:
        stack.kill("hub-2")
        killed = time.monotonic()
        while time.monotonic() - killed < 120:
            if time.monotonic() - killed < seconds:
                response = client.post("/api/launches", json={"image": "default"})
                ids.append(response.json()["id"])
            with session_scope(db.url) as s:
                health = s.get(HubHealth, "hub-2")
                if marked is None and health is not None and not health.healthy:
                    marked = time.monotonic() - killed
            counts = statuses(db, ids)
            if first_ready is None and counts[Status.ready]:
                first_ready = time.monotonic() - killed
            posting = time.monotonic() - killed < seconds
            if not posting and (counts[Status.ready] == len(ids) or counts[Status.failed]):
                break
            time.sleep(0.2)
        with session_scope(db.url) as s:
            bounced = s.scalar(
                sa.text(
                    "SELECT count(DISTINCT launch_id) FROM launch_events "
                    "WHERE message LIKE 'hub-2 did not answer%'"
                )
            )
            on_dead = s.scalar(
                sa.select(sa.func.count()).where(Launch.id.in_(ids), Launch.hub == "hub-2")
            )
        counts = statuses(db, ids)
        for launch_id in ids:
            client.delete(f"/api/launches/{launch_id}")
    return {
        "posted": len(ids),
        "ready": counts[Status.ready],
        "failed": counts[Status.failed],
        "on_dead_hub": on_dead or 0,
        "put_back": bounced or 0,
        "marked_down": marked if marked is not None else -1.0,
        "first_ready": first_ready if first_ready is not None else -1.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--spawn-limit", type=int, default=20)
    parser.add_argument("--spawn-seconds", type=float, default=0.5)
    parser.add_argument("--worker-threads", type=int, default=32)
    parser.add_argument("--hubs", default="1,2,3")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    results: dict[int, tuple[float, Counter[str], dict[str, float]]] = {}
    failed_over: dict[str, float] | None = None
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
        for hubs, (took, spread, cpu) in results.items():
            ratio = f"{base[0] / took:.2f}x the 1-Hub throughput" if base else ""
            rate = args.count / took
            where = ", ".join(f"{name}: {n}" for name, n in sorted(spread.items()))
            print(f"  {hubs} Hub(s): {took:6.1f} s  {rate:6.1f} launches/s  {ratio}  ({where})")
            # Cores busy on average over the run, per child (a Hub counts with its proxy).
            busy = ", ".join(f"{name} {seconds / took:.2f}" for name, seconds in cpu.items())
            total = sum(cpu.values()) / took
            print(f"      cores busy: {busy}; all {total:.2f} of {os.cpu_count()}")
        if failed_over is not None:
            f = failed_over
            print(
                f"failover (2 Hubs, hub-2 killed, a launch posted every 0.2 s for 10 s): "
                f"hub-2 marked down {f['marked_down']:.1f} s after the kill; the first launch "
                f"ready {f['first_ready']:.1f} s after it; {int(f['ready'])} of "
                f"{int(f['posted'])} ready, {int(f['failed'])} failed, {int(f['on_dead_hub'])} "
                f"left on hub-2, {int(f['put_back'])} placed on hub-2 and put back in line"
            )
        run.ok = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
