"""The warm pool: ready servers kept for popular specs, each handed to one visitor's launch.

A pooled server is a launch of its own (``pool_key`` set, no visitor), started like any other
(same admission caps, same spawner and sandbox) but ending in ``pooled`` instead of ``ready``:
no token, no lifetime, never culled as idle. A visitor's launch for a pooled spec claims one
(``claim``): one transaction whose conditional UPDATEs move the Hub user from the pooled row to
the visitor's, so each server goes to exactly one launch, ever; then the server is checked
alive and the visitor's token issued, and its lifetime starts. A server found dead is not
handed out (``take``): the next pooled one is, and the dead one's user is removed; with none
left, the launch starts a fresh server for the user it holds, as any launch would.

``maintain`` (beat, every ``HUBLAUNCH_POOL_INTERVAL`` s, and after each claim) tops each pool up
to its size (fixed, or read from recent demand: ``worker.pool_demand``), drains the surplus when
that size goes down, and drains a repository pool's servers of an older commit once its ref
moved. The database is the truth: nothing is kept in a process, so the pool survives a restart
of every hublaunch process.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select

from worker import placement, transitions
from worker.admission import limits
from worker.broker import launch_message, pool_message, teardown_message
from worker.context import WorkerContext
from worker.hub_client import HubClient, HubError
from worker.hub_users import STOP_WAIT_SECONDS, remove_hub_user
from worker.hubs import hubs
from worker.metrics import observation
from worker.models import ACTIVE, Launch, Status
from worker.pool_config import Pool, pool_key, pools
from worker.pool_demand import sizes
from worker.repos import RepoSpec, ResolveError, SpecError
from worker.settings import Settings
from worker.transitions import STARTING, NewLaunch
from worker.unit_of_work import Undelivered, UnitOfWork

log = logging.getLogger(__name__)

# A pool whose launches failed this many times (times its size) within FAILURE_WINDOW is not
# refilled until the window passes: a spec that cannot start must not churn servers.
FAILURE_WINDOW = timedelta(minutes=5)
FAILURES_PER_SLOT = 2
# Pooled servers tried before a claim gives up (each lost race or dead server is one).
CLAIM_TRIES = 5
# Seconds after a claim before its refill: sent at once, the refill's Hub calls (a new user, a
# spawn) land on the Hub while the hit's own are in flight and slow the hit down.
REFILL_AFTER = 1.0


# -- a visitor's launch takes a pooled server ---------------------------------------------


def claim(
    ctx: WorkerContext, launch_id: str, spec: dict[str, Any], *, replacing: str | None = None
) -> str | None:
    """Hand a pooled server to this queued launch; its Hub user's name, or None (a miss, or a
    spec with no pool). ``replacing``: the launch holds this user, whose pooled server turned
    out dead, and takes the next one instead (``take``)."""
    key = pool_key(spec)
    if key not in {pool.key for pool in pools(ctx.settings)}:
        return None
    started = time.monotonic()
    name: str | None = None
    try:
        for _ in range(CLAIM_TRIES):
            with ctx.units.begin() as uow:
                candidate = transitions.pooled_candidate(uow, key)
                if candidate is None:
                    uow.observe(observation("hublaunch_pool_claims", outcome="miss"))
                    break
                name = transitions.hand_over(
                    uow, candidate, launch_id, now=ctx.clock(), replacing=replacing
                )
                if name is not None:
                    # Counted and the refill sent once the hand-over commits, in its unit.
                    uow.observe(observation("hublaunch_pool_claims", outcome="hit"))
                    seconds = time.monotonic() - started
                    uow.observe(observation("hublaunch_pool_claim_seconds", seconds))
                    uow.send(pool_message(countdown=REFILL_AFTER))  # not at the next interval
                    break
        else:  # every try lost its race: a miss too
            with ctx.units.begin() as uow:
                uow.observe(observation("hublaunch_pool_claims", outcome="miss"))
    except Undelivered as e:  # the hand-over committed; only the refill message was refused
        log.warning("pool: refill not asked for (%s); the next interval does it", e)
    if name is not None:
        log.info("launch %s: pooled server %s handed over", launch_id, name)
    return name


def take(ctx: WorkerContext, launch_id: str, spec: dict[str, Any]) -> tuple[str | None, bool]:
    """``claim``, then check the server answers: a dead one is never handed out. Its (never
    used) user is removed and the next pooled server tried. Returns (the user, whether its
    pooled server runs): a live hit; (None, False), a miss; or, when the pool ran dry after a
    dead one, (that user, False): the caller starts a fresh server for it, as any launch would."""
    name = claim(ctx, launch_id, spec)
    for _ in range(CLAIM_TRIES):
        if name is None:
            return None, False
        if alive(ctx, name):
            return name, True
        log.warning("launch %s: pooled server %s is gone; trying the next", launch_id, name)
        dead_on = _hub(ctx, name)  # read before the launch gives the name up
        replacement = claim(ctx, launch_id, spec, replacing=name)
        if replacement is None:
            return name, False  # none left: a fresh server for this user
        try:
            remove_hub_user(dead_on, name, wait=STOP_WAIT_SECONDS)
        except HubError as e:  # an unowned prefixed user: the cleanup pass's orphan rule
            log.warning("pool: removing the dead pooled user %s: %s", name, e.message)
        name = replacement
    return name, False


def _hub(ctx: WorkerContext, name: str) -> HubClient:
    """The client of the Hub the user ``name`` is on (a pooled server stays on its Hub)."""
    if len(hubs(ctx.settings)) == 1:
        return ctx.hub_for(None)  # one Hub: nothing to look up (a hit's path is timed)
    with ctx.units.begin() as uow:
        hub = uow.db.scalar(select(Launch.hub).where(Launch.hub_user == name))
    return ctx.hub_for(hub)


def alive(ctx: WorkerContext, name: str) -> bool:
    """Whether the user's server runs and answers, as the Hub sees it now."""
    try:
        user = _hub(ctx, name).get_user(name)
    except HubError:
        return False
    server = user.servers.get("") if user is not None else None
    return server is not None and server.ready


# -- keeping the pools at their size ------------------------------------------------------


@dataclass(frozen=True)
class Report:
    started: dict[str, int]
    drained: dict[str, int]


def maintain(ctx: WorkerContext) -> Report:
    """Top every pool up, drain what is not wanted. Safe to run twice at once: a second pass
    may start a server more than needed, which the next pass drains."""
    wanted = {pool.key: pool for pool in pools(ctx.settings)}
    commits = {
        pool.key: commit
        for pool in wanted.values()
        if "repo" in pool.spec and (commit := _current_commit(ctx, pool)) is not None
    }
    now = ctx.clock()
    started: dict[str, int] = {}
    drained: dict[str, int] = {}
    configured = hubs(ctx.settings)
    several = len(configured) > 1
    with ctx.units.begin() as uow:
        # Several Hubs: each Hub that answers keeps its own pool of each size (a pooled server
        # stays on its Hub); one Hub: one pool, as before (the Hub is not looked at).
        up = [h.name for h in placement.answering(uow.db, ctx.settings, now)] if several else [None]
        rows = uow.db.execute(
            select(Launch.id, Launch.pool_key, Launch.status, Launch.commit, Launch.hub).where(
                Launch.pool_key.is_not(None),
                Launch.status.in_((*STARTING, Status.pooled)),
                Launch.end_requested_at.is_(None),
            )
        ).all()
        # Each Hub keeps a fixed pool's size; a demand-sized pool's size is for all of them
        # (the demand is the whole service's), shared out.
        size = {
            key: math.ceil(s.wanted / max(len(up), 1)) if wanted[key].by_demand else s.wanted
            for key, s in sizes(uow.db, wanted.values(), ctx.settings, now).items()
        }
        surplus: list[str] = []
        kept: dict[tuple[str, str | None], list[Any]] = {}
        for row in rows:
            pool = wanted.get(str(row.pool_key))
            stale = row.pool_key in commits and row.commit not in (None, commits[row.pool_key])
            if pool is None or stale:
                surplus.append(row.id)
            else:
                where = (row.hub or configured[0].name) if several else None
                kept.setdefault((pool.key, where), []).append(row)
        for (key, _hub), members in kept.items():
            # Shrunk: the servers still starting go first, then pooled ones.
            extra = len(members) - size[key]
            if extra > 0:
                order = sorted(members, key=lambda r: r.status == Status.pooled)
                surplus += [r.id for r in order[:extra]]
        failures = _recent_failures(uow, now)
        room = _room(uow, ctx.settings)
        to_start: list[NewLaunch] = []
        pins: list[str | None] = []
        for key, pool in wanted.items():
            missing = {
                hub: max(size[key] - sum(r.id not in surplus for r in kept.get((key, hub), [])), 0)
                for hub in up
            }
            if failures.get(key, 0) >= FAILURES_PER_SLOT * max(size[key], 1) * len(up):
                if any(missing.values()):
                    log.warning("pool %s: its launches keep failing; not refilled for now", key)
                continue
            for hub in up:
                count = min(missing[hub], max(room, 0))
                room -= count
                to_start += [
                    NewLaunch(pool.spec, ctx.settings.session_max_age) for _ in range(count)
                ]
                pins += [hub] * count
                if count:
                    started[key] = started.get(key, 0) + count
        for launch_id in transitions.drain_pool(uow, surplus, now=now):
            uow.send(teardown_message(launch_id))
            key = next(str(r.pool_key) for r in rows if r.id == launch_id)
            drained[key] = drained.get(key, 0) + 1
        if to_start:
            ids = transitions.create_many(
                uow,
                to_start,
                timeout=ctx.settings.launch_timeout,
                now=now,
                pool_keys=[pool_key(new.spec) for new in to_start],
            )
            # Each new server goes to the Hub whose pool it fills (the admission keeps it there).
            transitions.pin(uow, {i: hub for i, hub in zip(ids, pins, strict=True) if hub})
            for launch_id in ids:
                uow.send(launch_message(launch_id))
    if started or drained:
        log.info("pool: started %s, drained %s", started or "none", drained or "none")
    return Report(started, drained)


def _current_commit(ctx: WorkerContext, pool: Pool) -> str | None:
    """The commit a repository pool's ref points at now; None when it cannot be resolved (the
    pool is then neither drained nor refused: the launches resolve it themselves)."""
    spec = RepoSpec(pool.spec["repo"], pool.spec.get("ref", "HEAD"))
    try:
        return ctx.resolve(spec, ctx.settings)
    except (ResolveError, SpecError) as e:
        log.warning("pool %s: cannot resolve %s: %s", pool.key, spec.ref, e)
        return None


def _recent_failures(uow: UnitOfWork, now: datetime) -> dict[str, int]:
    rows = uow.db.execute(
        select(Launch.pool_key, func.count())
        .where(
            Launch.pool_key.is_not(None),
            Launch.status == Status.failed,
            Launch.updated_at > now - FAILURE_WINDOW,
        )
        .group_by(Launch.pool_key)
    ).all()
    return {str(key): int(count) for key, count in rows}


def _room(uow: UnitOfWork, settings: Settings) -> int:
    """Servers the caps on active sessions leave for the pool: refills never make a visitor
    wait in line (they stop at the cap; a visitor's launch is admitted first)."""
    held = uow.db.scalar(
        select(func.count()).where(
            and_(Launch.status.in_(ACTIVE), Launch.user_removed_at.is_(None))
        )
    )
    waiting = uow.db.scalar(
        select(func.count()).where(
            Launch.status.in_(STARTING), Launch.hub_user.is_(None), Launch.pool_key.is_(None)
        )
    )
    return limits(settings).total - int(held or 0) - int(waiting or 0)
