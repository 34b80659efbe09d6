"""Claims on starting launches (worker/claims.py): one live run at a time, a dead run noticed
within a lease, and the sweep that sends such launches again — on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from tests.fakes import RecordingBroker
from tests.unit.conftest import Clock
from worker import claims, transitions
from worker.broker import LAUNCH_TASK
from worker.context import WorkerContext
from worker.db import as_utc, session_scope
from worker.models import Launch
from worker.outcome import DONE, Outcome
from worker.transitions import FailReason

LEASE = timedelta(seconds=10)
GRACE = timedelta(seconds=30)


def new_launch(ctx: WorkerContext) -> str:
    with ctx.units.begin() as uow:
        spec = {"image": "default"}
        return transitions.create(uow, spec, lifetime=600, timeout=600, now=ctx.clock()).id


def row(ctx: WorkerContext, launch_id: str) -> Launch:
    with session_scope(ctx.settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        return launch


def test_one_run_holds_a_launch_until_its_claim_expires(ctx: WorkerContext, clock: Clock) -> None:
    launch_id = new_launch(ctx)

    first = claims.claim(ctx.units, launch_id, lease=LEASE, now=clock())
    assert first is not None
    assert claims.claim(ctx.units, launch_id, lease=LEASE, now=clock()) is None
    clock.advance(9)
    assert claims.claim(ctx.units, launch_id, lease=LEASE, now=clock()) is None

    clock.advance(2)  # the holder stopped beating: taken for dead
    second = claims.claim(ctx.units, launch_id, lease=LEASE, now=clock())
    assert second is not None and second != first
    # The dead run's release (it was only paused) cannot free the new run's claim.
    claims.release(ctx.units, launch_id, first, DONE, now=clock())
    assert row(ctx, launch_id).claimed_by == second


def test_a_run_that_will_retry_is_expected_back(ctx: WorkerContext, clock: Clock) -> None:
    launch_id = new_launch(ctx)
    run = claims.claim(ctx.units, launch_id, lease=LEASE, now=clock())
    assert run is not None

    claims.release(ctx.units, launch_id, run, Outcome(retry_in=20), now=clock())

    launch = row(ctx, launch_id)
    assert launch.claimed_by is None and launch.claim_expires_at is not None
    expected = clock() + timedelta(seconds=20) + claims.RETRY_SLACK
    assert as_utc(launch.claim_expires_at) == expected
    # The retry itself (or any other message) may take it at once.
    assert claims.claim(ctx.units, launch_id, lease=LEASE, now=clock()) is not None


def test_concurrent_claims_have_one_winner(ctx: WorkerContext, clock: Clock) -> None:
    launch_id = new_launch(ctx)
    now = clock()
    won: list[str | None] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        won.append(claims.claim(ctx.units, launch_id, lease=LEASE, now=now))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([w for w in won if w is not None]) == 1


def test_running_skips_a_held_launch_and_keeps_the_claim_of_a_crashed_run(
    ctx: WorkerContext, clock: Clock
) -> None:
    launch_id = new_launch(ctx)
    with claims.running(ctx.units, launch_id, lease=LEASE, clock=clock) as run:
        assert run.held
        with claims.running(ctx.units, launch_id, lease=LEASE, clock=clock) as duplicate:
            assert not duplicate.held
        run.done(Outcome(retry_in=5))
    assert row(ctx, launch_id).claimed_by is None  # free for the retry, expected back

    with claims.running(ctx.units, launch_id, lease=LEASE, clock=clock) as run:
        assert run.held
        run.done(DONE)
    # Done: nothing to let go of (the launch is no longer starting, the sweep skips it).
    assert row(ctx, launch_id).claimed_by is not None

    with (
        pytest.raises(RuntimeError),
        claims.running(ctx.units, launch_id, lease=LEASE, clock=clock) as run,
    ):
        raise RuntimeError("the task died")
    assert row(ctx, launch_id).claimed_by is not None  # left to expire; the sweep takes over


def test_heartbeat_extends_the_claims_this_process_holds(ctx: WorkerContext) -> None:
    launch_id = new_launch(ctx)
    heartbeat = claims.Heartbeat()
    now = claims.utcnow()
    run = claims.claim(ctx.units, launch_id, lease=LEASE, now=now)
    assert run is not None
    with heartbeat.holding(ctx.units, run, launch_id, timedelta(seconds=60)):
        assert heartbeat.beat() == 1
        expires = row(ctx, launch_id).claim_expires_at
        assert expires is not None and as_utc(expires) > now + timedelta(seconds=50)
    assert heartbeat.beat() == 0  # let go: nothing more to extend


def test_recover_sends_launches_whose_run_died_once(
    ctx: WorkerContext, clock: Clock, broker: RecordingBroker
) -> None:
    dead, alive, never_claimed, finished = (new_launch(ctx) for _ in range(4))
    for launch_id in (dead, alive, finished):
        assert claims.claim(ctx.units, launch_id, lease=LEASE, now=clock()) is not None
    with ctx.units.begin() as uow:
        launch = uow.db.get(Launch, finished)
        assert launch is not None
        transitions.mark_failed(uow, launch, "x", reason=FailReason.internal_error, now=clock())

    def heartbeat_of_the_live_run() -> None:
        with ctx.units.begin() as uow:
            launch = uow.db.get(Launch, alive)
            assert launch is not None
            launch.claim_expires_at = clock() + LEASE

    clock.advance(11)
    heartbeat_of_the_live_run()
    assert claims.recover(ctx.units, now=clock(), unclaimed_after=GRACE) == [dead]
    assert (
        claims.recover(ctx.units, now=clock(), unclaimed_after=GRACE) == []
    )  # a second beat at once sends nothing

    clock.advance(31)  # past the grace: the message nobody ever took, and the re-sent one
    heartbeat_of_the_live_run()
    assert sorted(claims.recover(ctx.units, now=clock(), unclaimed_after=GRACE)) == sorted(
        [dead, never_claimed]
    )
    assert broker.arguments(LAUNCH_TASK).count(dead) == 2
    assert finished not in broker.arguments(LAUNCH_TASK)
    assert alive not in broker.arguments(LAUNCH_TASK)
