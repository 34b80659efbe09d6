"""Celery tasks: unpack the id, call one domain function, map its outcome to a retry.

Each task's log lines carry what it works on (``worker.logs``): the launch id, or the name of
the environment a build makes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from worker import abandon as abandoned
from worker import builds, claims, cull, hub_health, pool, starting, teardown
from worker.broker import (
    ABANDON_TASK,
    BUILD_TASK,
    CULL_TASK,
    HUB_HEALTH_TASK,
    LAUNCH_TASK,
    POOL_TASK,
    RECOVER_TASK,
    TEARDOWN_TASK,
    teardown_message,
)
from worker.celery_app import app
from worker.context import worker_context
from worker.logs import bind_build, bind_launch


# The launch is retried by the domain's own backoff until its deadline, so no retry cap here.
@app.task(name=LAUNCH_TASK, bind=True, max_retries=None)
def launch(self: Any, launch_id: str) -> None:
    with bind_launch(launch_id):
        ctx = worker_context()
        lease = timedelta(seconds=ctx.settings.launch_lease)
        with claims.running(ctx.units, launch_id, lease=lease, clock=ctx.clock) as run:
            if not run.held:
                return  # a live run has it (a duplicate or re-sent message): that run finishes
            outcome = starting.advance(ctx, launch_id, attempt=self.request.retries)
            run.done(outcome)
        if outcome.teardown_in is not None:
            # The removal continues in its own task; nothing to commit, so the unit only sends.
            with ctx.units.begin() as uow:
                uow.send(teardown_message(launch_id, countdown=outcome.teardown_in))
        elif outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)


# Removing a user is retried with capped backoff (hours); the scheduled cleanup reconciles after.
@app.task(name=TEARDOWN_TASK, bind=True, max_retries=2000)
def teardown_user(self: Any, launch_id: str) -> None:
    with bind_launch(launch_id):
        outcome = teardown.teardown(worker_context(), launch_id, attempt=self.request.retries)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)


# A lost pass is simply done again by the next one, so the message need not outlive a crash.
@app.task(name=CULL_TASK, acks_late=False, soft_time_limit=600, time_limit=660)
def cleanup() -> int:
    return len(cull.cull_pass(worker_context()))


# Cheap (one UPDATE), so it runs every few seconds; a lost sweep is simply done by the next.
@app.task(name=RECOVER_TASK, acks_late=False, soft_time_limit=60, time_limit=90)
def recover() -> int:
    ctx = worker_context()
    unclaimed_after = timedelta(seconds=ctx.settings.redispatch_after)
    return len(claims.recover(ctx.units, now=ctx.clock(), unclaimed_after=unclaimed_after))


# The warm pools (worker/pool.py): a pass that overlaps another may start a server too many,
# which the next drains; a lost pass is done by the next one.
@app.task(name=POOL_TASK, acks_late=False, soft_time_limit=60, time_limit=90)
def refill_pools(_reason: str = "") -> int:
    report = pool.maintain(worker_context())
    return sum(report.started.values())


# Every Hub checked at once (worker/hub_health.py); a lost check is done by the next.
@app.task(name=HUB_HEALTH_TASK, acks_late=False, soft_time_limit=30, time_limit=45)
def check_hubs() -> dict[str, bool]:
    return hub_health.check_all(worker_context())


# Builds are long and not safe to run twice at once; the builds row (heartbeat) is what
# detects a dead build worker, so the message is acknowledged when the task starts.
@app.task(name=BUILD_TASK, acks_late=False, soft_time_limit=None, time_limit=None)
def build(name: str) -> None:
    ctx = worker_context()
    builder = ctx.need_builder()
    with bind_build(name):
        builds.run_build(ctx.units, builder, name, clock=ctx.clock)
        # Its lines name the environments it removes; ``env`` is the build that needed room.
        builds.evict(ctx.units, builder, ctx.settings.envs_disk_budget, clock=ctx.clock)


# Appended here, not in the imports above: other changes to this module are in flight.


# A /build launch whose watchers all left: ended unless one came back (worker/abandon.py).
@app.task(name=ABANDON_TASK, bind=True, max_retries=100)
def abandon(self: Any, launch_id: str) -> None:
    with bind_launch(launch_id):
        ctx = worker_context()
        outcome = abandoned.end_if_abandoned(
            ctx.settings, ctx.units, launch_id, now=ctx.clock(), attempt=self.request.retries
        )
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)
