"""Ending a launch's Hub side: remove its user, then record that nothing is owed any more."""

from __future__ import annotations

import logging

from worker import transitions
from worker.context import WorkerContext
from worker.hub_client import HubUnavailable, HubUser
from worker.hub_users import STOP_WAIT_SECONDS, remove_hub_user
from worker.logs import bind_user
from worker.outcome import DONE, Outcome, backoff
from worker.queries import get_launch

log = logging.getLogger(__name__)


def teardown(
    ctx: WorkerContext, launch_id: str, *, attempt: int = 0, known: HubUser | None = None
) -> Outcome:
    """Stop every server of the launch's Hub user, then delete the user. Safe to repeat.

    A ready launch whose end was requested becomes ``ended``; a failed one stays ``failed``.
    Returns a retry delay while the Hub is unreachable or a server is still stopping. No
    transaction is open during the Hub calls.
    """
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is None or launch.user_removed_at is not None:
            return DONE
        name = launch.hub_user
        hub = ctx.hub_for(launch.hub)
    bind_user(name)
    try:
        removed = name is None or remove_hub_user(
            hub,
            name,
            wait=STOP_WAIT_SECONDS,
            known=known if known and known.name == name else None,
        )
        if not removed:
            return Outcome(retry_in=backoff(attempt, cap=10.0))
    except HubUnavailable as e:
        log.warning("teardown of launch %s: %s", launch_id, e.message)
        return Outcome(retry_in=backoff(attempt, retry_after=e.retry_after))
    with ctx.units.begin() as uow:
        launch = get_launch(uow.db, launch_id)
        if launch is not None and launch.user_removed_at is None:
            transitions.mark_user_removed(uow, launch, now=ctx.clock())
    return DONE
