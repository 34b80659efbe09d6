"""Fuzz the public API from its own OpenAPI document, against a whole stack.

schemathesis generates requests for every documented operation, both valid ones (the JSON
schema's data) and invalid ones (wrong types, missing fields, odd strings in paths, query
strings and headers), sends them through the stack's public address (the proxy, as a visitor
does), and checks every answer: never a 5xx, a documented status, a documented content type and
a body that matches the documented schema. Launches the run creates are ended afterwards and
their Hub users must be gone.

    .venv/bin/python -m bench.fuzz --cases 1000

``fuzz()`` and ``end_launches()`` are also what tests/integration/test_fuzz.py runs, shorter.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import httpx
import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis.errors import HypothesisException
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.common import Run, bench_database, bench_run, hub_http, machine_info, print_info
from hublaunch.stack import Stack

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# An event stream ends at ready or failed (the fake spawner gets there in about a second), but
# sends a keepalive every 15 s, so a read timeout alone would not end a stuck one; each request
# is also bounded as a whole.
REQUEST_SECONDS = 30.0
# What the fuzzing stack's per-client rate limit allows: the run is one client sending far more
# than a visitor would, and it tests answers, not the limit (a 429 is documented anyway).
FUZZ_ENV = {"HUBLAUNCH_CLIENT_RATE": "100000/minute"}


@dataclass
class FuzzResult:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    launches: set[str] = field(default_factory=set)  # ids of the launches the run created
    seconds: float = 0.0
    timed_out: bool = False
    seed: int = 0  # hypothesis's seed of the first round (``--seed`` repeats the run)


class _TimeUp(Exception):
    pass


def fuzz(
    base_url: str,
    *,
    cases: int,
    time_limit: float,
    admin_token: str = "",
    seed: int | None = None,
    progress: Callable[[FuzzResult], None] | None = None,
) -> FuzzResult:
    """Send at least ``cases`` generated requests (fewer if ``time_limit`` seconds pass first),
    spread over every operation, valid and invalid data alike; check each answer."""
    started = time.monotonic()
    deadline = started + time_limit
    result = FuzzResult()
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json")
    operations = []
    for found in schema.get_all_operations():
        if isinstance(found, Ok):
            operations.append(found.ok())
        else:  # the document itself is broken there
            result.failures.append(f"operation not testable: {found.err()}")
    result.seed = secrets.randbits(32) if seed is None else seed
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    targets = [
        (o, m) for o in operations for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    session = requests.Session()
    rounds = 0
    try:
        while result.cases < cases and not result.timed_out:
            before = result.cases
            # Each (operation, mode) gets a share of what is left; a small operation (no
            # parameters) runs out of new examples early, so rounds repeat with the next seed.
            share = (cases - result.cases) // len(targets) + 1
            for operation, mode in targets:
                _fuzz_one(
                    operation,
                    mode,
                    share,
                    result.seed + rounds,
                    base_url,
                    headers,
                    session,
                    result,
                    deadline,
                )
                if progress is not None:
                    progress(result)
                if result.cases >= cases or result.timed_out:
                    break
            rounds += 1
            if result.cases == before:
                break  # nothing generates any more (cannot happen with this document)
    finally:
        session.close()
        result.seconds = time.monotonic() - started
    return result


def _fuzz_one(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    seed: int,
    base_url: str,
    headers: dict[str, str],
    session: requests.Session,
    result: FuzzResult,
    deadline: float,
) -> None:
    try:
        strategy = operation.as_strategy(generation_mode=mode)
    except Exception:  # e.g. no negative data exists for an operation without parameters
        return
    label = f"{operation.method.upper()} {operation.path}"

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @hypothesis.given(case=strategy)
    def run(case: Any) -> None:
        if time.monotonic() > deadline:
            result.timed_out = True
            raise _TimeUp
        result.cases += 1
        result.operations[label] += 1
        try:
            response = case.call(
                base_url=base_url,
                session=session,
                headers=headers,
                timeout=(5, REQUEST_SECONDS),
            )
        except requests.RequestException as e:
            result.failures.append(f"{label}: no answer ({type(e).__name__}: {e})\n{_curl(case)}")
            return
        result.statuses[response.status_code] += 1
        _note_launches(response, result.launches)
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as e:
            detail = "; ".join(f"{f.title}: {f.message}" for f in e.exceptions)
            result.failures.append(f"{label} -> {response.status_code}: {detail}\n{_curl(case)}")
        except AssertionError as e:
            result.failures.append(f"{label} -> {response.status_code}: {e}\n{_curl(case)}")

    try:
        run()
    except _TimeUp:
        pass
    except HypothesisException:
        pass  # unsatisfiable or exhausted: no more examples for this operation and mode


def _curl(case: Any) -> str:
    try:
        return f"  reproduce: {case.as_curl_command()}"
    except Exception:
        return f"  case: {case!r}"


def _note_launches(response: Any, launches: set[str]) -> None:
    """Launch ids in an answer: a POST's body, or the /build stream's ``id: <launch>:<n>``."""
    values = response.headers.get("content-type") or [""]  # schemathesis keeps lists
    content_type = values[0] if isinstance(values, list) else str(values)
    if response.status_code == 202 and content_type.startswith("application/json"):
        try:
            body = response.json()
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            launches.add(body["id"])
    elif content_type.startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("id: ") and ":" in line[4:]:
                launches.add(line[4:].split(":", 1)[0])


def end_launches(base_url: str, launch_ids: set[str], timeout: float = 120.0) -> list[str]:
    """DELETE every launch and wait until each is ended or failed; returns the ids that were
    not (an empty list when all ended)."""
    deadline = time.monotonic() + timeout
    left = set(launch_ids)
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for launch_id in sorted(left):
            client.delete(f"/api/launches/{launch_id}")
        while left and time.monotonic() < deadline:
            for launch_id in sorted(left):
                response = client.get(f"/api/launches/{launch_id}")
                if response.status_code == 404 or response.json()["status"] in ("ended", "failed"):
                    left.discard(launch_id)
            time.sleep(0.2)
    return sorted(left)


def hub_users(stack: Stack) -> set[str]:
    """Names of the Hub's users, operators' accounts aside."""
    with hub_http(stack, 10) as hub:
        response = hub.get("users", params={"limit": 1000})
        response.raise_for_status()
        users = response.json()
        items = users["items"] if isinstance(users, dict) else users
    admins = set(stack.config.env.get("HUBLAUNCH_HUB_ADMIN_USERS", "").split(","))
    return {u["name"] for u in items if u["name"] not in admins}


def wait_for_no_hub_users(stack: Stack, timeout: float = 120.0) -> set[str]:
    """Wait until the Hub has no session users; returns those still there at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := hub_users(stack)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def report(result: FuzzResult) -> None:
    print(f"\ncases: {result.cases} in {result.seconds:.1f} s (seed {result.seed})")
    print("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(result.statuses.items())))
    print("per operation:")
    for label, n in sorted(result.operations.items()):
        print(f"  {label:45} {n}")
    print(f"launches created: {len(result.launches)}")
    if result.timed_out:
        print("time limit reached")
    print(f"failures: {len(result.failures)}")
    for failure in result.failures[:50]:
        print(f"  {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated requests (1000)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random)")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument(
        "--time-limit", type=float, default=900, help="stop after this many seconds (900)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    with bench_run("hublaunch-fuzz-", keep=args.keep) as run:
        run.ok = measure(run, args)
    return run.exit_code


def measure(run: Run, args: argparse.Namespace) -> bool:
    started = time.monotonic()
    admin_token = secrets.token_urlsafe(32)
    with bench_database(run.tmp / "hublaunch.sqlite" if args.sqlite else None) as db:
        info = machine_info(
            ("database", db.kind),
            ("spawner", "fake (in the Hub process)"),
            ("schemathesis", version("schemathesis")),
        )
        env = {**FUZZ_ENV, "HUBLAUNCH_ADMIN_TOKEN": admin_token}
        stack = run.stack("stack", db, beat=False, env=env)
        with stack.running():
            print(f"stack up in {time.monotonic() - started:.1f} s; fuzzing ...", flush=True)
            last = [0]

            def progress(result: FuzzResult) -> None:
                if result.cases - last[0] >= 100:
                    last[0] = result.cases
                    print(f"  {result.cases} cases, {len(result.failures)} failures", flush=True)

            result = fuzz(
                stack.public_url,
                cases=args.cases,
                time_limit=args.time_limit,
                admin_token=admin_token,
                seed=args.seed,
                progress=progress,
            )
            not_ended = end_launches(stack.public_url, result.launches)
            users_left = wait_for_no_hub_users(stack)
            print_info(info)
            report(result)
            print(f"launches not ended: {len(not_ended)}; Hub users left: {len(users_left)}")
            print(json.dumps({"cases": result.cases, "failures": len(result.failures)}))
    return (
        not result.failures
        and not result.timed_out
        and result.cases >= args.cases
        and not not_ended
        and not users_left
    )


if __name__ == "__main__":
    sys.exit(main())
