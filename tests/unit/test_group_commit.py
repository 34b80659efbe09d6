"""Group commit: launches that arrive together are written together, and every caller still gets
its own answer: its own launch, or its own failure, never a neighbour's. On both databases."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from api import intake
from api.group_commit import DATABASE_DOWN, QUEUE_DOWN, DatabaseUnavailable, LaunchWriter
from api.schemas import LaunchRequest
from tests.fakes import RecordingBroker
from worker.broker import LAUNCH_TASK, Message, QueueUnavailable
from worker.db import session_scope
from worker.models import Launch, LaunchEvent, Status
from worker.settings import Settings
from worker.transitions import NewLaunch
from worker.unit_of_work import UnitOfWork, Units


class GateBroker(RecordingBroker):
    """Holds the first batch at the broker until ``release``: what arrives meanwhile queues up
    behind it, as it does behind a slow commit."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.batches: list[int] = []

    def send_many(self, messages: Sequence[Message]) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never released the gate"
        self.batches.append(len(messages))
        super().send_many(messages)


def new(lifetime: int = 600, **fields: Any) -> NewLaunch:
    return NewLaunch({"image": "default"}, lifetime, **fields)


def counts(url: str) -> tuple[int, int]:
    with session_scope(url) as db:
        return (
            db.scalar(select(func.count()).select_from(Launch)) or 0,
            db.scalar(select(func.count()).select_from(LaunchEvent)) or 0,
        )


def lifetimes(url: str) -> dict[str, int]:
    with session_scope(url) as db:
        return {
            launch_id: lifetime
            for launch_id, lifetime in db.execute(select(Launch.id, Launch.lifetime))
        }


def held_behind_a_first_launch(
    writer: LaunchWriter, broker: GateBroker, calls: list[Callable[[], str]]
) -> list[Future[str]]:
    """Start ``calls`` while a first launch is held at the broker, then let everything go."""
    pool = ThreadPoolExecutor(len(calls) + 1)
    pool.submit(writer.create, new(lifetime=1))
    assert broker.entered.wait(10)
    futures = [pool.submit(call) for call in calls]
    deadline = time.monotonic() + 10
    while writer._waiting.qsize() < len(calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    broker.gate.set()
    pool.shutdown(wait=True)
    return futures


def test_launches_that_arrive_together_share_one_write_and_each_gets_its_own(
    settings: Settings,
) -> None:
    broker = GateBroker(settings.database_url)
    writer = LaunchWriter(Units(settings.database_url, broker), 600)
    calls = [lambda i=i: writer.create(new(lifetime=100 + i)) for i in range(20)]
    futures = held_behind_a_first_launch(writer, broker, calls)
    ids = [f.result() for f in futures]
    assert broker.batches == [1, 20]  # the 20 that waited went in one write
    assert len(set(ids)) == 21 - 1 and counts(settings.database_url) == (21, 21)
    # Each caller got the launch it asked for, not a neighbour's.
    stored = lifetimes(settings.database_url)
    assert [stored[launch_id] for launch_id in ids] == [100 + i for i in range(20)]
    assert sorted(broker.arguments(LAUNCH_TASK)) == sorted(stored)


def test_a_row_the_database_refuses_fails_only_its_own_request(settings: Settings) -> None:
    """A batch that fails is written again a launch at a time: here one launch's row collides
    with an existing one (the same id), and its neighbours are written all the same."""
    taken = LaunchWriter(
        Units(settings.database_url, RecordingBroker(settings.database_url)), 600
    ).create(new())
    broker = GateBroker(settings.database_url)
    writer = LaunchWriter(Units(settings.database_url, broker), 600)
    calls = [
        lambda: writer.create(new(lifetime=201)),
        lambda: writer.create(new(lifetime=202, id=taken)),
        lambda: writer.create(new(lifetime=203)),
    ]
    first, clash, last = held_behind_a_first_launch(writer, broker, calls)
    with pytest.raises(IntegrityError):
        clash.result()
    stored = lifetimes(settings.database_url)
    assert stored[first.result()] == 201 and stored[last.result()] == 203
    assert stored[taken] == 600 and counts(settings.database_url) == (4, 4)


def test_a_queue_that_refuses_a_batch_fails_each_of_its_launches(settings: Settings) -> None:
    broker = RecordingBroker(settings.database_url)
    broker.down = True
    writer = LaunchWriter(Units(settings.database_url, broker), 600)
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(writer.create, new()) for _ in range(5)]
    for future in futures:
        with pytest.raises(QueueUnavailable):
            future.result()
    with session_scope(settings.database_url) as db:
        launches = db.scalars(select(Launch)).all()
    assert len(launches) == 5
    assert {(launch.status, launch.error) for launch in launches} == {(Status.failed, QUEUE_DOWN)}


def test_no_database_is_a_clear_503_and_nothing_recorded(settings: Settings) -> None:
    units = Units("postgresql+psycopg://hublaunch@127.0.0.1:1/nowhere", RecordingBroker(""))
    writer = LaunchWriter(units, 600)
    with pytest.raises(DatabaseUnavailable):
        writer.create(new())
    with pytest.raises(intake.Refused) as refused:
        intake.accept(writer, settings, LaunchRequest(image="default"), "192.0.2.1")
    assert (refused.value.status, refused.value.message) == (503, DATABASE_DOWN)


class CommitAckLost(Units):
    """The first write commits, then its connection drops before the answer arrives (what a
    server restart at the wrong moment does): the writer cannot know it was written."""

    @contextmanager
    def begin(self, *, one_statement: bool = False) -> Iterator[UnitOfWork]:
        if not getattr(self, "dropped", False):
            object.__setattr__(self, "dropped", True)
            with session_scope(self.database_url) as db:
                yield UnitOfWork(db)  # committed; its messages are never delivered
            raise OperationalError(
                "COMMIT", {}, Exception("server closed the connection"), connection_invalidated=True
            )
        with super().begin(one_statement=one_statement) as uow:
            yield uow


def test_a_write_whose_answer_was_lost_is_neither_doubled_nor_dropped(settings: Settings) -> None:
    broker = RecordingBroker(settings.database_url)
    writer = LaunchWriter(CommitAckLost(settings.database_url, broker), 600)
    launch_id = writer.create(new())
    assert counts(settings.database_url) == (1, 1)
    assert broker.arguments(LAUNCH_TASK) == [launch_id]


def test_a_connection_dropped_while_idle_is_replaced_without_failing_the_launch(
    postgres_url: str,
) -> None:
    """The writer's connections are not pinged before use (a round trip a batch): the one
    PostgreSQL dropped while it sat in the pool fails the first try, and the launch is written
    on a fresh one. (SQLite's connections are files: nothing drops them.)"""
    broker = RecordingBroker(postgres_url)
    writer = LaunchWriter(Units(postgres_url, broker), 600)
    writer.create(new())
    with session_scope(postgres_url) as db:
        dropped = db.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).all()
    assert dropped, "the writer's idle connection was not found"
    second = writer.create(new())
    assert second in broker.arguments(LAUNCH_TASK)
    with session_scope(postgres_url) as db:
        assert db.get(Launch, second) is not None


def test_coroutines_wait_without_threads_and_a_cancelled_one_leaves_the_rest(
    settings: Settings,
) -> None:
    broker = GateBroker(settings.database_url)
    writer = LaunchWriter(Units(settings.database_url, broker), 600)

    async def main() -> list[str | BaseException]:
        first = asyncio.ensure_future(writer.create_async(new()))
        await asyncio.to_thread(broker.entered.wait, 10)
        waiting = [asyncio.ensure_future(writer.create_async(new())) for _ in range(10)]
        await asyncio.sleep(0.05)
        waiting[3].cancel()  # its visitor went away
        broker.gate.set()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    answers = asyncio.run(main())
    assert isinstance(answers[4], asyncio.CancelledError)
    ids = [a for a in answers if isinstance(a, str)]
    assert len(set(ids)) == 10 and broker.batches == [1, 10]
    # The cancelled one was accepted into its batch before its visitor left: it exists, and
    # the abandoned-launch and idle rules end it as they end any launch nobody uses.
    assert counts(settings.database_url) == (11, 11)


def test_the_writer_thread_stops_when_idle_and_starts_again(settings: Settings) -> None:
    writer = LaunchWriter(
        Units(settings.database_url, RecordingBroker(settings.database_url)), 600, idle=0.05
    )
    writer.create(new())
    deadline = time.monotonic() + 5
    while writer._running_in and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer._running_in == 0
    writer.create(new())
    assert counts(settings.database_url) == (2, 2)


class Crashing(Units):
    """A unit of work that fails with what no batch handles (a bug, an interpreter exit)."""

    @contextmanager
    def begin(self, *, one_statement: bool = False) -> Iterator[UnitOfWork]:
        raise SystemExit("boom")
        yield  # pragma: no cover


# The dying thread's exception is the point here, not a leak.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_killed_mid_batch_answers_its_callers_and_the_next_one_starts(
    settings: Settings,
) -> None:
    writer = LaunchWriter(Crashing(settings.database_url, RecordingBroker("")), 600)
    with pytest.raises(RuntimeError, match="the launch writer stopped"):
        writer.create(new())
    deadline = time.monotonic() + 5
    while writer._running_in and time.monotonic() < deadline:
        time.sleep(0.01)
    writer._units = Units(settings.database_url, RecordingBroker(settings.database_url))
    assert writer.create(new())  # a new writer thread took over
