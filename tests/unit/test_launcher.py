"""The launch state machine against an in-memory Hub: each step once, retries, failures, ends."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from tests.fakes import FakeHub
from tests.unit.conftest import Clock
from worker import transitions
from worker.context import WorkerContext
from worker.db import session_scope
from worker.hub_client import HubSpawnFailed, HubUnavailable
from worker.hub_users import remove_hub_user
from worker.models import Launch, LaunchEvent, Status
from worker.outcome import DONE, backoff
from worker.queries import get_launch
from worker.starting import advance
from worker.teardown import teardown


def new_launch(ctx: WorkerContext, image: str = "default", lifetime: int = 600) -> str:
    with ctx.units.begin() as uow:
        spec = {"image": image}
        return transitions.create(uow, spec, lifetime=lifetime, timeout=600, now=ctx.clock()).id


def load(ctx: WorkerContext, launch_id: str) -> tuple[Launch, list[str]]:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        phases = list(
            db.scalars(
                select(LaunchEvent.phase)
                .where(LaunchEvent.launch_id == launch_id)
                .order_by(LaunchEvent.id)
            )
        )
        return launch, phases


def test_queued_launch_becomes_ready_with_encrypted_token(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx)

    assert advance(ctx, launch_id) == DONE

    launch, phases = load(ctx, launch_id)
    assert launch.status == Status.ready
    assert phases == ["waiting", "built", "launching", "ready"]
    assert launch.hub_user is not None and launch.hub_user.startswith("hl-")
    assert launch.hub_user in hub.users
    [token] = hub.tokens
    assert launch.token_ciphertext and token not in launch.token_ciphertext
    assert ctx.cipher.decrypt(launch.token_ciphertext.encode()).decode() == token
    assert launch.expires_at is not None and launch.ready_at is not None
    assert (launch.expires_at - launch.ready_at).total_seconds() == 600
    assert launch_id in ctx.notified  # type: ignore[attr-defined]


def test_running_twice_has_one_effect(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx)
    advance(ctx, launch_id)
    calls = len(hub.calls)

    assert advance(ctx, launch_id) == DONE
    assert len(hub.calls) == calls  # a redelivered message finds the launch ready: no Hub call
    assert len(hub.users) == 1 and len(hub.tokens) == 1


def test_user_name_is_stored_before_the_first_hub_call(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx)
    seen: list[str | None] = []

    def check_row(what: str, name: str) -> None:
        if not seen:
            launch, _ = load(ctx, launch_id)
            seen.append(launch.hub_user)

    hub.on_call = check_row
    advance(ctx, launch_id)
    launch, _ = load(ctx, launch_id)
    assert seen == [launch.hub_user]


def test_transient_trouble_retries_with_the_same_user_name(
    ctx: WorkerContext, hub: FakeHub
) -> None:
    launch_id = new_launch(ctx)
    hub.down_for = 1  # the create call itself fails once
    outcome = advance(ctx, launch_id)
    assert outcome.retry_in is not None and outcome.retry_in >= 0
    first, _ = load(ctx, launch_id)
    assert first.status == Status.launching

    assert advance(ctx, launch_id, attempt=1) == DONE
    launch, _ = load(ctx, launch_id)
    assert launch.status == Status.ready
    assert launch.hub_user == first.hub_user
    assert list(hub.users) == [first.hub_user]


def test_retry_honours_retry_after() -> None:
    assert backoff(0, retry_after=7.0) >= 7.0
    assert all(0 <= backoff(n) <= 30 for n in range(20))


def test_hub_down_past_the_deadline_fails_with_a_clear_error(
    ctx: WorkerContext, hub: FakeHub, clock: Clock
) -> None:
    launch_id = new_launch(ctx)
    hub.down_for = 1000
    assert advance(ctx, launch_id).retry_in is not None
    clock.advance(61)

    outcome = advance(ctx, launch_id, attempt=5)

    launch, phases = load(ctx, launch_id)
    assert launch.status == Status.failed
    assert launch.error == (
        "The server did not start within 60 s (last problem: Hub unreachable: ConnectError). "
        "Try again in a few minutes."
    )
    assert phases[-3:] == ["launching", "launching", "failed"]  # the retry was announced
    assert launch.user_removed_at is None  # the Hub is still down: removal is handed off
    assert outcome.teardown_in is not None

    hub.down_for = 0
    assert teardown(ctx, launch_id) == DONE
    launch, _ = load(ctx, launch_id)
    assert launch.user_removed_at is not None
    assert hub.users == {}


def test_unknown_image_fails_and_deletes_the_user(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx, image="nope")

    assert advance(ctx, launch_id) == DONE

    launch, phases = load(ctx, launch_id)
    assert launch.status == Status.failed
    assert launch.error == "The server could not be started: Unknown image 'nope'"
    assert phases[-1] == "failed"
    assert hub.users == {}
    assert launch.user_removed_at is not None


def break_servers(hub: FakeHub, failures: int) -> list[str]:
    """The next ``failures`` servers die while starting (the progress stream says "failed");
    returns the users each start was for."""
    hub.start_pending = True
    original_start = hub.start_server
    started: list[str] = []

    def start(name: str, options: dict[str, Any]) -> bool:
        original_start(name, options)
        started.append(name)
        if len(started) <= failures:
            hub.users[name]["servers"][""] = "broken"
        return False

    hub.start_server = start  # type: ignore[method-assign]
    return started


def messages(ctx: WorkerContext, launch_id: str) -> list[str]:
    with session_scope(ctx.settings.database_url) as db:
        return list(
            db.scalars(
                select(LaunchEvent.message)
                .where(LaunchEvent.launch_id == launch_id)
                .order_by(LaunchEvent.id)
            )
        )


def test_a_server_that_dies_is_replaced_and_each_try_announced(
    ctx: WorkerContext, hub: FakeHub
) -> None:
    launch_id = new_launch(ctx)
    started = break_servers(hub, failures=2)

    assert advance(ctx, launch_id).retry_in is not None
    assert advance(ctx, launch_id).retry_in is not None
    assert advance(ctx, launch_id) == DONE

    launch, _ = load(ctx, launch_id)
    assert launch.status == Status.ready and launch.spawn_failures == 2
    assert len(set(started)) == 1 and list(hub.users) == started[:1]  # one Hub user, 3 servers
    said = messages(ctx, launch_id)
    assert "The server did not start (boom); starting a fresh one (try 2 of 4)" in said
    assert "The server did not start (boom); starting a fresh one (try 3 of 4)" in said


def test_a_server_that_never_starts_fails_after_the_last_try(
    ctx: WorkerContext, hub: FakeHub
) -> None:
    launch_id = new_launch(ctx)
    started = break_servers(hub, failures=1000)

    outcomes = [advance(ctx, launch_id) for _ in range(4)]

    assert [o.retry_in is not None for o in outcomes] == [True, True, True, False]
    launch, phases = load(ctx, launch_id)
    assert launch.status == Status.failed and len(started) == 4
    assert launch.error == "The server could not be started (4 times): boom"
    assert phases[-1] == "failed" and hub.users == {}
    assert advance(ctx, launch_id) == DONE and len(started) == 4  # a late message does nothing


def test_a_spawn_failure_that_cannot_pass_fails_at_once(ctx: WorkerContext, hub: FakeHub) -> None:
    hub.start_pending = True
    launch_id = new_launch(ctx)
    original_start = hub.start_server

    def unknown_image_late(name: str, options: dict[str, Any]) -> bool:
        original_start(name, options)
        hub.users[name]["servers"][""] = "broken"
        return False

    def wait_ready(name: str, **_: Any) -> str:
        detail = "Spawn failed: Unknown image 'x'; this Hub can run: default"
        raise HubSpawnFailed(f"progress: {detail}", detail=detail)

    hub.start_server = unknown_image_late  # type: ignore[method-assign]
    hub.wait_ready = wait_ready  # type: ignore[method-assign]
    assert advance(ctx, launch_id) == DONE
    launch, _ = load(ctx, launch_id)
    assert launch.status == Status.failed and launch.spawn_failures == 0
    assert launch.error == (
        "The server could not be started: Unknown image 'x'; this Hub can run: default"
    )


def test_the_hubs_spawn_limit_is_waited_for_without_counting_a_try(
    ctx: WorkerContext, hub: FakeHub
) -> None:
    launch_id = new_launch(ctx)
    original_start = hub.start_server
    busy = [True]

    def start(name: str, options: dict[str, Any]) -> bool:
        if busy.pop() if busy else False:
            raise HubUnavailable(
                "Hub answered 429: Too many users trying to log in right now.",
                status=429,
                detail="Too many users trying to log in right now.",
                retry_after=3.0,
            )
        return original_start(name, options)

    hub.start_server = start  # type: ignore[method-assign]
    outcome = advance(ctx, launch_id)
    assert outcome.retry_in is not None and outcome.retry_in >= 3.0
    assert advance(ctx, launch_id) == DONE
    launch, _ = load(ctx, launch_id)
    assert launch.status == Status.ready and launch.spawn_failures == 0
    said = messages(ctx, launch_id)
    assert any(
        m.startswith("The Hub is busy starting other servers; yours starts in") for m in said
    )
    assert not any("429" in m for m in said)


def test_end_requested_while_launching_tears_down(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx)

    def end_when_token_is_issued(what: str, name: str) -> None:
        if what == "create_token":
            with ctx.units.begin() as uow:
                launch = get_launch(uow.db, launch_id)
                assert launch is not None
                assert (
                    transitions.request_end(uow, launch, now=ctx.clock()) is False
                )  # the running task will see the flag

    hub.on_call = end_when_token_is_issued
    advance(ctx, launch_id)

    launch, _ = load(ctx, launch_id)
    assert launch.status == Status.ended
    assert launch.end_reason == "requested"
    assert launch.token_ciphertext is None
    assert hub.users == {}


def test_end_of_a_ready_launch_is_sent_to_teardown(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx)
    advance(ctx, launch_id)
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        assert launch is not None
        assert transitions.request_end(uow, launch, now=ctx.clock()) is True

    hub.stop_pending_rounds = 2  # the Hub answers 202 "stopping"; the stop ends a bit later
    assert teardown(ctx, launch_id) == DONE
    launch, _ = load(ctx, launch_id)
    assert launch.status == Status.ended and launch.ended_at is not None
    assert hub.users == {}
    # Ending twice is a no-op.
    assert teardown(ctx, launch_id) == DONE


def test_queued_launch_ended_before_it_ran_never_touches_the_hub(
    ctx: WorkerContext, hub: FakeHub
) -> None:
    launch_id = new_launch(ctx)
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        assert launch is not None
        assert transitions.request_end(uow, launch, now=ctx.clock()) is False

    advance(ctx, launch_id)
    launch, phases = load(ctx, launch_id)
    assert launch.status == Status.ended
    assert hub.calls == []
    assert phases[-1] == "failed"  # watchers learn the launch will not become ready


@pytest.mark.parametrize("status", [Status.failed, Status.ended])
def test_terminal_launches_are_left_alone(ctx: WorkerContext, hub: FakeHub, status: Status) -> None:
    launch_id = new_launch(ctx)
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        launch.status = status
    assert advance(ctx, launch_id) == DONE
    assert hub.calls == []


def test_a_duplicate_run_finishing_first_leaves_the_launch_ready(
    ctx: WorkerContext, hub: FakeHub
) -> None:
    launch_id = new_launch(ctx)

    def duplicate_wins(what: str, name: str) -> None:
        if what == "create_token" and not hub.tokens:
            hub.on_call = None
            assert advance(ctx, launch_id) == DONE  # the duplicate

    hub.on_call = duplicate_wins
    assert advance(ctx, launch_id) == DONE

    launch, phases = load(ctx, launch_id)
    assert launch.status == Status.ready
    assert phases.count("ready") == 1
    assert launch.hub_user in hub.users


def test_a_slow_stop_is_left_for_a_later_attempt(ctx: WorkerContext, hub: FakeHub) -> None:
    launch_id = new_launch(ctx)
    advance(ctx, launch_id)
    name = load(ctx, launch_id)[0].hub_user
    assert name is not None
    hub.stop_pending_rounds = 100

    assert remove_hub_user(hub, name, wait=0) is False
    assert name in hub.users and ("delete_user", name) not in hub.calls

    hub.stop_pending_rounds = 0
    assert remove_hub_user(hub, name) is True
    assert name not in hub.users
