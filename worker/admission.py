"""Caps on active sessions, and the line launches wait in while the caps are reached.

A session is *active* while its launch is ``launching`` or ``ready``: from the moment it may
create a Hub user until that user is removed (a ready session whose end was requested still
holds its server until the teardown removes it, and ``mark_user_removed`` is what moves it to
``ended``). Failed and ended launches whose removal is still owed are not counted: their server
is being stopped, and a Hub that is slow to remove them must not block the line for everyone.

Before a launch creates its Hub user, ``admit()`` decides, under a lock, whether it may: then it
takes the slot in the same transaction (``transitions.mark_launching``), so the count another
worker reads next already includes it. Otherwise the launch waits: a ``waiting`` event with its
place in line (again only when the place changes), its deadline extended, and the task retried
every ``POLL_SECONDS``, until ``max_wait`` s have passed and it fails with ``capacity``.

The line is fair between clients, then first come, first served: a launch's turn is the number
of sessions its client already holds plus its client's launches ahead of it in line, and lower
turns go first (``created_at`` orders each turn). So a client's first session goes before
anyone's second, one client that sends many launches waits behind its own, and it never pushes
the others back. A client is the keyed digest of the visitor's address (``worker.clients``):
behind one NAT, a class shares it, and is served like one busy client.

Per spec (an image, or a repository whatever its ref) a second, shorter cap applies: a launch
held back by its own spec's cap does not count as ahead of launches of other specs, so one
popular repository never blocks the rest.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, text
from sqlalchemy.orm import Session

from worker import placement, transitions
from worker.context import WorkerContext
from worker.db import as_utc
from worker.hubs import hubs
from worker.models import ACTIVE, Launch, LaunchEvent, Phase, Status
from worker.outcome import DONE, Outcome
from worker.queries import get_launch
from worker.settings import Settings
from worker.transitions import FailReason, spec_key

log = logging.getLogger(__name__)

# How often a waiting launch asks again (a Celery retry each time).
POLL_SECONDS = 2.0
# Statuses a launch can wait in (it has no Hub user yet).
WAITING = (Status.queued, Status.building)
# Derivation of the default cap: the sandbox's default session memory (HUBLAUNCH_SESSION_MEMORY,
# hub/jupyterhub_config.py), the share of the machine's memory sessions may use (the rest is the
# Hub's, the database's, the workers' and the builds'), and sessions per CPU (mostly idle
# notebooks, but starting one costs a CPU for a few seconds).
SESSION_MEMORY = 2 * 2**30
MEMORY_SHARE = 0.75
SESSIONS_PER_CPU = 8
# Any constant: PostgreSQL scopes advisory locks to the database, so stacks never share it.
PG_LOCK_KEY = 0x68_6C_61_64_6D_69_74  # "hladmit"


@dataclass(frozen=True)
class Limits:
    total: int
    per_spec: int


@dataclass(frozen=True)
class Entry:
    """A launch in the computation of the line."""

    id: str
    key: str
    created_at: datetime
    client: str | None = None  # None: a launch of the pool's, or from before clients were kept


# -- the caps ------------------------------------------------------------------------


def parse_bytes(value: str) -> int:
    """JupyterHub's byte notation ("2G", "512M", "1073741824"), 1024-based."""
    value = value.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


def machine_sessions(memory: int, cpus: int, session_memory: int) -> int:
    """How many sessions this machine holds: its memory's share over one session's limit,
    and at most ``SESSIONS_PER_CPU`` per CPU; at least one."""
    by_memory = int(memory * MEMORY_SHARE) // max(session_memory, 1)
    return max(1, min(by_memory, cpus * SESSIONS_PER_CPU))


def _machine() -> tuple[int, int, int]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpus = len(os.sched_getaffinity(0))
    try:
        session = parse_bytes(os.environ.get("HUBLAUNCH_SESSION_MEMORY", "") or "2G")
    except ValueError:
        session = SESSION_MEMORY
    return memory, cpus, session


@functools.cache
def _limits(max_active: int, per_spec: int) -> Limits:
    total = max_active
    if total == 0:
        memory, cpus, session = _machine()
        total = machine_sessions(memory, cpus, session)
        log.info(
            "admission: active sessions capped at %d (derived: %.1f GiB memory x %.2f / %.1f GiB "
            "per session, at most %d CPUs x %d); set HUBLAUNCH_MAX_ACTIVE to choose",
            total,
            memory / 2**30,
            MEMORY_SHARE,
            session / 2**30,
            cpus,
            SESSIONS_PER_CPU,
        )
    if per_spec == 0:
        per_spec = max(1, total // 2)
        log.info("admission: active sessions per spec capped at %d (half the total)", per_spec)
    return Limits(total=total, per_spec=min(per_spec, total))


def limits(settings: Settings) -> Limits:
    """The caps in force (0 in a setting: derived once per process, and logged)."""
    return _limits(settings.max_active, settings.max_active_per_spec)


def place(
    me: Entry,
    active: Iterable[str],
    waiting: Iterable[Entry],
    caps: Limits,
    *,
    active_total: int | None = None,
    sessions: Mapping[str, int] | None = None,
) -> int | None:
    """None when ``me`` may start now, else how many launches are ahead of it in line.

    ``active``: the spec keys of the active sessions; ``waiting``: the other launches in line.
    Walking the line in order, a launch whose spec still has a free slot (after the active
    sessions and the same-spec launches before it) will take a slot before ``me``; one held
    back by its own spec's cap will not, so it is not counted ahead of other specs.
    ``sessions``: how many active sessions each client in line holds (``fair_order``).
    """
    held = Counter(active)
    free_total = caps.total - (sum(held.values()) if active_total is None else active_total)
    seen: Counter[str] = Counter()
    ahead = 0
    for entry in fair_order([*waiting, me], sessions or {}):
        spec_free = caps.per_spec - held[entry.key] - seen[entry.key]
        if entry.id == me.id:
            if spec_free <= 0:
                return seen[entry.key]  # behind the launches of its own spec
            return None if ahead < free_total else ahead
        if spec_free > 0:
            ahead += 1
        seen[entry.key] += 1
    raise AssertionError("unreachable: me is in the line")


def fair_order(line: Iterable[Entry], sessions: Mapping[str, int]) -> list[Entry]:
    """The line in the order slots go: by turn (the sessions the launch's client holds, plus
    its client's launches that arrived before it), then by arrival."""
    by_arrival = sorted(line, key=lambda e: (as_utc(e.created_at), e.id))
    turns: Counter[str] = Counter(sessions)
    ranked = []
    for entry in by_arrival:
        turn = turns[entry.client] if entry.client is not None else 0
        if entry.client is not None:
            turns[entry.client] += 1
        ranked.append((turn, entry))
    # sorted() is stable: within a turn, arrival order stays.
    return [entry for _, entry in sorted(ranked, key=lambda pair: pair[0])]


# -- the lock ------------------------------------------------------------------------


def _lock(db: Session) -> None:
    """Serialize admissions across processes until this transaction ends (commit or rollback
    releases it; a dead worker's connection takes it along), so two workers never both see the
    last free slot: the count is read, and the slot taken, under the lock.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE`` takes the
    database's write lock before the first read, so the reads see every admission committed
    before (a deferred transaction could read first and lose the upgrade to writing). A Redis
    lock would need a TTL longer than the slowest transaction and a broker that is Redis; the
    database is there for every stack, and its locks end with the transaction."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    else:
        db.connection().exec_driver_sql("BEGIN IMMEDIATE")


# -- reads -----------------------------------------------------------------------------


def _slot_events(launch_id: str) -> Any:
    return select(LaunchEvent).where(
        LaunchEvent.launch_id == launch_id,
        LaunchEvent.phase == Phase.waiting,
        LaunchEvent.message.startswith(transitions.SLOT_WAIT, autoescape=True),
    )


def _held(db: Session, keys: set[str]) -> tuple[list[str], int]:
    """The active sessions: the spec keys among ``keys`` (one per session), and how many in
    all. Counted in the database, so an admission costs the same at 10 or 10,000 sessions."""
    live = and_(Launch.status.in_(ACTIVE), Launch.user_removed_at.is_(None))
    total = db.scalar(select(func.count()).select_from(Launch).where(live)) or 0
    rows = db.execute(
        select(Launch.spec_key, func.count())
        .where(live, Launch.spec_key.in_(keys))
        .group_by(Launch.spec_key)
    )
    return [key for key, count in rows if key is not None for _ in range(count)], total


def _sessions_of(db: Session, clients: set[str]) -> dict[str, int]:
    """The active sessions each of ``clients`` holds."""
    if not clients:
        return {}
    live = and_(Launch.status.in_(ACTIVE), Launch.user_removed_at.is_(None))
    rows = db.execute(
        select(Launch.client, func.count())
        .where(live, Launch.client.in_(clients))
        .group_by(Launch.client)
    )
    return {str(client): int(count) for client, count in rows}


def _in_line(db: Session, launch_id: str) -> list[Entry]:
    """The other launches waiting for a slot: not launching yet, no end asked, and told at
    least once that they wait."""
    waited = exists().where(
        LaunchEvent.launch_id == Launch.id,
        LaunchEvent.phase == Phase.waiting,
        LaunchEvent.message.startswith(transitions.SLOT_WAIT, autoescape=True),
    )
    rows = db.execute(
        select(Launch.id, Launch.spec, Launch.created_at, Launch.client).where(
            and_(
                Launch.status.in_(WAITING),
                Launch.end_requested_at.is_(None),
                Launch.id != launch_id,
                waited,
            )
        )
    )
    return [Entry(r.id, spec_key(r.spec), r.created_at, r.client) for r in rows]


# -- the decision ----------------------------------------------------------------------


def admit(ctx: WorkerContext, launch_id: str) -> Launch | Outcome:
    """The launch, when it holds a slot (now ``launching`` with its Hub user's name, as read in
    the admitting transaction: the caller needs no other). Else what the task does next: ask
    again in ``POLL_SECONDS``, or nothing (failed, gone, ended)."""
    caps = limits(ctx.settings)
    with ctx.units.begin() as uow:
        _lock(uow.db)
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.is_terminal:
            return DONE
        if launch.hub_user is not None or launch.status not in WAITING:
            return launch  # admitted before (a retry of a later step)
        if launch.end_requested_at is not None:
            return Outcome(retry_in=0)  # the next run ends it; it takes no slot
        now = ctx.clock()
        me = Entry(launch.id, spec_key(launch.spec), launch.created_at, launch.client)
        line = _in_line(uow.db, launch_id)
        held, total = _held(uow.db, {me.key} | {entry.key for entry in line})
        # Several Hubs (worker/placement.py): only the room of the Hubs that answer counts.
        configured = hubs(ctx.settings)
        up = placement.answering(uow.db, ctx.settings, now)
        if launch.hub is not None:
            # Built for one Hub (per-Hub builds): it runs there, or is built again elsewhere
            # when that Hub is down.
            if launch.hub not in {hub.name for hub in up}:
                why = f"{launch.hub} is down"
                transitions.unpin(uow, launch, why=why, now=now)
                return Outcome(retry_in=0)
            up = [hub for hub in up if hub.name == launch.hub]
        per_hub = placement.active_per_hub(uow.db, configured[0].name)
        room = placement.room(up, per_hub)
        if room != math.inf:
            caps = Limits(total=min(caps.total, total + int(room)), per_spec=caps.per_spec)
        # Alone in line, the order does not matter: the clients' sessions are not read.
        clients = {e.client for e in [me, *line] if e.client is not None} if line else set()
        sessions = _sessions_of(uow.db, clients)
        position = place(me, held, line, caps, active_total=total, sessions=sessions)
        chosen = placement.choose(up, per_hub) if position is None else None
        if chosen is not None:
            transitions.mark_launching(
                uow,
                launch,
                user_prefix=ctx.settings.user_prefix,
                deadline=now + timedelta(seconds=ctx.settings.launch_timeout),
                now=now,
                hub=chosen.name,
            )
            uow.notify(launch_id)
            return launch
        position = position or 0  # room counted, but no Hub took it (a race): wait a turn
        first = uow.db.scalars(_slot_events(launch_id).order_by(LaunchEvent.id).limit(1)).first()
        waited = (now - as_utc(first.created_at)).total_seconds() if first else 0.0
        if waited >= ctx.settings.max_wait:
            log.warning("launch %s: no free slot after %.0f s", launch_id, waited)
            transitions.mark_failed(
                uow,
                launch,
                transitions.capacity_message(waited),
                reason=FailReason.capacity,
                now=now,
                user_removed=True,  # it never had a Hub user
            )
            return DONE
        last = uow.db.scalars(
            _slot_events(launch_id).order_by(LaunchEvent.id.desc()).limit(1)
        ).first()
        announce = last is None or (last.data or {}).get("position") != position
        transitions.wait_for_slot(
            uow,
            launch,
            position=position,
            announce=announce,
            deadline=now + timedelta(seconds=ctx.settings.launch_timeout),
            now=now,
        )
    return Outcome(retry_in=POLL_SECONDS)
