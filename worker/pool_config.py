"""Which warm pools the settings ask for (``HUBLAUNCH_POOL``), and what a launch matches a pool
by. Read by the worker (worker/pool.py keeps the pools) and by the app (metrics, admin API)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from worker import sources
from worker.repos import SpecError
from worker.settings import Settings
from worker.transitions import spec_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pool:
    """One configured pool: which launches it serves (``key``), the spec of its servers, and
    how many it keeps: ``minimum`` = ``maximum`` for a fixed size; between them, by demand
    (``worker.pool_demand``)."""

    key: str
    spec: dict[str, Any]
    minimum: int
    maximum: int

    @property
    def by_demand(self) -> bool:
        return self.minimum < self.maximum


def pool_key(spec: dict[str, Any]) -> str:
    """What a launch's spec matches a pool by: the image (as the per-spec cap names it), or
    the repository and the ref as asked (a pool serves one ref; its servers run its commit)."""
    if "image" in spec:
        return spec_key(spec)
    return f"repo:{spec['repo']}@{spec.get('ref', 'HEAD')}"


# Parsed pools by what parsing reads: every launch of a pooled spec asks, and an entry that
# does not parse is logged once, not at every launch.
_parsed: dict[tuple[str, tuple[str, ...], bool], tuple[Pool, ...]] = {}


def pools(settings: Settings) -> tuple[Pool, ...]:
    """The pools the setting asks for; an entry that does not parse is logged and skipped."""
    key = (settings.pool, tuple(settings.banned_specs), settings.allow_local_repos)
    if key not in _parsed:
        if len(_parsed) > 64:  # settings objects come and go in tests; a service has one
            _parsed.clear()
        _parsed[key] = _parse(settings)
    return _parsed[key]


def _parse(settings: Settings) -> tuple[Pool, ...]:
    found: dict[str, Pool] = {}
    for entry in (part.strip() for part in settings.pool.split(",")):
        if not entry:
            continue
        text, _, size = entry.rpartition("=")
        try:
            spec = _spec(text.strip(), settings)
        except SpecError as e:
            log.error("pool: %r is not a spec this service launches: %s", text, e)
            continue
        key = pool_key(spec)
        low, _, high = size.partition("..")
        found[key] = Pool(key, spec, int(low), int(high or low))
    return tuple(found.values())


REPO_PREFIXES = ("gh:", "gl:", "gist:", "https://", "http://", "file://")


def _spec(text: str, settings: Settings) -> dict[str, Any]:
    if sources.is_record(text):  # records have no ref; a CKAN URL may hold an "@"
        return sources.normalize(text, None, settings).as_dict()
    repo, at, ref = text.rpartition("@")
    if text.startswith(REPO_PREFIXES):
        return sources.normalize(repo if at else text, ref if at else None, settings).as_dict()
    return {"image": text}
