"""``/metrics``: what every process counted (from Redis) and what the database and the queue
hold right now (read at scrape time), as one Prometheus text page.

Counters and histograms come from the one place each change happens (``worker.transitions``,
the cleanup pass, builds, the Hub client) through the unit of work, so a launch finished by any
worker and a pass run by beat are counted once, whichever process serves the scrape. Gauges are
read when scraped: a process-local gauge would be wrong as soon as there are two processes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import String, cast, func, select

from worker import metrics, placement, queries
from worker.db import as_utc, reading, utcnow
from worker.hubs import Hub, hubs
from worker.models import HubHealth, Launch, Status
from worker.pool_config import pools
from worker.pool_demand import Size, sizes
from worker.settings import Settings
from worker.transitions import describe_spec

log = logging.getLogger(__name__)

# Specs named in hublaunch_sessions_active; the rest are summed as "other". Visitors choose
# specs, so the label set must not grow with them.
TOP_SPECS = 20
# Celery's Redis transport keeps one list per priority step of a queue (0 has the plain name).
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class StreamCount:
    """Event streams this app process has open (streams live in the app, so this is exact)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def opened(self) -> None:
        with self._lock:
            self.value += 1

    def closed(self) -> None:
        with self._lock:
            self.value -= 1


STREAMS = StreamCount()


class HublaunchCollector(Collector):
    def __init__(self, settings: Settings, client: redis.Redis | None) -> None:
        self.settings = settings
        self.client = client

    def collect(self) -> Iterator[Metric]:
        yield from self._stored()
        yield from self._database()
        yield from self._queues()
        streams = GaugeMetricFamily(
            "hublaunch_event_streams_open", "Event streams open on this app process."
        )
        streams.add_metric([], STREAMS.value)
        yield streams

    # -- counted by every process, kept in Redis -----------------------------------------------

    def _stored(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "hublaunch_metrics_store_up",
            "1 when the counters kept in Redis could be read for this scrape.",
        )
        data: dict[str, dict[str, float]] = {}
        if self.client is not None:
            try:
                data = metrics.stored(self.client, self.settings.queue)
            except redis.RedisError as e:
                log.warning("metrics: cannot read the counters from Redis: %s", e)
        up.add_metric([], 1.0 if data else 0.0)
        yield up
        for name, family in metrics.FAMILIES.items():
            fields = data.get(name, {})
            if family.kind == "counter":
                yield _counter(family, fields)
            else:
                yield _histogram(family, fields)

    # -- what the database holds now ----------------------------------------------------------

    def _database(self) -> Iterator[Metric]:
        now = utcnow()
        active = Launch.user_removed_at.is_(None)  # the partial index ix_launches_active
        with reading(self.settings.database_url) as db:
            by_status = db.execute(
                select(Launch.status, func.count()).where(active).group_by(Launch.status)
            ).all()
            specs = db.execute(
                select(cast(Launch.spec, String), func.count())
                .where(active, Launch.status == Status.ready)
                .group_by(cast(Launch.spec, String))
            ).all()
            oldest_queued = db.scalar(
                select(func.min(Launch.created_at)).where(active, Launch.status == Status.queued)
            )
            pooled = queries.pool_counts(db)
            pool_sizes = sizes(db, pools(self.settings), self.settings, now)
            configured = hubs(self.settings)
            per_hub = placement.active_per_hub(db, configured[0].name)
            health = {
                name: healthy
                for name, healthy in db.execute(select(HubHealth.name, HubHealth.healthy))
            }
            expired = db.scalar(
                select(func.count()).where(
                    active,
                    Launch.status == Status.ready,
                    Launch.end_requested_at.is_(None),
                    Launch.expires_at < now,
                )
            )
        launches = GaugeMetricFamily(
            "hublaunch_launches",
            "Launches whose Hub user may still exist, by status (final ones until removed).",
            labels=["status"],
        )
        counts = {status: 0 for status in Status}
        counts.update({Status(status): count for status, count in by_status})
        for status, count in counts.items():
            launches.add_metric([status.value], count)
        yield launches
        yield _sessions_by_spec(specs)
        yield _pool_servers(pool_sizes, pooled)
        yield from _hub_gauges(configured, per_hub, health)
        backlog = GaugeMetricFamily(
            "hublaunch_queue_oldest_seconds",
            "Age of the oldest launch still queued (0 when none is).",
        )
        backlog.add_metric(
            [], (now - as_utc(oldest_queued)).total_seconds() if oldest_queued else 0.0
        )
        yield backlog
        overdue = GaugeMetricFamily(
            "hublaunch_sessions_expired",
            "Ready sessions past their end time that no cleanup pass has ended yet.",
        )
        overdue.add_metric([], expired or 0)
        yield overdue
        limit = GaugeMetricFamily(
            "hublaunch_session_max_age_seconds", "The longest a session may live."
        )
        limit.add_metric([], timedelta(seconds=self.settings.session_max_age).total_seconds())
        yield limit

    # -- the queue ----------------------------------------------------------------------------

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "hublaunch_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        if self.client is not None:
            names = (self.settings.queue, self.settings.build_queue)
            try:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    for suffix in PRIORITY_SUFFIXES:
                        pipe.llen(name + suffix)
                lengths = pipe.execute()
            except redis.RedisError as e:
                log.warning("metrics: cannot read the queue lengths: %s", e)
            else:
                steps = len(PRIORITY_SUFFIXES)
                for i, name in enumerate(names):
                    depth.add_metric([name], sum(lengths[i * steps : (i + 1) * steps]))
        yield depth


def _counter(family: metrics.Family, fields: dict[str, float]) -> Metric:
    metric = CounterMetricFamily(
        family.name.removesuffix("_total"), family.help, labels=list(family.labels)
    )
    for field, value in sorted(fields.items()):
        values, _part = metrics.label_values(field)
        metric.add_metric(list(values), value)
    return metric


def _histogram(family: metrics.Family, fields: dict[str, float]) -> Metric:
    metric = HistogramMetricFamily(family.name, family.help, labels=list(family.labels))
    series: dict[tuple[str, ...], dict[str, float]] = {}
    for field, value in fields.items():
        values, part = metrics.label_values(field)
        series.setdefault(tuple(values), {})[part] = value
    for values, parts in sorted(series.items()):
        # Buckets are stored per observation's own bound and above: already cumulative.
        buckets = [(str(float(b)), parts.get(str(b), 0.0)) for b in family.buckets]
        buckets.append(("+Inf", parts.get("+Inf", 0.0)))
        metric.add_metric(list(values), buckets, parts.get("sum", 0.0))
    return metric


def _hub_gauges(
    configured: tuple[Hub, ...], active: dict[str, int], health: dict[str, bool]
) -> Iterator[Metric]:
    """Per Hub: its active sessions, its capacity (0: none of its own), and whether its last
    check passed (1 until a check says otherwise: one Hub is not checked)."""
    sessions = GaugeMetricFamily(
        "hublaunch_hub_sessions", "Active sessions (and pooled servers) by Hub.", labels=["hub"]
    )
    capacity = GaugeMetricFamily(
        "hublaunch_hub_capacity",
        "Sessions each Hub may hold (0: no cap of its own).",
        labels=["hub"],
    )
    up = GaugeMetricFamily(
        "hublaunch_hub_up", "Whether the Hub answered its last health check.", labels=["hub"]
    )
    for hub in configured:
        sessions.add_metric([hub.name], active.get(hub.name, 0))
        capacity.add_metric([hub.name], hub.capacity)
        up.add_metric([hub.name], 1.0 if health.get(hub.name, True) else 0.0)
    yield sessions
    yield capacity
    yield up


def _pool_servers(wanted: dict[str, Size], held: dict[str, dict[str, int]]) -> Metric:
    """Each warm pool's servers: wanted (its size now), starting and ready (``pooled``)."""
    gauge = GaugeMetricFamily(
        "hublaunch_pool_servers",
        "Warm-pool servers by pool and state: wanted (its size now), starting, ready.",
        labels=["pool", "state"],
    )
    counts = {key: {"wanted": 0, **states} for key, states in held.items()}
    for key, size in wanted.items():
        counts.setdefault(key, {"starting": 0, "ready": 0})["wanted"] = size.wanted
    for key, states in sorted(counts.items()):
        for state, count in sorted(states.items()):
            gauge.add_metric([key, state], count)
    return gauge


def _sessions_by_spec(rows: Any) -> Metric:
    gauge = GaugeMetricFamily(
        "hublaunch_sessions_active",
        f"Ready sessions by spec (the {TOP_SPECS} most used; the rest as 'other').",
        labels=["spec"],
    )
    counts: dict[str, int] = {}
    for text, count in rows:
        try:
            name = describe_spec(json.loads(text))
        except (ValueError, TypeError, KeyError):
            name = "other"
        counts[name] = counts.get(name, 0) + count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    for name, count in ranked[:TOP_SPECS]:
        gauge.add_metric([name], count)
    rest = sum(count for _, count in ranked[TOP_SPECS:])
    if rest:
        gauge.add_metric(["other"], rest)
    return gauge
