"""Celery tasks: unpack the id, call one domain function, map its outcome to a retry.

Each task's log lines carry what it works on (``worker.logs``): the launch id, or the name of
the environment a build makes.
"""

from __future__ import annotations

from typing import Any

from worker import builds, cull, starting, teardown
from worker.broker import BUILD_TASK, CULL_TASK, LAUNCH_TASK, TEARDOWN_TASK, teardown_message
from worker.celery_app import app
from worker.context import worker_context
from worker.logs import bind_build, bind_launch


# The launch is retried by the domain's own backoff until its deadline, so no retry cap here.
@app.task(name=LAUNCH_TASK, bind=True, max_retries=None)
def launch(self: Any, launch_id: str) -> None:
    with bind_launch(launch_id):
        ctx = worker_context()
        outcome = starting.advance(ctx, launch_id, attempt=self.request.retries)
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
