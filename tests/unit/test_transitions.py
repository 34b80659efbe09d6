"""The launch state machine, one transition at a time, on both databases: the table, the
fields and events each move writes, and the conditional UPDATEs that decide races (two runs
interleaved by hand, each in its own unit of work)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.fakes import insert_launch
from tests.unit.conftest import Clock
from worker import transitions
from worker.broker import launch_message
from worker.db import as_utc, session_scope
from worker.models import EndReason, Launch, LaunchEvent, Phase, Status
from worker.settings import Settings
from worker.transitions import ALLOWED, FailReason, IllegalTransition
from worker.unit_of_work import UnitOfWork, Units

SPEC = {"image": "default"}


@pytest.fixture
def units(settings: Settings) -> Units:
    from tests.fakes import RecordingBroker

    return Units(settings.database_url, RecordingBroker(settings.database_url))


FAIL = FailReason.internal_error


def put(settings: Settings, now: datetime, status: Status = Status.queued, **fields: Any) -> str:
    with session_scope(settings.database_url) as db:
        launch = insert_launch(db, SPEC, lifetime=300, now=now)
        launch.status = status
        for name, value in fields.items():
            setattr(launch, name, value)
        return launch.id


def load(settings: Settings, launch_id: str) -> Launch:
    with session_scope(settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        return launch


def events(settings: Settings, launch_id: str) -> list[tuple[Phase, str]]:
    with session_scope(settings.database_url) as db:
        query = select(LaunchEvent).where(LaunchEvent.launch_id == launch_id)
        return [(e.phase, e.message) for e in db.scalars(query.order_by(LaunchEvent.id))]


def at(value: datetime | None) -> datetime:
    """A stored time, which must be there (SQLite hands it back without its zone)."""
    assert value is not None
    return as_utc(value)


def get(uow: UnitOfWork, launch_id: str) -> Launch:
    launch = uow.db.get(Launch, launch_id)
    assert launch is not None
    return launch


# -- the table -------------------------------------------------------------------------


def test_the_table() -> None:
    assert {
        Status.queued: {Status.building, Status.launching, Status.failed, Status.ended},
        Status.building: {Status.launching, Status.failed, Status.ended},
        # Back in line: its Hub failed before its user existed (several Hubs, issue 14).
        Status.launching: {Status.ready, Status.pooled, Status.failed, Status.ended, Status.queued},
        Status.pooled: {Status.ended},
        Status.ready: {Status.ended},
        Status.failed: set(),
        Status.ended: set(),
    } == ALLOWED
    assert set(transitions.sources(Status.launching)) == {Status.queued, Status.building}
    assert set(transitions.sources(Status.ready)) == {Status.launching}
    assert set(transitions.sources(Status.failed)) == {
        Status.queued,
        Status.building,
        Status.launching,
    }
    assert transitions.sources(Status.queued) == (Status.launching,)  # unplace only


@pytest.mark.parametrize("source", [Status.launching, Status.ready, Status.failed, Status.ended])
def test_building_only_from_queued(
    settings: Settings, units: Units, clock: Clock, source: Status
) -> None:
    launch_id = put(settings, clock(), source)
    with pytest.raises(IllegalTransition, match=f"{source} -> building"), units.begin() as uow:
        transitions.mark_building(uow, get(uow, launch_id), deadline=clock(), now=clock())
    assert load(settings, launch_id).status == source


@pytest.mark.parametrize("source", [Status.failed, Status.ended])
def test_final_launches_neither_fail_nor_end_again(
    settings: Settings, units: Units, clock: Clock, source: Status
) -> None:
    launch_id = put(settings, clock(), source)
    with pytest.raises(IllegalTransition), units.begin() as uow:
        transitions.mark_failed(uow, get(uow, launch_id), "no", reason=FAIL, now=clock())
    with pytest.raises(IllegalTransition), units.begin() as uow:
        transitions.mark_ended(uow, get(uow, launch_id), now=clock())
    assert events(settings, launch_id) == [(Phase.waiting, "Launch of image default queued")]


def test_a_ready_launch_cannot_fail(settings: Settings, units: Units, clock: Clock) -> None:
    launch_id = put(settings, clock(), Status.ready, hub_user="hl-x")
    with pytest.raises(IllegalTransition), units.begin() as uow:
        transitions.mark_failed(uow, get(uow, launch_id), "no", reason=FAIL, now=clock())


# -- one launch ------------------------------------------------------------------------


def test_create_queues_with_a_deadline_and_one_event(
    settings: Settings, units: Units, clock: Clock
) -> None:
    with units.begin() as uow:
        launch = transitions.create(uow, SPEC, lifetime=300, timeout=90, now=clock())
    stored = load(settings, launch.id)
    assert stored.status == Status.queued and stored.lifetime == 300
    assert as_utc(stored.created_at) == as_utc(stored.updated_at) == clock()
    assert at(stored.deadline_at) == clock() + timedelta(seconds=90)
    assert events(settings, launch.id) == [(Phase.waiting, "Launch of image default queued")]
    assert len(launch.id) >= 22


def test_mark_building_sets_the_deadline_and_says_what_it_resolves(
    settings: Settings, units: Units, clock: Clock
) -> None:
    with session_scope(settings.database_url) as db:
        launch = insert_launch(db, {"repo": "https://example.org/r", "ref": "v1"}, lifetime=60)
        launch_id = launch.id
    clock.advance(5)
    with units.begin() as uow:
        transitions.mark_building(
            uow, get(uow, launch_id), deadline=clock() + timedelta(hours=1), now=clock()
        )
    stored = load(settings, launch_id)
    assert stored.status == Status.building
    assert as_utc(stored.updated_at) == clock()
    assert at(stored.deadline_at) == clock() + timedelta(hours=1)
    assert events(settings, launch_id)[-1] == (Phase.fetching, "Resolving https://example.org/r@v1")


def test_the_first_resolved_commit_is_kept(settings: Settings, units: Units, clock: Clock) -> None:
    launch_id = put(settings, clock(), Status.building)
    with units.begin() as uow:
        transitions.record_commit(uow, launch_id, "a" * 40, "env-a", clock())
    with units.begin() as uow:
        transitions.record_commit(uow, launch_id, "b" * 40, "env-b", clock())
    stored = load(settings, launch_id)
    assert (stored.commit, stored.env_name) == ("a" * 40, "env-a")


def test_mark_launching_chooses_one_name_and_says_so_once(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock())
    deadline = clock() + timedelta(seconds=60)
    with units.begin() as uow:
        name = transitions.mark_launching(
            uow, get(uow, launch_id), user_prefix="hl-", deadline=deadline, now=clock()
        )
    with units.begin() as uow:
        again = transitions.mark_launching(
            uow, get(uow, launch_id), user_prefix="hl-", deadline=deadline, now=clock()
        )
    assert again == name and name.startswith("hl-") and len(name) == 3 + 16
    stored = load(settings, launch_id)
    assert stored.status == Status.launching and stored.hub_user == name
    assert at(stored.deadline_at) == deadline
    assert [p for p, _ in events(settings, launch_id)] == [
        Phase.waiting,
        Phase.built,
        Phase.launching,
    ]


def test_concurrent_runs_of_mark_launching_agree_on_one_name(
    settings: Settings, units: Units, clock: Clock
) -> None:
    """Two runs of the same launch (a redelivered message) both read the row before either
    chose a name; the second must take the first's name, not write its own."""
    launch_id = put(settings, clock())
    deadline = clock() + timedelta(seconds=60)
    with units.begin() as first, units.begin() as second:
        mine, theirs = get(first, launch_id), get(second, launch_id)
        assert mine.hub_user is None and theirs.hub_user is None
        # The first commits before the second writes (on PostgreSQL the second's UPDATE would
        # otherwise wait for the first's row lock, then re-check its WHERE: the same outcome).
        chosen = transitions.mark_launching(
            first, mine, user_prefix="hl-", deadline=deadline, now=clock()
        )
        first.db.commit()
        taken = transitions.mark_launching(
            second, theirs, user_prefix="hl-", deadline=deadline, now=clock()
        )
    assert taken == chosen == load(settings, launch_id).hub_user
    assert [p for p, _ in events(settings, launch_id)].count(Phase.launching) == 1


def test_a_name_already_written_is_never_replaced(
    settings: Settings, units: Units, clock: Clock
) -> None:
    """The name guard stands on its own, not only on the status check: a run that read the row
    before the name was written keeps that name even where the status would still allow the
    move. (Today only mark_launching writes a name, and it moves the status in the same
    UPDATE, so this state is made by hand.)"""
    launch_id = put(settings, clock())
    with units.begin() as late:
        stale = get(late, launch_id)
        assert stale.hub_user is None
        with session_scope(settings.database_url) as db:
            db.execute(update(Launch).where(Launch.id == launch_id).values(hub_user="hl-first"))
        name = transitions.mark_launching(
            late, stale, user_prefix="hl-", deadline=clock(), now=clock()
        )
    assert name == load(settings, launch_id).hub_user == "hl-first"
    assert Phase.launching not in [p for p, _ in events(settings, launch_id)]


@pytest.mark.parametrize("source", [Status.ready, Status.failed, Status.ended])
def test_mark_launching_from_a_later_status_is_illegal(
    settings: Settings, units: Units, clock: Clock, source: Status
) -> None:
    launch_id = put(settings, clock(), source)
    with pytest.raises(IllegalTransition), units.begin() as uow:
        transitions.mark_launching(
            uow, get(uow, launch_id), user_prefix="hl-", deadline=clock(), now=clock()
        )
    assert load(settings, launch_id).hub_user is None


def test_a_repository_launch_says_nothing_about_an_image(
    settings: Settings, units: Units, clock: Clock
) -> None:
    with session_scope(settings.database_url) as db:
        launch = insert_launch(db, {"repo": "https://example.org/r"}, lifetime=60, now=clock())
        launch.status = Status.building
        launch_id = launch.id
    with units.begin() as uow:
        transitions.mark_launching(
            uow, get(uow, launch_id), user_prefix="hl-", deadline=clock(), now=clock()
        )
    assert events(settings, launch_id)[-1] == (Phase.launching, "Launching server...")
    assert Phase.built not in [p for p, _ in events(settings, launch_id)]


def test_mark_ready_stores_the_token_and_the_expiry(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock(), Status.launching, hub_user="hl-x")
    clock.advance(7)
    with units.begin() as uow:
        assert transitions.mark_ready(
            uow, get(uow, launch_id), token_ciphertext="ct", public_url="https://h", now=clock()
        )
    stored = load(settings, launch_id)
    assert stored.status == Status.ready and stored.token_ciphertext == "ct"
    assert at(stored.ready_at) == as_utc(stored.updated_at) == clock()
    assert at(stored.expires_at) == clock() + timedelta(seconds=300)
    assert events(settings, launch_id)[-1] == (Phase.ready, "Server ready")
    with session_scope(settings.database_url) as db:
        last = db.scalars(select(LaunchEvent).order_by(LaunchEvent.id.desc())).first()
        assert last is not None and last.data == {"url": "https://h/user/hl-x/"}


def test_mark_ready_loses_to_a_requested_end(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock(), Status.launching, hub_user="hl-x")
    with units.begin() as starting, units.begin() as owner:
        running = get(starting, launch_id)
        assert not transitions.request_end(owner, get(owner, launch_id), now=clock())
        owner.db.commit()
        assert not transitions.mark_ready(
            starting, running, token_ciphertext="ct", public_url="https://h", now=clock()
        )
    stored = load(settings, launch_id)
    assert stored.status == Status.launching and stored.token_ciphertext is None


def test_mark_ready_twice_says_ready_once(settings: Settings, units: Units, clock: Clock) -> None:
    launch_id = put(settings, clock(), Status.launching, hub_user="hl-x")
    results = []
    for _ in range(2):
        with units.begin() as uow:
            results.append(
                transitions.mark_ready(
                    uow, get(uow, launch_id), token_ciphertext="c", public_url="h", now=clock()
                )
            )
    assert results == [True, False]
    assert [p for p, _ in events(settings, launch_id)].count(Phase.ready) == 1


@pytest.mark.parametrize("removed", [False, True])
def test_mark_failed_ends_the_launch_with_its_message(
    settings: Settings, units: Units, clock: Clock, removed: bool
) -> None:
    launch_id = put(settings, clock(), Status.launching, token_ciphertext="ct")
    with units.begin() as uow:
        transitions.mark_failed(
            uow, get(uow, launch_id), "it broke", reason=FAIL, now=clock(), user_removed=removed
        )
        assert uow.notices == [launch_id]
    stored = load(settings, launch_id)
    assert stored.status == Status.failed and stored.error == "it broke"
    assert stored.end_reason == EndReason.failed and stored.token_ciphertext is None
    assert at(stored.ended_at) == clock()
    assert (stored.user_removed_at is not None) == removed
    assert events(settings, launch_id)[-1] == (Phase.failed, "it broke")


@pytest.mark.parametrize("source", [Status.queued, Status.building, Status.launching])
def test_ending_a_starting_launch_tells_watchers_it_will_not_be_ready(
    settings: Settings, units: Units, clock: Clock, source: Status
) -> None:
    launch_id = put(settings, clock(), source)
    with units.begin() as uow:
        transitions.mark_ended(uow, get(uow, launch_id), now=clock())
    stored = load(settings, launch_id)
    assert stored.status == Status.ended and stored.end_reason == EndReason.requested
    assert events(settings, launch_id)[-1] == (Phase.failed, transitions.ENDED_BEFORE_READY)


def test_ending_a_ready_launch_keeps_its_reason_and_drops_its_token(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(
        settings,
        clock(),
        Status.ready,
        hub_user="hl-x",
        token_ciphertext="ct",
        end_reason=EndReason.idle,
    )
    with units.begin() as uow:
        transitions.mark_ended(uow, get(uow, launch_id), now=clock())
        assert uow.notices == [launch_id]
    stored = load(settings, launch_id)
    assert stored.status == Status.ended and stored.end_reason == EndReason.idle
    assert stored.token_ciphertext is None and at(stored.ended_at) == clock()
    assert [p for p, _ in events(settings, launch_id)] == [Phase.waiting]


@pytest.mark.parametrize(
    ("status", "removed", "send"),
    [
        (Status.queued, False, False),
        (Status.building, False, False),
        (Status.launching, False, False),
        (Status.ready, False, True),
        (Status.failed, False, True),
        (Status.ended, False, True),
        (Status.failed, True, False),
        (Status.ended, True, False),
    ],
)
def test_request_end_says_when_a_teardown_is_owed(
    settings: Settings, units: Units, clock: Clock, status: Status, removed: bool, send: bool
) -> None:
    removed_at = clock() if removed else None
    launch_id = put(settings, clock(), status, user_removed_at=removed_at)
    clock.advance(3)
    with units.begin() as uow:
        assert transitions.request_end(uow, get(uow, launch_id), now=clock()) is send
    stored = load(settings, launch_id)
    assert at(stored.end_requested_at) == clock()
    assert as_utc(stored.updated_at) == clock()


def test_a_second_request_end_changes_nothing(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock(), Status.ready, hub_user="hl-x")
    with units.begin() as uow:
        transitions.request_end(uow, get(uow, launch_id), now=clock())
    clock.advance(10)
    with units.begin() as uow:
        transitions.request_end(uow, get(uow, launch_id), now=clock())
    stored = load(settings, launch_id)
    assert at(stored.end_requested_at) == as_utc(stored.updated_at)
    assert as_utc(stored.updated_at) == clock() - timedelta(seconds=10)


def test_a_removed_user_ends_a_live_launch(settings: Settings, units: Units, clock: Clock) -> None:
    launch_id = put(settings, clock(), Status.ready, hub_user="hl-x", token_ciphertext="ct")
    clock.advance(1)
    with units.begin() as uow:
        transitions.mark_user_removed(uow, get(uow, launch_id), now=clock())
        assert uow.notices == [launch_id]
    stored = load(settings, launch_id)
    assert stored.status == Status.ended and at(stored.user_removed_at) == clock()
    assert stored.token_ciphertext is None and as_utc(stored.updated_at) == clock()


def test_a_removed_user_leaves_a_failed_launch_failed(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock(), Status.failed, hub_user="hl-x")
    with units.begin() as uow:
        transitions.mark_user_removed(uow, get(uow, launch_id), now=clock())
        assert uow.notices == [launch_id]
    stored = load(settings, launch_id)
    assert stored.status == Status.failed and stored.user_removed_at is not None


def test_progress_notes_move_the_launch_clock_and_others_do_not(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock(), Status.launching)
    clock.advance(5)
    with units.begin() as uow:
        transitions.note(uow, get(uow, launch_id), Phase.launching, "quiet", now=clock())
    assert as_utc(load(settings, launch_id).updated_at) == clock() - timedelta(seconds=5)
    with units.begin() as uow:
        transitions.note(
            uow, get(uow, launch_id), Phase.launching, "moving", now=clock(), progress=True
        )
        assert uow.notices == [launch_id]
    assert as_utc(load(settings, launch_id).updated_at) == clock()
    assert events(settings, launch_id)[-2:] == [
        (Phase.launching, "quiet"),
        (Phase.launching, "moving"),
    ]


# -- many launches at once -------------------------------------------------------------


def test_fail_stuck_fails_only_starting_launches(
    settings: Settings, units: Units, clock: Clock
) -> None:
    ids = {status: put(settings, clock(), status) for status in Status}
    with units.begin() as uow:
        claimed = transitions.fail_stuck(
            uow, Launch.id.in_(ids.values()), "late", lease=clock(), now=clock()
        )
        assert set(uow.notices) == {ids[s] for s in transitions.STARTING}
    assert {launch_id for launch_id, _ in claimed} == {ids[s] for s in transitions.STARTING}
    for status, launch_id in ids.items():
        stored = load(settings, launch_id)
        if status in transitions.STARTING:
            assert stored.status == Status.failed and stored.error == "late"
            assert stored.end_reason == EndReason.failed
            assert at(stored.lease_until) == clock()
            assert events(settings, launch_id)[-1] == (Phase.failed, "late")
        else:
            assert stored.status == status and stored.lease_until is None


def test_request_ends_claims_only_ready_launches_not_yet_asked(
    settings: Settings, units: Units, clock: Clock
) -> None:
    ids = {status: put(settings, clock(), status) for status in Status}
    asked = put(settings, clock(), Status.ready, end_requested_at=clock() - timedelta(1))
    lease = clock() + timedelta(minutes=5)
    with units.begin() as uow:
        claimed = transitions.request_ends(
            uow, Launch.id.in_([*ids.values(), asked]), EndReason.idle, lease=lease, now=clock()
        )
    assert [launch_id for launch_id, _ in claimed] == [ids[Status.ready]]
    stored = load(settings, ids[Status.ready])
    assert stored.end_reason == EndReason.idle and stored.status == Status.ready
    assert at(stored.lease_until) == lease
    assert load(settings, asked).end_reason is None


def test_end_gone_ends_only_ready_or_pooled_launches_with_a_user_owed(
    settings: Settings, units: Units, clock: Clock
) -> None:
    ids = {status: put(settings, clock(), status) for status in Status}
    removed = put(settings, clock(), Status.ready, user_removed_at=clock() - timedelta(1))
    with units.begin() as uow:
        claimed = transitions.end_gone(uow, [*ids.values(), removed], now=clock())
        gone = {ids[Status.ready], ids[Status.pooled]}
        assert set(uow.notices) == gone
    assert {launch_id for launch_id, _ in claimed} == gone
    for launch_id in gone:
        stored = load(settings, launch_id)
        assert stored.status == Status.ended and stored.end_reason == EndReason.gone
        assert at(stored.user_removed_at) == clock()
    assert load(settings, removed).status == Status.ready


def test_resend_quiet_sends_only_starting_launches_after_the_commit(
    settings: Settings, units: Units, clock: Clock
) -> None:
    ids = {status: put(settings, clock(), status) for status in Status}
    clock.advance(60)
    with units.begin() as uow:
        claimed = transitions.resend_quiet(uow, Launch.id.in_(ids.values()), now=clock())
        starting = {ids[s] for s in transitions.STARTING}
        assert {m.argument for m in uow.messages} == starting
    assert {launch_id for launch_id, _ in claimed} == starting
    assert {m.argument for m in units.broker.sent} == starting  # type: ignore[attr-defined]
    assert units.broker.sent[0] == launch_message(next(iter(claimed))[0])  # type: ignore[attr-defined]
    for status, launch_id in ids.items():
        moved = as_utc(load(settings, launch_id).updated_at) == clock()
        assert moved == (status in transitions.STARTING)


# -- text ------------------------------------------------------------------------------


def test_texts() -> None:
    assert transitions.describe_spec({"image": "x"}) == "image x"
    assert transitions.describe_spec({"repo": "https://r"}) == "https://r@HEAD"
    assert transitions.describe_spec({"repo": "https://r", "ref": "v"}) == "https://r@v"
    assert transitions.printable("a\x00b") == "a\ufffdb"
    assert transitions.timeout_message(5) == (
        "The server did not start within 5 s. Try again in a few minutes."
    )
    assert transitions.timeout_message(5, "down") == (
        "The server did not start within 5 s (last problem: down). Try again in a few minutes."
    )
    assert str(IllegalTransition("i", Status.ready, Status.failed)) == (
        "launch i: ready -> failed is not allowed"
    )
    assert transitions.new_hub_user_name("p-").startswith("p-")
    assert transitions.new_hub_user_name("p-") != transitions.new_hub_user_name("p-")


# -- each conditional UPDATE touches its own row only ----------------------------------


def test_moves_of_one_launch_leave_the_others_alone(
    settings: Settings, units: Units, clock: Clock
) -> None:
    mine = put(settings, clock(), Status.launching, hub_user="hl-mine")
    other = put(settings, clock(), Status.launching, hub_user="hl-other")
    queued = put(settings, clock())
    bystander = put(settings, clock())
    with units.begin() as uow:
        transitions.mark_ready(
            uow, get(uow, mine), token_ciphertext="c", public_url="h", now=clock()
        )
        transitions.request_end(uow, get(uow, mine), now=clock())
        transitions.mark_launching(
            uow, get(uow, queued), user_prefix="hl-", deadline=clock(), now=clock()
        )
        transitions.record_commit(uow, queued, "a" * 40, "env", clock())
    assert load(settings, other).status == Status.launching
    assert load(settings, other).end_requested_at is None
    assert load(settings, bystander).status == Status.queued
    assert load(settings, bystander).hub_user is None
    assert load(settings, bystander).commit is None


def test_mark_launching_and_record_commit_move_the_launch_clock(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock())
    clock.advance(9)
    with units.begin() as uow:
        transitions.record_commit(uow, launch_id, "a" * 40, "env", clock())
    assert at(load(settings, launch_id).updated_at) == clock()
    clock.advance(9)
    with units.begin() as uow:
        transitions.mark_launching(
            uow, get(uow, launch_id), user_prefix="hl-", deadline=clock(), now=clock()
        )
    assert at(load(settings, launch_id).updated_at) == clock()


def test_illegal_moves_name_the_launch_and_the_move(
    settings: Settings, units: Units, clock: Clock
) -> None:
    launch_id = put(settings, clock(), Status.ended)
    with pytest.raises(IllegalTransition) as moved, units.begin() as uow:
        transitions.mark_building(uow, get(uow, launch_id), deadline=clock(), now=clock())
    assert str(moved.value) == f"launch {launch_id}: ended -> building is not allowed"
    with pytest.raises(IllegalTransition) as named, units.begin() as uow:
        transitions.mark_launching(
            uow, get(uow, launch_id), user_prefix="hl-", deadline=clock(), now=clock()
        )
    assert str(named.value) == f"launch {launch_id}: ended -> launching is not allowed"


def test_launch_ids_carry_128_bits() -> None:
    ids = {transitions.new_launch_id() for _ in range(50)}
    assert len(ids) == 50 and {len(i) for i in ids} == {22}  # 16 bytes, url-safe base64
