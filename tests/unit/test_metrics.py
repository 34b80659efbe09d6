"""Metrics: what each change of state counts, how it reaches Redis (after the commit only), and
what /metrics makes of it, with an in-memory Redis and the unit databases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import fakeredis
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from api.main import create_app
from tests.fakes import FakeHub, RecordingBroker, insert_launch
from tests.unit.conftest import Clock
from worker import hub_health, metrics, transitions
from worker.context import WorkerContext
from worker.db import session_scope
from worker.hub_client import endpoint_family
from worker.metrics import Recorder, observation
from worker.models import EndReason, Launch, Status
from worker.queries import get_launch
from worker.settings import Settings
from worker.starting import advance
from worker.teardown import teardown
from worker.transitions import FailReason
from worker.unit_of_work import Units


@pytest.fixture
def store() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


class Immediate(Recorder):
    """Adds to the in-memory Redis at once (the background thread has a test of its own)."""

    def __init__(self, store: fakeredis.FakeRedis) -> None:
        super().__init__(None)
        self._redis = store

    def add(self, observations: Iterable[metrics.Observation]) -> None:
        with self._lock:
            self._pending.extend(observations)
        self.flush()


@pytest.fixture
def recorder(store: fakeredis.FakeRedis) -> Recorder:
    return Immediate(store)


def test_the_background_thread_adds_what_was_observed(store: fakeredis.FakeRedis) -> None:
    recorder = Recorder(None, interval=0.02)
    recorder._redis = store
    recorder.add([observation("hublaunch_cleanup_passes")])
    deadline = time.monotonic() + 5
    while not metrics.stored(store)["hublaunch_cleanup_passes"]:
        assert time.monotonic() < deadline, "nothing reached Redis"
        time.sleep(0.01)
    assert metrics.stored(store)["hublaunch_cleanup_passes"] == {"[]": 1.0}


@pytest.fixture
def counted(ctx: WorkerContext, recorder: Recorder, hub: FakeHub) -> WorkerContext:
    """The worker's context, with its Hub requests and commits counted into ``recorder``."""
    ctx.units = Units(ctx.units.database_url, ctx.units.broker, recorder=recorder)
    return ctx


def values(store: fakeredis.FakeRedis) -> dict[str, dict[str, float]]:
    return {name: fields for name, fields in metrics.stored(store).items() if fields}


def counter(store: fakeredis.FakeRedis, name: str, *labels: str) -> float:
    field = metrics.Observation(name, labels, 1).fields()
    key, _ = next(field)
    return metrics.stored(store)[name].get(key, 0.0)


# -- observations ------------------------------------------------------------------------


def test_a_histogram_observation_adds_to_its_bucket_and_every_one_above() -> None:
    fields = dict(observation("hublaunch_launch_ready_seconds", 3.0, provider="image").fields())
    key = '["image"]'
    sep = metrics.SEPARATOR
    assert f"{key}{sep}2.5" not in fields  # 3 s is above the 2.5 s bound
    assert fields[f"{key}{sep}5"] == 1
    assert fields[f"{key}{sep}3600"] == 1 and fields[f"{key}{sep}+Inf"] == 1
    assert fields[f"{key}{sep}sum"] == 3.0


def test_labels_must_be_exactly_the_familys() -> None:
    with pytest.raises(ValueError, match="takes the labels"):
        observation("hublaunch_launches_created", provider="image", extra="x")
    with pytest.raises(ValueError, match="takes the labels"):
        observation("hublaunch_launches_created")


def test_label_values_with_separators_survive_the_round_trip(
    recorder: Recorder, store: fakeredis.FakeRedis
) -> None:
    odd = 'a|b\t"c"\n'
    recorder.add([observation("hublaunch_cleanup_actions", category=odd, result="x")])
    recorder.flush()
    [field] = metrics.stored(store)["hublaunch_cleanup_actions"]
    assert metrics.label_values(field) == ([odd, "x"], "")


def test_without_redis_nothing_is_kept_and_nothing_fails() -> None:
    recorder = Recorder(None)
    recorder.add([observation("hublaunch_cleanup_passes")])
    recorder.flush()


def test_a_redis_that_does_not_answer_loses_the_counts_not_the_launch() -> None:
    recorder = Recorder("redis://127.0.0.1:1/0")
    recorder.add([observation("hublaunch_cleanup_passes")])
    recorder.flush()  # logged, not raised


# -- counted after the commit, once ------------------------------------------------------


def test_a_rollback_counts_nothing(
    settings: Settings, recorder: Recorder, store: fakeredis.FakeRedis, clock: Clock
) -> None:
    units = Units(settings.database_url, RecordingBroker(settings.database_url), recorder=recorder)
    with pytest.raises(RuntimeError), units.begin() as uow:
        transitions.create(uow, {"image": "default"}, lifetime=60, timeout=60, now=clock())
        raise RuntimeError("the transaction fails")
    assert values(store) == {}
    with units.begin() as uow:
        transitions.create(uow, {"image": "default"}, lifetime=60, timeout=60, now=clock())
    assert counter(store, "hublaunch_launches_created", "image") == 1


def test_a_launch_to_ready_counts_its_creation_wait_spawn_and_hub_requests(
    counted: WorkerContext, store: fakeredis.FakeRedis, clock: Clock, recorder: Recorder
) -> None:
    counted.hub = FakeHub()
    with counted.units.begin() as uow:
        launch = transitions.create(uow, {"image": "default"}, lifetime=60, timeout=60, now=clock())
    clock.advance(2)
    advance(counted, launch.id)

    assert counter(store, "hublaunch_launches_created", "image") == 1
    assert counter(store, "hublaunch_launches_finished", "image", "ready", "") == 1
    stored = metrics.stored(store)
    sep = metrics.SEPARATOR
    assert stored["hublaunch_launch_queue_seconds"][f'["image"]{sep}sum'] == 2.0
    assert f'["image"]{sep}1' not in stored["hublaunch_launch_queue_seconds"]  # waited 2 s
    assert stored["hublaunch_launch_ready_seconds"][f'["image"]{sep}+Inf'] == 1
    assert stored["hublaunch_launch_spawn_seconds"][f'["image"]{sep}+Inf'] == 1


def test_failures_are_counted_by_reason(
    counted: WorkerContext, store: fakeredis.FakeRedis, clock: Clock
) -> None:
    with session_scope(counted.settings.database_url) as db:
        launch_id = insert_launch(db, {"image": "nope"}, lifetime=60, now=clock()).id
    advance(counted, launch_id)  # the FakeHub knows only "default": the Hub refuses it
    assert counter(store, "hublaunch_launches_finished", "image", "failed", "hub_refused") == 1


def test_an_end_before_ready_and_a_session_end_are_told_apart(
    counted: WorkerContext, store: fakeredis.FakeRedis, clock: Clock
) -> None:
    with session_scope(counted.settings.database_url) as db:
        early = insert_launch(db, {"image": "default"}, lifetime=60, now=clock()).id
        later = insert_launch(db, {"image": "default"}, lifetime=60, now=clock()).id
    for launch_id in (early, later):
        if launch_id == later:
            advance(counted, launch_id)
        with counted.units.begin() as uow:
            launch = get_launch(uow.db, launch_id)
            assert launch is not None
            transitions.request_end(uow, launch, now=clock())
    advance(counted, early)  # ended before it was ready
    teardown(counted, later)  # a ready session, ended by its owner
    assert counter(store, "hublaunch_launches_finished", "image", "ended", "requested") == 1
    assert counter(store, "hublaunch_sessions_ended", EndReason.requested) == 1
    assert counter(store, "hublaunch_launches_finished", "image", "ready", "") == 1


def test_a_repository_launch_is_counted_by_its_host_and_an_unknown_host_as_git() -> None:
    assert transitions.provider({"repo": "https://github.com/a/b", "ref": "main"}) == "github.com"
    assert transitions.provider({"repo": "https://evil.example/x/y"}) == "git"
    assert transitions.provider({"image": "default"}) == "image"


@pytest.mark.parametrize(
    ("method", "path", "family"),
    [
        ("POST", "users/hl-abc", "POST /users/:name"),
        ("POST", "users/hl-abc/tokens", "POST /users/:name/tokens"),
        ("DELETE", "users/hl-abc/server", "DELETE /users/:name/server"),
        ("DELETE", "users/hl-abc/servers/x%2Fy", "DELETE /users/:name/servers/:server"),
        ("GET", "users?offset=0&name_filter=hl-", "GET /users"),
        ("GET", "", "GET /"),
    ],
)
def test_hub_request_families_never_carry_a_user_name(method: str, path: str, family: str) -> None:
    assert endpoint_family(method, path) == family


def test_stuck_launches_count_as_timeouts(
    settings: Settings, recorder: Recorder, store: fakeredis.FakeRedis, clock: Clock
) -> None:
    units = Units(settings.database_url, RecordingBroker(settings.database_url), recorder=recorder)
    with session_scope(settings.database_url) as db:
        insert_launch(db, {"image": "default"}, lifetime=60, now=clock() - timedelta(hours=1))
    with units.begin() as uow:
        transitions.fail_stuck(
            uow, Launch.status == Status.queued, "late", lease=clock(), now=clock()
        )
    assert counter(store, "hublaunch_launches_finished", "image", "failed", FailReason.timeout) == 1


# -- /metrics ------------------------------------------------------------------------------


@pytest.fixture
def scrape(
    settings: Settings, store: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    app = create_app(settings, broker=RecordingBroker(settings.database_url))
    [collector] = list(app.state.metrics._collector_to_names)
    collector.client = store
    with TestClient(app) as client:
        yield client


def families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_shows_the_counts_of_every_process_and_the_database_now(
    scrape: TestClient, settings: Settings, store: fakeredis.FakeRedis, clock: Clock
) -> None:
    # What a worker counted (through Redis, not this process).
    worker = Immediate(store)
    worker.add([observation("hublaunch_cleanup_actions", category="expired", result="ended")])
    worker.flush()
    with session_scope(settings.database_url) as db:
        for image in ("a", "a", "b"):
            launch = insert_launch(db, {"image": image}, lifetime=60, now=clock())
            launch.status = Status.ready
        insert_launch(db, {"image": "q"}, lifetime=60, now=clock() - timedelta(seconds=30))

    response = scrape.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    seen = families(response.text)
    assert seen["hublaunch_cleanup_actions_total"] == {
        (("category", "expired"), ("result", "ended")): 1.0
    }
    assert seen["hublaunch_sessions_active"] == {
        (("spec", "image a"),): 2.0,
        (("spec", "image b"),): 1.0,
    }
    assert seen["hublaunch_launches"][(("status", "ready"),)] == 3.0
    assert seen["hublaunch_launches"][(("status", "queued"),)] == 1.0
    assert seen["hublaunch_queue_oldest_seconds"][()] >= 29
    assert seen["hublaunch_metrics_store_up"][()] == 1.0
    assert all(name.startswith("hublaunch_") for name in seen)


def test_active_sessions_by_spec_are_capped(
    scrape: TestClient, settings: Settings, clock: Clock
) -> None:
    # Visitors choose specs: a flood of distinct ones must not become a flood of series.
    with session_scope(settings.database_url) as db:
        for n in range(30):
            launch = insert_launch(db, {"image": f"img{n:02d}"}, lifetime=60, now=clock())
            launch.status = Status.ready
    active = families(scrape.get("/metrics").text)["hublaunch_sessions_active"]
    assert len(active) == 21 and active[(("spec", "other"),)] == 10.0


def test_metrics_needs_the_admin_token_once_one_is_set(
    settings: Settings, store: fakeredis.FakeRedis
) -> None:
    guarded = settings.model_copy(update={"admin_token": SecretStr("s3cret-admin")})
    with TestClient(create_app(guarded, broker=RecordingBroker(settings.database_url))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-admin"})
        assert ok.status_code == 200 and "hublaunch_launches" in ok.text


def test_each_hub_has_its_sessions_capacity_and_health(
    settings: Settings, store: fakeredis.FakeRedis, clock: Clock
) -> None:
    """Several Hubs (issue 14): the gauges per Hub, from the database at scrape time."""
    entries = [
        {
            "name": name,
            "api_url": f"http://{name}/hub/api",
            "public_url": f"http://{name}",
            "capacity": capacity,
        }
        for name, capacity in (("a", 5), ("b", 0))
    ]
    several = settings.model_copy(update={"hubs": json.dumps(entries)})
    with session_scope(several.database_url) as db:
        for hub in ("a", "a", None):  # None: placed before there were names, the first Hub's
            launch = insert_launch(db, {"image": "x"}, lifetime=60, now=clock())
            launch.status, launch.hub = Status.ready, hub
        hub_health.record(db, "b", ok=False, error="refused", now=clock())
    app = create_app(several, broker=RecordingBroker(several.database_url))
    [collector] = list(app.state.metrics._collector_to_names)
    collector.client = store
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    seen = families(response.text)
    assert seen["hublaunch_hub_sessions"] == {(("hub", "a"),): 3.0, (("hub", "b"),): 0.0}
    assert seen["hublaunch_hub_capacity"] == {(("hub", "a"),): 5.0, (("hub", "b"),): 0.0}
    assert seen["hublaunch_hub_up"] == {(("hub", "a"),): 1.0, (("hub", "b"),): 0.0}
