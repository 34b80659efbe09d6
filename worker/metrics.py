"""Counters and histograms that every process adds to and the app exposes, kept in Redis.

The app, the workers and beat are separate processes (separate containers in compose), so a
process-local registry would show each only its own part. Each process buffers what it
observed: a unit of work hands over its observations after its commit (so a rolled-back change
is never counted), the Hub client each request as it is made; a background thread adds the
buffer to Redis hashes in one pipeline every half second. ``/metrics`` on the app reads the
hashes back as Prometheus families. Without Redis (the embedded dev queue) nothing is kept;
the families the app derives from the database at scrape time are still there.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

# Then the deployment's queue name, so deployments sharing one Redis keep their counts apart.
KEY_PREFIX = "hublaunch:metrics:"
# Between a field's label values (JSON, which escapes every tab) and its histogram part.
SEPARATOR = "\t"

# Up to the default launch timeout and past it: short buckets hid long spawns in JupyterHub's
# own dashboards.
TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
HUB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "hublaunch_launches_created",
            "counter",
            "Launches accepted, by provider.",
            ("provider",),
        ),
        Family(
            "hublaunch_launches_finished",
            "counter",
            "Launches that reached ready, failed or ended before ready, by provider, outcome and "
            "reason.",
            ("provider", "outcome", "reason"),
        ),
        Family(
            "hublaunch_sessions_ended",
            "counter",
            "Ready sessions that ended, by reason.",
            ("reason",),
        ),
        Family(
            "hublaunch_launch_queue_seconds",
            "histogram",
            "From the launch's creation until a worker took its first step.",
            ("provider",),
            TIME_BUCKETS,
        ),
        Family(
            "hublaunch_launch_spawn_seconds",
            "histogram",
            "From the Hub user's creation (launching) until the server was ready.",
            ("provider",),
            TIME_BUCKETS,
        ),
        Family(
            "hublaunch_launch_ready_seconds",
            "histogram",
            "Time to ready: from the launch's creation until its server was ready.",
            ("provider",),
            TIME_BUCKETS,
        ),
        Family(
            "hublaunch_builds",
            "counter",
            "Environment builds that finished, by result.",
            ("result",),
        ),
        Family(
            "hublaunch_build_seconds",
            "histogram",
            "How long an environment build took, by result.",
            ("result",),
            TIME_BUCKETS,
        ),
        Family(
            "hublaunch_cleanup_actions",
            "counter",
            "What cleanup passes did, by category and result.",
            ("category", "result"),
        ),
        Family("hublaunch_cleanup_passes", "counter", "Cleanup passes run."),
        Family(
            "hublaunch_pool_claims",
            "counter",
            "Launches of a pooled spec, by outcome: hit (a pooled server handed over) or miss.",
            ("outcome",),
        ),
        Family(
            "hublaunch_pool_claim_seconds",
            "histogram",
            "How long a hit took to hand a pooled server over (the database's part).",
            (),
            HUB_BUCKETS,
        ),
        Family(
            "hublaunch_hub_requests",
            "counter",
            "Requests to the Hubs' REST APIs, by Hub, endpoint family and status code.",
            ("hub", "family", "code"),
        ),
        Family(
            "hublaunch_hub_request_seconds",
            "histogram",
            "Latency of requests to the Hubs' REST APIs, by Hub and endpoint family.",
            ("hub", "family"),
            HUB_BUCKETS,
        ),
    )
}


@dataclass(frozen=True)
class Observation:
    family: str
    labels: tuple[str, ...]
    value: float

    def fields(self) -> Iterator[tuple[str, float]]:
        """The hash fields this adds to, and by how much."""
        family = FAMILIES[self.family]
        key = json.dumps(self.labels)
        if family.kind == "counter":
            yield key, self.value
            return
        for bound in family.buckets:
            if self.value <= bound:
                yield f"{key}{SEPARATOR}{bound}", 1
        yield f"{key}{SEPARATOR}+Inf", 1
        yield f"{key}{SEPARATOR}sum", self.value


def observation(name: str, value: float = 1.0, /, **labels: str) -> Observation:
    """One observation of family ``name`` (1 for a counter), with exactly its labels."""
    spec = FAMILIES[name]
    if set(labels) != set(spec.labels):
        raise ValueError(f"{name} takes the labels {spec.labels}, not {tuple(labels)}")
    return Observation(name, tuple(str(labels[label]) for label in spec.labels), value)


class Recorder:
    """This process's buffer of observations (thread-safe). A background thread adds them to
    Redis every ``interval`` seconds, so no launch waits for a Redis round trip (measured: two
    per launch, about 2 ms of the worker's time); a process that dies loses at most that much
    counting. ``flush()`` adds them at once (at exit, in tests)."""

    def __init__(
        self, redis_url: str | None, namespace: str = "launches", *, interval: float = 0.5
    ) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2) if redis_url else None
        self._prefix = f"{KEY_PREFIX}{namespace}:"
        self._interval = interval
        self._pending: list[Observation] = []
        self._lock = threading.Lock()
        self._flusher_pid = 0  # the process whose flusher thread runs (none across a fork)

    def add(self, observations: Iterable[Observation]) -> None:
        with self._lock:
            self._pending.extend(observations)
            if self._redis is not None and self._flusher_pid != os.getpid():
                # Started on first use, in this process: building a Recorder starts nothing.
                self._flusher_pid = os.getpid()
                threading.Thread(target=self._run, name="metrics", daemon=True).start()
                atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if self._redis is None or not pending:
            return
        # Summed here first: a busy intake adds the same few fields thousands of times.
        totals: dict[tuple[str, str], float] = {}
        for item in pending:
            for field, amount in item.fields():
                key = (item.family, field)
                totals[key] = totals.get(key, 0.0) + amount
        pipe = self._redis.pipeline(transaction=False)
        for (family, field), amount in totals.items():
            pipe.hincrbyfloat(self._prefix + family, field, amount)
        try:
            pipe.execute()
        except redis.RedisError as e:
            # Metrics are not worth failing a launch for; the loss is logged.
            log.warning("could not record %d metric observations: %s", len(pending), e)


def stored(client: redis.Redis, namespace: str = "launches") -> dict[str, dict[str, float]]:
    """Every family's hash as Redis holds it for one deployment (one pipeline)."""
    pipe = client.pipeline(transaction=False)
    for name in FAMILIES:
        pipe.hgetall(f"{KEY_PREFIX}{namespace}:{name}")
    out: dict[str, dict[str, float]] = {}
    for name, raw in zip(FAMILIES, pipe.execute(), strict=True):
        out[name] = {k.decode(): float(v) for k, v in raw.items()}
    return out


def label_values(field: str) -> tuple[Sequence[str], str]:
    """A hash field split into its label values and its histogram part ("" for counters)."""
    key, _, part = field.partition(SEPARATOR)
    values: list[str] = json.loads(key)
    return values, part
