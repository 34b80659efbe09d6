"""One cleanup pass: end expired and idle sessions, fail or re-send stuck launches, delete
orphaned Hub users, mark ghosts, and finish removals that earlier attempts left undone.

The database, not the queue, is the source of truth. Overlapping passes (two beat processes,
a pass slower than the interval, a manual ``hublaunch cull``) are safe: a row is claimed with a
conditional UPDATE before anything is done to it, so only one pass acts on it, and a removal
that races another one is a no-op. Hub work for different users runs in a bounded thread pool
and one user's failure is recorded, never allowed to stop the pass.

Only Hub users whose name starts with the configured prefix are ever touched, never an admin,
and never one whose launch is still live.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from worker import transitions
from worker.context import WorkerContext
from worker.db import as_utc, bulk_update
from worker.hub_client import HubError, HubUser
from worker.hub_users import STOP_WAIT_SECONDS, remove_hub_user
from worker.logs import bind_launch
from worker.metrics import observation
from worker.models import EndReason, Launch, Status
from worker.outcome import DONE
from worker.teardown import teardown
from worker.transitions import STARTING, Claimed
from worker.unit_of_work import Undelivered, UnitOfWork, Units

log = logging.getLogger(__name__)

# A row claimed by a pass is left alone by other passes for this long (a pass that dies
# releases nothing; the lease lets the next pass take over).
LEASE = timedelta(minutes=5)
# Removals that a launch task or teardown task may still be doing are left to them this long.
REMOVAL_GRACE = timedelta(seconds=30)
CHUNK = 500


@dataclass(frozen=True)
class Action:
    """One thing a pass did (or, in a dry run, would do)."""

    category: str  # expired, idle, stopped, stuck, lost, removal, orphan, ghost
    user: str | None
    launch_id: str | None
    result: str


def cull_pass(ctx: WorkerContext, *, dry_run: bool = False) -> list[Action]:
    """Run one pass now (``ctx.clock()`` is "now", so tests move time instead of sleeping).

    Everything read from the Hub is read before the transaction opens, and every Hub change is
    made after it committed: no database transaction waits on the Hub.
    """
    now = ctx.clock()
    listing = _list_hub_users(ctx)
    hub_users = listing.users if listing is not None else None
    listed_at = now
    stopped = _stopped_by_reason(ctx, listing) if listing is not None else {}
    actions: list[Action] = []
    claimed: list[tuple[str, str | None, str]] = []  # (category, user, launch id)
    lost: Claimed = []
    orphans: list[str] = []
    undelivered: set[str] = set()

    try:
        with ctx.units.begin() as uow:
            claims = _Claims(uow, now, dry_run)
            for launch_id, user in claims.stuck(ctx.settings.launch_timeout):
                claimed.append(("stuck", user, launch_id))
            for launch_id, user in claims.end(EndReason.expired, _expired(now)):
                claimed.append(("expired", user, launch_id))
            if hub_users is not None:
                # Ready sessions whose user is still there but whose server stopped (it
                # crashed, or the Hub was restarted with cleanup_servers): nothing to come
                # back to.
                for reason, stopped_names in stopped.items():
                    for names in _chunks(stopped_names):
                        condition = and_(Launch.hub_user.in_(names), Launch.ready_at < listed_at)
                        for launch_id, user in claims.end(reason, condition):
                            claimed.append(("stopped", user, launch_id))
                        # A pooled server that stopped is drained (the pool starts another).
                        for launch_id, user in claims.drain_pooled(condition):
                            claimed.append(("stopped", user, launch_id))
                # A session ready for less than the idle timeout is not idle, whatever its
                # server's activity says: a warm-pool server waited unused before its launch
                # took it (worker/pool.py).
                fresh_cutoff = now - timedelta(seconds=ctx.settings.idle_timeout)
                for names in _chunks(_idle_names(ctx, hub_users, now)):
                    condition = and_(Launch.hub_user.in_(names), Launch.ready_at < fresh_cutoff)
                    for launch_id, user in claims.end(EndReason.idle, condition):
                        claimed.append(("idle", user, launch_id))
            for launch_id, user in claims.owed_removals():
                claimed.append(("removal", user, launch_id))
            lost = claims.lost(ctx.settings.redispatch_after)
            if listing is not None:
                orphans = _orphans(ctx, uow.db, listing, now)
                actions += _ghosts(ctx, uow, listing, listed_at, now, dry_run)
    except Undelivered as e:  # committed; the next pass re-sends what the broker refused
        undelivered = {message.argument for message in e.messages}

    for launch_id, user in lost:
        result = "would re-send" if dry_run else "re-sent"
        if launch_id in undelivered:
            result = "error: QueueUnavailable"
        actions.append(Action("lost", user, launch_id, result))
    if dry_run:
        actions += [Action(c, u, i, f"would {_verb(c)}") for c, u, i in claimed]
        actions += [Action("orphan", name, None, "would delete") for name in orphans]
        return actions

    with ThreadPoolExecutor(ctx.settings.cull_concurrency, thread_name_prefix="cull") as pool:
        listed = hub_users or {}
        removals = pool.map(lambda c: _remove_launch_user(ctx, c[0], c[1], c[2], listed), claimed)
        where = listing.hub_of if listing is not None else {}
        deletions = pool.map(
            lambda name: _remove_orphan(ctx, name, listed.get(name), where.get(name)), orphans
        )
        actions += list(removals) + list(deletions)
    _release([launch_id for _, _, launch_id in claimed], actions, ctx.units)
    for action in actions:
        with bind_launch(action.launch_id, action.user):
            log.info(
                "cull: %s %s %s: %s", action.category, action.user, action.launch_id, action.result
            )
    return actions


def _stopped_by_reason(ctx: WorkerContext, listing: Listing) -> dict[EndReason, list[str]]:
    """Users whose server stopped, by why: the sandbox records "out of memory" in the spawner's
    state; anything else (a crash, a Hub restart without its servers) is "gone"."""
    found: dict[EndReason, list[str]] = {EndReason.gone: [], EndReason.out_of_memory: []}
    for user in listing.users.values():
        if _running(user):
            continue
        try:
            why = ctx.hub_for(listing.hub_of[user.name]).stopped_reason(user.name)
        except HubError:
            why = ""
        reason = EndReason.out_of_memory if why == "out of memory" else EndReason.gone
        found[reason].append(user.name)
    return found


def _verb(category: str) -> str:
    return {"stuck": "fail and remove", "removal": "remove"}.get(category, "end")


# -- reading the Hub -------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """The prefixed users of every Hub that answered (names are unique across Hubs), the Hub
    each is on, and which Hubs answered: a Hub that is down has its idle, orphan and ghost
    checks wait for a pass that can list it, and the other Hubs' go on."""

    users: dict[str, HubUser]
    hub_of: dict[str, str]
    listed: frozenset[str]
    first: str

    def covers(self, hub: str | None) -> bool:
        return (hub or self.first) in self.listed


def _list_hub_users(ctx: WorkerContext) -> Listing | None:
    prefix = ctx.settings.user_prefix
    users: dict[str, HubUser] = {}
    hub_of: dict[str, str] = {}
    listed: set[str] = set()
    clients = ctx.all_hubs()
    for name, client in clients.items():
        try:
            found = [u for u in client.iter_users(name_filter=prefix) if u.name.startswith(prefix)]
        except HubError as e:
            log.warning("cull: cannot list the users of Hub %s: %s", name, e.message)
            continue
        listed.add(name)
        for user in found:
            users[user.name] = user
            hub_of[user.name] = name
    if not listed:
        return None
    return Listing(users, hub_of, frozenset(listed), next(iter(clients)))


def _running(user: HubUser) -> bool:
    server = user.servers.get("")
    return server is not None and (server.ready or server.pending is not None)


def _idle_names(ctx: WorkerContext, users: dict[str, HubUser], now: datetime) -> list[str]:
    cutoff = now - timedelta(seconds=ctx.settings.idle_timeout)
    idle = []
    for user in users.values():
        server = user.servers.get("")
        if server is None or not server.ready:
            continue
        active = server.last_activity or user.last_activity or user.created
        if active is not None and as_utc(active) < cutoff:
            idle.append(user.name)
    return idle


# -- claims (conditional UPDATEs; only one pass wins a row) ------------------------


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(Launch.lease_until.is_(None), Launch.lease_until < now)


def _active() -> ColumnElement[bool]:
    return Launch.user_removed_at.is_(None)  # matches the partial index ix_launches_active


def _expired(now: datetime) -> ColumnElement[bool]:
    return and_(Launch.expires_at.is_not(None), Launch.expires_at < now)


class _Claims:
    """The pass's conditional UPDATEs (only one pass wins a row); a dry run only reads.

    This module says which rows; ``worker.transitions`` writes what their new state is.
    """

    def __init__(self, uow: UnitOfWork, now: datetime, dry_run: bool) -> None:
        self.uow, self.now, self.dry_run = uow, now, dry_run
        self.lease = now + LEASE

    def _read(self, where: ColumnElement[bool]) -> Claimed:
        rows = self.uow.db.execute(select(Launch.id, Launch.hub_user).where(where))
        return [(r.id, r.hub_user) for r in rows]

    def end(self, reason: EndReason, condition: ColumnElement[bool]) -> Claimed:
        """Ready sessions matching ``condition``: to end, and why."""
        where = and_(_active(), _lease_free(self.now), condition)
        if self.dry_run:
            return self._read(
                and_(where, Launch.status == Status.ready, Launch.end_requested_at.is_(None))
            )
        return transitions.request_ends(self.uow, where, reason, lease=self.lease, now=self.now)

    def stuck(self, timeout: int) -> Claimed:
        """Launches still starting past their deadline: failed, their user removed."""
        where = and_(
            _active(),
            Launch.status.in_(STARTING),
            or_(
                Launch.deadline_at < self.now,
                and_(
                    Launch.deadline_at.is_(None),
                    Launch.created_at < self.now - timedelta(seconds=timeout),
                ),
            ),
            _lease_free(self.now),
        )
        if self.dry_run:
            return self._read(where)
        message = transitions.timeout_message(timeout)
        return transitions.fail_stuck(self.uow, where, message, lease=self.lease, now=self.now)

    def drain_pooled(self, condition: ColumnElement[bool]) -> Claimed:
        """Pooled servers matching ``condition`` (stopped): drained, their user removed."""
        where = and_(
            _active(),
            _lease_free(self.now),
            condition,
            Launch.status == Status.pooled,
            Launch.end_requested_at.is_(None),
        )
        if self.dry_run:
            return self._read(where)
        return transitions.drain_stopped(self.uow, where, lease=self.lease, now=self.now)

    def owed_removals(self) -> Claimed:
        """Ended or failed launches whose Hub user was never confirmed gone (a lost teardown
        message, a Hub that was down, a server that was still stopping last pass)."""
        where = and_(
            _active(),
            or_(
                Launch.status.in_((Status.failed, Status.ended)),
                and_(
                    Launch.status.in_((Status.ready, Status.pooled)),
                    Launch.end_requested_at.is_not(None),
                ),
            ),
            Launch.updated_at < self.now - REMOVAL_GRACE,
            _lease_free(self.now),
        )
        if self.dry_run:
            return self._read(where)
        rows = self.uow.db.execute(
            bulk_update(Launch)
            .where(where)
            .values(lease_until=self.lease)
            .returning(Launch.id, Launch.hub_user)
        )
        return [(r.id, r.hub_user) for r in rows]

    def lost(self, quiet_seconds: int) -> Claimed:
        """Launches that made no progress for a while: their message may be lost (a crash
        between commit and send, or a worker killed before the broker re-delivers)."""
        where = and_(
            _active(),
            Launch.status.in_(STARTING),
            Launch.updated_at < self.now - timedelta(seconds=quiet_seconds),
            or_(Launch.deadline_at >= self.now, Launch.deadline_at.is_(None)),
        )
        if self.dry_run:
            return self._read(where)
        return transitions.resend_quiet(self.uow, where, now=self.now)


def _orphans(ctx: WorkerContext, db: Session, listing: Listing, now: datetime) -> list[str]:
    """Prefixed, non-admin Hub users older than the grace period with no launch that owns them
    on the Hub they are on (a launch placed again elsewhere left its first user behind)."""
    grace_cutoff = now - timedelta(seconds=ctx.settings.orphan_grace)
    candidates = [
        user.name
        for user in listing.users.values()
        if not user.admin and user.created is not None and as_utc(user.created) < grace_cutoff
    ]
    owned: set[str] = set()
    for names in _chunks(candidates):
        rows = db.execute(
            select(Launch.hub_user, Launch.hub).where(_active(), Launch.hub_user.in_(names))
        )
        owned.update(
            name
            for name, hub in rows
            if name is not None and (hub or listing.first) == listing.hub_of[name]
        )
    return [name for name in candidates if name not in owned]


def _ghosts(
    ctx: WorkerContext,
    uow: UnitOfWork,
    listing: Listing,
    listed_at: datetime,
    now: datetime,
    dry_run: bool,
) -> list[Action]:
    """Ready sessions whose Hub user is gone (deleted by hand, lost with the Hub's database),
    on the Hubs that answered (one that is down is not taken to have lost its sessions)."""
    users = listing.users
    ready = uow.db.execute(
        select(Launch.id, Launch.hub_user, Launch.hub).where(
            _active(),
            Launch.status.in_((Status.ready, Status.pooled)),
            Launch.end_requested_at.is_(None),
            Launch.ready_at < listed_at,  # a session that became ready after the listing is fine
        )
    ).all()
    gone = [r.id for r in ready if listing.covers(r.hub) and r.hub_user not in users]
    if dry_run:
        return [
            Action("ghost", r.hub_user, r.id, "would mark ended") for r in ready if r.id in gone
        ]
    marked: Claimed = []
    for ids in _chunks(gone):
        marked += transitions.end_gone(uow, ids, now=now)
    return [Action("ghost", user, launch_id, "marked ended") for launch_id, user in marked]


# -- Hub work, one user per thread --------------------------------------------------


def _remove_launch_user(
    ctx: WorkerContext,
    category: str,
    user: str | None,
    launch_id: str,
    listed: dict[str, HubUser],
) -> Action:
    with bind_launch(launch_id, user):  # a thread of the pool: nothing is bound in it yet
        return _remove_bound_launch_user(ctx, category, user, launch_id, listed)


def _remove_bound_launch_user(
    ctx: WorkerContext,
    category: str,
    user: str | None,
    launch_id: str,
    listed: dict[str, HubUser],
) -> Action:
    try:
        outcome = teardown(ctx, launch_id, known=listed.get(user or ""))
    except Exception as e:  # isolate: one broken user never stops the pass
        log.exception("cull: removing %s (launch %s) failed", user, launch_id)
        return Action(category, user, launch_id, f"error: {type(e).__name__}")
    if outcome != DONE:
        return Action(category, user, launch_id, "stopping; finished by a later pass")
    return Action(category, user, launch_id, "ended" if category != "stuck" else "failed")


def _remove_orphan(ctx: WorkerContext, name: str, known: HubUser | None, hub: str | None) -> Action:
    with bind_launch(None, name):
        return _remove_bound_orphan(ctx, name, known, hub)


def _remove_bound_orphan(
    ctx: WorkerContext, name: str, known: HubUser | None, hub: str | None
) -> Action:
    try:
        removed = remove_hub_user(ctx.hub_for(hub), name, wait=STOP_WAIT_SECONDS, known=known)
    except Exception as e:
        log.exception("cull: removing orphan %s failed", name)
        return Action("orphan", name, None, f"error: {type(e).__name__}")
    return Action("orphan", name, None, "deleted" if removed else "stopping; next pass")


def _release(launch_ids: Sequence[str], actions: Sequence[Action], units: Units) -> None:
    """Free the pass's rows, and count what it did (with this last commit of the pass)."""
    with units.begin() as uow:
        for ids in _chunks(launch_ids):
            uow.db.execute(bulk_update(Launch).where(Launch.id.in_(ids)).values(lease_until=None))
        uow.observe(observation("hublaunch_cleanup_passes"))
        for action in actions:
            # "error: <exception class>" keeps the label set small: no message text in it.
            uow.observe(
                observation(
                    "hublaunch_cleanup_actions", category=action.category, result=action.result
                )
            )


def _chunks(items: Iterable[str]) -> Iterable[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
