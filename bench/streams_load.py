"""Open event streams vs the intake (issue 11): does ``POST /api/launches`` stay fast while
``--streams`` event streams are open?

The app alone (one uvicorn process, ``hublaunch api``'s options; PostgreSQL and Redis; no worker,
so the watched launches stay queued and their streams stay open, polling and woken by Redis).
wrk measures POST latency first with no stream open, then with ``--streams`` streams held open by
one asyncio client, in the same run.

    .venv/bin/python -m bench.streams_load          # 1,000 streams; needs wrk
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from api.events import IDLE_POLL_SECONDS
from bench.common import bench_database, forget_queue, machine_info, print_info
from bench.intake_rate import WRK_SCRIPT, Result, app_env, run_wrk, serve
from hublaunch.stack import free_port
from worker.migrate import upgrade

TARGET_P99_MS = 100.0


def paced_posts(url: str, rate: float, seconds: float, label: str) -> Result:
    """POST at a steady ``rate`` a second (an open loop, as visitors arrive: a slow answer does
    not slow the arrivals), each on a thread of its own; the latency of each answer."""
    latencies: list[float] = []
    codes: list[int] = []
    lock = threading.Lock()

    def one(client: httpx.Client) -> None:
        started = time.monotonic()
        try:
            code = client.post("/api/launches", json={"image": "default"}).status_code
        except httpx.HTTPError:
            code = 0
        with lock:
            latencies.append((time.monotonic() - started) * 1000)
            codes.append(code)

    threads = []
    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) as c:
        start = time.monotonic()
        for n in range(int(rate * seconds)):
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
            thread = threading.Thread(target=one, args=(c,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    bad = len([code for code in codes if code != 202])
    return Result(label, rate, cuts[49], cuts[98], f"not 202: {bad}")


async def hold_streams(url: str, ids: list[str], opened: list[int], stop: threading.Event) -> None:
    limits = httpx.Limits(max_connections=len(ids) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one(launch_id: str) -> None:
            async with client.stream("GET", f"/api/launches/{launch_id}/events") as response:
                opened.append(response.status_code)
                async for _ in response.aiter_lines():
                    if stop.is_set():
                        return

        tasks = [asyncio.create_task(one(i)) for i in ids]
        await asyncio.to_thread(stop.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="paced POSTs a second")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="hublaunch-bench-streams-"))
    queue = f"bench-streams-{os.getpid()}"
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    stop = threading.Event()
    results: list[Result] = []
    try:
        with bench_database() as db:
            upgrade(db.url)
            env = {**app_env(db.url, queue, tmp), "HUBLAUNCH_CLIENT_RATE": "0"}
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = serve("api.main:create_app", port, env, tmp / "api.log", True)
            try:
                results.append(run_wrk(url, "no stream open", args, script))
                results.append(
                    paced_posts(url, args.rate, args.seconds, f"no stream, {args.rate:.0f}/s")
                )
                with httpx.Client(base_url=url, timeout=30) as client:
                    ids = [
                        client.post("/api/launches", json={"image": "default"}).json()["id"]
                        for _ in range(args.streams)
                    ]
                opened: list[int] = []
                holder = threading.Thread(
                    target=asyncio.run, args=(hold_streams(url, ids, opened, stop),), daemon=True
                )
                holder.start()
                deadline = time.monotonic() + 120
                while len(opened) < len(ids) and time.monotonic() < deadline:
                    time.sleep(0.2)
                print(f"  {len(opened)} streams open ({opened.count(200)} answered 200)")
                # Measured in the steady state: every stream has read the database once on its
                # own (jittered) period, not in the quiet before the first of those reads.
                settle = IDLE_POLL_SECONDS * 1.5
                print(f"  letting them settle for {settle:.0f} s (their first idle reads)")
                time.sleep(settle)
                results.append(run_wrk(url, f"{len(opened)} streams open", args, script))
                results.append(
                    paced_posts(
                        url, args.rate, args.seconds, f"{len(opened)} streams, {args.rate:.0f}/s"
                    )
                )
                stop.set()
                holder.join(timeout=30)
                results.append(run_wrk(url, "no stream open (again)", args, script))
            finally:
                proc.terminate()
                proc.wait(timeout=20)
            print()
            print_info(
                machine_info(
                    ("database", db.kind),
                    ("load", f"wrk, {args.connections} connections, {args.seconds} s a run"),
                )
            )
    finally:
        stop.set()
        forget_queue(queue)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("wrk: as many POSTs as 16 connections get answered (saturated); paced: a steady rate")
    for r in results:
        print(
            f"{r.label:<34} {r.rate:7.0f}/s  p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms  "
            f"{r.statuses}"
        )
    paced = [r for r in results if "streams," in r.label]
    if paced:
        worst = paced[0].p99_ms
        print(
            f"\nintake p99 at {args.rate:.0f} POST/s with the streams open: {worst:.1f} ms "
            f"(target <= {TARGET_P99_MS:.0f} ms: {'met' if worst <= TARGET_P99_MS else 'NOT met'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
