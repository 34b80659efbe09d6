"""Idempotency-Key on POST /api/launches: one key, one launch, whatever the retries.

The first request with a key claims it in Redis (``SET NX``, a short TTL while it runs); when
its launch is accepted the key holds the body's hash and the answer (24 h). A request with a
key already answered gets that answer again; with another body, a 422; while the first is
still running, it waits a little for it. A first request that is refused releases the key, so
a retry may try again. Keys are scoped by the client's address: a key is not a way to reach
another client's launch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

HEADER = "Idempotency-Key"
KEY = re.compile(r"[A-Za-z0-9._~:+/=-]{1,255}")
DONE_TTL = 24 * 3600  # seconds an answered key is remembered
PENDING_TTL = 30  # seconds a claim may run before it is taken as lost (a crashed process)
WAIT_SECONDS = 5.0  # how long a second request waits for the first one to finish
POLL_SECONDS = 0.05

# Delete the key only if it still holds this claim (a lost claim's key may be someone else's).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class KeyProblem(Exception):
    """The request cannot go on with this key; ``status`` and ``message`` say why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


BAD_KEY = (
    f"{HEADER} must be 1 to 255 characters from A-Z a-z 0-9 and - _ . ~ : + / = "
    "(a UUID is a good key)"
)
OTHER_BODY = (
    f"This {HEADER} was already used with another request body; "
    "use a new key for a new launch, or send the same body to get the same launch."
)
IN_PROGRESS = (
    f"A request with this {HEADER} is still being processed; retry in a few seconds "
    "to get its answer."
)
UNAVAILABLE = f"The {HEADER} cannot be checked right now; nothing was started. Try again shortly."


def check_key(value: str) -> str:
    if not KEY.fullmatch(value):
        raise KeyProblem(400, BAD_KEY)
    return value


def body_hash(body: dict[str, Any]) -> str:
    """The request's meaning, not its bytes: the same fields and values hash alike."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def storage_key(prefix: str, client: str, key: str) -> str:
    # Hashed: any key and address give one short Redis key, and none is readable in Redis.
    digest = hashlib.sha256(f"{client}\0{key}".encode()).hexdigest()
    return f"{prefix}idem:{digest}"


@dataclass
class Claim:
    """This request holds the key: it must ``complete`` it with its answer or ``release`` it."""

    store: redis.Redis
    key: str
    token: str
    body: str

    def complete(self, answer: dict[str, Any]) -> None:
        value = json.dumps({"body": self.body, "answer": answer})
        try:
            self.store.set(self.key, value, ex=DONE_TTL)
        except redis.RedisError:
            # The launch is accepted; a retry with the key may start a second one, which is
            # less bad than failing a request whose launch is running.
            self.release()

    def release(self) -> None:
        # Redis failing: the claim's TTL ends it.
        with contextlib.suppress(redis.RedisError):
            self.store.eval(RELEASE, 1, self.key, self.token)


@dataclass(frozen=True)
class Replay:
    """The key was answered already: the same answer."""

    answer: dict[str, Any]


def claim(
    store: redis.Redis,
    prefix: str,
    client: str,
    key: str,
    body: dict[str, Any],
    *,
    wait: float = WAIT_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Claim | Replay:
    """Claim ``key`` for this request, or get the answer of the request that did.

    Raises ``KeyProblem``: 400 for a malformed key, 422 when the key was used with another
    body, 409 when the first request is still running after ``wait`` s, 503 without Redis.
    """
    check_key(key)
    name = storage_key(prefix, client, key)
    digest = body_hash(body)
    token = f"pending:{digest}:{secrets.token_hex(8)}"
    deadline = time.monotonic() + wait
    try:
        while True:
            if store.set(name, token, nx=True, ex=PENDING_TTL):
                return Claim(store, name, token, digest)
            raw = store.get(name)
            if raw is not None:
                found = raw.decode() if isinstance(raw, bytes) else str(raw)
                if found.startswith("pending:"):
                    if found.split(":")[1] != digest:
                        raise KeyProblem(422, OTHER_BODY)
                else:
                    stored = json.loads(found)
                    if stored["body"] != digest:
                        raise KeyProblem(422, OTHER_BODY)
                    return Replay(stored["answer"])
            # Pending (wait for it), or just released (claim it on the next turn).
            if time.monotonic() >= deadline:
                raise KeyProblem(409, IN_PROGRESS)
            sleep(POLL_SECONDS)
    except redis.RedisError as e:
        # Failing closed: the caller sent a key to avoid a second launch, and the queue is the
        # same Redis, so nothing could be started now anyway.
        raise KeyProblem(503, UNAVAILABLE) from e
