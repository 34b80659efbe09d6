"""Cleanup pass vs jupyterhub-idle-culler (issue 3): how fast do N expired users go away?

One stack per spawner kind (``local``: real ``jupyterhub-singleuser`` servers; ``fake``: an HTTP
server inside the Hub), beat off, on a throwaway PostgreSQL database. For each contender the same
N users with running servers are set up on that Hub, then timed until all are gone from it:

* **floor**: every ``DELETE /users/{name}/server`` then ``DELETE /users/{name}`` sent straight to
  the Hub API with httpx, 16 users at a time; a delete refused because the server is still
  stopping (the stop answered 202) is retried every 0.1 s until it succeeds. Users ``raw-NNN``.
* **hublaunch**: N real launches (``POST /api/launches {"image": "default", "lifetime": 60}``,
  8 at a time, each followed to ``ready`` on its event stream), then ONE ``cull_pass`` in this
  process with a clock reading now + 120 s, so every session is expired. If the pass leaves a
  user "stopping", further passes run (their time is added and reported). Afterwards every
  launch must be ``ended``/``expired`` and no ``hl-`` user left on the Hub.
* **idle-culler**: users ``ic-NNN`` created and started directly on the Hub, then
  ``python -m jupyterhub_idle_culler --url=... --cull-users=True --remove-named-servers=True
  --timeout=1 --max-age=1 --cull-every=1`` (token in JUPYTERHUB_API_TOKEN, never on the command
  line), timed from its start until it has deleted every user (its own DEBUG log line
  "Finished culling <user>", checked against the Hub's user list), then stopped.

After each setup the run waits until the machine is quiet again (three 1-s samples under 25 %
CPU busy; at least 5 s, at most 90 s), since 30 servers that just started keep both cores busy
for a while. Rounds alternate the order (floor, hublaunch, idle-culler; then idle-culler,
hublaunch, floor) so neither a warm Hub nor a cold one favours a contender. Besides the time,
each timed part records the CPU seconds the Hub process and the proxy used and how busy the
machine was, and the hublaunch pass counts and times its Hub calls (a wrapper around its
HubClient, in this process).

    .venv/bin/python -m bench.cull_vs_idle_culler                  # real (N=30), then fake (N=200)
    .venv/bin/python -m bench.cull_vs_idle_culler --kinds fake --fake-n 50 --rounds 1

Exits non-zero when a contender left users behind, a setup failed or the time limit cut the
run short; a missed target (hublaunch <= 1.2x the floor and >= 3x faster than idle-culler with
real servers) is reported, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.common import (
    BenchFailure,
    CountingHub,
    KeptBroker,
    Run,
    bench_context,
    bench_database,
    bench_run,
    hub_http,
    machine_info,
    post_launch,
    print_info,
    wait_for_phase,
)
from hublaunch.stack import Stack
from worker.cull import REMOVAL_GRACE, cull_pass
from worker.hub_client import HubClient, HubError
from worker.hub_users import remove_hub_user

FLOOR_CONCURRENCY = 16
FLOOR_RETRY_SECONDS = 0.1
TARGET_VS_FLOOR = 1.2
TARGET_VS_IDLE_CULLER = 3.0
CONTENDERS = ("floor", "hublaunch", "idle-culler")
PREFIX = {"floor": "raw-", "hublaunch": "hl-", "idle-culler": "ic-"}
IC_LOG_LINE = re.compile(r"^\[(\w) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) [^\]]*\] (.*)$")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def cap(self, seconds: float) -> float:
        """``seconds``, but never past the run's time limit."""
        left = self.left()
        if left <= 0:
            raise BenchFailure("time limit reached")
        return min(seconds, left)


@dataclass
class Timing:
    kind: str
    round: int
    contender: str
    n: int
    seconds: float | None = None
    setup_seconds: float = 0.0
    load: float = 0.0  # 1-minute load average just before the timed part
    busy: float = 0.0  # the machine's CPU busy fraction in the last second before it
    window_busy: float | None = None  # the machine's CPU busy fraction during it
    hub_cpu: float | None = None  # CPU seconds the Hub process used during the timed part
    proxy_cpu: float | None = None  # and configurable-http-proxy
    left_after_first: int = 0  # hublaunch: users a first pass left "stopping"
    notes: list[str] = field(default_factory=list)
    error: str | None = None


# -- helpers -----------------------------------------------------------------------------------


def hub_names(hub: HubClient, prefix: str) -> set[str]:
    return {u.name for u in hub.iter_users(name_filter=prefix) if u.name.startswith(prefix)}


def loadavg() -> float:
    return os.getloadavg()[0]


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of the machine's CPU time (all cores) spent busy over ``interval`` seconds."""

    total0, idle0 = machine_cpu()
    time.sleep(interval)
    total1, idle1 = machine_cpu()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def settle(t: Timing, args: argparse.Namespace, dl: Deadline) -> None:
    """Wait until the machine is quiet (the servers just started have finished starting up),
    at least ``--settle`` s and at most ``--settle-max`` s; record how busy it still was."""
    started = time.monotonic()
    quiet = 0
    busy = 1.0
    while time.monotonic() - started < dl.cap(args.settle_max):
        busy = cpu_busy()
        quiet = quiet + 1 if busy < args.quiet_below else 0
        if quiet >= 3 and time.monotonic() - started >= args.settle:
            break
    t.busy = busy
    t.notes.append(f"settled {time.monotonic() - started:.0f} s; CPU {busy:.0%} busy before")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hub_pids(stack: Stack) -> tuple[int, int | None]:
    """The Hub's pid and that of the proxy it started (its child)."""
    hub = stack.procs["hub"].pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
            if int(stat[1]) == hub and b"configurable-http-proxy" in cmdline:
                return hub, int(entry.name)
    return hub, None


def machine_cpu() -> tuple[int, int]:
    """(total, idle) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


class CpuMeter:
    """CPU seconds used by the Hub and the proxy between start() and stop(), and how busy the
    whole machine was meanwhile."""

    def __init__(self, stack: Stack, t: Timing) -> None:
        self.hub, self.proxy = hub_pids(stack)
        self.t = t

    def _read(self) -> tuple[float, float]:
        return cpu_seconds(self.hub), cpu_seconds(self.proxy) if self.proxy else 0.0

    def start(self) -> None:
        self.before = self._read()
        self.machine = machine_cpu()

    def stop(self) -> None:
        hub, proxy = self._read()
        total, idle = machine_cpu()
        self.t.hub_cpu = hub - self.before[0]
        self.t.proxy_cpu = proxy - self.before[1] if self.proxy else None
        self.t.window_busy = 1 - (idle - self.machine[1]) / max(total - self.machine[0], 1)


def start_servers(
    hub: HubClient, names: list[str], concurrency: int, deadline: Deadline, timeout: float
) -> None:
    """Create each user and start its default server, ``concurrency`` at a time."""

    def one(name: str) -> None:
        hub.create_user(name)
        if not hub.start_server(name, {"image": "default"}):
            hub.wait_ready(name, timeout=deadline.cap(timeout))

    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="setup") as pool:
            list(pool.map(one, names))
    except HubError as e:
        raise BenchFailure(f"setup: {e.message}") from e
    check_running(hub, names)


def check_running(hub: HubClient, names: list[str], timeout: float = 30) -> None:
    """Every user exists with a ready default server (the listing may lag the progress stream
    by a moment)."""
    end = time.monotonic() + timeout
    while True:
        users = {u.name: u for u in hub.iter_users(name_filter=names[0].split("-")[0] + "-")}
        missing = [n for n in names if n not in users]
        not_ready = [
            n
            for n in names
            if n in users and not (users[n].servers.get("") and users[n].servers[""].ready)
        ]
        if not missing and not not_ready:
            return
        if time.monotonic() > end:
            raise BenchFailure(f"setup: {len(missing)} users missing, {len(not_ready)} not ready")
        time.sleep(0.5)


def clear_hub(hub: HubClient, deadline: Deadline) -> list[str]:
    """Remove every user still on the Hub (what a failed contender left); return their names."""
    left = sorted(u.name for u in hub.iter_users())
    for name in left:
        end = time.monotonic() + deadline.cap(60)
        while not remove_hub_user(hub, name, wait=5):
            if time.monotonic() > end:
                raise BenchFailure(f"could not remove {name} from the Hub")
    return left


# -- the contenders ---------------------------------------------------------------------------


def floor(stack: Stack, hub: HubClient, t: Timing, args: argparse.Namespace, dl: Deadline) -> None:
    names = [f"raw-{i:03d}" for i in range(t.n)]
    t0 = time.perf_counter()
    start_servers(hub, names, args.setup_concurrency, dl, args.ready_timeout)
    t.setup_seconds = time.perf_counter() - t0
    settle(t, args, dl)
    statuses: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    end = time.monotonic() + dl.cap(args.contender_timeout)

    def one(http: httpx.Client, name: str) -> None:
        stop = http.delete(f"users/{name}/server")
        statuses[f"stop {stop.status_code}"] += 1
        if stop.status_code not in (202, 204, 404):
            raise BenchFailure(f"stop {name}: {stop.status_code} {stop.text[:200]}")
        while True:
            gone = http.delete(f"users/{name}")
            if gone.status_code in (204, 404):
                statuses[f"delete {gone.status_code}"] += 1
                return
            if gone.status_code != 400 or time.monotonic() > end:
                raise BenchFailure(f"delete {name}: {gone.status_code} {gone.text[:200]}")
            retries["delete refused (stopping), retried"] += 1
            time.sleep(FLOOR_RETRY_SECONDS)

    with hub_http(
        stack, timeout=60, limits=httpx.Limits(max_connections=FLOOR_CONCURRENCY)
    ) as http:
        t.load = loadavg()
        meter = CpuMeter(stack, t)
        meter.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(FLOOR_CONCURRENCY, thread_name_prefix="floor") as pool:
            list(pool.map(lambda name: one(http, name), names))
        t.seconds = time.perf_counter() - t0
        meter.stop()
    t.notes.append(", ".join(f"{k}: {v}" for k, v in sorted((statuses + retries).items())))
    if left := hub_names(hub, "raw-"):
        raise BenchFailure(f"{len(left)} raw users left on the Hub")


def hublaunch(
    stack: Stack, hub: HubClient, t: Timing, args: argparse.Namespace, dl: Deadline
) -> None:
    settings = stack.settings()
    if args.pass_hub_timeout is not None:
        settings = settings.model_copy(update={"hub_request_timeout": args.pass_hub_timeout})
    t0 = time.perf_counter()
    ids = launch_sessions(stack, t.n, args, dl)
    t.setup_seconds = time.perf_counter() - t0
    if len(hub_names(hub, settings.user_prefix)) != t.n:
        raise BenchFailure("setup: not every launch has its Hub user")
    settle(t, args, dl)

    moment = datetime.now(UTC) + timedelta(seconds=120)
    client = HubClient(settings.hub_api_url, stack.hub_token, timeout=settings.hub_request_timeout)
    counting = CountingHub(client)
    kept = KeptBroker()
    ctx = bench_context(settings, counting, clock=lambda: moment, broker=kept)
    t.load = loadavg()
    meter = CpuMeter(stack, t)
    meter.start()
    t0 = time.perf_counter()
    actions = cull_pass(ctx)
    first = time.perf_counter() - t0
    meter.stop()
    t.notes.append(counting.summary(t0))
    results = Counter(f"{a.category} {a.result}" for a in actions)
    t.notes.append(f"pass 1: {first:.2f} s, " + ", ".join(f"{k}: {v}" for k, v in results.items()))
    total, passes = first, 1
    # A user still stopping is owed a removal; the next pass takes it once the removal grace
    # (left to a teardown task that may still be at it) is over, so move the clock past it.
    while (left := hub_names(hub, settings.user_prefix)) and dl.left() > 0 and passes < 5:
        moment = moment + REMOVAL_GRACE + timedelta(seconds=1)
        t.left_after_first = t.left_after_first or len(left)
        t.notes.append(f"{len(left)} users left after pass {passes}")
        t0 = time.perf_counter()
        more = cull_pass(ctx)
        took = time.perf_counter() - t0
        total += took
        passes += 1
        t.notes.append(
            f"pass {passes}: {took:.2f} s, "
            + ", ".join(
                f"{k}: {v}" for k, v in Counter(f"{a.category} {a.result}" for a in more).items()
            )
        )
    t.seconds = total
    client.close()
    if kept.messages:
        t.notes.append(f"{len(kept.messages)} launches would have been re-sent")
    if left := hub_names(hub, settings.user_prefix):
        raise BenchFailure(f"{len(left)} hl- users left on the Hub after {passes} passes")
    engine = sa.create_engine(stack.config.database_url)
    try:
        with engine.connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT status, end_reason, user_removed_at IS NOT NULL FROM launches "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            ).all()
    finally:
        engine.dispose()
    states = Counter(tuple(r) for r in rows)
    if states != Counter({("ended", "expired", True): t.n}):
        raise BenchFailure(f"launch rows after the pass: {dict(states)}")


def launch_sessions(stack: Stack, n: int, args: argparse.Namespace, dl: Deadline) -> list[str]:
    """N launches through the public API, ``setup_concurrency`` at a time, each to ``ready``."""

    def one(client: httpx.Client) -> str:
        launch_id = post_launch(client, {"image": "default", "lifetime": 60})
        wait_for_phase(client, launch_id, "ready", dl.cap(args.ready_timeout))
        return launch_id

    timeout = httpx.Timeout(30, read=60)
    with (
        httpx.Client(base_url=stack.public_url, timeout=timeout) as client,
        ThreadPoolExecutor(args.setup_concurrency, thread_name_prefix="launch") as pool,
    ):
        return list(pool.map(lambda _: one(client), range(n)))


def idle_culler(
    stack: Stack, hub: HubClient, t: Timing, args: argparse.Namespace, dl: Deadline
) -> None:
    names = [f"ic-{i:03d}" for i in range(t.n)]
    t0 = time.perf_counter()
    start_servers(hub, names, args.setup_concurrency, dl, args.ready_timeout)
    t.setup_seconds = time.perf_counter() - t0
    if others := {u.name for u in hub.iter_users()} - set(names):
        # The idle-culler culls every user it can see: make sure it sees only its own.
        raise BenchFailure(f"other users on the Hub before idle-culler: {sorted(others)[:5]}")
    settle(t, args, dl)

    log_path = stack.config.data_dir / f"idle-culler-{t.kind}-{t.round}.log"
    argv = [
        sys.executable,
        "-m",
        "jupyterhub_idle_culler",
        f"--url={stack.hub_api_url}",
        "--cull-users=True",
        "--remove-named-servers=True",
        f"--timeout={args.ic_timeout}",
        "--max-age=1",
        f"--cull-every={args.ic_cull_every}",
        f"--concurrency={args.ic_concurrency}",
        "--IdleCuller.log_level=DEBUG",  # "Finished culling <user>" is a DEBUG line
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env["JUPYTERHUB_API_TOKEN"] = stack.hub_token
    end = time.monotonic() + dl.cap(args.contender_timeout)
    t.load = loadavg()
    meter = CpuMeter(stack, t)
    meter.start()
    with log_path.open("wb") as log:
        started_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=stack.config.data_dir,  # no idle_culler_config.py of anyone else's is read
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _running.append(proc)
    polled: float | None = None
    try:
        next_hub_check = time.monotonic() + 2
        while True:
            finished = finished_culling(log_path, set(names))
            if len(finished) == t.n:
                break
            if proc.poll() is not None:
                raise BenchFailure(f"idle-culler exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > next_hub_check:  # in case its log says less than it did
                next_hub_check = time.monotonic() + 2
                if not hub_names(hub, "ic-"):
                    polled = time.perf_counter() - t0
                    break
            if time.monotonic() > end:
                remaining = len(hub_names(hub, "ic-"))
                raise BenchFailure(
                    f"idle-culler left {remaining} users after {args.contender_timeout} s"
                )
            time.sleep(0.2)
    finally:
        meter.stop()
        stop_process(proc)
    first_line = first_log_time(log_path)
    if first_line is not None:
        t.notes.append(f"its first log line {first_line - started_wall:.2f} s after start")
    if polled is not None:
        t.seconds = polled
        t.notes.append("time from polling the Hub every 2 s (its log was incomplete)")
    else:
        t.seconds = max(finished.values()) - started_wall
    t.notes.append(idle_culler_summary(log_path))
    if left := hub_names(hub, "ic-"):
        raise BenchFailure(f"{len(left)} ic- users left on the Hub")


def finished_culling(log_path: Path, names: set[str]) -> dict[str, float]:
    """User -> wall-clock time of its "Finished culling" line (the user's DELETE succeeded)."""
    done: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = IC_LOG_LINE.match(line)
        if m and m.group(3).startswith("Finished culling "):
            name = m.group(3).removeprefix("Finished culling ").strip()
            if name in names and name not in done:
                done[name] = datetime.strptime(m.group(2), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return done


def first_log_time(log_path: Path) -> float | None:
    for line in log_path.read_text(errors="replace").splitlines():
        if m := IC_LOG_LINE.match(line):
            return datetime.strptime(m.group(2), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return None


def idle_culler_summary(log_path: Path) -> str:
    counts: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        m = IC_LOG_LINE.match(line)
        if not m:
            continue
        message = m.group(3)
        for key in ("Culling server", "Culling user", "is slow to stop", "Error processing"):
            if key in message:
                counts[key] += 1
    return "its log: " + ", ".join(f"{k}: {v}" for k, v in counts.items())


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ValueError):
        _running.remove(proc)


_running: list[subprocess.Popen[bytes]] = []

RUNNERS: dict[str, Callable[[Stack, HubClient, Timing, argparse.Namespace, Deadline], None]] = {
    "floor": floor,
    "hublaunch": hublaunch,
    "idle-culler": idle_culler,
}


# -- a stack per spawner kind -----------------------------------------------------------------


def kill_leftover_servers(stack: Stack) -> int:
    """Stop single-user servers of this stack's Hub that outlived it (found by the Hub API URL in
    their environment, so nobody else's processes are touched)."""
    marker = f"127.0.0.1:{stack.hub_port}/hub/api".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"JUPYTERHUB_API_URL=" in environ and marker in environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def run_kind(
    kind: str, n: int, args: argparse.Namespace, run: Run, dl: Deadline, timings: list[Timing]
) -> str:
    with bench_database() as db:
        stack = run.stack(
            f"stack-{kind}",
            db,
            spawner=kind,
            beat=False,
            # Recorded before the sandbox; sandboxed servers: --kinds sandbox.
            env={"HUBLAUNCH_ALLOW_UNSANDBOXED": "1"} if kind == "local" else {},
            label=f"[{kind}] ",
        )
        try:
            stack.start(timeout=dl.cap(120))
            hub = HubClient(stack.hub_api_url, stack.hub_token, timeout=60)
            try:
                for rnd in range(1, args.rounds + 1):
                    order = CONTENDERS if rnd % 2 else tuple(reversed(CONTENDERS))
                    for contender in order:
                        if dl.left() <= 0:
                            raise BenchFailure("time limit reached")
                        t = Timing(kind, rnd, contender, n)
                        timings.append(t)
                        print(f"[{kind}] round {rnd}: {contender}, {n} users ...", flush=True)
                        try:
                            RUNNERS[contender](stack, hub, t, args, dl)
                        except (BenchFailure, HubError, httpx.HTTPError) as e:
                            t.error = f"{type(e).__name__}: {e}"
                        seconds = f"{t.seconds:.2f} s" if t.seconds is not None else "-"
                        print(
                            f"[{kind}] round {rnd}: {contender}: {seconds} "
                            f"(setup {t.setup_seconds:.1f} s, load {t.load:.2f}, "
                            f"CPU {t.busy:.0%} busy before, {t.window_busy or 0:.0%} during, "
                            f"Hub CPU {t.hub_cpu or 0:.2f} s, proxy CPU {t.proxy_cpu or 0:.2f} s)"
                            + (f" FAILED: {t.error}" if t.error else ""),
                            flush=True,
                        )
                        for note in t.notes:
                            print(f"    {note}", flush=True)
                        if left := clear_hub(hub, dl):
                            t.notes.append(f"removed {len(left)} leftover users afterwards")
                            print(f"    removed {len(left)} leftover users", flush=True)
            finally:
                with contextlib.suppress(Exception):
                    clear_hub(hub, Deadline(60))
                hub.close()
        finally:
            stack.stop()
            if killed := kill_leftover_servers(stack):
                print(f"[{kind}] killed {killed} single-user servers left running", flush=True)
    return db.kind


# -- the report -------------------------------------------------------------------------------


def cell(t: Timing | None) -> str:
    if t is None:
        return "-"
    value = f"{t.seconds:.2f}" if t.seconds is not None else "-"
    return value + ("!" if t.error else "")


def report(timings: list[Timing], info: list[tuple[str, str]], args: argparse.Namespace) -> bool:
    """Print the tables; True when the real-server targets were met (or not measured)."""
    met = True
    print()
    flags = (
        f"--cull-users=True --remove-named-servers=True --timeout={args.ic_timeout} "
        f"--max-age=1 --cull-every={args.ic_cull_every} --concurrency={args.ic_concurrency}"
    )
    print_info([*info, ("idle flags", flags)])
    for kind in dict.fromkeys(t.kind for t in timings):
        rows = [t for t in timings if t.kind == kind]
        rounds = sorted({t.round for t in rows})
        n = rows[0].n
        spawner = {
            "local": "real jupyterhub-singleuser",
            "sandbox": "real jupyterhub-singleuser, sandboxed",
        }.get(kind, "fake (in the Hub)")
        print(f"\n{spawner}, N = {n}: seconds until every user is gone from the Hub")
        head = f"{'contender':<24}{'N':>5}" + "".join(f"{'round ' + str(r):>10}" for r in rounds)
        print(head + f"{'mean':>9}{'vs floor':>10}{'Hub CPU':>9}{'proxy CPU':>11}")
        means: dict[str, float] = {}
        for contender in CONTENDERS:
            mine = {t.round: t for t in rows if t.contender == contender}
            cells = [mine.get(r) for r in rounds]
            values = [c.seconds for c in cells if c and c.seconds is not None and not c.error]
            text = "".join(f"{cell(c):>10}" for c in cells)
            mean = statistics.fmean(values) if len(values) == len(rounds) else None
            if mean is not None:
                means[contender] = mean
            label = {
                "floor": f"floor ({FLOOR_CONCURRENCY} parallel)",
                "hublaunch": "hublaunch cull_pass",
                "idle-culler": "jupyterhub-idle-culler",
            }[contender]
            ratio = f"{mean / means['floor']:.2f}" if mean is not None and "floor" in means else "-"
            hub_cpu = [c.hub_cpu for c in cells if c and c.hub_cpu is not None]
            proxy_cpu = [c.proxy_cpu for c in cells if c and c.proxy_cpu is not None]
            cpu = f"{statistics.fmean(hub_cpu):.2f}" if hub_cpu else "-"
            pcpu = f"{statistics.fmean(proxy_cpu):.2f}" if proxy_cpu else "-"
            shown = f"{mean:.2f}" if mean else "-"
            print(f"{label:<24}{n:>5}{text}{shown:>9}{ratio:>10}{cpu:>9}{pcpu:>11}")
        setup = {
            c: statistics.fmean([t.setup_seconds for t in rows if t.contender == c] or [0])
            for c in CONTENDERS
        }
        print(
            "setup (not timed), mean s: "
            + ", ".join(f"{c} {s:.1f}" for c, s in setup.items())
            + "; load average before the timed parts: "
            + ", ".join(f"{t.load:.2f}" for t in rows)
        )
        if {"floor", "hublaunch", "idle-culler"} <= means.keys():
            vs_floor = means["hublaunch"] / means["floor"]
            speedup = means["idle-culler"] / means["hublaunch"]
            per_round = []
            for r in rounds:
                got = {t.contender: t.seconds for t in rows if t.round == r and t.seconds}
                if len(got) == 3:
                    per_round.append(
                        f"round {r}: {got['hublaunch'] / got['floor']:.2f}x floor, "
                        f"{got['idle-culler'] / got['hublaunch']:.1f}x faster"
                    )
            print(f"hublaunch / floor: {vs_floor:.2f}   idle-culler / hublaunch: {speedup:.1f}x")
            print("  " + "; ".join(per_round))
            if kind == "local":
                ok_floor = vs_floor <= TARGET_VS_FLOOR
                ok_ic = speedup >= TARGET_VS_IDLE_CULLER
                met = ok_floor and ok_ic
                print(
                    f"target hublaunch <= {TARGET_VS_FLOOR}x floor: "
                    f"{'met' if ok_floor else 'NOT met'}; "
                    f">= {TARGET_VS_IDLE_CULLER:.0f}x faster than idle-culler: "
                    f"{'met' if ok_ic else 'NOT met'}"
                )
        for t in rows:
            if t.left_after_first:
                print(
                    f"round {t.round}: hublaunch's first pass left {t.left_after_first} users "
                    "stopping; the figure adds the later passes' own time (with beat, the next "
                    "pass comes an interval later)"
                )
        failed = [t for t in rows if t.error]
        for t in failed:
            print(f"FAILED round {t.round} {t.contender}: {t.error}")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="local,fake", help="spawners: local,sandbox,fake")
    parser.add_argument("--real-n", type=int, default=30, help="users with real servers (30)")
    parser.add_argument("--fake-n", type=int, default=200, help="users with fake servers (200)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, order alternating (2)")
    parser.add_argument(
        "--setup-concurrency", type=int, default=8, help="launches/starts at a time (8)"
    )
    parser.add_argument("--settle", type=float, default=5.0, help="min wait after setup (5 s)")
    parser.add_argument("--settle-max", type=float, default=90, help="max wait (90 s)")
    parser.add_argument(
        "--quiet-below", type=float, default=0.25, help="CPU busy fraction counted quiet (0.25)"
    )
    parser.add_argument(
        "--pass-hub-timeout",
        type=float,
        default=None,
        help="hub_request_timeout for the pass (default: the setting's default, 10 s)",
    )
    parser.add_argument("--ready-timeout", type=float, default=180, help="per server (180 s)")
    parser.add_argument(
        "--contender-timeout", type=float, default=300, help="per timed part (300 s)"
    )
    parser.add_argument("--ic-timeout", type=int, default=1, help="idle-culler --timeout (1)")
    parser.add_argument("--ic-cull-every", type=int, default=1, help="--cull-every (1)")
    parser.add_argument("--ic-concurrency", type=int, default=10, help="--concurrency (10)")
    parser.add_argument("--time-limit", type=float, default=1500, help="whole run (1500 s)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"local", "fake"} or args.rounds < 1:
        parser.error("--kinds takes local and/or fake; --rounds at least 1")

    dl = Deadline(args.time_limit)
    info = machine_info(
        ("idle-culler", f"jupyterhub-idle-culler {version('jupyterhub-idle-culler')}")
    )
    timings: list[Timing] = []
    with bench_run("hublaunch-bench-cull-", keep=args.keep) as run:
        try:
            for kind in kinds:
                n = args.real_n if kind == "local" else args.fake_n
                db_kind = run_kind(kind, n, args, run, dl, timings)
            info.append(
                ("database", db_kind.split(" (")[0] + " (hublaunch's; the Hub's is SQLite)")
            )
            report(timings, info, args)
            expected = len(kinds) * args.rounds * len(CONTENDERS)
            run.ok = len(timings) == expected and not any(t.error for t in timings)
        except BenchFailure as e:
            print(f"stopped: {e}", file=sys.stderr)
            if timings:
                report(timings, info, args)
        finally:
            for proc in list(_running):
                stop_process(proc)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
