"""The transaction boundary (commit, then send; a rollback sends nothing) and the intake's
accept and end, on both databases, with a broker that refuses messages naming uncommitted rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import func, select

from api import intake
from api.group_commit import QUEUE_DOWN, LaunchWriter
from api.schemas import LaunchRequest
from tests.fakes import RecordingBroker, insert_launch
from tests.unit.conftest import Clock
from worker import transitions
from worker.broker import LAUNCH_TASK, TEARDOWN_TASK, Message, QueueUnavailable, launch_message
from worker.db import session_factory, session_scope
from worker.models import EndReason, Launch, LaunchEvent, Phase, Status
from worker.settings import Settings
from worker.transitions import FailReason
from worker.unit_of_work import Undelivered, UnitOfWork, Units


class Boom(Exception):
    pass


@pytest.fixture
def doorbells() -> list[str]:
    return []


@pytest.fixture
def units(settings: Settings, broker: RecordingBroker, doorbells: list[str]) -> Units:
    return Units(settings.database_url, broker, doorbells.append)


def rows(settings: Settings) -> tuple[int, int]:
    with session_scope(settings.database_url) as db:
        return (
            db.scalar(select(func.count()).select_from(Launch)) or 0,
            db.scalar(select(func.count()).select_from(LaunchEvent)) or 0,
        )


def accept(units: Units, settings: Settings, body: LaunchRequest) -> Launch:
    """The intake's accept, through a launch writer of its own on ``units``: the launch."""
    return load(
        settings,
        intake.accept(LaunchWriter(units, settings.launch_timeout), settings, body, "192.0.2.1"),
    )


def load(settings: Settings, launch_id: str) -> Launch:
    with session_scope(settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        return launch


# -- the broker's own check ------------------------------------------------------------


def test_the_recording_broker_refuses_a_message_for_an_uncommitted_row(
    settings: Settings, broker: RecordingBroker
) -> None:
    db = session_factory(settings.database_url)()
    try:
        launch = insert_launch(db, {"image": "default"}, lifetime=60)
        db.flush()  # written, not committed: the queue's worker could not find it
        with pytest.raises(AssertionError, match="not committed"):
            broker.send(launch_message(launch.id))
        db.commit()
        broker.send(launch_message(launch.id))
    finally:
        db.close()
    assert broker.arguments(LAUNCH_TASK) == [launch.id]


class SendsBeforeCommit(Units):
    """What the intake would be if it sent inside its transaction."""

    @contextmanager
    def begin(self, *, one_statement: bool = False) -> Iterator[UnitOfWork]:
        db = session_factory(self.database_url)()
        uow = UnitOfWork(db)
        try:
            yield uow
            db.flush()
            self._deliver(uow)
            db.commit()
        except BaseException:
            db.rollback()
            raise
        finally:
            db.close()


def test_an_intake_that_sent_inside_its_transaction_would_be_caught(
    settings: Settings, broker: RecordingBroker
) -> None:
    units = SendsBeforeCommit(settings.database_url, broker)
    with pytest.raises(AssertionError, match="not committed"):
        accept(units, settings, LaunchRequest(image="default"))
    assert broker.sent == [] and rows(settings) == (0, 0)


# -- units of work ---------------------------------------------------------------------


def test_a_unit_sends_and_rings_only_after_its_commit(
    units: Units, settings: Settings, broker: RecordingBroker, doorbells: list[str]
) -> None:
    with units.begin() as uow:
        launch = insert_launch(uow.db, {"image": "default"}, lifetime=60)
        uow.send(launch_message(launch.id))
        uow.notify(launch.id)
        uow.notify(launch.id)  # one doorbell per launch and unit
        assert broker.sent == [] and doorbells == []
    assert broker.sent == [launch_message(launch.id)]
    assert doorbells == [launch.id]
    assert rows(settings) == (1, 1)


def test_a_rollback_drops_the_messages_and_doorbells(
    units: Units, settings: Settings, broker: RecordingBroker, doorbells: list[str]
) -> None:
    with pytest.raises(Boom), units.begin() as uow:
        launch = insert_launch(uow.db, {"image": "default"}, lifetime=60)
        uow.send(launch_message(launch.id))
        uow.notify(launch.id)
        raise Boom
    assert broker.sent == [] and doorbells == []
    assert rows(settings) == (0, 0)


def test_refused_messages_are_named_after_the_commit(
    units: Units, settings: Settings, broker: RecordingBroker, doorbells: list[str]
) -> None:
    broker.down = True
    with pytest.raises(Undelivered) as refused, units.begin() as uow:
        first = insert_launch(uow.db, {"image": "default"}, lifetime=60)
        second = insert_launch(uow.db, {"image": "default"}, lifetime=60)
        uow.send(launch_message(first.id))
        uow.send(launch_message(second.id))
        uow.notify(first.id)
    # Every message was tried and is named; the rows stay, and watchers were told.
    assert refused.value.messages == [launch_message(first.id), launch_message(second.id)]
    assert "Connection refused" in str(refused.value)
    assert rows(settings) == (2, 2) and doorbells == [first.id]


# -- accept ----------------------------------------------------------------------------


def test_accept_commits_a_queued_launch_then_sends_it(
    units: Units, settings: Settings, broker: RecordingBroker
) -> None:
    launch = accept(units, settings, LaunchRequest(image="default", lifetime=120))
    assert broker.sent == [Message(LAUNCH_TASK, launch.id)]
    stored = load(settings, launch.id)
    assert stored.status == Status.queued and stored.lifetime == 120
    assert stored.spec == {"image": "default"}
    assert stored.deadline_at is not None and stored.hub_user is None


def test_accept_defaults_the_lifetime_and_refuses_one_above_the_maximum(
    units: Units, settings: Settings, broker: RecordingBroker
) -> None:
    launch = accept(units, settings, LaunchRequest(image="default"))
    assert load(settings, launch.id).lifetime == settings.session_max_age
    at_max = LaunchRequest(image="default", lifetime=settings.session_max_age)
    assert load(settings, accept(units, settings, at_max).id).lifetime == (settings.session_max_age)
    with pytest.raises(intake.Refused) as refused:
        accept(
            units, settings, LaunchRequest(image="default", lifetime=settings.session_max_age + 1)
        )
    assert refused.value.status == 422
    assert str(settings.session_max_age) in refused.value.message
    assert rows(settings)[0] == 2 and len(broker.sent) == 2


def test_accept_with_the_queue_down_fails_the_launch_and_says_503(
    units: Units, settings: Settings, broker: RecordingBroker, doorbells: list[str]
) -> None:
    broker.down = True
    with pytest.raises(intake.Refused) as refused:
        accept(units, settings, LaunchRequest(image="default"))
    assert refused.value.status == 503 and refused.value.message == QUEUE_DOWN
    with session_scope(settings.database_url) as db:
        [launch] = db.scalars(select(Launch))
        assert launch.status == Status.failed and launch.error == QUEUE_DOWN
        assert launch.end_reason == EndReason.failed
        # Nothing was started on the Hub, so no cleanup is owed.
        assert launch.user_removed_at is not None
        phases = list(db.scalars(select(LaunchEvent.phase).order_by(LaunchEvent.id)))
    assert phases == [Phase.waiting, Phase.failed]
    assert doorbells == [launch.id]


def test_accept_refuses_banned_and_malformed_repositories(
    units: Units, settings: Settings, broker: RecordingBroker
) -> None:
    banned = settings.model_copy(update={"banned_specs": [r"^https://github\.com/evil/"]})
    with pytest.raises(intake.Refused) as refused:
        accept(units, banned, LaunchRequest(repo="gh:evil/miner"))
    assert refused.value.status == 403
    with pytest.raises(intake.Refused) as refused:
        accept(units, settings, LaunchRequest(repo="https://127.0.0.1/x"))
    assert refused.value.status == 422
    assert rows(settings) == (0, 0) and broker.sent == []


def test_accept_stores_a_repository_as_normalized(
    units: Units, settings: Settings, broker: RecordingBroker
) -> None:
    local = settings.model_copy(update={"allow_local_repos": True})  # nothing is resolved
    launch = accept(units, local, LaunchRequest(repo="file:///srv/o/r"))
    # As the builder reads it, not as it was sent: the ref is spelled out.
    assert load(settings, launch.id).spec == {"repo": "file:///srv/o/r", "ref": "HEAD"}


# -- end -------------------------------------------------------------------------------


def launch_in(settings: Settings, status: Status, **fields: object) -> str:
    with session_scope(settings.database_url) as db:
        launch = insert_launch(db, {"image": "default"}, lifetime=60)
        launch.status = status
        for name, value in fields.items():
            setattr(launch, name, value)
        return launch.id


def test_end_of_an_unknown_launch_is_none(units: Units, broker: RecordingBroker) -> None:
    assert intake.end(units, "nope") is None
    assert broker.sent == []


@pytest.mark.parametrize(
    ("status", "removed", "teardown"),
    [
        (Status.queued, False, False),  # the launch task sees the request and ends it
        (Status.launching, False, False),
        (Status.ready, False, True),
        (Status.failed, False, True),  # its user may still exist
        (Status.ended, False, True),
        (Status.failed, True, False),  # nothing left to remove
        (Status.ended, True, False),
    ],
)
def test_end_records_the_request_and_sends_a_teardown_only_when_owed(
    units: Units,
    settings: Settings,
    broker: RecordingBroker,
    clock: Clock,
    status: Status,
    removed: bool,
    teardown: bool,
) -> None:
    launch_id = launch_in(
        settings, status, hub_user="hl-x", user_removed_at=clock() if removed else None
    )
    ended = intake.end(units, launch_id)
    assert ended is not None and ended.id == launch_id
    assert broker.arguments(TEARDOWN_TASK) == ([launch_id] if teardown else [])
    assert load(settings, launch_id).end_requested_at is not None


def test_a_second_end_keeps_the_first_request_time(
    units: Units, settings: Settings, clock: Clock
) -> None:
    launch_id = launch_in(settings, Status.ready, hub_user="hl-x")
    with units.begin() as uow:
        launch = uow.db.get(Launch, launch_id)
        assert launch is not None
        transitions.request_end(uow, launch, now=clock())
    first = load(settings, launch_id).end_requested_at
    intake.end(units, launch_id)
    assert load(settings, launch_id).end_requested_at == first


def test_end_with_the_queue_down_is_recorded_and_says_503(
    units: Units, settings: Settings, broker: RecordingBroker
) -> None:
    launch_id = launch_in(settings, Status.ready, hub_user="hl-x")
    broker.down = True
    with pytest.raises(intake.Refused) as refused:
        intake.end(units, launch_id)
    assert refused.value.status == 503 and refused.value.message == intake.END_NOT_SENT
    assert load(settings, launch_id).end_requested_at is not None


def test_refused_reads_as_its_message() -> None:
    refused = intake.Refused(409, "no")
    assert (str(refused), refused.status, refused.message) == ("no", 409, "no")


def test_a_refused_launch_is_logged_with_its_id_and_the_reason(
    units: Units, settings: Settings, broker: RecordingBroker, caplog: pytest.LogCaptureFixture
) -> None:
    broker.down = True
    with pytest.raises(intake.Refused):
        accept(units, settings, LaunchRequest(image="default"))
    with session_scope(settings.database_url) as db:
        launch_id = db.scalars(select(Launch.id)).one()
    assert (
        f"launch {launch_id}: queue unavailable: Error 111 connecting to 127.0.0.1:6379. "
        "Connection refused."
    ) in caplog.messages


class FailsMeanwhile(RecordingBroker):
    """The queue refuses, and meanwhile something else (a cleanup pass) already failed the
    launch: the intake must leave it as it is."""

    def send(self, message: Message) -> None:
        with Units(self.database_url, RecordingBroker(self.database_url)).begin() as uow:
            launch = uow.db.get(Launch, message.argument)
            assert launch is not None
            transitions.mark_failed(
                uow, launch, "failed by a pass", reason=FailReason.timeout, now=launch.created_at
            )
        raise QueueUnavailable("down")


def test_a_launch_failed_meanwhile_is_left_failed_when_the_queue_refuses(
    settings: Settings,
) -> None:
    units = Units(settings.database_url, FailsMeanwhile(settings.database_url))
    with pytest.raises(intake.Refused) as refused:
        accept(units, settings, LaunchRequest(image="default"))
    assert refused.value.status == 503
    with session_scope(settings.database_url) as db:
        launch = db.scalars(select(Launch)).one()
        assert launch.error == "failed by a pass" and launch.user_removed_at is None


def test_a_launch_keeps_who_asked_as_a_keyed_digest_never_the_address(
    settings: Settings, broker: RecordingBroker
) -> None:
    units = Units(settings.database_url, broker)
    writer = LaunchWriter(units, settings.launch_timeout)

    def client_of(address: str, settings: Settings = settings) -> str | None:
        launch_id = intake.accept(writer, settings, LaunchRequest(image="default"), address)
        with session_scope(settings.database_url) as db:
            launch = db.get_one(Launch, launch_id)
            return launch.client

    first = client_of("203.0.113.7")
    assert first is not None and len(first) == 32 and "203.0.113" not in first
    assert client_of("203.0.113.7") == first  # one client, one digest
    assert client_of("203.0.113.8") != first
    # Keyed: the same address under another secret is another digest (a table of every IPv4
    # address's digest is no use without the key).
    other = settings.model_copy(update={"secret_key": SecretStr(Fernet.generate_key().decode())})
    assert client_of("203.0.113.7", other) != first
