"""What the sandbox costs (issue 8): time-to-ready of a real server, sandboxed vs unsandboxed.

Two stacks run side by side, each a JupyterHub with real ``jupyterhub-singleuser`` servers, an
app and a worker on SQLite: one with the shipped ``SandboxSpawner`` (bubblewrap, per-session
uid, namespaces, cgroups, the forwarders into its network namespace), one with the unsandboxed
``EnvironmentSpawner`` (the baseline, as root). Launches alternate between them (the order flips
each round) so drift on this shared machine hits both alike. Each launch is timed from POST to
the ``ready`` event and ended afterwards. Then the same number of requests to each kind of
server's REST API through the proxy, for the per-request cost of the forwarder. Last, the box
alone, without a Hub: starting a box (cgroups, bubblewrap, namespaces, setpriv) that runs
``/bin/true`` and ending it, against starting ``/bin/true`` as a plain child process.

    .venv/bin/python -m bench.sandbox_cost [--n 10] [--requests 200] [--boxes 50]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator

import httpx

from bench.common import (
    Comparison,
    Run,
    bench_database,
    bench_run,
    compare,
    end_launch,
    machine_info,
    print_info,
    verdict,
)
from hublaunch.stack import Stack
from sandbox import box as boxes

TARGET_RATIO = 1.10
TARGET_EXTRA_MS = 300.0
STEP_TIMEOUT = 90.0


def launch(client: httpx.Client) -> tuple[float, str, str]:
    """(ms from POST to ready, launch id, server URL with token)."""
    t0 = time.perf_counter()
    response = client.post("/api/launches", json={"image": "default"})
    response.raise_for_status()
    launch_id = response.json()["id"]
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        status = client.get(f"/api/launches/{launch_id}").json()
        if status["status"] == "ready":
            return (time.perf_counter() - t0) * 1000, launch_id, status["url"]
        if status["status"] in ("failed", "ended"):
            raise RuntimeError(f"launch {status['status']}: {status['error']}")
        time.sleep(0.02)
    raise RuntimeError(f"not ready within {STEP_TIMEOUT:.0f} s")


def request_times(url_with_token: str, n: int) -> list[float]:
    server, token = url_with_token.split("?token=")
    times = []
    with httpx.Client(headers={"Authorization": f"token {token}"}, timeout=30) as http:
        http.get(f"{server}api/status").raise_for_status()  # warm the connection
        for _ in range(n):
            t0 = time.perf_counter()
            http.get(f"{server}api/status").raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def box_cycles(n: int) -> tuple[list[float], list[float]]:
    """(ms to start a box, run /bin/true in it and end it; ms to run /bin/true as a child)."""
    boxed, plain = [], []
    for i in range(n):
        name = f"bench-{secrets.token_hex(4)}-{i}"
        spec = boxes.BoxSpec(name=name, uid=60999, command=["/bin/true"], env={}, cwd="/")
        t0 = time.perf_counter()
        box = boxes.start(spec, stdout=subprocess.DEVNULL)
        box.release()
        assert box.process is not None
        box.process.wait(30)
        box.end()
        boxed.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        plain.append((time.perf_counter() - t0) * 1000)
    return boxed, plain


def table(
    title: str,
    boxed: list[float],
    baseline: list[float],
    labels: tuple[str, str] = ("sandboxed", "unsandboxed (baseline)"),
) -> Comparison:
    """Print one table: the boxed figures and the baseline's, measured in the same run."""
    result = compare(title, boxed, baseline, labels)
    assert result is not None
    return result


@contextlib.contextmanager
def stacks(run: Run) -> Iterator[dict[str, Stack]]:
    made: dict[str, Stack] = {}
    with contextlib.ExitStack() as cleanup:
        for kind, env in (("sandbox", {}), ("local", {"HUBLAUNCH_ALLOW_UNSANDBOXED": "1"})):
            db = cleanup.enter_context(bench_database(run.tmp / f"{kind}.sqlite"))
            stack = run.stack(kind, db, spawner=kind, beat=False, env=env)
            cleanup.callback(stack.stop)
            made[kind] = stack.start(timeout=90)
        yield made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10, help="launches of each kind")
    parser.add_argument("--requests", type=int, default=200, help="API requests per kind")
    parser.add_argument("--boxes", type=int, default=50, help="box start/end cycles")
    args = parser.parse_args(argv)
    with bench_run("hublaunch-bench-") as run:
        measure(run, args)
        run.ok = True
    return run.exit_code


def measure(run: Run, args: argparse.Namespace) -> None:
    ready: dict[str, list[float]] = {"sandbox": [], "local": []}
    latency: dict[str, list[float]] = {"sandbox": [], "local": []}
    with stacks(run) as made:
        clients = {k: httpx.Client(base_url=s.public_url, timeout=30) for k, s in made.items()}
        # One warm-up launch each: first imports fill the page cache.
        for client in clients.values():
            _ms, launch_id, _url = launch(client)
            end_launch(client, launch_id)
        for i in range(args.n):
            order = ["sandbox", "local"] if i % 2 == 0 else ["local", "sandbox"]
            for kind in order:
                ms, launch_id, url = launch(clients[kind])
                ready[kind].append(ms)
                if i == 0:
                    latency[kind] = request_times(url, args.requests)
                end_launch(clients[kind], launch_id)
        for client in clients.values():
            client.close()

    spawner = "real jupyterhub-singleuser, SandboxSpawner vs EnvironmentSpawner"
    print_info(machine_info(("database", "SQLite"), ("spawner", spawner)))
    print()
    box = table("time-to-ready (POST -> ready)", ready["sandbox"], ready["local"])
    print(f"sandbox cost at p50: {box.extra_p50:+.0f} ms, ratio {box.ratio:.3f}")
    ok = box.ratio <= TARGET_RATIO and box.extra_p50 <= TARGET_EXTRA_MS
    print(f"target <= {TARGET_RATIO:.2f}x and <= {TARGET_EXTRA_MS:.0f} ms: {verdict(ok)}")
    print()
    box = table("GET api/status through the proxy", latency["sandbox"], latency["local"])
    print(f"forwarder cost at p50: {box.extra_p50:+.2f} ms, ratio {box.ratio:.3f}")
    print()
    boxed, plain = box_cycles(args.boxes)
    box = table(
        "a box alone: start, run /bin/true, end",
        boxed,
        plain,
        ("in a box", "plain child (baseline)"),
    )
    print(f"box cost at p50: {box.extra_p50:+.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
