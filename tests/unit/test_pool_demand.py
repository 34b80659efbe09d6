"""Warm pools sized by demand (``default=<min>..<max>``), on both databases: the size follows
the visitors' recent launches of the spec and its servers' start time, within the bounds, and
the pool fills and drains to it."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from tests.fakes import FakeHub, RecordingBroker, insert_launch
from tests.unit.conftest import Clock
from tests.unit.test_pool import load, rows, run_sent, visitor
from worker import pool
from worker.broker import TEARDOWN_TASK
from worker.context import WorkerContext
from worker.db import session_scope
from worker.models import Status
from worker.outcome import DONE
from worker.pool_config import pools
from worker.pool_demand import START_GUESS, sizes, wanted
from worker.settings import Settings
from worker.starting import advance
from worker.teardown import teardown

DEFAULT = "image:default"
REPO = {"repo": "https://example.org/x.git", "ref": "main"}


def by_demand(ctx: WorkerContext, bounds: str, spec: str = "default") -> WorkerContext:
    settings = ctx.settings.model_copy(update={"pool": f"{spec}={bounds}"})
    return dataclasses.replace(ctx, settings=settings)


def size_of(ctx: WorkerContext, key: str = DEFAULT) -> Any:
    with session_scope(ctx.settings.database_url) as db:
        return sizes(db, pools(ctx.settings), ctx.settings, ctx.clock())[key]


def launches(ctx: WorkerContext, n: int, spec: dict[str, Any], *, ago: float = 0) -> None:
    """Visitors' launches of ``spec`` created ``ago`` seconds back."""
    with session_scope(ctx.settings.database_url) as db:
        for _ in range(n):
            insert_launch(db, spec, lifetime=600, now=ctx.clock() - timedelta(seconds=ago))


def started(ctx: WorkerContext, key: str, seconds: list[float], *, ago: float = 0) -> None:
    """Pooled servers of ``key`` that took ``seconds`` each to start, ready ``ago`` s back."""
    ready = ctx.clock() - timedelta(seconds=ago)
    with session_scope(ctx.settings.database_url) as db:
        for took in seconds:
            launch = insert_launch(db, {"image": "default"}, lifetime=600, now=ready)
            launch.pool_key, launch.status = key, Status.ended
            launch.created_at = ready - timedelta(seconds=took)
            launch.ready_at = ready


def test_the_size_covers_the_launches_that_arrive_while_a_server_starts() -> None:
    assert wanted(0.0, 4.0, 0, 8) == 0  # nobody came: the minimum
    assert wanted(0.0, 4.0, 2, 8) == 2
    # 1 launch per start time on average: the mean plus two Poisson deviations, 1 + 2 = 3.
    assert wanted(0.25, 4.0, 0, 8) == 3
    # One launch in ten minutes still keeps one server warm.
    assert wanted(1 / 600, 4.0, 0, 8) == 1
    assert wanted(10.0, 4.0, 0, 8) == 8  # never above the maximum
    assert wanted(10.0, 4.0, 1, 1) == 1


def test_the_setting_takes_bounds_and_refuses_bad_ones(settings: Settings) -> None:
    found = pools(settings.model_copy(update={"pool": "default=1..6, gh:org/repo@main=2"}))
    assert [(p.key, p.minimum, p.maximum, p.by_demand) for p in found] == [
        (DEFAULT, 1, 6, True),
        ("repo:https://github.com/org/repo@main", 2, 2, False),
    ]
    for bad in ("default=6..1", "default=1..", "default=..4", "default=1..x", "default=-1..2"):
        with pytest.raises(ValidationError, match="pool"):
            Settings(database_url=settings.database_url, pool=bad)


def test_the_size_follows_the_window_of_launches_and_start_times(
    ctx: WorkerContext, clock: Clock
) -> None:
    ctx = by_demand(ctx, "0..20")
    assert size_of(ctx).wanted == 0 and size_of(ctx).start_seconds is None
    # 60 launches in the 600 s window: 0.1 a second; no server started yet, so START_GUESS.
    launches(ctx, 60, {"image": "default"}, ago=30)
    expected = wanted(0.1, START_GUESS, 0, 20)
    assert size_of(ctx).wanted == expected and size_of(ctx).launches == 60
    # Its servers start in 4 s (median of 3, 4, 30): 0.1 * 4 = 0.4 -> ceil(0.4 + 1.26) = 2.
    started(ctx, DEFAULT, [3.0, 4.0, 30.0], ago=10)
    assert size_of(ctx).start_seconds == 4.0 and size_of(ctx).wanted == 2
    # Launches of other specs, launches older than the window, and the pool's own servers do
    # not count as demand.
    launches(ctx, 50, {"image": "other"})
    launches(ctx, 50, {"image": "default"}, ago=601)
    assert size_of(ctx).launches == 60
    clock.advance(600)  # all of it ages out
    assert size_of(ctx).wanted == 0 and size_of(ctx).start_seconds is None


def test_a_repository_pool_counts_the_ref_it_serves(ctx: WorkerContext) -> None:
    key = "repo:https://example.org/x.git@main"
    ctx = by_demand(ctx, "0..9", "https://example.org/x.git@main")
    launches(ctx, 12, REPO)
    launches(ctx, 40, {**REPO, "ref": "v2"})  # another ref: another pool's demand, or none
    assert size_of(ctx, key).launches == 12


def fill_slowly(ctx: WorkerContext, broker: RecordingBroker, clock: Clock) -> list[str]:
    """``fill``, with servers that take 5 s to start."""
    pool.maintain(ctx)
    clock.advance(5)
    run_sent(ctx, broker)
    return rows(ctx, Status.pooled)


def test_a_demand_pool_fills_with_demand_and_drains_when_it_goes(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker, clock: Clock
) -> None:
    ctx = by_demand(ctx, "1..5")
    assert len(fill_slowly(ctx, broker, clock)) == 1  # the minimum, before anyone came
    assert size_of(ctx).start_seconds == 5.0
    # A class arrives: 240 launches in the 10 minutes' window.
    launches(ctx, 240, {"image": "default"}, ago=60)
    assert size_of(ctx).wanted == wanted(0.4, 5.0, 1, 5) == 5  # 2 + 2 * 1.41 = 4.83
    assert len(fill_slowly(ctx, broker, clock)) == 5
    # A visitor takes one: the refill brings the pool back to the size.
    launch_id = visitor(ctx)
    assert advance(ctx, launch_id) == DONE
    assert load(ctx, launch_id).status == Status.ready
    assert len(rows(ctx, Status.pooled)) == 4
    assert pool.maintain(ctx).started == {DEFAULT: 1}
    clock.advance(5)
    run_sent(ctx, broker)
    # The class has gone: once its launches age out, the surplus drains to the minimum.
    clock.advance(700)
    report = pool.maintain(ctx)
    assert report.drained == {DEFAULT: 4} and report.started == {}
    for launch_id in broker.arguments(TEARDOWN_TASK):
        assert teardown(ctx, launch_id) == DONE
    assert len(rows(ctx, Status.pooled)) == 1
