"""Celery tasks: unpack the id, call one domain function, map its outcome to a retry."""

from __future__ import annotations

from typing import Any

from worker import builds, launcher
from worker import cull as cleanup
from worker.celery_app import app
from worker.context import launch_context
from worker.enqueue import (
    BUILD_TASK,
    CULL_TASK,
    LAUNCH_TASK,
    TEARDOWN_TASK,
    send_build,
    send_launch,
    send_teardown,
)


# The launch is retried by the domain's own backoff until its deadline, so no retry cap here.
@app.task(name=LAUNCH_TASK, bind=True, max_retries=None)
def launch(self: Any, launch_id: str) -> None:
    outcome = launcher.advance(launch_context(), launch_id, attempt=self.request.retries)
    if outcome.send_build is not None:
        send_build(outcome.send_build)
    if outcome.teardown_in is not None:
        send_teardown(launch_id, countdown=outcome.teardown_in)
    elif outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)


# Removing a user is retried with capped backoff (hours); the scheduled cleanup reconciles after.
@app.task(name=TEARDOWN_TASK, bind=True, max_retries=2000)
def teardown(self: Any, launch_id: str) -> None:
    outcome = launcher.teardown(launch_context(), launch_id, attempt=self.request.retries)
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)


# A lost pass is simply done again by the next one, so the message need not outlive a crash.
@app.task(name=CULL_TASK, acks_late=False, soft_time_limit=600, time_limit=660)
def cull() -> int:
    return len(cleanup.cull_pass(launch_context()))


# Builds are long and not safe to run twice at once; the builds row (heartbeat) is what
# detects a dead build worker, so the message is acknowledged when the task starts.
@app.task(name=BUILD_TASK, acks_late=False, soft_time_limit=None, time_limit=None)
def build(name: str) -> None:
    ctx = launch_context()
    assert ctx.builder is not None
    waiting = builds.run_build(
        ctx.settings.database_url, ctx.builder, name, clock=ctx.clock, notify=ctx.notify
    )
    for launch_id in waiting:
        send_launch(launch_id)
    builds.evict(
        ctx.settings.database_url, ctx.builder, ctx.settings.envs_disk_budget, clock=ctx.clock
    )
