"""The launch steps: from a queued row to a running server, and back to nothing.

Each step re-reads the row, does only the work that is missing, advances the status and
commits, so running the whole thing twice (a redelivered message, a retry) has one effect:
the Hub user name is chosen once and stored before the first Hub call, "already exists" and
"already running" count as done, and the final UPDATE to ``ready`` is conditional on nobody
having asked to end the launch meanwhile.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.fernet import Fernet
from sqlalchemy.orm import Session

from worker import builds, repos
from worker.builders import Builder, environment_name
from worker.db import as_utc, bulk_update, session_scope, utcnow
from worker.hub_client import HubClient, HubRequestError, HubUnavailable, HubUser
from worker.launches import (
    describe_spec,
    events_after,
    get_launch,
    new_hub_user_name,
    record_event,
)
from worker.models import Build, EndReason, Launch, Phase, Status
from worker.repos import RepoSpec, ResolveError, SpecError
from worker.settings import Settings

log = logging.getLogger(__name__)

# How often a removal re-reads a server that the Hub is still stopping.
STOP_POLL_SECONDS = 0.25
# How long one teardown waits for servers to stop before handing over to a later attempt.
STOP_WAIT_SECONDS = 20.0

# Extra life for the server token beyond the session, so a clock skew never cuts a session short.
TOKEN_GRACE = 60


@dataclass
class LaunchContext:
    """What the steps need, built once per worker process."""

    settings: Settings
    hub: HubClient
    cipher: Fernet
    notify: Callable[[str], None] = lambda _launch_id: None
    clock: Callable[[], datetime] = field(default=utcnow)
    builder: Builder | None = None
    resolve: Callable[[RepoSpec, Settings], str] = repos.resolve

    def deadline(self, launch: Launch) -> datetime:
        if launch.deadline_at is not None:
            return as_utc(launch.deadline_at)
        return as_utc(launch.created_at) + timedelta(seconds=self.settings.launch_timeout)


@dataclass(frozen=True)
class Outcome:
    """What the task should do next: nothing, run again after ``retry_in`` seconds, or hand the
    unfinished removal of the Hub user to the teardown task after ``teardown_in`` seconds."""

    retry_in: float | None = None
    teardown_in: float | None = None
    # An environment build this launch claimed: the task sends it (after the commit).
    send_build: str | None = None


DONE = Outcome()


def backoff(attempt: int, *, retry_after: float | None = None, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter; a Hub's Retry-After is a floor."""
    delay = random.uniform(0, min(cap, 0.5 * 2**attempt))  # noqa: S311 - jitter, not crypto
    return max(delay, retry_after or 0.0)


class LaunchTimedOut(Exception):
    """The launch passed its deadline before its next step."""


class BuildRefused(Exception):
    """The environment this launch needs failed to build; the message carries the log tail."""


def advance(ctx: LaunchContext, launch_id: str, *, attempt: int = 0) -> Outcome:
    """Run the missing steps of one launch until it is ready, failed or must wait for the Hub."""
    try:
        return _advance(ctx, launch_id)
    except LaunchTimedOut:
        return _fail(ctx, launch_id, _timeout_message(ctx, _last_problem(ctx, launch_id)))
    except HubUnavailable as e:
        with session_scope(ctx.settings.database_url) as db:
            launch = get_launch(db, launch_id)
            if launch is None or launch.is_terminal:
                return DONE
            remaining = (ctx.deadline(launch) - ctx.clock()).total_seconds()
            if remaining > 0:
                # Never sleep past the deadline: the last try happens in time to report it.
                delay = min(backoff(attempt, retry_after=e.retry_after), remaining)
                log.warning("launch %s: %s; retrying in %.1fs", launch_id, e.message, delay)
                record_event(
                    db,
                    launch,
                    Phase.launching,
                    f"Waiting for the Hub ({e.detail}); retrying in {delay:.1f} s",
                    data={"problem": e.message},
                    now=ctx.clock(),
                )
                ctx.notify(launch_id)
                return Outcome(retry_in=delay)
        return _fail(ctx, launch_id, _timeout_message(ctx, e.message))
    except HubRequestError as e:
        log.warning("launch %s failed: %s", launch_id, e.message)
        return _fail(ctx, launch_id, _user_message(e))
    except BuildRefused as e:
        return _fail(ctx, launch_id, str(e))
    except (ResolveError, SpecError) as e:
        return _fail(ctx, launch_id, f"The repository could not be resolved: {e}")
    except Exception:
        log.exception("launch %s: unexpected error", launch_id)
        return _fail(ctx, launch_id, "The launch failed because of an internal error; try again.")


def _last_problem(ctx: LaunchContext, launch_id: str) -> str | None:
    with session_scope(ctx.settings.database_url) as db:
        problems = [
            e.data["problem"] for e in events_after(db, launch_id) if e.data and "problem" in e.data
        ]
    return problems[-1] if problems else None


def _advance(ctx: LaunchContext, launch_id: str) -> Outcome:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        if launch is None or launch.is_terminal or launch.status == Status.ready:
            return DONE
        if launch.end_requested_at is not None:
            return _end_now(ctx, db, launch)
        if ctx.clock() >= ctx.deadline(launch):
            raise LaunchTimedOut
        repo = launch.spec.get("repo")
    if repo is not None:
        image_or_wait = _environment(ctx, launch_id)
        if isinstance(image_or_wait, Outcome):
            return image_or_wait
        image = image_or_wait
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        if launch is None or launch.is_terminal:
            return DONE
        if repo is None:
            image = launch.spec["image"]
        name = _choose_user(ctx, db, launch)
        deadline = ctx.deadline(launch)
    ctx.notify(launch_id)

    ctx.hub.create_user(name)
    ready = ctx.hub.start_server(name, {"image": image})
    if not ready:
        remaining = (deadline - ctx.clock()).total_seconds()
        ctx.hub.wait_ready(
            name, timeout=max(remaining, 0.1), on_progress=lambda m: _progress(ctx, launch_id, m)
        )
    return _issue_token(ctx, launch_id, name)


def _choose_user(ctx: LaunchContext, db: Session, launch: Launch) -> str:
    """The Hub user name, chosen once: conditional on none yet, so a concurrent duplicate run
    cannot pick a second one. Moves the launch to ``launching``."""
    if launch.hub_user is None:
        now = ctx.clock()
        chosen = db.execute(  # type: ignore[attr-defined]  # CursorResult.rowcount
            bulk_update(Launch)
            .where(Launch.id == launch.id, Launch.hub_user.is_(None))
            .values(
                hub_user=new_hub_user_name(ctx.settings.user_prefix),
                status=Status.launching,
                updated_at=now,
                deadline_at=now + timedelta(seconds=ctx.settings.launch_timeout),
            )
        ).rowcount
        db.refresh(launch)
        if chosen:
            if "image" in launch.spec:
                record_event(
                    db, launch, Phase.built, f"Using {describe_spec(launch.spec)}", now=now
                )
            record_event(db, launch, Phase.launching, "Launching server...", now=now)
    assert launch.hub_user is not None
    return launch.hub_user


def _environment(ctx: LaunchContext, launch_id: str) -> str | Outcome:
    """For a repository launch: resolve the ref once, then build the environment once.
    Returns the image for the spawner, or what to do while the build runs."""
    builder = ctx.builder
    assert builder is not None, "repository launches need a builder"
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        commit = launch.commit
        if commit is None and launch.status == Status.queued:
            now = ctx.clock()
            launch.status = Status.building
            launch.updated_at = now
            launch.deadline_at = now + timedelta(
                seconds=ctx.settings.build_timeout + ctx.settings.launch_timeout
            )
            record_event(db, launch, Phase.fetching, f"Resolving {describe_spec(launch.spec)}")
        spec = RepoSpec(launch.spec["repo"], launch.spec.get("ref", "HEAD"))
    if commit is None:
        ctx.notify(launch_id)
        commit = ctx.resolve(spec, ctx.settings)
        name = environment_name(spec.url, commit, builder.version)
        with session_scope(ctx.settings.database_url) as db:
            db.execute(
                bulk_update(Launch)
                .where(Launch.id == launch_id, Launch.commit.is_(None))
                .values(commit=commit, env_name=name, updated_at=ctx.clock())
            )
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None and launch.env_name is not None
        if launch.status != Status.building:
            return builder.image(launch.env_name)  # a duplicate run got past the build
        decision = builds.decide(db, launch, builder, ctx.clock())
        if decision == builds.Decision.failed:
            message = builds.failure_message(db.get(Build, launch.env_name))
        name = launch.env_name
    ctx.notify(launch_id)
    if decision == builds.Decision.failed:
        raise BuildRefused(message)
    if decision == builds.Decision.ready:
        return builder.image(name)
    return Outcome(
        retry_in=builds.POLL_SECONDS,
        send_build=name if decision == builds.Decision.start else None,
    )


def _progress(ctx: LaunchContext, launch_id: str, message: str) -> None:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        if launch is not None and not launch.is_terminal:
            now = ctx.clock()
            record_event(db, launch, Phase.launching, message, now=now)
            launch.updated_at = now  # progress: the cleanup pass will not think it lost
    ctx.notify(launch_id)


def _issue_token(ctx: LaunchContext, launch_id: str, name: str) -> Outcome:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        if launch is None or launch.status != Status.launching:
            return DONE
        lifetime = launch.lifetime
    # The token opens this one user's server only and dies with the session.
    token = ctx.hub.create_token(
        name,
        scopes=[f"access:servers!user={name}"],
        expires_in=lifetime + TOKEN_GRACE,
        note=f"hublaunch session {launch_id}",
    )
    now = ctx.clock()
    with session_scope(ctx.settings.database_url) as db:
        became_ready = db.execute(  # type: ignore[attr-defined]  # CursorResult.rowcount
            bulk_update(Launch)
            .where(
                Launch.id == launch_id,
                Launch.status == Status.launching,
                Launch.end_requested_at.is_(None),
            )
            .values(
                status=Status.ready,
                token_ciphertext=ctx.cipher.encrypt(token.encode()).decode(),
                ready_at=now,
                expires_at=now + timedelta(seconds=lifetime),
                updated_at=now,
            )
        ).rowcount
        launch = get_launch(db, launch_id)
        assert launch is not None
        if not became_ready:
            if launch.end_requested_at is not None and launch.status == Status.launching:
                # Ended while we were starting it: the owner asked, so take it down now.
                return _end_now(ctx, db, launch)
            # A duplicate run finished first; the token issued here dies with the session.
            return DONE
        record_event(
            db, launch, Phase.ready, "Server ready", data={"url": server_url(ctx, launch)}, now=now
        )
    ctx.notify(launch_id)
    log.info("launch %s ready as %s", launch_id, name)
    return DONE


def server_url(ctx: LaunchContext | Settings, launch: Launch) -> str:
    """The user's server URL, without the token."""
    settings = ctx.settings if isinstance(ctx, LaunchContext) else ctx
    return f"{settings.public_url}/user/{launch.hub_user}/"


def _fail(ctx: LaunchContext, launch_id: str, message: str) -> Outcome:
    now = ctx.clock()
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        if launch is None or launch.is_terminal:
            return DONE
        launch.status = Status.failed
        launch.error = message
        launch.end_reason = EndReason.failed
        launch.ended_at = now
        launch.updated_at = now
        launch.token_ciphertext = None
        record_event(db, launch, Phase.failed, message, now=now)
    ctx.notify(launch_id)
    return _handoff(teardown(ctx, launch_id))


def _end_now(ctx: LaunchContext, db: Session, launch: Launch) -> Outcome:
    now = ctx.clock()
    if launch.status in (Status.queued, Status.building, Status.launching):
        # The event stream ends on ready or failed; tell watchers this one will not be ready.
        record_event(db, launch, Phase.failed, "The launch was ended before it was ready.", now=now)
    if not launch.is_terminal:
        launch.status = Status.ended
        launch.end_reason = launch.end_reason or EndReason.requested
        launch.ended_at = now
        launch.updated_at = now
        launch.token_ciphertext = None
    db.commit()
    ctx.notify(launch.id)
    return _handoff(teardown(ctx, launch.id))


def _handoff(outcome: Outcome) -> Outcome:
    return Outcome(teardown_in=outcome.retry_in) if outcome.retry_in is not None else DONE


def teardown(
    ctx: LaunchContext, launch_id: str, *, attempt: int = 0, known: HubUser | None = None
) -> Outcome:
    """Stop every server of the launch's Hub user, then delete the user. Safe to repeat.

    A ready launch whose end was requested becomes ``ended``; a failed one stays ``failed``.
    Returns a retry delay while the Hub is unreachable or a server is still stopping.
    """
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        if launch is None or launch.user_removed_at is not None:
            return DONE
        name = launch.hub_user
    try:
        removed = name is None or remove_hub_user(
            ctx.hub,
            name,
            wait=STOP_WAIT_SECONDS,
            known=known if known and known.name == name else None,
        )
        if not removed:
            return Outcome(retry_in=backoff(attempt, cap=10.0))
    except HubUnavailable as e:
        log.warning("teardown of launch %s: %s", launch_id, e.message)
        return Outcome(retry_in=backoff(attempt, retry_after=e.retry_after))
    now = ctx.clock()
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        launch.user_removed_at = now
        launch.token_ciphertext = None
        if not launch.is_terminal:
            launch.status = Status.ended
            launch.end_reason = launch.end_reason or EndReason.requested
            launch.ended_at = now
        launch.updated_at = now
    ctx.notify(launch_id)
    return DONE


def remove_hub_user(
    hub: HubClient, name: str, *, wait: float = 0.0, known: HubUser | None = None
) -> bool:
    """Stop every server of the user (named ones too), then delete the user.

    Returns False while a server is still stopping after ``wait`` seconds: the Hub answers a
    slow stop with 202 and refuses to delete a user whose server is stopping, so the caller
    tries again later. A user that is already gone counts as removed. ``known`` is the user as a
    listing just read it (saves a request per user in a cleanup pass).
    """
    deadline = time.monotonic() + wait
    user = known or hub.get_user(name)
    if user is None:
        return True
    pending = [server for server in user.servers if not hub.stop_server(name, server)]
    while True:
        if not pending:
            try:
                hub.delete_user(name)
                return True
            except HubRequestError as e:
                if e.status != 400:  # 400: "in the process of stopping, please wait"
                    raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(STOP_POLL_SECONDS)
        user = hub.get_user(name)
        if user is None:
            return True
        pending = [server for server, state in user.servers.items() if state.pending == "stop"]


def _timeout_message(ctx: LaunchContext, problem: str | None) -> str:
    because = f" (last problem: {problem})" if problem else ""
    return (
        f"The server did not start within {ctx.settings.launch_timeout} s{because}. "
        "Try again in a few minutes."
    )


def _user_message(e: HubRequestError) -> str:
    return f"The server could not be started: {e.detail.removeprefix('Spawn failed: ')}"
