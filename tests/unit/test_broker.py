"""The Redis broker writes the messages Celery itself would, on a real Redis.

Every launch in the integration tests is sent by ``RedisBroker`` and run by a real Celery worker;
here the message is compared with Celery's own, field by field, so a Celery or kombu upgrade that
changes the format fails here first.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from worker.broker import (
    BUILD_TASK,
    CeleryBroker,
    Message,
    QueueUnavailable,
    RedisBroker,
    build_message,
    launch_message,
    make_broker,
    teardown_message,
)
from worker.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
# Different for every message (or every sender); compared by shape, not value.
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin", "eta"}


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"hublaunch-test-broker-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name, f"{name}.builds", *client.keys(f"_kombu.binding*{name}*"))


def sent(queue: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(REDIS_URL)
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def shape(value: Any, key: str = "") -> Any:
    """The message with what differs between two sends replaced by its type."""
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in value.items()}
    if key in PER_MESSAGE:
        return type(value).__name__
    return value


def body(message: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(message["body"]))


@pytest.mark.parametrize(
    "message",
    [launch_message("L1"), teardown_message("L2", countdown=30), build_message("env-abc")],
    ids=["launch", "teardown-later", "build"],
)
def test_a_message_is_the_one_celery_sends(queue: str, message: Message) -> None:
    settings = Settings(broker_url=REDIS_URL, queue=queue)
    CeleryBroker(settings).send(message)
    RedisBroker(settings).send(message)
    target = settings.build_queue if message.task == BUILD_TASK else queue
    theirs, ours = sent(target)
    assert shape(ours) == shape(theirs)
    assert body(ours) == body(theirs) == [[message.argument], {}, body(theirs)[2]]
    assert ours["headers"]["id"] == ours["headers"]["root_id"]
    assert ours["properties"]["correlation_id"] == ours["headers"]["id"]
    if message.countdown is None:
        assert ours["headers"]["eta"] is None
    else:
        eta = datetime.fromisoformat(ours["headers"]["eta"])
        expected = datetime.now(UTC) + timedelta(seconds=message.countdown)
        assert abs((eta - expected).total_seconds()) < 5


def test_a_batch_goes_in_order_with_a_task_id_each(queue: str) -> None:
    settings = Settings(broker_url=REDIS_URL, queue=queue)
    RedisBroker(settings).send_many([launch_message(f"L{i}") for i in range(5)])
    messages = sent(queue)
    assert [body(m)[0] for m in messages] == [[f"L{i}"] for i in range(5)]
    assert len({m["headers"]["id"] for m in messages}) == 5


def test_a_redis_that_does_not_answer_is_an_unavailable_queue() -> None:
    broker = RedisBroker(Settings(broker_url="redis://127.0.0.1:1/0", queue="nowhere"))
    with pytest.raises(QueueUnavailable):
        broker.send_many([launch_message("L1")])


def test_redis_is_written_directly_and_other_brokers_go_through_celery(tmp_path: object) -> None:
    assert isinstance(make_broker(Settings(broker_url=REDIS_URL)), RedisBroker)
    assert isinstance(make_broker(Settings(broker_url=f"filesystem://{tmp_path}")), CeleryBroker)
