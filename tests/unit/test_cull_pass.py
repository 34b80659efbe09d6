"""The cleanup pass's claims, one by one, on both databases, with an in-memory Hub and time
moved by the injected clock (never by sleeping)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.fakes import FakeHub, RecordingBroker, insert_launch
from tests.unit.conftest import Clock
from worker.broker import LAUNCH_TASK
from worker.context import WorkerContext
from worker.cull import LEASE, REMOVAL_GRACE, Action, cull_pass
from worker.db import as_utc, session_scope
from worker.hub_client import HubRequestError, HubUnavailable, HubUser, ServerState
from worker.models import EndReason, Launch, LaunchEvent, Status


@dataclass
class ListingHub(FakeHub):
    """FakeHub plus what a pass reads: the listing (with creation and activity times) and why a
    stopped server stopped."""

    created: dict[str, datetime] = field(default_factory=dict)
    activity: dict[str, datetime] = field(default_factory=dict)
    # A server's own last activity where it differs from its user's (None: not reported).
    server_activity: dict[str, datetime | None] = field(default_factory=dict)
    admins: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)
    listing_down: bool = False

    def add_user(
        self,
        name: str,
        *,
        created: datetime,
        server: str | None = None,
        activity: datetime | None = None,
        admin: bool = False,
    ) -> None:
        self.users[name] = {"servers": {"": server} if server else {}}
        self.created[name] = created
        if activity is not None:
            self.activity[name] = activity
        if admin:
            self.admins.add(name)

    def iter_users(self, *, name_filter: str = "", page_size: int = 200) -> Iterator[HubUser]:
        self._call("iter_users", name_filter)
        if self.listing_down:
            raise HubUnavailable("Hub unreachable: ConnectError")
        for name in [n for n in self.users if name_filter in n]:
            servers = {
                s: ServerState(
                    ready=state == "ready",
                    pending={"pending": "spawn", "stopping": "stop"}.get(state),
                    url=None,
                    last_activity=self.server_activity.get(name, self.activity.get(name)),
                )
                for s, state in self.users[name]["servers"].items()
            }
            yield HubUser(
                name=name,
                admin=name in self.admins,
                servers=servers,
                last_activity=self.activity.get(name),
                created=self.created.get(name),
            )

    def stopped_reason(self, name: str) -> str:
        self._call("stopped_reason", name)
        return self.reasons.get(name, "")


@pytest.fixture
def hub() -> ListingHub:
    return ListingHub()


def put(ctx: WorkerContext, status: Status = Status.queued, **fields: Any) -> str:
    """A launch row as test set-up: created now, then the given columns overwritten."""
    with session_scope(ctx.settings.database_url) as db:
        launch = insert_launch(db, {"image": "default"}, lifetime=600, now=ctx.clock())
        launch.status = status
        for name, value in fields.items():
            setattr(launch, name, value)
        return launch.id


def put_ready(
    ctx: WorkerContext,
    hub: ListingHub,
    name: str,
    *,
    server: str | None = "ready",
    active_ago: float = 0,
    **fields: Any,
) -> str:
    """A ready session whose Hub user ``name`` exists with the given server state."""
    now = ctx.clock()
    hub.add_user(
        name,
        created=now - timedelta(hours=1),
        server=server,
        activity=now - timedelta(seconds=active_ago),
    )
    values: dict[str, Any] = {
        "hub_user": name,
        # Ready before its last activity, as a server is (a pooled one aside: test_pool.py).
        "ready_at": now - timedelta(seconds=max(600, active_ago)),
        "expires_at": now + timedelta(hours=1),
        "updated_at": now - timedelta(minutes=10),
        **fields,
    }
    return put(ctx, Status.ready, **values)


def row(ctx: WorkerContext, launch_id: str) -> Launch:
    with session_scope(ctx.settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        return launch


def sent(ctx: WorkerContext) -> list[str]:
    broker = ctx.units.broker
    assert isinstance(broker, RecordingBroker)
    return broker.arguments(LAUNCH_TASK)


def by_launch(actions: list[Action]) -> dict[str | None, tuple[str, str]]:
    return {a.launch_id: (a.category, a.result) for a in actions if a.launch_id}


def ago(clock: Clock, seconds: float) -> datetime:
    return clock() - timedelta(seconds=seconds)


# -- expired ---------------------------------------------------------------------------


def test_an_expired_session_is_ended_and_its_user_removed(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    expired = put_ready(ctx, hub, "hl-expired", expires_at=ago(clock, 1))
    at_expiry = put_ready(ctx, hub, "hl-at-expiry", expires_at=clock())
    later = put_ready(ctx, hub, "hl-later", expires_at=ago(clock, -1))

    actions = cull_pass(ctx)

    assert by_launch(actions) == {expired: ("expired", "ended")}
    launch = row(ctx, expired)
    assert launch.status == Status.ended and launch.end_reason == EndReason.expired
    assert launch.user_removed_at is not None and launch.lease_until is None
    assert set(hub.users) == {"hl-at-expiry", "hl-later"}
    for untouched in (at_expiry, later):
        assert row(ctx, untouched).status == Status.ready
        assert row(ctx, untouched).end_requested_at is None
    assert ("delete_user", "hl-expired") in hub.calls


# -- idle ------------------------------------------------------------------------------


def test_an_idle_session_is_ended_and_an_active_one_kept(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    idle_timeout = ctx.settings.idle_timeout
    idle = put_ready(ctx, hub, "hl-idle", active_ago=idle_timeout + 1)
    active = put_ready(ctx, hub, "hl-active", active_ago=idle_timeout - 1)
    # A server still starting is never idle, however old its activity.
    starting = put_ready(ctx, hub, "hl-starting", server="pending", active_ago=idle_timeout * 2)

    actions = cull_pass(ctx)

    assert by_launch(actions)[idle] == ("idle", "ended")
    assert row(ctx, idle).end_reason == EndReason.idle
    assert row(ctx, idle).status == Status.ended
    assert row(ctx, active).status == Status.ready and "hl-active" in hub.users
    assert starting not in by_launch(actions) and "hl-starting" in hub.users


# -- stopped ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("why", "reason"), [("", EndReason.gone), ("out of memory", EndReason.out_of_memory)]
)
def test_a_session_whose_server_stopped_is_ended_with_the_reason(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, why: str, reason: EndReason
) -> None:
    stopped = put_ready(ctx, hub, "hl-stopped", server=None)
    hub.reasons["hl-stopped"] = why
    # Ready after the listing was read (same instant): its server may not be listed yet.
    fresh = put_ready(ctx, hub, "hl-fresh", server=None, ready_at=clock())
    running = put_ready(ctx, hub, "hl-running")

    actions = cull_pass(ctx)

    assert by_launch(actions) == {stopped: ("stopped", "ended")}
    launch = row(ctx, stopped)
    assert launch.status == Status.ended and launch.end_reason == reason
    assert "hl-stopped" not in hub.users
    assert row(ctx, fresh).status == row(ctx, running).status == Status.ready


# -- stuck -----------------------------------------------------------------------------


def test_a_launch_past_its_deadline_fails_and_its_user_is_removed(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    hub.add_user("hl-stuck", created=ago(clock, 100), server="pending")
    stuck = put(ctx, Status.launching, hub_user="hl-stuck", deadline_at=ago(clock, 1))
    on_time = put(ctx, Status.launching, hub_user="hl-on-time", deadline_at=clock())

    actions = cull_pass(ctx)

    assert by_launch(actions) == {stuck: ("stuck", "failed")}
    launch = row(ctx, stuck)
    assert launch.status == Status.failed and launch.end_reason == EndReason.failed
    assert launch.error is not None and "did not start within 60 s" in launch.error
    assert launch.user_removed_at is not None and launch.token_ciphertext is None
    assert "hl-stuck" not in hub.users
    assert row(ctx, on_time).status == Status.launching


def test_a_launch_without_a_deadline_is_stuck_after_the_timeout_from_its_creation(
    ctx: WorkerContext, clock: Clock
) -> None:
    timeout = ctx.settings.launch_timeout
    old = put(ctx, deadline_at=None, created_at=ago(clock, timeout + 1))
    young = put(ctx, deadline_at=None, created_at=ago(clock, timeout - 1))

    actions = cull_pass(ctx)

    assert by_launch(actions)[old] == ("stuck", "failed")
    assert row(ctx, old).status == Status.failed
    assert row(ctx, young).status == Status.queued


def test_final_launches_are_never_stuck(ctx: WorkerContext, clock: Clock) -> None:
    ended = put(ctx, Status.ended, deadline_at=ago(clock, 100), user_removed_at=ago(clock, 100))
    assert cull_pass(ctx) == []
    assert row(ctx, ended).status == Status.ended


# -- owed removals -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [Status.failed, Status.ended])
def test_an_owed_removal_is_done_once_the_grace_has_passed(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, status: Status
) -> None:
    grace = REMOVAL_GRACE.total_seconds()
    hub.add_user("hl-owed", created=ago(clock, 3600), server="ready")
    hub.add_user("hl-recent", created=ago(clock, 3600), server="ready")
    owed = put(ctx, status, hub_user="hl-owed", updated_at=ago(clock, grace + 1))
    recent = put(ctx, status, hub_user="hl-recent", updated_at=ago(clock, grace - 1))

    actions = cull_pass(ctx)

    assert by_launch(actions) == {owed: ("removal", "ended")}
    assert row(ctx, owed).user_removed_at is not None
    assert row(ctx, owed).status == status
    assert "hl-owed" not in hub.users
    assert row(ctx, recent).user_removed_at is None and "hl-recent" in hub.users


def test_a_ready_session_whose_end_was_requested_is_removed_after_the_grace(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    grace = REMOVAL_GRACE.total_seconds()
    asked = put_ready(
        ctx, hub, "hl-asked", end_requested_at=ago(clock, 60), updated_at=ago(clock, grace + 1)
    )
    actions = cull_pass(ctx)
    assert by_launch(actions) == {asked: ("removal", "ended")}
    assert row(ctx, asked).status == Status.ended


# -- lost launches -----------------------------------------------------------------------


def test_a_quiet_launch_is_sent_again_only_after_the_quiet_period(
    ctx: WorkerContext, clock: Clock
) -> None:
    quiet = ctx.settings.redispatch_after
    lost = put(ctx, updated_at=ago(clock, quiet + 1), deadline_at=ago(clock, -600))
    moving = put(ctx, updated_at=ago(clock, quiet - 1), deadline_at=ago(clock, -600))

    first = cull_pass(ctx)

    assert by_launch(first) == {lost: ("lost", "re-sent")}
    assert sent(ctx) == [lost]
    assert as_utc(row(ctx, lost).updated_at) == clock()  # its quiet period starts again
    assert as_utc(row(ctx, moving).updated_at) == ago(clock, quiet - 1)

    # The next pass, moments later: the re-sent launch is not quiet yet; the other one now is.
    clock.advance(2)
    second = cull_pass(ctx)
    assert by_launch(second) == {moving: ("lost", "re-sent")}
    assert sent(ctx) == [lost, moving]

    clock.advance(quiet - 2)  # exactly the quiet period since the re-send: still not quiet
    assert cull_pass(ctx) == []
    clock.advance(1)
    assert by_launch(cull_pass(ctx)) == {lost: ("lost", "re-sent")}
    assert sent(ctx) == [lost, moving, lost]


def test_a_lost_launch_past_its_deadline_fails_instead_of_being_sent(
    ctx: WorkerContext, clock: Clock
) -> None:
    late = put(ctx, updated_at=ago(clock, 3600), deadline_at=ago(clock, 1))
    actions = cull_pass(ctx)
    assert by_launch(actions) == {late: ("stuck", "failed")}
    assert sent(ctx) == []


def test_a_refused_re_send_is_reported_and_tried_again_next_pass(
    ctx: WorkerContext, clock: Clock, broker: RecordingBroker
) -> None:
    quiet = ctx.settings.redispatch_after
    lost = put(ctx, updated_at=ago(clock, quiet + 1), deadline_at=ago(clock, -600))
    broker.down = True
    assert by_launch(cull_pass(ctx)) == {lost: ("lost", "error: QueueUnavailable")}
    broker.down = False
    clock.advance(quiet + 1)
    assert by_launch(cull_pass(ctx)) == {lost: ("lost", "re-sent")}
    assert sent(ctx) == [lost]


# -- ghosts ----------------------------------------------------------------------------


def test_a_ready_session_whose_user_vanished_is_marked_ended(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    ghost = put_ready(ctx, hub, "hl-ghost")
    del hub.users["hl-ghost"]
    # Became ready at the instant of the listing: not listed yet, not a ghost.
    just_ready = put(ctx, Status.ready, hub_user="hl-just-ready", ready_at=clock())
    alive = put_ready(ctx, hub, "hl-alive")

    actions = cull_pass(ctx)

    assert by_launch(actions) == {ghost: ("ghost", "marked ended")}
    launch = row(ctx, ghost)
    assert launch.status == Status.ended and launch.end_reason == EndReason.gone
    assert launch.user_removed_at is not None
    assert row(ctx, just_ready).status == row(ctx, alive).status == Status.ready
    assert not any(what in ("stop_server", "delete_user") for what, _ in hub.calls)
    assert ghost in ctx.notified  # type: ignore[attr-defined]


# -- orphans ---------------------------------------------------------------------------


def test_only_unowned_prefixed_users_older_than_the_grace_are_deleted(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    grace = ctx.settings.orphan_grace
    hub.add_user("hl-orphan", created=ago(clock, grace + 1), server="ready")
    hub.add_user("hl-young", created=ago(clock, grace - 1))
    hub.add_user("hl-admin", created=ago(clock, grace * 10), admin=True)
    hub.add_user("someone", created=ago(clock, grace * 10))
    hub.add_user("hl-unknown-age", created=ago(clock, 0))
    hub.created.pop("hl-unknown-age")
    owned = put_ready(ctx, hub, "hl-owned")
    hub.created["hl-owned"] = ago(clock, grace * 10)

    actions = cull_pass(ctx)

    assert [(a.category, a.user, a.result) for a in actions] == [("orphan", "hl-orphan", "deleted")]
    assert set(hub.users) == {"hl-young", "hl-admin", "someone", "hl-unknown-age", "hl-owned"}
    assert row(ctx, owned).status == Status.ready


def test_a_user_of_a_removed_launch_counts_as_an_orphan(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    # The launch says its user was removed, yet the Hub still lists it: nothing owns it.
    hub.add_user("hl-leftover", created=ago(clock, 3600))
    put(ctx, Status.ended, hub_user="hl-leftover", user_removed_at=ago(clock, 60))
    actions = cull_pass(ctx)
    assert [(a.category, a.user) for a in actions] == [("orphan", "hl-leftover")]
    assert hub.users == {}


# -- leases ----------------------------------------------------------------------------

CLAIMS = ["expired", "idle", "stopped", "stuck", "removal"]


def claimable(ctx: WorkerContext, hub: ListingHub, clock: Clock, category: str) -> str:
    """A launch the pass would claim as ``category``."""
    if category == "expired":
        return put_ready(ctx, hub, "hl-x", expires_at=ago(clock, 1))
    if category == "idle":
        return put_ready(ctx, hub, "hl-x", active_ago=ctx.settings.idle_timeout + 1)
    if category == "stopped":
        return put_ready(ctx, hub, "hl-x", server=None)
    hub.add_user("hl-x", created=ago(clock, 3600), server="pending")
    if category == "stuck":
        return put(ctx, Status.launching, hub_user="hl-x", deadline_at=ago(clock, 1))
    return put(ctx, Status.failed, hub_user="hl-x", updated_at=ago(clock, 60))


@pytest.mark.parametrize("category", CLAIMS)
def test_a_row_leased_by_another_pass_is_left_alone_until_the_lease_ends(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, category: str
) -> None:
    launch_id = claimable(ctx, hub, clock, category)
    with session_scope(ctx.settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        launch.lease_until = clock() + timedelta(seconds=10)
    before = row(ctx, launch_id)

    assert by_launch(cull_pass(ctx)) == {}
    assert row(ctx, launch_id).status == before.status
    assert row(ctx, launch_id).end_requested_at == before.end_requested_at

    clock.advance(11)  # the other pass died: its lease ran out
    assert by_launch(cull_pass(ctx))[launch_id][0] == category
    assert row(ctx, launch_id).lease_until is None  # released once the pass is done


@pytest.mark.parametrize("category", CLAIMS)
def test_a_claimed_row_holds_the_lease_while_its_user_is_removed(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, category: str
) -> None:
    launch_id = claimable(ctx, hub, clock, category)
    during: list[Launch] = []
    hub.on_call = lambda what, name: (
        during.append(row(ctx, launch_id)) if what == "delete_user" else None
    )

    assert by_launch(cull_pass(ctx))[launch_id][0] == category

    [held] = during
    assert held.lease_until is not None and as_utc(held.lease_until) == clock() + LEASE


def test_an_exact_lease_end_is_free(ctx: WorkerContext, hub: ListingHub, clock: Clock) -> None:
    launch_id = put_ready(ctx, hub, "hl-x", expires_at=ago(clock, 1), lease_until=clock())
    assert by_launch(cull_pass(ctx)) == {}
    clock.advance(0.001)
    assert by_launch(cull_pass(ctx)) == {launch_id: ("expired", "ended")}


# -- the Hub cannot be listed ----------------------------------------------------------


def test_without_the_listing_only_the_database_claims_run(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    expired = put_ready(ctx, hub, "hl-expired", expires_at=ago(clock, 1))
    idle = put_ready(ctx, hub, "hl-idle", active_ago=ctx.settings.idle_timeout + 1)
    hub.add_user("hl-orphan", created=ago(clock, 3600))
    hub.listing_down = True

    actions = cull_pass(ctx)

    assert by_launch(actions) == {expired: ("expired", "ended")}
    assert row(ctx, idle).status == Status.ready
    assert "hl-orphan" in hub.users


# -- dry run ---------------------------------------------------------------------------


def snapshot(ctx: WorkerContext) -> tuple[list[tuple[Any, ...]], int]:
    with session_scope(ctx.settings.database_url) as db:
        rows = [tuple(r) for r in db.execute(select(Launch.__table__).order_by(Launch.id))]
        events = db.scalar(select(func.count()).select_from(LaunchEvent)) or 0
        return rows, events


def test_a_dry_run_reports_everything_and_changes_nothing(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    quiet = ctx.settings.redispatch_after
    ids = {
        "expired": put_ready(ctx, hub, "hl-expired", expires_at=ago(clock, 1)),
        "idle": put_ready(ctx, hub, "hl-idle", active_ago=ctx.settings.idle_timeout + 1),
        "stopped": put_ready(ctx, hub, "hl-stopped", server=None),
        "stuck": put(ctx, Status.launching, hub_user="hl-stuck", deadline_at=ago(clock, 1)),
        "removal": put(ctx, Status.failed, hub_user="hl-owed", updated_at=ago(clock, 60)),
        "lost": put(ctx, updated_at=ago(clock, quiet + 1), deadline_at=ago(clock, -600)),
        "ghost": put(ctx, Status.ready, hub_user="hl-ghost", ready_at=ago(clock, 60)),
    }
    hub.add_user("hl-orphan", created=ago(clock, 3600))
    users_before = {name: dict(user["servers"]) for name, user in hub.users.items()}
    before = snapshot(ctx)

    actions = cull_pass(ctx, dry_run=True)

    assert by_launch(actions) == {
        ids["expired"]: ("expired", "would end"),
        ids["idle"]: ("idle", "would end"),
        ids["stopped"]: ("stopped", "would end"),
        ids["stuck"]: ("stuck", "would fail and remove"),
        ids["removal"]: ("removal", "would remove"),
        ids["lost"]: ("lost", "would re-send"),
        ids["ghost"]: ("ghost", "would mark ended"),
    }
    assert ("orphan", "hl-orphan", "would delete") in [
        (a.category, a.user, a.result) for a in actions
    ]
    assert snapshot(ctx) == before
    assert sent(ctx) == []
    assert ctx.notified == []  # type: ignore[attr-defined]
    assert {name: dict(user["servers"]) for name, user in hub.users.items()} == users_before
    assert {what for what, _ in hub.calls} <= {"iter_users", "stopped_reason"}


# -- what a pass reports ---------------------------------------------------------------


def test_actions_name_the_launch_and_its_user(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worker.cull")
    quiet = ctx.settings.redispatch_after
    expired = put_ready(ctx, hub, "hl-expired", expires_at=ago(clock, 1))
    lost = put(ctx, hub_user="hl-lost", updated_at=ago(clock, quiet + 1))
    ghost = put(ctx, Status.ready, hub_user="hl-ghost", ready_at=ago(clock, 60))
    hub.add_user("hl-orphan", created=ago(clock, 3600))
    expected = {
        Action("expired", "hl-expired", expired, "ended"),
        Action("lost", "hl-lost", lost, "re-sent"),
        Action("ghost", "hl-ghost", ghost, "marked ended"),
        Action("orphan", "hl-orphan", None, "deleted"),
    }
    dry = {(a.category, a.user, a.launch_id) for a in cull_pass(ctx, dry_run=True)}
    assert dry == {(a.category, a.user, a.launch_id) for a in expected}

    assert set(cull_pass(ctx)) == expected
    assert f"cull: expired hl-expired {expired}: ended" in caplog.messages
    assert "cull: orphan hl-orphan None: deleted" in caplog.messages


def test_removals_use_the_listing_and_run_on_the_pass_threads(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    threads: set[str] = set()
    hub.on_call = lambda what, name: threads.add(threading.current_thread().name)
    put_ready(ctx, hub, "hl-expired", expires_at=ago(clock, 1))
    hub.add_user("hl-orphan", created=ago(clock, 3600), server="ready")
    hub.calls.clear()
    threads.clear()

    cull_pass(ctx)

    assert "get_user" not in {what for what, _ in hub.calls}  # the listing is the state
    assert {("delete_user", "hl-expired"), ("delete_user", "hl-orphan")} <= set(hub.calls)
    workers = threads - {threading.current_thread().name}
    assert workers and all(name.startswith("cull_") for name in workers)


class CrowdedHub(ListingHub):
    """Each user deletion waits (up to a bound) for more deletions to join it, and records the
    most that ran at once: a pool larger than allowed shows up as a crowd."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed, self.active, self.most = allowed, 0, 0
        self._changed = threading.Condition()

    def delete_user(self, name: str) -> bool:
        with self._changed:
            self.active += 1
            self.most = max(self.most, self.active)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.active > self.allowed, timeout=0.3)
            self.active -= 1
        return super().delete_user(name)


def test_hub_work_runs_at_most_cull_concurrency_at_once(ctx: WorkerContext, clock: Clock) -> None:
    hub = CrowdedHub(allowed=2)
    ctx.hub = hub  # type: ignore[assignment]
    ctx.settings = ctx.settings.model_copy(update={"cull_concurrency": 2})
    for n in range(5):
        put_ready(ctx, hub, f"hl-crowd{n}", expires_at=ago(clock, 1))

    actions = cull_pass(ctx)

    assert [a.result for a in actions].count("ended") == 5
    assert hub.most == 2  # the pool was used, and never beyond its bound


class RefusingHub(ListingHub):
    def delete_user(self, name: str) -> bool:
        if name.startswith("hl-refused"):
            self._call("delete_user", name)
            raise HubRequestError("Hub answered 403", status=403)
        return super().delete_user(name)


def test_one_users_failure_is_reported_and_never_stops_the_pass(
    ctx: WorkerContext, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = RefusingHub()
    ctx.hub = hub  # type: ignore[assignment]
    refused = put_ready(ctx, hub, "hl-refused", expires_at=ago(clock, 1))
    fine = put_ready(ctx, hub, "hl-fine", expires_at=ago(clock, 1))
    hub.add_user("hl-refused-orphan", created=ago(clock, 3600))

    actions = set(cull_pass(ctx))

    assert actions == {
        Action("expired", "hl-refused", refused, "error: HubRequestError"),
        Action("expired", "hl-fine", fine, "ended"),
        Action("orphan", "hl-refused-orphan", None, "error: HubRequestError"),
    }
    assert f"cull: removing hl-refused (launch {refused}) failed" in caplog.messages
    assert "cull: removing orphan hl-refused-orphan failed" in caplog.messages
    assert row(ctx, refused).user_removed_at is None  # owed: a later pass tries again
    assert row(ctx, refused).lease_until is None


def test_a_server_still_stopping_is_left_to_a_later_pass(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.teardown.STOP_WAIT_SECONDS", 0)
    monkeypatch.setattr("worker.cull.STOP_WAIT_SECONDS", 0)
    hub.stop_pending_rounds = 100
    expired = put_ready(ctx, hub, "hl-expired", expires_at=ago(clock, 1))
    hub.add_user("hl-orphan", created=ago(clock, 3600), server="ready")

    assert set(cull_pass(ctx)) == {
        Action("expired", "hl-expired", expired, "stopping; finished by a later pass"),
        Action("orphan", "hl-orphan", None, "stopping; next pass"),
    }
    assert row(ctx, expired).user_removed_at is None


def test_an_orphan_whose_server_stops_slowly_is_deleted_in_the_same_pass(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    hub.stop_pending_rounds = 1  # the Hub answers the stop with 202, then it is gone
    hub.add_user("hl-orphan", created=ago(clock, 3600), server="ready")
    assert cull_pass(ctx) == [Action("orphan", "hl-orphan", None, "deleted")]
    assert hub.users == {}


def test_a_pass_that_cannot_list_the_hub_says_so(
    ctx: WorkerContext, hub: ListingHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub.listing_down = True
    cull_pass(ctx)
    assert (
        "cull: cannot list the users of Hub default: Hub unreachable: ConnectError"
        in caplog.messages
    )


# -- idle: which activity counts -----------------------------------------------------------


def test_idle_reads_the_servers_activity_then_the_users_then_its_creation(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    old, recent = ctx.settings.idle_timeout + 1, 1.0
    # Listed first, and not idle: the users after it are still looked at.
    put_ready(ctx, hub, "hl-pending", server="pending", active_ago=old)
    by_server = put_ready(ctx, hub, "hl-by-server", active_ago=old)
    hub.server_activity["hl-by-server"] = ago(clock, recent)  # the server counts first
    by_user = put_ready(ctx, hub, "hl-by-user", active_ago=old)
    hub.server_activity["hl-by-user"] = None
    by_created = put_ready(ctx, hub, "hl-by-created", active_ago=old)
    hub.server_activity["hl-by-created"] = None
    del hub.activity["hl-by-created"]
    hub.created["hl-by-created"] = ago(clock, recent)
    user_not_created = put_ready(ctx, hub, "hl-user-first", active_ago=old)
    hub.server_activity["hl-user-first"] = None
    hub.created["hl-user-first"] = ago(clock, recent)
    at_cutoff = put_ready(ctx, hub, "hl-at-cutoff", active_ago=ctx.settings.idle_timeout)

    idle = {a.launch_id for a in cull_pass(ctx) if a.category == "idle"}

    assert idle == {by_user, user_not_created}
    for kept in (by_server, by_created, at_cutoff):
        assert row(ctx, kept).status == Status.ready


# -- edges of each claim -----------------------------------------------------------------


def test_each_claim_stops_exactly_at_its_limit(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    timeout, grace = ctx.settings.launch_timeout, REMOVAL_GRACE.total_seconds()
    not_stuck = put(ctx, deadline_at=None, created_at=ago(clock, timeout), updated_at=clock())
    not_owed = put(ctx, Status.failed, hub_user="hl-failed", updated_at=ago(clock, grace))
    due = put(ctx, updated_at=ago(clock, 3600), deadline_at=clock())  # not past it yet
    hub.add_user("hl-young", created=ago(clock, ctx.settings.orphan_grace))

    assert by_launch(cull_pass(ctx)) == {due: ("lost", "re-sent")}
    assert row(ctx, not_stuck).status == Status.queued
    assert row(ctx, not_owed).user_removed_at is None
    assert "hl-young" in hub.users


def test_a_launch_without_a_deadline_is_sent_again_when_quiet(
    ctx: WorkerContext, clock: Clock
) -> None:
    ctx.settings = ctx.settings.model_copy(update={"launch_timeout": 600})
    quiet = ctx.settings.redispatch_after
    lost = put(
        ctx, deadline_at=None, created_at=ago(clock, quiet + 1), updated_at=ago(clock, quiet + 1)
    )
    assert by_launch(cull_pass(ctx)) == {lost: ("lost", "re-sent")}


def test_launches_whose_user_is_removed_are_never_claimed_again(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    hub.add_user("hl-listed", created=ago(clock, 60), server="ready")
    removed = ago(clock, 3600)
    old = ago(clock, 3600)
    # What every finished launch looks like: nothing is owed.
    put(ctx, Status.failed, hub_user="hl-a", updated_at=old, user_removed_at=removed)
    put(ctx, Status.ended, hub_user="hl-b", updated_at=old, user_removed_at=removed)
    # Made by hand (no transition leaves a live launch with its user removed): the claims
    # keep to the rows whose user may exist, as the partial index ix_launches_active does.
    put(ctx, Status.ready, hub_user="hl-c", expires_at=old, ready_at=old, user_removed_at=removed)
    put(ctx, Status.launching, deadline_at=old, updated_at=old, user_removed_at=removed)
    put(ctx, updated_at=old, deadline_at=ago(clock, -600), user_removed_at=removed)
    put(ctx, Status.ready, hub_user="hl-listed", ready_at=old, user_removed_at=removed)
    put(ctx, Status.ready, hub_user="hl-unlisted", ready_at=old, user_removed_at=removed)

    assert cull_pass(ctx, dry_run=True) == []
    assert cull_pass(ctx) == []
    assert sent(ctx) == []


def test_a_starting_launch_whose_end_was_requested_is_left_to_its_task(
    ctx: WorkerContext, clock: Clock
) -> None:
    """The launch task sees the request and tears down itself; the pass only makes sure a
    task runs (a quiet launch is sent again), it does not remove the user under it."""
    quiet = ctx.settings.redispatch_after
    asked = put(
        ctx,
        Status.launching,
        hub_user="hl-asked",
        end_requested_at=ago(clock, quiet + 1),
        updated_at=ago(clock, quiet + 1),
        deadline_at=ago(clock, -600),
    )
    assert by_launch(cull_pass(ctx)) == {asked: ("lost", "re-sent")}


def test_a_ready_session_being_ended_whose_user_vanished_is_no_ghost(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    ending = put(ctx, Status.ready, hub_user="hl-gone", ready_at=ago(clock, 60))
    with session_scope(ctx.settings.database_url) as db:
        launch = db.get(Launch, ending)
        assert launch is not None
        launch.end_requested_at = launch.updated_at = clock()  # its teardown is on the way
    assert cull_pass(ctx) == []
    assert row(ctx, ending).status == Status.ready


def test_many_rows_are_claimed_in_chunks(
    ctx: WorkerContext, hub: ListingHub, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.cull.CHUNK", 2)
    ghosts = {
        put(ctx, Status.ready, hub_user=f"hl-g{i}", ready_at=ago(clock, 60)) for i in range(5)
    }
    stopped = {put_ready(ctx, hub, f"hl-s{i}", server=None) for i in range(5)}
    for i in range(5):
        hub.add_user(f"hl-o{i}", created=ago(clock, 3600))

    actions = cull_pass(ctx)

    assert {a.launch_id for a in actions if a.category == "ghost"} == ghosts
    assert {a.launch_id for a in actions if a.category == "stopped"} == stopped
    assert len([a for a in actions if a.category == "orphan"]) == 5


def test_a_dry_run_reports_what_a_real_run_then_does(
    ctx: WorkerContext, hub: ListingHub, clock: Clock
) -> None:
    """Rows at the edges of several claims: what the dry run reports is what happens."""
    old = ago(clock, 3600)
    quiet = ctx.settings.redispatch_after
    # Ready sessions past the starting deadline they once had, quiet for long: not stuck, not
    # lost.
    put_ready(ctx, hub, "hl-ready", deadline_at=old, updated_at=old)
    put_ready(ctx, hub, "hl-fresh-ready", deadline_at=ago(clock, -600), updated_at=old)
    # Expired, but its end was already asked for recently: nothing to do yet.
    put_ready(ctx, hub, "hl-asked", expires_at=old, end_requested_at=clock(), updated_at=clock())
    # Idle by the Hub's account, but still launching: not a session to end yet.
    hub.add_user("hl-launching", created=old, server="ready", activity=old)
    put(ctx, Status.launching, hub_user="hl-launching", updated_at=clock())
    # Quiet and past its deadline: failed, not sent again.
    put(ctx, updated_at=ago(clock, quiet + 1), deadline_at=ago(clock, 1))
    # Ended, user still owed, not listed: a removal, not a ghost.
    put(ctx, Status.ended, hub_user="hl-owed", ready_at=old, updated_at=ago(clock, 10))

    dry = {(a.category, a.launch_id, a.user) for a in cull_pass(ctx, dry_run=True)}
    real = {(a.category, a.launch_id, a.user) for a in cull_pass(ctx)}

    assert dry == real
    assert {category for category, _, _ in real} == {"stuck"}


def test_names_are_claimed_in_chunks_of_the_chunk_size() -> None:
    # One query per CHUNK names: few round trips, and never more bound parameters than a
    # database accepts in one statement.
    from worker.cull import CHUNK, _chunks

    sizes = [len(chunk) for chunk in _chunks(str(n) for n in range(2 * CHUNK + 1))]
    assert sizes == [CHUNK, CHUNK, 1]


# -- several Hubs (issue 14) ------------------------------------------------------------


def on_hub(ctx: WorkerContext, launch_id: str, name: str) -> str:
    with session_scope(ctx.settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        launch.hub = name
    return launch_id


@pytest.fixture
def two_hubs(ctx: WorkerContext, hub: ListingHub) -> dict[str, ListingHub]:
    other = ListingHub(name="b")
    hub.name = "a"
    ctx.hubs = {"a": hub, "b": other}  # type: ignore[dict-item]
    return {"a": hub, "b": other}


def test_a_pass_covers_every_hub_and_acts_on_each_users_own_hub(
    ctx: WorkerContext, two_hubs: dict[str, ListingHub]
) -> None:
    a, b = two_hubs["a"], two_hubs["b"]
    now = ctx.clock()
    idle_on_b = on_hub(ctx, put_ready(ctx, b, "hl-idle-b", active_ago=3600), "b")
    busy_on_a = on_hub(ctx, put_ready(ctx, a, "hl-busy-a"), "a")
    b.add_user("hl-orphan-b", created=now - timedelta(hours=2))
    # A user named like a live launch of hub "a", but on hub "b": left behind on "b" when its
    # launch was placed again; an orphan there, and the launch on "a" is untouched.
    a.add_user("hl-moved", created=now - timedelta(hours=2), server="ready", activity=now)
    b.add_user("hl-moved", created=now - timedelta(hours=2))
    put(
        ctx,
        Status.ready,
        hub_user="hl-moved",
        hub="a",
        ready_at=now,
        expires_at=now + timedelta(hours=1),
    )

    actions = cull_pass(ctx)

    assert by_launch(actions)[idle_on_b] == ("idle", "ended")
    assert ("delete_user", "hl-idle-b") in b.calls and ("delete_user", "hl-idle-b") not in a.calls
    orphans = {a_.user for a_ in actions if a_.category == "orphan"}
    assert orphans == {"hl-orphan-b", "hl-moved"}
    assert "hl-moved" in a.users and "hl-moved" not in b.users
    assert row(ctx, busy_on_a).status == Status.ready


def test_a_hub_that_cannot_be_listed_keeps_its_sessions_and_the_rest_go_on(
    ctx: WorkerContext, two_hubs: dict[str, ListingHub]
) -> None:
    b = two_hubs["b"]
    on_b = on_hub(ctx, put_ready(ctx, b, "hl-on-b"), "b")
    b.users.clear()  # as if gone, but b cannot be asked: not taken for a ghost
    b.listing_down = True
    gone_on_a = put(
        ctx,
        Status.ready,
        hub_user="hl-gone-a",
        hub="a",
        ready_at=ctx.clock() - timedelta(minutes=5),
        expires_at=ctx.clock() + timedelta(hours=1),
    )
    actions = cull_pass(ctx)
    assert row(ctx, on_b).status == Status.ready
    assert by_launch(actions)[gone_on_a] == ("ghost", "marked ended")
