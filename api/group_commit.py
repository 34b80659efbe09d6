"""Group commit: launches accepted at the same moment share one transaction and one publish.

Alone, a launch cost the intake a flush, a commit and a broker round trip: about 5 ms of CPU a
request (``bench.intake_rate``: 186 accepted/s against 2,700/s for a bare endpoint). Here one
writer thread per process takes every launch waiting when it is free and writes them together,
so those costs are paid once a batch. A lone request waits for nothing (there is no timer);
requests that arrive while a batch is written go into the next one, as PostgreSQL's own group
commit does with WAL flushes.

Nothing about a 202 changes: the caller is answered once its launch is committed and its
message handed to the broker. A batch that fails is written again one launch at a time, so a
row the database refuses fails its own request only, never its neighbours'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from worker import transitions
from worker.broker import QueueUnavailable, launch_message
from worker.db import utcnow
from worker.queries import get_launch
from worker.transitions import NewLaunch
from worker.unit_of_work import Undelivered, Units

log = logging.getLogger(__name__)

QUEUE_DOWN = "The launch queue is unavailable; nothing was started. Try again shortly."
DATABASE_DOWN = "The launch database is unavailable; nothing was started. Try again shortly."


class DatabaseUnavailable(Exception):
    """The launch's transaction did not commit: nothing was recorded."""


# What a launch's caller gets: its id, or why there is none.
Outcome = str | Exception


@dataclass
class _Pending:
    new: NewLaunch
    # A thread waits on a concurrent future; a coroutine on an asyncio one, settled in its loop.
    future: Future[str] | asyncio.Future[str]
    loop: asyncio.AbstractEventLoop | None = None


class LaunchWriter:
    """Creates launches in batches on a thread of its own, started on first use in each process
    (never across a fork) and stopped after ``idle`` seconds with nothing to write."""

    def __init__(
        self, units: Units, launch_timeout: int, *, max_batch: int = 128, idle: float = 30.0
    ) -> None:
        self._units = units
        self._timeout = launch_timeout
        self._max_batch = max_batch
        self._idle = idle
        self._waiting: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running_in = 0  # the pid whose writer thread runs, 0 for none

    def create(self, new: NewLaunch) -> str:
        """The new launch's id, once committed and sent. Raises ``QueueUnavailable``
        (committed, and failed on its row) or ``DatabaseUnavailable`` (nothing recorded)."""
        future: Future[str] = Future()
        self._submit(_Pending(new, future))
        return future.result()

    async def create_async(self, new: NewLaunch) -> str:
        """``create`` for a coroutine: it waits without holding a thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._submit(_Pending(new, future, loop))
        return await future

    def _submit(self, pending: _Pending) -> None:
        with self._lock:
            self._waiting.put(pending)
            if self._running_in != os.getpid():
                self._running_in = os.getpid()
                threading.Thread(target=self._run, name="launch-writer", daemon=True).start()

    def _run(self) -> None:
        try:
            self._serve()  # returns when idle, marked stopped under the lock
        except BaseException:
            # Killed by something no batch catches: the next launch starts a new writer,
            # which takes what is still waiting.
            with self._lock:
                self._running_in = 0
            raise

    def _serve(self) -> None:
        while True:
            try:
                first = self._waiting.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:  # _submit() puts under this lock: nothing slips in between
                    if self._waiting.empty():
                        self._running_in = 0
                        return
                continue
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                outcomes = self._write(batch)
            except BaseException as e:  # never leave a caller waiting on a dead writer
                _settle(batch, [RuntimeError(f"the launch writer stopped: {e!r}")] * len(batch))
                raise
            _settle(batch, outcomes)

    def _write(self, batch: list[_Pending]) -> list[Outcome]:
        try:
            return self._write_together(batch)
        except DBAPIError as e:
            error: Exception = e
            if e.connection_invalidated:
                # A connection that dropped while idle (the writer's are not pinged): again.
                try:
                    return self._write_together(batch)
                except IntegrityError:
                    # The first try committed before its connection dropped: the launches
                    # exist (their ids are chosen before the first try); send them.
                    return self._write_together(batch, written=True)
                except Exception as again:
                    error = again
        except Exception as e:
            error = e
        if len(batch) == 1:
            return [_failure(error)]
        log.warning("a batch of %d launches failed (%s); writing each alone", len(batch), error)
        outcomes: list[Outcome] = []
        for pending in batch:
            try:
                outcomes.extend(self._write_together([pending]))
            except Exception as alone:
                outcomes.append(_failure(alone))
        return outcomes

    def _write_together(self, batch: Sequence[_Pending], *, written: bool = False) -> list[Outcome]:
        """One statement (on PostgreSQL; a transaction elsewhere) and one publish for the
        batch; ``written``: only the publish."""
        ids = [pending.new.id for pending in batch]
        try:
            with self._units.begin(one_statement=True) as uow:
                if not written:
                    transitions.create_many(
                        uow, [p.new for p in batch], timeout=self._timeout, now=utcnow()
                    )
                for launch_id in ids:
                    uow.send(launch_message(launch_id))
        except Undelivered as e:
            # Committed, but no task will run them: say so on each row and to each caller.
            unsent = {message.argument for message in e.messages}
            self._fail_unsent([launch_id for launch_id in ids if launch_id in unsent], str(e))
            return [
                QueueUnavailable(str(e)) if launch_id in unsent else launch_id for launch_id in ids
            ]
        return list(ids)

    def _fail_unsent(self, launch_ids: list[str], reason: str) -> None:
        for launch_id in launch_ids:
            log.error("launch %s: queue unavailable: %s", launch_id, reason)
        try:
            with self._units.begin() as uow:
                for launch_id in launch_ids:
                    row = get_launch(uow.db, launch_id)
                    if row is not None and not row.is_terminal:
                        transitions.mark_failed(
                            uow,
                            row,
                            QUEUE_DOWN,
                            reason=transitions.FailReason.queue_unavailable,
                            now=utcnow(),
                            user_removed=True,
                        )
        except DBAPIError as e:
            # Left queued: the recovery sweep (worker.claims) sends them again.
            log.error("could not record the unsent launches as failed: %s", e)


def _failure(error: Exception) -> Exception:
    if isinstance(error, OperationalError | InterfaceError):  # the connection, not the row
        log.error("a launch was not recorded: %s", error)
        return DatabaseUnavailable(DATABASE_DOWN)
    return error


def _settle(batch: list[_Pending], outcomes: list[Outcome]) -> None:
    """Answer every caller: threads at once, each event loop with one wake-up for all of its
    coroutines (a wake-up a launch was a noticeable part of the intake's cost)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, Outcome]]] = {}
    for pending, outcome in zip(batch, outcomes, strict=True):
        if pending.loop is None:
            _resolve(pending.future, outcome)
        else:
            by_loop.setdefault(pending.loop, []).append((pending, outcome))
    for loop, answers in by_loop.items():
        # A closed loop (the app stopped) has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, answers)


def _resolve_all(answers: list[tuple[_Pending, Outcome]]) -> None:
    for pending, outcome in answers:
        _resolve(pending.future, outcome)


def _resolve(future: Future[str] | asyncio.Future[str], outcome: Outcome) -> None:
    if future.done():  # a coroutine cancelled while it waited
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
