"""Repository launches (issue 4): what resolve + build check add to a launch, and a cold build.

One stack (JupyterHub with the in-process fake spawner, app, worker) on a fresh database, a git
repository served over HTTP on 127.0.0.1, and, interleaved after warm-up rounds:

* an image launch: POST {"image": "default"} until the ``ready`` event;
* a cached repository launch: POST {"repo": <local repo>, "ref": "main"} of a commit whose
  environment is already built, until ``ready`` (ls-remote + build check + the same launch).

Then cold builds: a new empty commit each time (requirements.txt empty), timed from POST to the
``built`` event, and the venv builder alone on the same kind of commit as the baseline.

    .venv/bin/python bench/repo_launch.py [--n 30] [--cold 5] [--sqlite]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launch_overhead import (  # noqa: E402
    BROKER_URL,
    bench_database,
    end_launch,
    forget_queue,
    header,
    machine_info,
    row,
    summarize,
)

from hublaunch.stack import Stack, StackConfig  # noqa: E402
from tests.integration.gitserver import GitServer  # noqa: E402
from worker.builders import environment_name  # noqa: E402
from worker.builders.venv import VenvBuilder  # noqa: E402
from worker.settings import Settings  # noqa: E402

TARGET_EXTRA_MS = 100.0
STEP_TIMEOUT = 120.0


def timed_launch(client: httpx.Client, body: dict[str, str], until: str = "ready") -> float:
    """Milliseconds from POST to the ``until`` event; the launch is ended afterwards."""
    t0 = time.perf_counter()
    response = client.post("/api/launches", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST answered {response.status_code}: {response.text}")
    launch_id = response.json()["id"]
    deadline = time.monotonic() + STEP_TIMEOUT
    try:
        with client.stream("GET", f"/api/launches/{launch_id}/events") as stream:
            for line in stream.iter_lines():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {until} event within {STEP_TIMEOUT:.0f} s")
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event["phase"] == until:
                    return (time.perf_counter() - t0) * 1000
                if event["phase"] == "failed":
                    raise RuntimeError(f"launch failed: {event['message']}")
        raise RuntimeError("stream ended early")
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

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="hublaunch-bench-repo-"))
    queue = f"bench-repo-{int(time.time())}"
    git = GitServer(tmp / "git")
    ok = False
    try:
        with bench_database(args.sqlite, tmp) as (database_url, db_kind):
            stack = Stack(
                StackConfig(
                    data_dir=tmp / "stack",
                    database_url=database_url,
                    broker_url=BROKER_URL,
                    spawner="fake",
                    queue=queue,
                    beat=False,
                    env={"HUBLAUNCH_ALLOW_LOCAL_REPOS": "1"},
                )
            )
            with stack.running(), httpx.Client(base_url=stack.public_url, timeout=60) as client:
                url = git.url("bench")
                git.commit("bench", {"requirements.txt": ""})
                image, repo = {"image": "default"}, {"repo": url, "ref": "main"}
                timed_launch(client, repo)  # builds it once; every later launch is cached
                image_ms: list[float] = []
                repo_ms: list[float] = []
                for i in range(args.warmup + args.n):
                    if time.monotonic() - started > args.time_limit:
                        raise RuntimeError("time limit reached")
                    a, b = timed_launch(client, image), timed_launch(client, repo)
                    if i >= args.warmup:
                        image_ms.append(a)
                        repo_ms.append(b)

                cold_ms: list[float] = []
                for i in range(args.cold):
                    git.commit("bench", {"n.txt": str(i)}, message=f"cold {i}")
                    cold_ms.append(timed_launch(client, repo, until="built"))
                builder = VenvBuilder(
                    Settings(allow_local_repos=True, envs_dir=tmp / "direct-envs")
                )
                direct_ms: list[float] = []
                for i in range(args.cold):
                    commit = git.commit("bench", {"d.txt": str(i)}, message=f"direct {i}")
                    t0 = time.perf_counter()
                    builder.build(environment_name(url, commit, "d"), url, commit, lambda _l: None)
                    direct_ms.append((time.perf_counter() - t0) * 1000)

            print()
            for key, value in machine_info(db_kind):
                print(f"{key + ':':<12}{value}")
            print()
            print(header("time to ready"))
            print(row("image launch", summarize(image_ms)))
            print(row("cached repo launch", summarize(repo_ms)))
            s_img, s_repo = summarize(image_ms), summarize(repo_ms)
            assert s_img and s_repo
            extra = s_repo.p50 - s_img.p50
            verdict = "met" if extra <= TARGET_EXTRA_MS else "MISSED"
            print(
                f"\nresolve + check add {extra:+.1f} ms at p50 "
                f"(p95 {s_repo.p95 - s_img.p95:+.1f} ms; ratio {s_repo.p50 / s_img.p50:.2f}); "
                f"target <= {TARGET_EXTRA_MS:.0f} ms: {verdict}"
            )
            print()
            print(header("cold venv build, empty requirements"))
            print(row("POST -> built event", summarize(cold_ms)))
            print(row("VenvBuilder.build alone", summarize(direct_ms)))
            ok = True
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        git.stop()
        forget_queue(queue)
        forget_queue(f"{queue}.builds")
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
