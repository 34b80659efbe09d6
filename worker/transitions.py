"""The launch state machine: the only writer of a launch's status, its timestamps, its token
ciphertext and the events that tell watchers about them.

Every change of state is one function here, called inside a unit of work; each checks that
the move is legal (in Python for a loaded row, in the WHERE clause for the conditional and bulk
UPDATEs that decide races) and records the matching event and doorbell. The table:

    queued    -> building | launching | failed | ended
    building  -> launching | failed | ended
    launching -> ready | failed | ended
    ready     -> ended
    failed, ended: final

``end_requested_at``, ``user_removed_at`` and the cleanup lease are not statuses: a requested
end is carried out by whoever holds the launch (``mark_ended``), and a removed user is recorded
with ``mark_user_removed``.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import Session

from worker.broker import launch_message
from worker.bulk_insert import NewRow, insert_new
from worker.db import as_utc, bulk_update, rowcount
from worker.metrics import observation
from worker.models import SPEC_KEY_LENGTH, TERMINAL, EndReason, Launch, LaunchEvent, Phase, Status
from worker.providers import PROVIDER_SCHEMES as RECORD_PROVIDERS
from worker.unit_of_work import UnitOfWork

STARTING = (Status.queued, Status.building, Status.launching)

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.building, Status.launching, Status.failed, Status.ended}),
    Status.building: frozenset({Status.launching, Status.failed, Status.ended}),
    # Back to queued: its Hub went away before its user existed (placed again, issue 14).
    Status.launching: frozenset(
        {Status.ready, Status.pooled, Status.failed, Status.ended, Status.queued}
    ),
    # Handed over to a visitor's launch, drained, or found gone: its row ends either way.
    Status.pooled: frozenset({Status.ended}),
    Status.ready: frozenset({Status.ended}),
    Status.failed: frozenset(),
    Status.ended: frozenset(),
}

ENDED_BEFORE_READY = "The launch was ended before it was ready."


class FailReason(enum.StrEnum):
    """Why a launch failed, for the metrics (the visitor reads the message)."""

    hub_refused = "hub_refused"
    spawn_failed = "spawn_failed"
    timeout = "timeout"
    build_failed = "build_failed"
    unresolvable = "unresolvable"
    queue_unavailable = "queue_unavailable"
    internal_error = "internal_error"
    # Over the caps on active sessions for longer than max_wait (worker/admission.py).
    capacity = "capacity"


# Repository hosts named in the metrics; any other is "git", so a visitor cannot add series.
KNOWN_HOSTS = frozenset({"github.com", "gitlab.com", "bitbucket.org", "codeberg.org"})


def spec_key(spec: dict[str, Any]) -> str:
    """What one environment is called for the per-spec cap (``worker.admission``): the image
    (``:latest`` dropped), or the repository URL whatever the ref. The ref is left out on
    purpose: otherwise a visitor could fill every slot with one repository by asking for a
    different commit each time."""
    if "image" in spec:
        return "image:" + str(spec["image"]).removesuffix(":latest")
    url = str(spec.get("repo", "")).strip().lower().rstrip("/").removesuffix(".git")
    return ("repo:" + url)[:SPEC_KEY_LENGTH]


def provider(spec: dict[str, Any]) -> str:
    """The metrics' name for where a launch's environment comes from."""
    if "image" in spec:
        return "image"
    scheme = str(spec.get("repo", "")).partition(":")[0]
    if scheme in RECORD_PROVIDERS:
        return scheme
    host = urlsplit(str(spec.get("repo", ""))).hostname or ""
    return host if host in KNOWN_HOSTS else "git"


def _seconds(since: datetime, now: datetime) -> float:
    return max((as_utc(now) - as_utc(since)).total_seconds(), 0.0)


def _finished(uow: UnitOfWork, launch: Launch, outcome: str, reason: str) -> None:
    spec_provider = provider(launch.spec)
    uow.observe(
        observation(
            "hublaunch_launches_finished", provider=spec_provider, outcome=outcome, reason=reason
        )
    )


def _picked_up(uow: UnitOfWork, launch: Launch, now: datetime) -> None:
    """A worker took the launch's first step: the end of its wait in the queue."""
    uow.observe(
        observation(
            "hublaunch_launch_queue_seconds",
            _seconds(launch.created_at, now),
            provider=provider(launch.spec),
        )
    )


class IllegalTransition(Exception):
    """A caller asked for a move the table does not allow (a bug, never visitor input)."""

    def __init__(self, launch_id: str, source: Status, target: Status) -> None:
        super().__init__(f"launch {launch_id}: {source} -> {target} is not allowed")


def sources(target: Status) -> tuple[Status, ...]:
    """The statuses a launch may move to ``target`` from (for conditional UPDATEs)."""
    return tuple(status for status, targets in ALLOWED.items() if target in targets)


def _move(launch: Launch, target: Status, now: datetime) -> None:
    if target not in ALLOWED[launch.status]:
        raise IllegalTransition(launch.id, launch.status, target)
    launch.status = target
    launch.updated_at = now


# -- text ----------------------------------------------------------------------------


def describe_spec(spec: dict[str, Any]) -> str:
    if "image" in spec:
        return f"image {spec['image']}"
    return f"{spec['repo']}@{spec.get('ref', 'HEAD')}"


def printable(text: str) -> str:
    """Text as the database can store it: PostgreSQL refuses NUL in text, and a repository
    decides what its build prints."""
    return text.replace("\x00", "\ufffd")


def timeout_message(seconds: int, problem: str | None = None) -> str:
    because = f" (last problem: {problem})" if problem else ""
    return f"The server did not start within {seconds} s{because}. Try again in a few minutes."


# -- events --------------------------------------------------------------------------


def note(
    uow: UnitOfWork,
    launch: Launch,
    phase: Phase,
    message: str,
    *,
    now: datetime,
    data: dict[str, Any] | None = None,
    progress: bool = False,
) -> None:
    """Record an event without a change of status; ``progress`` also tells the cleanup pass
    the launch is moving (it re-sends launches that stay quiet)."""
    _event(uow.db, launch.id, phase, message, now=now, data=data)
    if progress:
        launch.updated_at = now
    uow.notify(launch.id)


def spawn_failed(uow: UnitOfWork, launch: Launch, detail: str, *, tries: int, now: datetime) -> int:
    """A server of this ``launching`` launch did not come up: counted, and announced with what
    happens next. Returns how many have failed (the caller fails the launch at ``tries``)."""
    failures = launch.spawn_failures + 1
    launch.spawn_failures = failures
    launch.updated_at = now
    short = detail.removeprefix("Spawn failed: ")
    if failures < tries:
        message = (
            f"The server did not start ({short}); starting a fresh one "
            f"(try {failures + 1} of {tries})"
        )
    else:
        message = f"The server did not start ({short})"
    data = {"spawn_failures": failures, "tries": tries}
    note(uow, launch, Phase.launching, message, now=now, data=data)
    return failures


def _event(
    db: Session,
    launch_id: str,
    phase: Phase,
    message: str,
    *,
    now: datetime,
    data: dict[str, Any] | None = None,
) -> None:
    db.add(
        LaunchEvent(
            launch_id=launch_id,
            phase=phase,
            message=printable(message),
            data=data,
            created_at=now,
        )
    )


# -- one launch at a time --------------------------------------------------------------


def new_launch_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits: the capability to watch and end a launch


@dataclass(frozen=True)
class NewLaunch:
    """What a launch is created from: its spec, already checked, and its lifetime. The id is
    chosen here, so writing the launch again after a dropped connection writes the same one."""

    spec: dict[str, Any]
    lifetime: int
    id: str = field(default_factory=new_launch_id)
    client: str | None = None  # worker.clients.digest of who asked; None for the pool's own


def new_hub_user_name(prefix: str) -> str:
    # Hub names are case-insensitive; hex keeps them lower-case and URL-safe. 64 bits of entropy.
    return f"{prefix}{secrets.token_hex(8)}"


def create(
    uow: UnitOfWork, spec: dict[str, Any], *, lifetime: int, timeout: int, now: datetime
) -> Launch:
    """A new launch, ``queued``, loaded into the unit's session."""
    (launch_id,) = create_many(uow, [NewLaunch(spec, lifetime)], timeout=timeout, now=now)
    return uow.db.get_one(Launch, launch_id)


def create_many(
    uow: UnitOfWork,
    new: Sequence[NewLaunch],
    *,
    timeout: int,
    now: datetime,
    pool_keys: Sequence[str] | None = None,
) -> list[str]:
    """New launches, ``queued``; returns their ids. Written in bulk (the intake's group commit,
    ``api.group_commit``): no object is loaded into the session."""
    deadline = now + timedelta(seconds=timeout)
    rows = [
        NewRow(
            id=item.id,
            spec=item.spec,
            spec_key=spec_key(item.spec),
            lifetime=item.lifetime,
            deadline_at=deadline,
            message=printable(f"Launch of {describe_spec(item.spec)} queued"),
            pool_key=pool_keys[i] if pool_keys is not None else None,
            client=item.client,
        )
        for i, item in enumerate(new)
    ]
    insert_new(uow.db, rows, now)
    for item in new:
        uow.observe(observation("hublaunch_launches_created", provider=provider(item.spec)))
    return [row.id for row in rows]


def mark_building(uow: UnitOfWork, launch: Launch, *, deadline: datetime, now: datetime) -> None:
    """``queued`` -> ``building``: a repository launch starts resolving and building."""
    _move(launch, Status.building, now)
    _picked_up(uow, launch, now)
    launch.deadline_at = deadline
    note(uow, launch, Phase.fetching, f"Resolving {describe_spec(launch.spec)}", now=now)


def record_commit(
    uow: UnitOfWork,
    launch_id: str,
    commit: str,
    env_name: str,
    now: datetime,
    *,
    hub: str | None = None,
) -> None:
    """What a repository launch's ref resolved to, kept from the first resolution only; with
    per-Hub builds also the Hub it is built for, and so will run on (worker/hubs.py)."""
    values: dict[str, object] = {"commit": commit, "env_name": env_name, "updated_at": now}
    if hub is not None:
        values["hub"] = hub
    uow.db.execute(
        bulk_update(Launch).where(Launch.id == launch_id, Launch.commit.is_(None)).values(values)
    )


def pin(uow: UnitOfWork, hubs_by_launch: dict[str, str]) -> None:
    """New launches that must run on a given Hub (a Hub's own warm pool): the admission places
    each there, or places it anew when that Hub is down."""
    for launch_id, hub in hubs_by_launch.items():
        uow.db.execute(bulk_update(Launch).where(Launch.id == launch_id).values(hub=hub))


def unpin(uow: UnitOfWork, launch: Launch, *, why: str, now: datetime) -> None:
    """A launch meant for a Hub that is now down, not yet started (built for it, or filling its
    warm pool): its Hub forgotten, and with it a repository's commit and environment, so the
    next run resolves and builds it for a Hub that answers."""
    launch.commit = launch.env_name = launch.hub = None
    launch.updated_at = now
    note(uow, launch, Phase.waiting, f"{why}; it goes to another Hub", now=now)


def mark_launching(
    uow: UnitOfWork,
    launch: Launch,
    *,
    user_prefix: str,
    deadline: datetime,
    now: datetime,
    hub: str | None = None,
) -> str:
    """-> ``launching`` on ``hub``, choosing the Hub user name once: the UPDATE is conditional
    on there being none yet, so a concurrent duplicate run cannot pick a second one. Returns
    the name."""
    if launch.hub_user is None:
        was_queued = launch.status == Status.queued
        chosen = rowcount(
            uow.db,
            bulk_update(Launch)
            .where(
                Launch.id == launch.id,
                Launch.hub_user.is_(None),
                Launch.status.in_(sources(Status.launching)),
            )
            .values(
                hub_user=new_hub_user_name(user_prefix),
                hub=hub,
                status=Status.launching,
                updated_at=now,
                deadline_at=deadline,
            ),
        )
        uow.db.refresh(launch)
        if chosen:
            if was_queued:
                _picked_up(uow, launch, now)
            if "image" in launch.spec:
                note(uow, launch, Phase.built, f"Using {describe_spec(launch.spec)}", now=now)
            note(uow, launch, Phase.launching, "Launching server...", now=now)
    if launch.hub_user is None:
        raise IllegalTransition(launch.id, launch.status, Status.launching)
    return launch.hub_user


def unplace(
    uow: UnitOfWork, launch: Launch, *, why: str, now: datetime, rebuild: bool = False
) -> None:
    """A launching launch whose Hub failed before its user was created -> ``queued`` with no
    Hub and no user name, so the next admission places it on a Hub that answers. ``rebuild``
    (per-Hub builds): its environment was built for that Hub's machine, so it is built again
    for the next."""
    _move(launch, Status.queued, now)
    launch.hub = None
    launch.hub_user = None
    if rebuild:
        launch.commit = launch.env_name = None
    note(uow, launch, Phase.waiting, f"{why}; placing it on another Hub", now=now)


def mark_ready(
    uow: UnitOfWork,
    launch: Launch,
    *,
    token_ciphertext: str,
    public_url: str,
    now: datetime,
    spawn_seconds: float | None = None,
) -> bool:
    """``launching`` -> ``ready``, unless someone asked to end the launch meanwhile (the owner
    or a cleanup pass): the UPDATE is conditional on both, so exactly one side wins."""
    became_ready = rowcount(
        uow.db,
        bulk_update(Launch)
        .where(
            Launch.id == launch.id,
            Launch.status.in_(sources(Status.ready)),
            Launch.end_requested_at.is_(None),
        )
        .values(
            status=Status.ready,
            token_ciphertext=token_ciphertext,
            ready_at=now,
            expires_at=now + timedelta(seconds=launch.lifetime),
            updated_at=now,
        ),
    )
    uow.db.refresh(launch)
    if became_ready:
        url = launch.server_url(public_url)
        note(uow, launch, Phase.ready, "Server ready", data={"url": url}, now=now)
        _finished(uow, launch, "ready", "")
        spec_provider = provider(launch.spec)
        ready_seconds = _seconds(launch.created_at, now)
        uow.observe(
            observation("hublaunch_launch_ready_seconds", ready_seconds, provider=spec_provider)
        )
        if spawn_seconds is not None:
            uow.observe(
                observation("hublaunch_launch_spawn_seconds", spawn_seconds, provider=spec_provider)
            )
    return bool(became_ready)


def mark_pooled(uow: UnitOfWork, launch: Launch, *, now: datetime) -> bool:
    """A warm-pool launch's server is up: ``launching`` -> ``pooled`` (no token, no lifetime:
    those start when a visitor's launch takes it), unless its end was asked for meanwhile."""
    pooled = rowcount(
        uow.db,
        bulk_update(Launch)
        .where(
            Launch.id == launch.id,
            Launch.status == Status.launching,
            Launch.pool_key.is_not(None),
            Launch.end_requested_at.is_(None),
        )
        .values(status=Status.pooled, ready_at=now, updated_at=now),
    )
    uow.db.refresh(launch)
    if pooled:
        note(uow, launch, Phase.ready, "Server ready in the warm pool", now=now)
    return bool(pooled)


def pooled_candidate(uow: UnitOfWork, key: str) -> str | None:
    """The pooled server of ``key`` that has waited longest, locked for this transaction on
    PostgreSQL (others skip it: concurrent claims take different servers)."""
    return uow.db.scalar(
        select(Launch.id)
        .where(
            Launch.pool_key == key,
            Launch.status == Status.pooled,
            Launch.end_requested_at.is_(None),
            Launch.user_removed_at.is_(None),
        )
        .order_by(Launch.ready_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )


# The event of a launch that took a server from the warm pool.
POOL_HIT = "Taking a ready server from the warm pool"


def hand_over(
    uow: UnitOfWork,
    pooled_id: str,
    launch_id: str,
    *,
    now: datetime,
    replacing: str | None = None,
) -> str | None:
    """Move a pooled server's Hub user to a visitor's ``queued`` launch, which becomes
    ``launching``; the pooled row ends (``handed_over``) with nothing left to remove. Both
    UPDATEs are conditional, in the caller's one transaction: a server goes to one launch, ever.
    ``replacing``: the launch, already ``launching``, holds this user, whose pooled server was
    found dead; it takes the new one instead (the caller removes the dead user). Returns the
    user's name, or None (the server or the launch was taken meanwhile)."""
    launch = uow.db.get(Launch, launch_id, with_for_update=True)
    expected = (Status.queued, None) if replacing is None else (Status.launching, replacing)
    if (
        launch is None
        or (launch.status, launch.hub_user) != expected
        or launch.end_requested_at is not None
    ):
        return None
    pooled = uow.db.execute(
        select(Launch.hub_user, Launch.hub, Launch.commit, Launch.env_name).where(
            Launch.id == pooled_id
        )
    ).first()
    if pooled is None or pooled.hub_user is None:
        return None
    name: str = pooled.hub_user
    released = rowcount(
        uow.db,
        bulk_update(Launch)
        .where(
            Launch.id == pooled_id,
            Launch.status == Status.pooled,
            Launch.end_requested_at.is_(None),
            Launch.user_removed_at.is_(None),
        )
        .values(
            status=Status.ended,
            end_reason=EndReason.handed_over,
            hub_user=None,
            ended_at=now,
            updated_at=now,
            user_removed_at=now,
        ),
    )
    if not released:
        return None
    # The environment goes along: a repository launch whose pooled server turns out dead
    # starts a fresh one from the same build.
    taken = rowcount(
        uow.db,
        bulk_update(Launch)
        .where(
            Launch.id == launch_id,
            Launch.status == expected[0],
            Launch.hub_user.is_(None) if replacing is None else Launch.hub_user == replacing,
        )
        .values(
            hub_user=name,
            hub=pooled.hub,  # the server stays on its Hub
            status=Status.launching,
            commit=pooled.commit,
            env_name=pooled.env_name,
            updated_at=now,
        ),
    )
    if not taken:  # locked above: cannot happen; never leave the server ownerless
        raise IllegalTransition(launch_id, launch.status, Status.launching)
    uow.db.refresh(launch)
    if replacing is None:
        _picked_up(uow, launch, now)
    note(uow, launch, Phase.launching, POOL_HIT, now=now)
    return name


def drain_pool(uow: UnitOfWork, launch_ids: Sequence[str], *, now: datetime) -> list[str]:
    """Warm-pool launches no longer wanted, still starting or pooled: their end is asked for
    (``drained``); the ids whose teardown the caller must send (a pooled one: nothing else
    runs for it; a starting one's launch task sees the flag and ends it itself)."""
    if not launch_ids:
        return []
    rows = uow.db.execute(
        bulk_update(Launch)
        .where(
            Launch.id.in_(launch_ids),
            Launch.pool_key.is_not(None),
            Launch.status.in_((*STARTING, Status.pooled)),
            Launch.end_requested_at.is_(None),
        )
        .values(end_requested_at=now, end_reason=EndReason.drained, updated_at=now)
        .returning(Launch.id, Launch.status)
    ).all()
    return [row.id for row in rows if row.status == Status.pooled]


def mark_failed(
    uow: UnitOfWork,
    launch: Launch,
    message: str,
    *,
    reason: FailReason,
    now: datetime,
    user_removed: bool = False,
) -> None:
    """A starting launch -> ``failed``. ``user_removed`` when no Hub user can exist (nothing was
    started), so no cleanup is owed."""
    _move(launch, Status.failed, now)
    _finished(uow, launch, "failed", reason)
    launch.error = message
    launch.end_reason = EndReason.failed
    launch.ended_at = now
    launch.token_ciphertext = None
    if user_removed:
        launch.user_removed_at = now
    note(uow, launch, Phase.failed, message, now=now)


BUILT_ONLY = "Done! The environment is ready to launch; not launching, as asked"


def mark_built_only(uow: UnitOfWork, launch: Launch, image: str, *, now: datetime) -> None:
    """A build-only launch whose environment is built -> ``ended`` (reason ``built``). Its
    final event is BinderHub's: ``ready`` with the image's name and no server URL or token.
    No Hub user was ever made, so nothing is owed to the cleanup."""
    _move(launch, Status.ended, now)
    launch.end_reason = EndReason.built
    _finished(uow, launch, "ended", EndReason.built)
    launch.ended_at = launch.user_removed_at = now
    note(uow, launch, Phase.ready, BUILT_ONLY, data={"imageName": image}, now=now)


def mark_ended(uow: UnitOfWork, launch: Launch, *, now: datetime) -> None:
    """A starting or ready launch -> ``ended``, for the reason already recorded (or because its
    owner asked). Watchers of a launch that never became ready are told it will not."""
    if launch.status in STARTING:
        note(uow, launch, Phase.failed, ENDED_BEFORE_READY, now=now)
    was_ready = launch.status == Status.ready
    _move(launch, Status.ended, now)
    launch.end_reason = launch.end_reason or EndReason.requested
    if was_ready:
        uow.observe(observation("hublaunch_sessions_ended", reason=launch.end_reason))
    else:
        _finished(uow, launch, "ended", launch.end_reason)
    launch.ended_at = now
    launch.token_ciphertext = None
    uow.notify(launch.id)


def request_end(uow: UnitOfWork, launch: Launch, *, now: datetime) -> bool:
    """Mark the launch as to be ended by its owner. True when a teardown must be sent.

    The flag is set with one UPDATE, then the status is re-read: a launch task that is still
    running sees the flag (``mark_ready`` is conditional on it) and tears down itself;
    otherwise nothing else is running for this launch and the teardown is sent.
    """
    uow.db.execute(
        bulk_update(Launch)
        .where(Launch.id == launch.id, Launch.end_requested_at.is_(None))
        .values(end_requested_at=now, updated_at=now)
    )
    uow.db.flush()
    uow.db.refresh(launch)
    if launch.user_removed_at is not None and launch.status in TERMINAL:
        return False
    return launch.status in (Status.ready, Status.failed, Status.ended)


def request_abandoned_end(uow: UnitOfWork, launch_id: str, *, now: datetime) -> bool | None:
    """End a launch that is still starting because nobody watches it any more (reason
    ``abandoned``). None when it is not starting or its end was already asked for; otherwise
    whether a teardown must be sent, as for ``request_end``."""
    asked = rowcount(
        uow.db,
        bulk_update(Launch)
        .where(
            Launch.id == launch_id,
            Launch.status.in_(STARTING),
            Launch.end_requested_at.is_(None),
        )
        .values(end_requested_at=now, end_reason=EndReason.abandoned, updated_at=now),
    )
    if not asked:
        return None
    launch = uow.db.get(Launch, launch_id)
    if launch is None:
        return None
    uow.db.refresh(launch)
    return launch.status in (Status.ready, Status.failed, Status.ended)


def mark_user_removed(uow: UnitOfWork, launch: Launch, *, now: datetime) -> None:
    """The Hub user is confirmed gone: nothing is owed any more. A launch not yet final ends."""
    launch.user_removed_at = now
    launch.token_ciphertext = None
    launch.updated_at = now
    if not launch.is_terminal:
        mark_ended(uow, launch, now=now)
    else:
        uow.notify(launch.id)


# -- many launches at once (the cleanup pass's claims) --------------------------------------


Claimed = list[tuple[str, str | None]]  # (launch id, Hub user)


def _claim(
    uow: UnitOfWork, where: ColumnElement[bool], values: dict[str, Any]
) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(launch id, Hub user, spec) of the rows updated."""
    rows = uow.db.execute(
        bulk_update(Launch)
        .where(where)
        .values(**values)
        .returning(Launch.id, Launch.hub_user, Launch.spec)
    )
    return [(r.id, r.hub_user, r.spec) for r in rows]


def fail_stuck(
    uow: UnitOfWork, where: ColumnElement[bool], message: str, *, lease: datetime, now: datetime
) -> Claimed:
    """Starting launches matching ``where`` -> ``failed`` (their user is removed afterwards)."""
    claimed = _claim(
        uow,
        and_(where, Launch.status.in_(sources(Status.failed))),
        {
            "status": Status.failed,
            "error": message,
            "end_reason": EndReason.failed,
            "ended_at": now,
            "updated_at": now,
            "token_ciphertext": None,
            "lease_until": lease,
        },
    )
    for launch_id, _user, spec in claimed:
        _event(uow.db, launch_id, Phase.failed, message, now=now)
        uow.notify(launch_id)
        uow.observe(
            observation(
                "hublaunch_launches_finished",
                provider=provider(spec),
                outcome="failed",
                reason=FailReason.timeout,
            )
        )
    return [(launch_id, user) for launch_id, user, _spec in claimed]


def request_ends(
    uow: UnitOfWork,
    where: ColumnElement[bool],
    reason: EndReason,
    *,
    lease: datetime,
    now: datetime,
) -> Claimed:
    """Ready sessions matching ``where`` are to end, and why (their teardown ends them)."""
    claimed = _claim(
        uow,
        and_(where, Launch.status == Status.ready, Launch.end_requested_at.is_(None)),
        {"end_requested_at": now, "end_reason": reason, "updated_at": now, "lease_until": lease},
    )
    return [(launch_id, user) for launch_id, user, _spec in claimed]


def drain_stopped(
    uow: UnitOfWork, where: ColumnElement[bool], *, lease: datetime, now: datetime
) -> Claimed:
    """Pooled servers matching ``where`` stopped: drained (the cleanup pass removes them)."""
    claimed = _claim(
        uow,
        and_(where, Launch.status == Status.pooled, Launch.end_requested_at.is_(None)),
        {
            "end_requested_at": now,
            "end_reason": EndReason.drained,
            "updated_at": now,
            "lease_until": lease,
        },
    )
    return [(launch_id, user) for launch_id, user, _spec in claimed]


def end_gone(uow: UnitOfWork, launch_ids: Sequence[str], *, now: datetime) -> Claimed:
    """Ready sessions (and pooled servers) whose Hub user vanished -> ``ended`` (gone),
    nothing left to remove."""
    claimed = _claim(
        uow,
        and_(
            Launch.id.in_(launch_ids),
            Launch.status.in_((Status.ready, Status.pooled)),
            Launch.user_removed_at.is_(None),
        ),
        {
            "status": Status.ended,
            "end_reason": EndReason.gone,
            "ended_at": now,
            "updated_at": now,
            "user_removed_at": now,
            "token_ciphertext": None,
        },
    )
    for launch_id, _user, _spec in claimed:
        uow.notify(launch_id)
        uow.observe(observation("hublaunch_sessions_ended", reason=EndReason.gone))
    return [(launch_id, user) for launch_id, user, _spec in claimed]


def resend_quiet(uow: UnitOfWork, where: ColumnElement[bool], *, now: datetime) -> Claimed:
    """Starting launches matching ``where`` made no progress: send each again (every step is
    idempotent), and reset their clock so the next pass does not send them again at once."""
    claimed = _claim(uow, and_(where, Launch.status.in_(STARTING)), {"updated_at": now})
    for launch_id, _user, _spec in claimed:
        uow.send(launch_message(launch_id))
    return [(launch_id, user) for launch_id, user, _spec in claimed]


# -- the waiting line (worker/admission.py decides who waits) ------------------------------

# The events of a launch waiting for a free slot start so (the queued event does not).
SLOT_WAIT = "Waiting for a free slot"


def slot_message(position: int) -> str:
    if position == 0:
        return f"{SLOT_WAIT}: you are next"
    return f"{SLOT_WAIT}: {position} launch{'es' if position != 1 else ''} ahead of you"


def capacity_message(waited: float) -> str:
    return f"The service is at capacity: waited {waited:.0f} s for a free slot; try again later."


def wait_for_slot(
    uow: UnitOfWork,
    launch: Launch,
    *,
    position: int,
    announce: bool,
    deadline: datetime,
    now: datetime,
) -> None:
    """A launch not yet launching waits in line: its deadline moves to ``deadline`` (never
    earlier), so the cleanup pass does not take a launch that waits for its turn for a stuck
    one, and ``updated_at`` to now, so it is not re-sent as lost. ``announce``: its place
    changed, and an event tells watchers how many launches are ahead of it."""
    if launch.status not in (Status.queued, Status.building):
        raise IllegalTransition(launch.id, launch.status, Status.launching)
    current = launch.deadline_at
    launch.deadline_at = deadline if current is None else max(as_utc(current), deadline)
    launch.updated_at = now
    if announce:
        note(
            uow,
            launch,
            Phase.waiting,
            slot_message(position),
            data={"position": position},
            now=now,
        )
