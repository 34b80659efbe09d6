"""Several Hubs (issue 14), with in-memory Hubs: the setting, placement by free capacity and
health, a Hub that fails before its user exists, and which Hub each step talks to."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from tests.fakes import FakeHub, RecordingBroker
from tests.unit.conftest import Clock
from tests.unit.test_builds import COMMIT, FakeBuilder
from worker import builds, hub_health, placement, transitions
from worker.broker import BUILD_TASK, Message
from worker.context import WorkerContext, build_context
from worker.db import session_scope
from worker.hub_client import HubUnavailable
from worker.hubs import DEFAULT, Hub, hubs
from worker.models import Launch, Status
from worker.outcome import DONE
from worker.queries import get_launch
from worker.repos import RepoSpec
from worker.settings import Settings
from worker.starting import advance


def hub_entry(name: str, capacity: int = 0, token: str | None = "t") -> dict[str, object]:
    entry: dict[str, object] = {
        "name": name,
        "api_url": f"http://127.0.0.1:1/{name}/hub/api",
        "public_url": f"https://{name}.example",
        "capacity": capacity,
    }
    if token is not None:
        entry["api_token"] = f"{token}-{name}"
    return entry


def with_hubs(settings: Settings, *entries: dict[str, object]) -> Settings:
    return settings.model_copy(update={"hubs": json.dumps(list(entries))})


# -- the setting -------------------------------------------------------------------------


def test_the_single_hub_settings_are_a_list_of_one(settings: Settings) -> None:
    [hub] = hubs(settings)
    assert (hub.name, hub.api_url, hub.public_url) == (
        DEFAULT,
        settings.hub_api_url,
        settings.public_url,
    )


def test_a_list_of_hubs_is_read_in_order_and_hides_its_tokens(settings: Settings) -> None:
    several = with_hubs(settings, hub_entry("a", 3), hub_entry("b"))
    found = hubs(several)
    assert [(h.name, h.capacity) for h in found] == [("a", 3), ("b", 0)]
    assert found[0].api_token == "t-a" and "t-a" not in repr(found)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("not json", "JSON list"),
        ("[]", "non-empty"),
        ('{"name": "a"}', "non-empty JSON list"),
        (json.dumps([hub_entry("a"), hub_entry("a")]), "unique"),
        (json.dumps([hub_entry("A")]), "lower-case"),
        (json.dumps([{**hub_entry("a"), "capacity": -1}]), "capacity"),
        (json.dumps([{**hub_entry("a"), "capacity": True}]), "capacity"),
        (json.dumps([{**hub_entry("a"), "api_url": "file:///x"}]), "http"),
        (json.dumps([{**hub_entry("a"), "weight": 2}]), "unknown keys"),
        (json.dumps([{**hub_entry("a"), "public_url": ""}]), "public_url"),
    ],
)
def test_a_bad_hub_list_is_refused_with_what_to_fix(value: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(database_url="sqlite://", hubs=value)


def test_the_worker_needs_every_token_the_app_needs_none(settings: Settings) -> None:
    tokenless = with_hubs(settings, hub_entry("a", token=None), hub_entry("b", token=None))
    assert [h.api_token for h in hubs(tokenless)] == ["", ""]  # what the app is given
    with pytest.raises(ValueError, match="api_token"):
        build_context(tokenless)


# -- placement -----------------------------------------------------------------------------


def h(name: str, capacity: int = 0) -> Hub:
    return Hub(name, f"http://{name}", "", f"http://{name}", capacity)


def test_the_hub_with_the_most_free_capacity_is_chosen() -> None:
    a, b, c = h("a", 10), h("b", 4), h("c", 10)
    assert placement.choose([a, b, c], {"a": 7, "b": 0, "c": 2}) == c
    # Ties: fewer active sessions, then the first configured.
    assert placement.choose([a, b], {"a": 6, "b": 0}) == b
    assert placement.choose([a, c], {}) == a
    # Full Hubs are never chosen; no room anywhere: none.
    assert placement.choose([a, b], {"a": 10, "b": 4}) is None
    # A Hub with no capacity of its own has room as long as the service's caps allow.
    assert placement.choose([a, h("u")], {"a": 0, "u": 50}) == h("u")


# -- the steps, on several in-memory Hubs -------------------------------------------------


@pytest.fixture
def fleet(ctx: WorkerContext, settings: Settings) -> dict[str, FakeHub]:
    """Three in-memory Hubs of capacity 2 each, named in the settings."""
    hubs_ = {name: FakeHub(name=name) for name in ("a", "b", "c")}
    ctx.settings = with_hubs(settings, *(hub_entry(n, 2) for n in hubs_))
    ctx.hubs = hubs_  # type: ignore[assignment]
    ctx.hub = hubs_["a"]  # type: ignore[assignment]
    return hubs_


def new(ctx: WorkerContext) -> str:
    with ctx.units.begin() as uow:
        return transitions.create(
            uow, {"image": "default"}, lifetime=600, timeout=600, now=ctx.clock()
        ).id


def row(ctx: WorkerContext, launch_id: str) -> Launch:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        db.expunge(launch)
        return launch


def test_launches_fill_the_hubs_evenly_and_wait_when_all_are_full(
    ctx: WorkerContext, fleet: dict[str, FakeHub]
) -> None:
    ids = [new(ctx) for _ in range(7)]
    for launch_id in ids[:6]:
        assert advance(ctx, launch_id) == DONE
    on = [row(ctx, i).hub for i in ids[:6]]
    assert sorted(on) == ["a", "a", "b", "b", "c", "c"]
    for launch_id in ids[:6]:
        launch = row(ctx, launch_id)
        assert launch.hub_user in fleet[str(launch.hub)].users  # on its own Hub only
        assert launch.hub_user not in {
            u for n, f in fleet.items() if n != launch.hub for u in f.users
        }
    # Six of six slots taken: the seventh waits in line.
    assert advance(ctx, ids[6]).retry_in is not None
    assert row(ctx, ids[6]).status == Status.queued


def test_a_hub_known_to_be_down_gets_no_launch_until_it_answers(
    ctx: WorkerContext, fleet: dict[str, FakeHub], clock: Clock
) -> None:
    with ctx.units.begin() as uow:
        hub_health.record(uow.db, "a", ok=False, error="refused", now=clock())
    ids = [new(ctx) for _ in range(4)]
    for launch_id in ids:
        assert advance(ctx, launch_id) == DONE
    assert {row(ctx, i).hub for i in ids} == {"b", "c"}
    # A check older than a few intervals no longer counts (a stopped health task).
    clock.advance(ctx.settings.hub_health_interval * 4)
    late = new(ctx)
    assert advance(ctx, late) == DONE
    assert row(ctx, late).hub == "a"


def test_every_hub_down_means_waiting_not_failing(
    ctx: WorkerContext, fleet: dict[str, FakeHub], clock: Clock
) -> None:
    with ctx.units.begin() as uow:
        for name in fleet:
            hub_health.record(uow.db, name, ok=False, error="refused", now=clock())
    launch_id = new(ctx)
    assert advance(ctx, launch_id).retry_in is not None
    assert row(ctx, launch_id).status == Status.queued
    assert all(not f.calls for f in fleet.values())


def test_a_hub_that_fails_before_the_user_exists_hands_the_launch_to_another(
    ctx: WorkerContext, fleet: dict[str, FakeHub]
) -> None:
    fleet["a"].down_for = 100
    launch_id = new(ctx)
    first = advance(ctx, launch_id)
    assert first.retry_in == 0  # put back in line at once
    launch = row(ctx, launch_id)
    assert (launch.status, launch.hub, launch.hub_user) == (Status.queued, None, None)
    assert advance(ctx, launch_id) == DONE
    launch = row(ctx, launch_id)
    assert launch.status == Status.ready and launch.hub in ("b", "c")
    # The failure was recorded: the next launch does not try "a".
    with session_scope(ctx.settings.database_url) as db:
        from worker.models import HubHealth

        assert db.scalars(select(HubHealth.healthy).where(HubHealth.name == "a")).one() is False


def test_one_hub_fails_a_launch_waits_for_it_as_before(ctx: WorkerContext, hub: FakeHub) -> None:
    """With a single Hub nothing is placed again: the launch waits for its Hub to answer."""
    hub.down_for = 1
    launch_id = new(ctx)
    outcome = advance(ctx, launch_id)
    assert outcome.retry_in is not None and outcome.retry_in > 0
    assert row(ctx, launch_id).status == Status.launching
    assert advance(ctx, launch_id) == DONE


def test_a_busy_hub_is_waited_for_not_left(ctx: WorkerContext, fleet: dict[str, FakeHub]) -> None:
    """The Hub's 429 (its spawn limit) says busy, not dead: the launch stays on it and waits,
    and no failure is recorded against it."""
    answers = iter([HubUnavailable("Hub answered 429", status=429, retry_after=1.0)])

    def busy_once(what: str, name: str) -> None:
        if what == "create_user":
            error = next(answers, None)
            if error is not None:
                raise error

    fleet["a"].on_call = busy_once
    launch_id = new(ctx)
    outcome = advance(ctx, launch_id)
    assert outcome.retry_in is not None and outcome.retry_in > 0
    launch = row(ctx, launch_id)
    assert (launch.status, launch.hub) == (Status.launching, "a")
    with session_scope(ctx.settings.database_url) as db:
        from worker.models import HubHealth

        assert db.get(HubHealth, "a") is None
    assert advance(ctx, launch_id) == DONE
    assert row(ctx, launch_id).hub == "a"


# -- per-Hub builds (the venv builder, several Hubs) --------------------------------------


@pytest.fixture
def built_here(ctx: WorkerContext, fleet: dict[str, FakeHub]) -> FakeBuilder:
    fake = FakeBuilder()
    ctx.builder = fake
    ctx.resolve = lambda spec, settings: COMMIT
    return fake


def repo_launch(ctx: WorkerContext) -> str:
    with ctx.units.begin() as uow:
        spec = RepoSpec("https://example.org/a/b", "main").as_dict()
        return transitions.create(uow, spec, lifetime=600, timeout=600, now=ctx.clock()).id


def build_sent(ctx: WorkerContext) -> list[Message]:
    broker = ctx.units.broker
    assert isinstance(broker, RecordingBroker)
    return [m for m in broker.sent if m.task == BUILD_TASK]


def test_an_environment_is_built_on_the_machine_of_the_hub_it_runs_on(
    ctx: WorkerContext, fleet: dict[str, FakeHub], built_here: FakeBuilder
) -> None:
    launch_id = repo_launch(ctx)
    assert advance(ctx, launch_id).retry_in is not None  # building
    launch = row(ctx, launch_id)
    assert launch.hub == "a" and str(launch.env_name).endswith("-a")
    [message] = build_sent(ctx)
    # To that Hub's build queue: a worker on its machine builds it where its spawner reads it.
    assert (message.argument, message.queue) == (launch.env_name, f"{ctx.settings.build_queue}.a")
    builds.run_build(ctx.units, built_here, str(launch.env_name), clock=ctx.clock)
    assert advance(ctx, launch_id) == DONE
    launch = row(ctx, launch_id)
    assert (launch.status, launch.hub) == (Status.ready, "a")
    assert launch.hub_user in fleet["a"].users


def test_a_launch_built_for_a_hub_that_went_down_is_built_for_another(
    ctx: WorkerContext, fleet: dict[str, FakeHub], built_here: FakeBuilder, clock: Clock
) -> None:
    launch_id = repo_launch(ctx)
    advance(ctx, launch_id)
    first = str(row(ctx, launch_id).env_name)
    builds.run_build(ctx.units, built_here, first, clock=ctx.clock)
    with ctx.units.begin() as uow:
        hub_health.record(uow.db, "a", ok=False, error="refused", now=clock())
    # Admission finds its Hub down: built again, for a Hub that answers, and run there.
    assert advance(ctx, launch_id).retry_in == 0
    assert advance(ctx, launch_id).retry_in is not None
    again = row(ctx, launch_id)
    assert again.hub in ("b", "c") and again.env_name != first
    assert str(again.env_name).endswith(f"-{again.hub}")
    builds.run_build(ctx.units, built_here, str(again.env_name), clock=ctx.clock)
    assert advance(ctx, launch_id) == DONE
    assert row(ctx, launch_id).status == Status.ready
    assert not fleet["a"].users


def test_with_one_hub_builds_go_to_the_shared_build_queue(
    ctx: WorkerContext, hub: FakeHub, settings: Settings
) -> None:
    fake = FakeBuilder()
    ctx.builder = fake
    ctx.resolve = lambda spec, settings: COMMIT
    launch_id = repo_launch(ctx)
    advance(ctx, launch_id)
    launch = row(ctx, launch_id)
    assert launch.hub is None and not str(launch.env_name).endswith("-default")
    [message] = build_sent(ctx)
    assert message.queue is None  # the broker's build queue, as before
