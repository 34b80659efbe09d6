"""Task messages and the broker that carries them.

Nothing here is called by hand: a unit of work (``worker.unit_of_work``) buffers the messages
its transaction asks for and gives them to a ``Broker`` after the commit.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

LAUNCH_TASK = "hublaunch.launch"
TEARDOWN_TASK = "hublaunch.teardown"
CULL_TASK = "hublaunch.cull"
RECOVER_TASK = "hublaunch.recover"
BUILD_TASK = "hublaunch.build"
POOL_TASK = "hublaunch.pool"
HUB_HEALTH_TASK = "hublaunch.hub_health"


class QueueUnavailable(Exception):
    """The broker did not take the message."""


@dataclass(frozen=True)
class Message:
    """One task to send: its name, the id it acts on, and when to run it."""

    task: str
    argument: str
    countdown: float | None = None
    # The queue it goes to when not the task's usual one (a Hub's own build queue).
    queue: str | None = None


def launch_message(launch_id: str) -> Message:
    return Message(LAUNCH_TASK, launch_id)


def teardown_message(launch_id: str, *, countdown: float | None = None) -> Message:
    return Message(TEARDOWN_TASK, launch_id, countdown)


def build_message(name: str, *, queue: str | None = None) -> Message:
    return Message(BUILD_TASK, name, queue=queue)


def pool_message(*, countdown: float | None = None) -> Message:
    """Top the warm pools up (worker/pool.py); the argument is unused."""
    return Message(POOL_TASK, "refill", countdown)


class Broker(Protocol):
    def send(self, message: Message) -> None:
        """Hand the message to the queue, or raise ``QueueUnavailable``."""

    def send_many(self, messages: Sequence[Message]) -> None:
        """Hand all the messages to the queue, or raise ``QueueUnavailable``: then any of them
        may be lost (and any may have gone)."""


class CeleryBroker:
    """Sends through a Celery app built from the settings it is given (not the process's
    environment), made on first use so building it connects to nothing."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def _celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                from worker.celery_app import create_celery

                self._app = create_celery(self._settings)
            return self._app

    def send(self, message: Message) -> None:
        self.send_many([message])

    def send_many(self, messages: Sequence[Message]) -> None:
        from kombu.exceptions import OperationalError

        celery = self._celery()
        try:
            # One producer and, on Redis, one pipeline for them all (kombu's publish batch):
            # a round trip per message was a third of a group-committed launch's cost.
            with celery.producer_or_acquire() as producer, producer.batch():
                for message in messages:
                    celery.send_task(
                        message.task,
                        args=[message.argument],
                        countdown=message.countdown,
                        retry=False,
                        # Builds have their own queue: a launch of a built spec never waits
                        # behind a build.
                        queue=message.queue
                        or (self._settings.build_queue if message.task == BUILD_TASK else None),
                        producer=producer,
                    )
        except (OperationalError, ConnectionError, OSError) as e:
            raise QueueUnavailable(str(e)) from e


class RedisBroker:
    """Writes Celery task messages straight into Redis, a batch in one pipeline.

    Celery and kombu spent about 0.2 ms of CPU on each message (routing, a producer from the
    pool, headers built field by field, three encodings): more than the rest of a launch's
    intake. The message is Celery's protocol 2 (``docs.celeryq.dev``, "Message Protocol"), in the
    envelope kombu's Redis transport pushes onto the queue's list; ``tests/unit/test_broker.py``
    compares it, field by field, with what Celery itself sends, so an upgrade that changes the
    format fails there. The worker still consumes with Celery.
    """

    def __init__(self, settings: Settings) -> None:
        import redis

        self._settings = settings
        self._redis = redis.Redis.from_url(
            settings.broker_url, socket_timeout=5, socket_connect_timeout=5
        )
        # Celery's reply_to: the sending process, which never reads replies (no results).
        self._origin = f"{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def send(self, message: Message) -> None:
        self.send_many([message])

    def send_many(self, messages: Sequence[Message]) -> None:
        import redis

        pipe = self._redis.pipeline(transaction=False)
        now = datetime.now(UTC)
        for message in messages:
            # Builds have their own queue: a launch of a built spec never waits behind a build.
            queue = message.queue or (
                self._settings.build_queue if message.task == BUILD_TASK else self._settings.queue
            )
            pipe.lpush(queue, self._envelope(message, queue, now))
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as e:
            raise QueueUnavailable(str(e)) from e

    def _envelope(self, message: Message, queue: str, now: datetime) -> str:
        task_id = str(uuid.uuid4())
        eta = None
        if message.countdown is not None:
            eta = (now + timedelta(seconds=message.countdown)).isoformat()
        args = [message.argument]
        body = json.dumps([args, {}, _NO_LINKS])
        headers: dict[str, Any] = {
            "lang": "py",
            "task": message.task,
            "id": task_id,
            "shadow": None,
            "eta": eta,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": self._origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        return json.dumps(
            {
                "body": base64.b64encode(body.encode()).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "correlation_id": task_id,
                    "reply_to": self._reply_to,
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )


# The body's third part: no callbacks, errbacks, chain or chord.
_NO_LINKS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def make_broker(settings: Settings) -> Broker:
    """Redis written directly where the broker is Redis; Celery's own publishing elsewhere (the
    embedded dev queue on disk, RabbitMQ)."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisBroker(settings)
    return CeleryBroker(settings)


# -- abandoned /build launches (worker/abandon.py) ----------------------------------------------

ABANDON_TASK = "hublaunch.abandon"


def abandon_message(launch_id: str, *, countdown: float) -> Message:
    """End the launch after ``countdown`` s if no one watches it again by then."""
    return Message(ABANDON_TASK, launch_id, countdown)
