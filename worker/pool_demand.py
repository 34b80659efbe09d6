"""How many servers each warm pool keeps now: its fixed size, or for a pool sized by demand
(``HUBLAUNCH_POOL=default=1..8``) what the recent launches of its spec call for.

A pool has to cover the launches that arrive while a taken server is replaced. By Little's law
that is, on average, the launch rate times the time a pooled server takes to start (λT).
Arrivals bunch (a class opening its notebooks), so the pool keeps the mean plus two standard
deviations of a Poisson count, λT + 2√λT: about 98 % of refill periods then see no miss. The
result is clamped to the pool's bounds; with no launch in the window it is the minimum.

λ is the visitors' launches of the pool's spec in the last ``pool_demand_window`` seconds
(hits and misses alike: each would have taken a server); T is the median time the pool's
servers of that window took from creation to ready (the queue, any build lookup, the spawn:
what a refill waits for), or ``START_GUESS`` when none started in it. Both are read from the
database, so the worker, the metrics and the admin API agree on a pool's size without sharing
anything else, and a restart changes nothing.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import as_utc
from worker.models import Launch
from worker.pool_config import Pool, pool_key
from worker.settings import Settings
from worker.transitions import spec_key

# Seconds a server is taken to need before the pool has started one in the window: about a
# real single-user server's start here (3.5 s) plus a queue hop, rounded up, so a new demand
# pool errs on the side of one server too many.
START_GUESS = 10.0


@dataclass(frozen=True)
class Size:
    """A pool's size now, and for a demand-sized pool what it was read from."""

    wanted: int
    launches: int = 0  # visitors' launches of its spec in the window
    start_seconds: float | None = None  # median start time of its servers in the window


def wanted(rate: float, start_seconds: float, minimum: int, maximum: int) -> int:
    """Servers that cover ``rate`` launches a second while each refill takes ``start_seconds``,
    within the bounds."""
    load = rate * start_seconds
    need = math.ceil(load + 2 * math.sqrt(load)) if load > 0 else 0
    return max(minimum, min(maximum, need))


def sizes(
    db: Session, configured: Iterable[Pool], settings: Settings, now: datetime
) -> dict[str, Size]:
    """Every configured pool's size now, by key."""
    pools = list(configured)
    by_demand = [pool for pool in pools if pool.by_demand]
    found = {pool.key: Size(pool.minimum) for pool in pools if not pool.by_demand}
    if not by_demand:
        return found
    since = now - timedelta(seconds=settings.pool_demand_window)
    # The visitors' launches of these specs: the indexed spec_key narrows them, the pool key
    # (a repository's ref as asked) is told apart here.
    specs = db.scalars(
        select(Launch.spec).where(
            Launch.spec_key.in_({spec_key(pool.spec) for pool in by_demand}),
            Launch.pool_key.is_(None),
            Launch.created_at > since,
        )
    )
    launches = Counter(pool_key(spec) for spec in specs)
    starts: dict[str, list[float]] = {}
    for key, created, ready in db.execute(
        select(Launch.pool_key, Launch.created_at, Launch.ready_at).where(
            Launch.pool_key.in_([pool.key for pool in by_demand]),
            Launch.ready_at > since,
        )
    ):
        if ready is not None:  # the WHERE says so; the column's type does not
            took = (as_utc(ready) - as_utc(created)).total_seconds()
            starts.setdefault(str(key), []).append(took)
    window = settings.pool_demand_window
    for pool in by_demand:
        taken = statistics.median(starts[pool.key]) if pool.key in starts else None
        found[pool.key] = Size(
            wanted(
                launches[pool.key] / window,
                START_GUESS if taken is None else taken,
                pool.minimum,
                pool.maximum,
            ),
            launches[pool.key],
            taken,
        )
    return found
