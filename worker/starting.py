"""The launch steps: from a queued row to a running server.

Each step re-reads the row, does only the work that is missing and records the change through
``worker.transitions`` in a unit of work of its own, so running the whole thing twice (a
redelivered message, a retry) has one effect: the Hub user name is chosen once and stored
before the first Hub call, "already exists" and "already running" count as done, and the move
to ``ready`` is conditional on nobody having asked to end the launch meanwhile. No transaction
is open while the Hub or the repository host is called.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy.exc import OperationalError

from worker import admission, builds, hub_health, placement, pool, transitions
from worker.broker import QueueUnavailable, build_message
from worker.builders import environment_name
from worker.context import WorkerContext
from worker.hub_client import HubError, HubRequestError, HubSpawnFailed, HubUnavailable
from worker.hubs import build_queue, hub_of, hubs, per_hub_builds
from worker.logs import bind_user
from worker.models import Build, Phase, Status
from worker.outcome import DONE, Outcome, backoff, handoff
from worker.queries import get_launch, last_problem
from worker.repos import RepoSpec, ResolveError, SpecError
from worker.teardown import teardown
from worker.transitions import FailReason, IllegalTransition

log = logging.getLogger(__name__)

# Extra life for the server token beyond the session, so a clock skew never cuts a session short.
TOKEN_GRACE = 60


class LaunchTimedOut(Exception):
    """The launch passed its deadline before its next step."""


class BuildRefused(Exception):
    """The environment this launch needs failed to build; the message carries the log tail."""


class LaunchVanished(Exception):
    """The launch's row is gone (it is never deleted while a task runs; a wiped database)."""


def advance(ctx: WorkerContext, launch_id: str, *, attempt: int = 0) -> Outcome:
    """Run the missing steps of one launch until it is ready, failed or must wait for the Hub."""
    try:
        return _advance(ctx, launch_id)
    except LaunchTimedOut:
        return _fail(ctx, launch_id, _timed_out(ctx, launch_id), FailReason.timeout)
    except HubUnavailable as e:
        with ctx.units.begin() as uow:
            launch = get_launch(uow.db, launch_id)
            if launch is None or launch.is_terminal:
                return DONE
            remaining = (ctx.deadline(launch) - ctx.clock()).total_seconds()
            if remaining > 0:
                # Never sleep past the deadline: the last try happens in time to report it.
                # Capped at 10 s: a visitor waits at most that long once the Hub is back.
                delay = min(backoff(attempt, retry_after=e.retry_after, cap=10.0), remaining)
                log.warning("launch %s: %s; retrying in %.1fs", launch_id, e.message, delay)
                transitions.note(
                    uow,
                    launch,
                    Phase.launching,
                    _waiting_message(e, delay),
                    data={"problem": e.message},
                    now=ctx.clock(),
                )
                return Outcome(retry_in=delay)
        message = transitions.timeout_message(_timeout(ctx), e.message)
        return _fail(ctx, launch_id, message, FailReason.timeout)
    except HubRequestError as e:
        log.warning("launch %s failed: %s", launch_id, e.message)
        return _fail(ctx, launch_id, _user_message(e), FailReason.hub_refused)
    except BuildRefused as e:
        return _fail(ctx, launch_id, str(e), FailReason.build_failed)
    except (ResolveError, SpecError) as e:
        message = f"The repository could not be resolved: {e}"
        return _fail(ctx, launch_id, message, FailReason.unresolvable)
    except LaunchVanished:
        log.warning("launch %s: its row is gone; nothing to do", launch_id)
        return DONE
    except QueueUnavailable as e:
        # A step committed but its message (a build) was refused: the claim stands, and a
        # later run (this retry, or the cleanup pass's re-send) picks the launch up again.
        log.warning("launch %s: queue unavailable: %s", launch_id, e)
        return Outcome(retry_in=backoff(attempt))
    except OperationalError as e:
        # The database went away mid-step (a restart, a dropped connection): every step is
        # safe to run again, and the next try gets a fresh connection.
        log.warning("launch %s: database unavailable: %s", launch_id, type(e.orig).__name__)
        return Outcome(retry_in=backoff(attempt))
    except Exception:
        log.exception("launch %s: unexpected error", launch_id)
        message = "The launch failed because of an internal error; try again."
        return _fail(ctx, launch_id, message, FailReason.internal_error)


def _waiting_message(e: HubUnavailable, delay: float) -> str:
    if e.status == 429:
        # The Hub's spawn limit: busy, not broken; the visitor needs no status code.
        return f"The Hub is busy starting other servers; yours starts in {delay:.1f} s"
    return f"Waiting for the Hub ({e.detail}); retrying in {delay:.1f} s"


def _timeout(ctx: WorkerContext) -> int:
    return ctx.settings.launch_timeout


def _timed_out(ctx: WorkerContext, launch_id: str) -> str:
    with ctx.units.begin() as uow:
        problem = last_problem(uow.db, launch_id)
    return transitions.timeout_message(_timeout(ctx), problem)


def _advance(ctx: WorkerContext, launch_id: str) -> Outcome:
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.is_terminal or launch.status in (Status.ready, Status.pooled):
            return DONE
        ending = launch.end_requested_at is not None
        if ending:
            transitions.mark_ended(uow, launch, now=ctx.clock())
        elif ctx.clock() >= ctx.deadline(launch):
            raise LaunchTimedOut
        repo = launch.spec.get("repo")
        build_only = bool(launch.spec.get("build_only"))
        # A visitor's launch not yet started may take a server from the warm pool.
        may_claim = launch.status == Status.queued and launch.pool_key is None and not build_only
        spec = launch.spec
    if ending:
        return handoff(teardown(ctx, launch_id))
    if may_claim and ctx.settings.pool:
        name, running = pool.take(ctx, launch_id, spec)
        if name is not None and running:
            return _issue_token(ctx, launch_id, name, None)
        # A miss; or the pooled servers drawn were dead and none is left: this launch starts a
        # fresh server (for that never used user, if it holds one), as any launch would.
    if repo is not None:
        image_or_wait = _environment(ctx, launch_id)
        if isinstance(image_or_wait, Outcome):
            return image_or_wait
        image = image_or_wait
    if build_only:
        return _built_only(ctx, launch_id, image if repo is not None else spec["image"])
    # Over the caps on active sessions the launch waits in line; admitted, it is launching
    # with its Hub user's name chosen, in the same transaction.
    admitted = admission.admit(ctx, launch_id)
    if isinstance(admitted, Outcome):
        return admitted
    launch = admitted
    if launch.hub_user is None:
        raise IllegalTransition(launch.id, launch.status, Status.launching)
    name = launch.hub_user
    if repo is None:
        image = launch.spec["image"]
    deadline = ctx.deadline(launch)
    # After a failed spawn, JupyterHub (6.1) may answer the next start with 201 while that
    # server is still starting (it reads the failed spawner it replaced): follow the progress
    # stream then, which says ready, or failed, for the server really there.
    confirm = launch.spawn_failures > 0

    bind_user(name)  # the rest of this launch's lines name its Hub user
    hub = ctx.hub_for(launch.hub)
    spawn_started = time.monotonic()
    try:
        hub.create_user(name)
    except HubUnavailable as e:
        # Its Hub went away before the user existed: another Hub may take the launch now.
        if _place_again(ctx, launch_id, hub.name, e):
            return Outcome(retry_in=0)
        raise
    try:
        ready = hub.start_server(name, {"image": image})
        if not ready or confirm:
            remaining = (deadline - ctx.clock()).total_seconds()
            hub.wait_ready(
                name,
                timeout=max(remaining, 0.1),
                on_progress=lambda m: _progress(ctx, launch_id, m),
            )
    except (HubSpawnFailed, HubUnavailable) as e:
        if not _server_failed(e):
            raise
        return _spawn_again(ctx, launch_id, name, e)
    return _issue_token(ctx, launch_id, name, time.monotonic() - spawn_started)


def _place_again(ctx: WorkerContext, launch_id: str, hub: str, e: HubUnavailable) -> bool:
    """With other Hubs configured: record ``hub`` as failing and put the launch back in line
    with no Hub (and a fresh user name: the old one may exist on ``hub``, whose cleanup removes
    it as an orphan). True when it was put back."""
    # A busy Hub (429) is not a dead one: its launches wait for it as with one Hub.
    if len(ctx.all_hubs()) < 2 or e.status not in (None, 502, 503, 504):
        return False
    with ctx.units.begin() as uow:
        hub_health.record(uow.db, hub, ok=False, error=e.message, now=ctx.clock())
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.status != Status.launching or launch.hub != hub:
            return False
        transitions.unplace(
            uow,
            launch,
            why=f"{hub} did not answer",
            now=ctx.clock(),
            rebuild="repo" in launch.spec and per_hub_builds(ctx.settings),
        )
    log.warning("launch %s: Hub %s unavailable (%s); placing it again", launch_id, hub, e)
    return True


# The Hub's words for an image it cannot run (hub/spawners.py UnknownImage): no new server
# will change that.
UNKNOWN_IMAGE = "Unknown image"


def _server_failed(e: HubSpawnFailed | HubUnavailable) -> bool:
    """Whether this server failed in a way a fresh one may not: it died or timed out while
    starting (the progress stream says "failed"), or the Hub's spawn raised (a 500). A Hub
    that is away or busy (connection errors, 502-504, 429) is waited for instead."""
    if isinstance(e, HubSpawnFailed):
        return UNKNOWN_IMAGE not in e.detail
    return e.status == 500


def _spawn_again(ctx: WorkerContext, launch_id: str, name: str, e: HubError) -> Outcome:
    """Count the failed server; start a fresh one shortly, or fail after the last try."""
    detail = e.detail or e.message
    log.warning("launch %s: the server did not start: %s", launch_id, e.message)
    # The failed server is stopped before the next try (JupyterHub stops it itself after a
    # failed spawn; this also covers a server that started too late).
    with ctx.units.begin() as uow:
        placed = get_launch(uow.db, launch_id)
        hub = ctx.hub_for(placed.hub if placed is not None else None)
    if not hub.stop_server(name):
        log.info("launch %s: the failed server is still stopping", launch_id)
    tries = ctx.settings.spawn_tries
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.status != Status.launching:
            return DONE
        remaining = (ctx.deadline(launch) - ctx.clock()).total_seconds()
        failures = transitions.spawn_failed(uow, launch, detail, tries=tries, now=ctx.clock())
    if failures >= tries or remaining < SPAWN_RETRY_DELAY:
        attempts = "once" if failures == 1 else f"{failures} times"
        message = f"The server could not be started ({attempts}): {_short(detail)}"
        return _fail(ctx, launch_id, message, FailReason.spawn_failed)
    return Outcome(retry_in=SPAWN_RETRY_DELAY)


# Seconds before the next server is started: time for the Hub to finish stopping the last.
SPAWN_RETRY_DELAY = 1.0


def _short(detail: str) -> str:
    return detail.removeprefix("Spawn failed: ")


def _environment(ctx: WorkerContext, launch_id: str) -> str | Outcome:
    """For a repository launch: resolve the ref once, then build the environment once.
    Returns the image for the spawner, or what to do while the build runs."""
    builder = ctx.need_builder()
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None:
            raise LaunchVanished(launch_id)
        commit = launch.commit
        if commit is None and launch.status == Status.queued:
            now = ctx.clock()
            budget = ctx.settings.build_timeout + ctx.settings.launch_timeout
            transitions.mark_building(
                uow, launch, deadline=now + timedelta(seconds=budget), now=now
            )
        spec = RepoSpec(launch.spec["repo"], launch.spec.get("ref", "HEAD"))
    if commit is None:
        commit = ctx.resolve(spec, ctx.settings)
        # Per-Hub builds: the Hub is chosen now, and the environment is built on its machine.
        hub = _build_hub(ctx) if per_hub_builds(ctx.settings) else None
        resolved = environment_name(spec.url, commit, builder.version, hub=hub)
        with ctx.units.begin() as uow:
            transitions.record_commit(uow, launch_id, commit, resolved, ctx.clock(), hub=hub)
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None:
            raise LaunchVanished(launch_id)
        if launch.env_name is None:
            raise RuntimeError(f"launch {launch_id} has a commit but no environment name")
        name = launch.env_name
        if launch.status != Status.building:
            return builder.image(name)  # a duplicate run got past the build
        decision = builds.decide(uow, launch, builder, ctx.clock())
        if decision == builds.Decision.failed:
            refusal = builds.failure_message(uow.db.get(Build, name))
        if decision == builds.Decision.start:
            queue = build_queue(ctx.settings, launch.hub) if launch.hub else None
            uow.send(build_message(name, queue=queue))
        uow.notify(launch_id)
    if decision == builds.Decision.failed:
        raise BuildRefused(refusal)
    if decision == builds.Decision.ready:
        return builder.image(name)
    return Outcome(retry_in=builds.POLL_SECONDS)


def _built_only(ctx: WorkerContext, launch_id: str, image: str) -> Outcome:
    """A build-only launch ends here, its environment built (or an image, already there):
    no Hub user, no server, no token."""
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is not None and not launch.is_terminal:
            transitions.mark_built_only(uow, launch, image, now=ctx.clock())
    return DONE


def _build_hub(ctx: WorkerContext) -> str:
    """The Hub a repository launch is built for, with per-Hub builds: the one placement would
    choose now (its slot is taken later, by the admission, on this same Hub)."""
    configured = hubs(ctx.settings)
    with ctx.units.begin() as uow:
        up = placement.answering(uow.db, ctx.settings, ctx.clock())
        chosen = placement.choose(up, placement.active_per_hub(uow.db, configured[0].name))
    return (chosen or (up or list(configured))[0]).name


def _progress(ctx: WorkerContext, launch_id: str, message: str) -> None:
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is not None and not launch.is_terminal:
            # Progress: the cleanup pass will not think it lost.
            transitions.note(uow, launch, Phase.launching, message, now=ctx.clock(), progress=True)


def _issue_token(
    ctx: WorkerContext, launch_id: str, name: str, spawn_seconds: float | None
) -> Outcome:
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.status != Status.launching:
            return DONE
        if launch.pool_key is not None:
            # A warm-pool server: no visitor yet, so no token; it waits in the pool.
            if transitions.mark_pooled(uow, launch, now=ctx.clock()):
                log.info("launch %s pooled as %s", launch_id, name)
                return DONE
            if launch.end_requested_at is None or launch.status != Status.launching:
                return DONE
            transitions.mark_ended(uow, launch, now=ctx.clock())
    if launch.pool_key is not None:
        return handoff(teardown(ctx, launch_id))
    # The token opens this one user's server only and dies with the session.
    token = ctx.hub_for(launch.hub).create_token(
        name,
        scopes=[f"access:servers!user={name}"],
        expires_in=launch.lifetime + TOKEN_GRACE,
        note=f"hublaunch session {launch_id}",
    )
    now = ctx.clock()
    with ctx.units.begin() as uow:
        # The row as read before the Hub call, attached without reading it again: mark_ready's
        # UPDATE is conditional on the stored state and re-reads the row after it.
        launch = uow.db.merge(launch, load=False)
        ciphertext = ctx.cipher.encrypt(token.encode()).decode()
        if transitions.mark_ready(
            uow,
            launch,
            token_ciphertext=ciphertext,
            public_url=hub_of(ctx.settings, launch.hub).public_url,
            now=now,
            spawn_seconds=spawn_seconds,
        ):
            log.info("launch %s ready as %s", launch_id, name)
            return DONE
        if launch.end_requested_at is None or launch.status != Status.launching:
            # A duplicate run finished first; the token issued here dies with the session.
            return DONE
        # Ended while we were starting it: the owner asked, so take it down now.
        transitions.mark_ended(uow, launch, now=now)
    return handoff(teardown(ctx, launch_id))


def _fail(ctx: WorkerContext, launch_id: str, message: str, reason: FailReason) -> Outcome:
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.is_terminal:
            return DONE
        transitions.mark_failed(uow, launch, message, reason=reason, now=ctx.clock())
    return handoff(teardown(ctx, launch_id))


def _user_message(e: HubRequestError) -> str:
    return f"The server could not be started: {_short(e.detail)}"
