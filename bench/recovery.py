"""Recovery after a worker SIGKILL (issue 11): how long until launches in flight are ready again?

One stack (JupyterHub with the fake spawner, made to take ``--start-delay`` s per server so each
launch is in the Hub's hands when the worker dies; app, Celery worker, beat) with the production
defaults of recovery (lease 10 s, sweep every 5 s). Each round:

* baseline: one launch with no fault, POST -> ready;
* fault: ``--inflight`` launches, the worker SIGKILLed (its whole process group) once all of them
  are spawning, a new worker started at once; the time from the kill until all are ready.

Prints both, their ratio, and the median of the rounds against the issue's target (ready within
30 s of the death).

    .venv/bin/python -m bench.recovery              # 5 rounds, PostgreSQL
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

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
from worker.db import session_scope
from worker.models import Launch, Status

TARGET_SECONDS = 30.0
STEP_TIMEOUT = 120.0  # a round that takes longer has failed


def statuses(url: str, ids: list[str]) -> list[Status]:
    with session_scope(url) as db:
        found = {r.id: r.status for r in db.execute(sa.select(Launch.id, Launch.status))}
    return [found.get(i, Status.queued) for i in ids]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def one_round(client: httpx.Client, stack: Stack, args: argparse.Namespace) -> tuple[float, float]:
    url = stack.config.database_url
    started = time.monotonic()
    baseline_id = post_launch(client, {"image": "default"})
    wait_for_phase(client, baseline_id, "ready", STEP_TIMEOUT)
    baseline = time.monotonic() - started
    end_launch(client, baseline_id)

    ids = [post_launch(client, {"image": "default"}) for _ in range(args.inflight)]
    wait_until(
        lambda: statuses(url, ids) == [Status.launching] * len(ids), STEP_TIMEOUT, "spawning"
    )
    stack.kill("worker")
    killed = time.monotonic()
    stack.start_child("worker")
    wait_until(lambda: statuses(url, ids) == [Status.ready] * len(ids), STEP_TIMEOUT, "all ready")
    recovered = time.monotonic() - killed
    for launch_id in ids:
        end_launch(client, launch_id)
    return baseline, recovered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inflight", type=int, default=3)
    parser.add_argument("--start-delay", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args()
    with bench_run("hublaunch-bench-recovery-", keep=args.keep) as run, bench_database() as db:
        info = machine_info(
            ("database", db.kind),
            ("spawner", f"fake, {args.start_delay:.1f} s a server"),
            ("recovery", "lease 10 s, sweep every 5 s (the defaults)"),
        )
        stack = run.stack(
            "stack",
            db,
            env={"HUBLAUNCH_FAKE_START_DELAY": str(args.start_delay)},
        )
        rounds: list[tuple[float, float]] = []
        failed = False
        with stack.running(), httpx.Client(base_url=stack.public_url, timeout=30) as client:
            try:
                for n in range(args.rounds):
                    baseline, recovered = one_round(client, stack, args)
                    rounds.append((baseline, recovered))
                    print(
                        f"  round {n + 1}: launch with no fault {baseline:.1f} s, "
                        f"{args.inflight} launches ready {recovered:.1f} s after the kill",
                        flush=True,
                    )
            except BenchFailure as e:
                print(f"FAILED: {e}", file=sys.stderr)
                failed = True
        print()
        print_info(info)
        if not rounds:
            return 1
        base = statistics.median(r[0] for r in rounds)
        recovered = statistics.median(r[1] for r in rounds)
        print(f"\nrounds: {len(rounds)}, {args.inflight} launches in flight at each kill")
        print(f"launch with no fault (median):       {base:6.1f} s")
        print(f"ready again after the kill (median): {recovered:6.1f} s")
        print(f"worst round:                         {max(r[1] for r in rounds):6.1f} s")
        print(f"ratio recovery/no-fault launch:      {recovered / base:6.2f}")
        met = recovered <= TARGET_SECONDS
        run.ok = not failed and len(rounds) == args.rounds
        print(
            f"target (ready within {TARGET_SECONDS:.0f} s of the death): "
            f"{'met' if met else 'NOT met'}"
        )
        return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
