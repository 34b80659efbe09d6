"""What a task does after a domain step: nothing, run again later, or hand over a teardown."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """Run again after ``retry_in`` seconds, or hand the unfinished removal of the Hub user to
    the teardown task after ``teardown_in`` seconds; neither means done."""

    retry_in: float | None = None
    teardown_in: float | None = None


DONE = Outcome()


def backoff(attempt: int, *, retry_after: float | None = None, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter; a Hub's Retry-After is a floor."""
    delay = random.uniform(0, min(cap, 0.5 * 2**attempt))  # noqa: S311 - jitter, not crypto
    return max(delay, retry_after or 0.0)


def handoff(outcome: Outcome) -> Outcome:
    """A teardown that could not finish in this task continues in the teardown task."""
    return Outcome(teardown_in=outcome.retry_in) if outcome.retry_in is not None else DONE
