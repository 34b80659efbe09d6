"""Caps on active sessions and the waiting line (worker/admission.py), on both databases."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.fakes import FakeHub
from tests.unit.conftest import Clock
from worker import admission, transitions
from worker.admission import Entry, Limits, fair_order, machine_sessions, parse_bytes, place
from worker.context import WorkerContext
from worker.cull import cull_pass
from worker.db import as_utc, session_scope
from worker.hub_client import HubUnavailable
from worker.models import Launch, LaunchEvent, Phase, Status
from worker.outcome import DONE
from worker.queries import get_launch
from worker.starting import advance
from worker.transitions import spec_key

GIB = 2**30


def capped(ctx: WorkerContext, total: int, per_spec: int = 0, max_wait: int = 600) -> None:
    ctx.settings = ctx.settings.model_copy(
        update={"max_active": total, "max_active_per_spec": per_spec or total, "max_wait": max_wait}
    )


def new_launch(ctx: WorkerContext, clock: Clock, spec: dict[str, Any] | None = None) -> str:
    clock.advance(1)  # a distinct created_at: the line's order
    with ctx.units.begin() as uow:
        launch = transitions.create(
            uow, spec or {"image": "default"}, lifetime=600, timeout=60, now=clock()
        )
        return launch.id


def row(ctx: WorkerContext, launch_id: str) -> Launch:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        return launch


def slot_events(ctx: WorkerContext, launch_id: str) -> list[tuple[str, int | None]]:
    with session_scope(ctx.settings.database_url) as db:
        events = db.scalars(
            select(LaunchEvent)
            .where(LaunchEvent.launch_id == launch_id, LaunchEvent.phase == Phase.waiting)
            .order_by(LaunchEvent.id)
        ).all()
        return [(e.message, (e.data or {}).get("position")) for e in events if e.data]


def end_session(ctx: WorkerContext, launch_id: str) -> None:
    """The owner ends a ready session and its user is removed: its slot is free."""
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        assert launch is not None
        transitions.request_end(uow, launch, now=ctx.clock())
        transitions.mark_user_removed(uow, launch, now=ctx.clock())


def test_over_the_cap_launches_wait_with_their_place_in_line(
    ctx: WorkerContext, clock: Clock, hub: FakeHub
) -> None:
    capped(ctx, 2)
    ids = [new_launch(ctx, clock) for _ in range(5)]
    outcomes = [advance(ctx, launch_id) for launch_id in ids]

    assert outcomes[:2] == [DONE, DONE]
    assert [row(ctx, i).status for i in ids] == [Status.ready] * 2 + [Status.queued] * 3
    assert all(o.retry_in == admission.POLL_SECONDS for o in outcomes[2:])
    assert [slot_events(ctx, i) for i in ids[2:]] == [
        [("Waiting for a free slot: you are next", 0)],
        [("Waiting for a free slot: 1 launch ahead of you", 1)],
        [("Waiting for a free slot: 2 launches ahead of you", 2)],
    ]
    assert len(hub.users) == 2  # nobody in line touched the Hub


def test_the_place_is_told_again_only_when_it_changes_and_the_next_starts(
    ctx: WorkerContext, clock: Clock
) -> None:
    capped(ctx, 2)
    ids = [new_launch(ctx, clock) for _ in range(4)]
    for launch_id in ids:
        advance(ctx, launch_id)
    for _ in range(3):  # polls with nothing changed add no events
        clock.advance(admission.POLL_SECONDS)
        advance(ctx, ids[3])
    assert slot_events(ctx, ids[3]) == [("Waiting for a free slot: 1 launch ahead of you", 1)]

    end_session(ctx, ids[0])
    # The last in line asks first: one slot, one launch ahead of it, so it still waits.
    assert advance(ctx, ids[3]).retry_in == admission.POLL_SECONDS
    assert row(ctx, ids[3]).status == Status.queued
    assert advance(ctx, ids[2]) == DONE
    assert row(ctx, ids[2]).status == Status.ready
    advance(ctx, ids[3])
    assert slot_events(ctx, ids[3]) == [
        ("Waiting for a free slot: 1 launch ahead of you", 1),
        ("Waiting for a free slot: you are next", 0),
    ]


def test_a_later_launch_does_not_overtake_an_earlier_one_in_line(
    ctx: WorkerContext, clock: Clock
) -> None:
    capped(ctx, 1)
    first, early, late = (new_launch(ctx, clock) for _ in range(3))
    advance(ctx, first)
    advance(ctx, early)
    end_session(ctx, first)
    # The later launch arrives at the door with a slot free, but someone waits before it.
    assert advance(ctx, late).retry_in == admission.POLL_SECONDS
    assert row(ctx, late).status == Status.queued
    assert slot_events(ctx, late) == [("Waiting for a free slot: 1 launch ahead of you", 1)]
    assert advance(ctx, early) == DONE
    assert row(ctx, early).status == Status.ready


def test_a_spec_at_its_own_cap_does_not_block_other_specs(
    ctx: WorkerContext, clock: Clock, hub: FakeHub
) -> None:
    hub.known_images = ("default", "other")
    capped(ctx, 4, per_spec=2)
    popular = [new_launch(ctx, clock) for _ in range(4)]
    other = new_launch(ctx, clock, {"image": "other"})
    for launch_id in [*popular, other]:
        advance(ctx, launch_id)

    statuses = [row(ctx, i).status for i in popular]
    assert statuses == [Status.ready, Status.ready, Status.queued, Status.queued]
    # Two slots are free overall; the popular image's launches wait for their own, the other
    # image starts although it came last.
    assert row(ctx, other).status == Status.ready
    assert slot_events(ctx, popular[3]) == [("Waiting for a free slot: 1 launch ahead of you", 1)]


def test_a_repository_counts_as_one_spec_whatever_the_ref() -> None:
    a = spec_key({"repo": "https://github.com/Owner/Repo.git", "ref": "HEAD"})
    assert a == spec_key({"repo": "https://github.com/owner/repo/", "ref": "0123abcd"})
    assert a != spec_key({"repo": "https://github.com/owner/other", "ref": "HEAD"})
    assert spec_key({"image": "default"}) == spec_key({"image": "default:latest"})
    assert spec_key({"image": "default"}) != spec_key({"repo": "default"})


def test_waiting_past_max_wait_fails_with_reason_capacity(
    ctx: WorkerContext, clock: Clock, hub: FakeHub
) -> None:
    capped(ctx, 1, max_wait=30)
    held, waiting = new_launch(ctx, clock), new_launch(ctx, clock)
    advance(ctx, held)
    advance(ctx, waiting)
    clock.advance(29)
    assert advance(ctx, waiting).retry_in == admission.POLL_SECONDS
    clock.advance(2)

    assert advance(ctx, waiting) == DONE
    launch = row(ctx, waiting)
    assert launch.status == Status.failed
    assert launch.error == (
        "The service is at capacity: waited 31 s for a free slot; try again later."
    )
    assert launch.hub_user is None and launch.user_removed_at is not None
    assert len(hub.users) == 1


def test_the_deadline_moves_while_a_launch_waits(
    ctx: WorkerContext, clock: Clock, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unlisted(**_: Any) -> Any:
        raise HubUnavailable("Hub unreachable: ConnectError")

    # The pass's Hub listing is not what this is about: without it, the stuck sweep still runs.
    monkeypatch.setattr(hub, "iter_users", unlisted, raising=False)
    capped(ctx, 1)
    held, waiting = new_launch(ctx, clock), new_launch(ctx, clock)
    advance(ctx, held)
    first_deadline = as_utc(row(ctx, waiting).deadline_at)  # type: ignore[arg-type]
    for _ in range(10):  # 100 s of waiting, past the 60 s launch timeout
        advance(ctx, waiting)
        clock.advance(10)
    launch = row(ctx, waiting)
    assert launch.status == Status.queued
    assert as_utc(launch.deadline_at) > clock() > first_deadline  # type: ignore[arg-type]

    actions = cull_pass(ctx)
    assert [a for a in actions if a.launch_id == waiting] == []
    assert row(ctx, waiting).status == Status.queued
    # A waiting launch nobody polls any more (its worker died) is stuck after its deadline.
    clock.advance(ctx.settings.launch_timeout + 1)
    assert any(a.category == "stuck" and a.launch_id == waiting for a in cull_pass(ctx))


def test_an_end_asked_while_waiting_ends_without_a_slot(
    ctx: WorkerContext, clock: Clock, hub: FakeHub
) -> None:
    capped(ctx, 1)
    held, waiting = new_launch(ctx, clock), new_launch(ctx, clock)
    advance(ctx, held)
    advance(ctx, waiting)
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, waiting)
        assert launch is not None
        transitions.request_end(uow, launch, now=clock())
    advance(ctx, waiting)
    assert row(ctx, waiting).status == Status.ended
    assert len(hub.users) == 1


def test_concurrent_admissions_never_exceed_the_cap(
    ctx: WorkerContext, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    capped(ctx, 3)
    ids = [new_launch(ctx, clock) for _ in range(8)]
    read_held = admission._held

    def slow_held(db: Any, keys: set[str]) -> tuple[list[str], int]:
        held = read_held(db, keys)
        time.sleep(0.05)  # widen the window between counting and taking a slot
        return held

    monkeypatch.setattr(admission, "_held", slow_held)
    start = threading.Barrier(len(ids))
    results: dict[str, Any] = {}

    def run(launch_id: str) -> None:
        start.wait()
        try:
            results[launch_id] = admission.admit(ctx, launch_id)
        except Exception as e:  # reported below, not lost in the thread
            results[launch_id] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not [r for r in results.values() if isinstance(r, Exception)], results
    admitted = [i for i, r in results.items() if isinstance(r, Launch)]
    assert len(admitted) == 3
    assert sorted(row(ctx, i).status for i in ids).count(Status.launching) == 3


# -- the caps' defaults and the line's arithmetic ------------------------------------


def test_the_default_cap_follows_memory_and_cpus() -> None:
    assert machine_sessions(24 * GIB, 2, 2 * GIB) == 9  # 18 GiB for sessions of 2 GiB
    assert machine_sessions(256 * GIB, 2, 2 * GIB) == 16  # 8 per CPU
    assert machine_sessions(1 * GIB, 1, 2 * GIB) == 1  # never 0: the line would never move
    assert parse_bytes("2G") == 2 * GIB and parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("1073741824") == GIB


def test_derived_caps_are_logged_and_per_spec_is_half(caplog: pytest.LogCaptureFixture) -> None:
    admission._limits.cache_clear()
    with caplog.at_level("INFO", logger="worker.admission"):
        caps = admission._limits(0, 0)
    assert caps.total >= 1 and caps.per_spec == max(1, caps.total // 2)
    assert f"active sessions capped at {caps.total} (derived" in caplog.text
    assert admission._limits(10, 0) == Limits(10, 5)
    assert admission._limits(3, 7) == Limits(3, 3)  # a spec never gets more than the total


def test_place_in_line() -> None:
    t0 = as_utc(Clock()())

    def entry(name: str, key: str, minute: int) -> Entry:
        return Entry(name, key, t0 + timedelta(minutes=minute))

    caps = Limits(total=3, per_spec=2)
    me = entry("me", "b", 5)
    assert place(me, ["a"], [], caps) is None
    # Two earlier launches take the two free slots.
    assert place(me, ["a"], [entry("x", "c", 1), entry("y", "d", 2)], caps) == 2
    # An earlier launch held back by its own spec's cap is not ahead of another spec.
    assert place(me, ["a", "a"], [entry("x", "a", 1)], caps) is None
    # Behind one launch of its own spec, its spec full: one ahead.
    assert place(me, ["b", "b"], [entry("x", "b", 1)], caps) == 1
    # Later launches never count.
    assert place(me, ["a", "a"], [entry("z", "c", 9)], caps) is None


def test_the_line_is_fair_between_clients() -> None:
    t0 = as_utc(Clock()())

    def entry(name: str, minute: int, client: str | None) -> Entry:
        return Entry(name, "a", t0 + timedelta(minutes=minute), client)

    def order(line: list[Entry], sessions: dict[str, int] | None = None) -> list[str]:
        return [e.id for e in fair_order(line, sessions or {})]

    # A flood: one client's five launches, then two other clients' one each.
    flood = [entry(f"f{i}", i, "flooder") for i in range(5)]
    late = [entry("b", 10, "b"), entry("c", 11, "c")]
    assert order([*late, *flood]) == ["f0", "b", "c", "f1", "f2", "f3", "f4"]
    # The sessions a client already holds count as its turns taken.
    assert order([*late, *flood], {"flooder": 2}) == ["b", "c", "f0", "f1", "f2", "f3", "f4"]
    assert order([*late, *flood], {"flooder": 1, "b": 1}) == [
        "c",
        "f0",
        "b",
        "f1",
        "f2",
        "f3",
        "f4",
    ]
    # Two clients with several each take turns, each turn by arrival.
    two = [entry("x1", 0, "x"), entry("x2", 1, "x"), entry("y1", 2, "y"), entry("y2", 3, "y")]
    assert order(two) == ["x1", "y1", "x2", "y2"]
    # Launches with no client (the pool's, older rows) are each a first turn.
    assert order([entry("p", 5, None), *flood[:2]]) == ["f0", "p", "f1"]
    # place() walks that order: with one free slot, the late client goes before the flood.
    caps = Limits(total=10, per_spec=10)
    held = ["a"] * 9
    assert place(late[0], held, flood, caps) == 1  # behind f0 only
    assert place(late[0], held, flood, caps, sessions={"flooder": 9}) is None
    assert place(flood[0], held, [*flood[1:], *late], caps, sessions={"flooder": 9}) == 2


def test_the_launch_page_shows_the_waiting_message() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed (make install puts configurable-http-proxy there)")
    script = Path(__file__).resolve().parents[2] / "api" / "static" / "launch.js"
    event = {"id": 7, "phase": "waiting", "position": 3}
    event["message"] = transitions.slot_message(3)
    program = (
        "const elements = {};"
        "globalThis.document = {getElementById: (id) => elements[id] ||"
        " (elements[id] = {textContent: '', hidden: true})};"
        "let source;"
        "globalThis.EventSource = function () { source = this; this.close = () => {}; };"
        f"globalThis.window = {{}}; require({json.dumps(str(script))});"
        "window.HubLaunch.page('/build/image/default', '', '');"
        f"source.onmessage({{data: {json.dumps(json.dumps(event))}}});"
        "console.log(JSON.stringify({phase: elements.phase.textContent,"
        " message: elements.message.textContent, progress: elements.progress.hidden}));"
    )
    result = subprocess.run(
        [node, "-e", program], capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(result.stdout) == {
        "phase": "waiting",
        "message": "Waiting for a free slot: 3 launches ahead of you",
        "progress": False,
    }
