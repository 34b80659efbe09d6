"""The transaction boundary: the one place that commits, and the one place that sends tasks.

A unit of work is one database transaction plus its outboxes: task messages for the broker,
doorbells for event-stream watchers and metric observations. They go out only after the commit
succeeded, so a message never names a row that might still roll back and a change is counted
once it happened, and they are dropped when the transaction rolls back (as warehouse's and
polar's job queues do). Domain code asks for a send with
``uow.send(...)``; it never commits and never talks to the broker itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from worker.broker import Broker, Message, QueueUnavailable
from worker.db import session_scope
from worker.metrics import Observation, Recorder

log = logging.getLogger(__name__)


def _no_doorbell(_launch_id: str) -> None:
    pass


@dataclass
class UnitOfWork:
    db: Session
    messages: list[Message] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)

    def send(self, message: Message) -> None:
        """Send ``message`` once this unit's transaction has committed."""
        self.messages.append(message)

    def observe(self, observation: Observation) -> None:
        """Count ``observation`` once this unit's transaction has committed."""
        self.observations.append(observation)

    def notify(self, launch_id: str) -> None:
        """Wake the launch's watchers once this unit's transaction has committed."""
        if launch_id not in self.notices:
            self.notices.append(launch_id)


class Undelivered(QueueUnavailable):
    """The transaction committed but the broker refused some of its messages."""

    def __init__(self, messages: list[Message], reason: str) -> None:
        super().__init__(reason)
        self.messages = messages


@dataclass(frozen=True)
class Units:
    """Opens units of work on one database, delivering to one broker and one doorbell."""

    database_url: str
    broker: Broker
    doorbell: Callable[[str], None] = _no_doorbell
    # Where this process's metrics go (None: not kept, as in the unit tests).
    recorder: Recorder | None = None

    @contextmanager
    def begin(self, *, one_statement: bool = False) -> Iterator[UnitOfWork]:
        """Commit on success then deliver; roll back and drop everything on error.

        Raises ``Undelivered`` (after the commit) naming the messages the broker refused: the
        caller decides what a lost message means. ``one_statement``: see ``session_scope``.
        """
        with session_scope(self.database_url, one_statement=one_statement) as db:
            uow = UnitOfWork(db)
            yield uow
        self._deliver(uow)

    def _deliver(self, uow: UnitOfWork) -> None:
        for launch_id in uow.notices:
            self.doorbell(launch_id)
        if self.recorder is not None:
            self.recorder.add(uow.observations)
        if not uow.messages:
            return
        try:
            self.broker.send_many(uow.messages)
        except QueueUnavailable as e:
            for message in uow.messages:
                log.error("could not send %s %s: %s", message.task, message.argument, e)
            raise Undelivered(list(uow.messages), str(e)) from e
