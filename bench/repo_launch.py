"""Repository launches (issue 4): what resolve + build check add to a launch, and a cold build.

One stack (JupyterHub with the in-process fake spawner, app, worker) on a fresh database, a git
repository served over HTTP on 127.0.0.1, and, interleaved after warm-up rounds:

* an image launch: POST {"image": "default"} until the ``ready`` event;
* a cached repository launch: POST {"repo": <local repo>, "ref": "main"} of a commit whose
  environment is already built, until ``ready`` (ls-remote + build check + the same launch).

Then cold builds: a new empty commit each time (requirements.txt empty), timed from POST to the
``built`` event, and the venv builder alone on the same kind of commit as the baseline.

    .venv/bin/python -m bench.repo_launch [--n 30] [--cold 5] [--sqlite]
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from bench.common import (
    BenchFailure,
    Run,
    bench_database,
    bench_run,
    compare,
    end_launch,
    machine_info,
    post_launch,
    print_info,
    verdict,
    wait_for_phase,
)
from tests.integration.gitserver import GitServer
from worker.builders import environment_name
from worker.builders.venv import VenvBuilder
from worker.settings import Settings

TARGET_EXTRA_MS = 100.0
STEP_TIMEOUT = 120.0


def timed_launch(client: httpx.Client, body: dict[str, str], until: str = "ready") -> float:
    """Milliseconds from POST to the ``until`` event; the launch is ended afterwards."""
    t0 = time.perf_counter()
    launch_id = post_launch(client, body)
    try:
        wait_for_phase(client, launch_id, until, STEP_TIMEOUT)
        return (time.perf_counter() - t0) * 1000
    finally:
        end_launch(client, launch_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="counted rounds of each (30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5, help="cold builds (5)")
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--time-limit", type=float, default=600)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with bench_run("hublaunch-bench-repo-") as run:
        git = GitServer(run.tmp / "git")
        try:
            measure(run, git, args, started)
            run.ok = True
        finally:
            git.stop()
    return run.exit_code


def measure(run: Run, git: GitServer, args: argparse.Namespace, started: float) -> None:
    with bench_database(run.tmp / "hublaunch.sqlite" if args.sqlite else None) as db:
        stack = run.stack("stack", db, beat=False, env={"HUBLAUNCH_ALLOW_LOCAL_REPOS": "1"})
        with stack.running(), httpx.Client(base_url=stack.public_url, timeout=60) as client:
            url = git.url("bench")
            git.commit("bench", {"requirements.txt": ""})
            image, repo = {"image": "default"}, {"repo": url, "ref": "main"}
            timed_launch(client, repo)  # builds it once; every later launch is cached
            image_ms: list[float] = []
            repo_ms: list[float] = []
            for i in range(args.warmup + args.n):
                if time.monotonic() - started > args.time_limit:
                    raise BenchFailure("time limit reached")
                a, b = timed_launch(client, image), timed_launch(client, repo)
                if i >= args.warmup:
                    image_ms.append(a)
                    repo_ms.append(b)

            cold_ms: list[float] = []
            for i in range(args.cold):
                git.commit("bench", {"n.txt": str(i)}, message=f"cold {i}")
                cold_ms.append(timed_launch(client, repo, until="built"))
            builder = VenvBuilder(
                Settings(allow_local_repos=True, envs_dir=run.tmp / "direct-envs")
            )
            direct_ms: list[float] = []
            for i in range(args.cold):
                commit = git.commit("bench", {"d.txt": str(i)}, message=f"direct {i}")
                t0 = time.perf_counter()
                builder.build(environment_name(url, commit, "d"), url, commit, lambda _l: None)
                direct_ms.append((time.perf_counter() - t0) * 1000)

    print()
    print_info(machine_info(("database", db.kind), ("spawner", "fake (in the Hub process)")))
    print()
    cached = compare("time to ready", repo_ms, image_ms, ("cached repo launch", "image launch"))
    assert cached
    print(
        f"\nresolve + check add {cached.extra_p50:+.1f} ms at p50 "
        f"(p95 {cached.extra_p95:+.1f} ms; ratio {cached.ratio:.2f}); "
        f"target <= {TARGET_EXTRA_MS:.0f} ms: {verdict(cached.extra_p50 <= TARGET_EXTRA_MS)}"
    )
    print()
    compare(
        "cold venv build, empty requirements",
        cold_ms,
        direct_ms,
        ("POST -> built event", "VenvBuilder.build alone"),
    )


if __name__ == "__main__":
    sys.exit(main())
