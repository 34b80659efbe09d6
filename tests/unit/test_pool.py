"""The warm pool against an in-memory Hub, on both databases: filled to its size, each server
handed to one launch ever, dead ones never handed out, drained when shrunk or outdated, left
alone by cleanup while it waits."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import select, update

from tests.fakes import FakeHub, RecordingBroker
from tests.unit.conftest import Clock
from tests.unit.test_cull_pass import ListingHub
from worker import hub_health, pool, transitions
from worker.broker import LAUNCH_TASK, POOL_TASK, TEARDOWN_TASK
from worker.context import WorkerContext
from worker.cull import cull_pass
from worker.db import as_utc, session_scope
from worker.models import EndReason, Launch, Status
from worker.outcome import DONE
from worker.pool_config import pool_key, pools
from worker.starting import advance
from worker.teardown import teardown

DEFAULT = "image:default"


def pooled(ctx: WorkerContext, size: int, spec: str = "default") -> WorkerContext:
    settings = ctx.settings.model_copy(update={"pool": f"{spec}={size}"})
    return dataclasses.replace(ctx, settings=settings)


def run_sent(ctx: WorkerContext, broker: RecordingBroker) -> None:
    """Run the launch tasks sent so far (the pool's launches), as a worker would."""
    for launch_id in broker.arguments(LAUNCH_TASK):
        assert advance(ctx, launch_id) == DONE
    broker.sent.clear()


def fill(ctx: WorkerContext, broker: RecordingBroker) -> list[str]:
    pool.maintain(ctx)
    run_sent(ctx, broker)
    return rows(ctx, Status.pooled)


def rows(ctx: WorkerContext, status: Status) -> list[str]:
    with session_scope(ctx.settings.database_url) as db:
        return list(
            db.scalars(
                select(Launch.id)
                .where(Launch.status == status, Launch.pool_key.is_not(None))
                .order_by(Launch.ready_at)
            )
        )


def load(ctx: WorkerContext, launch_id: str) -> Launch:
    with session_scope(ctx.settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        return launch


def visitor(ctx: WorkerContext, image: str = "default") -> str:
    with ctx.units.begin() as uow:
        spec = {"image": image}
        return transitions.create(uow, spec, lifetime=600, timeout=600, now=ctx.clock()).id


def test_the_setting_names_images_and_repositories(ctx: WorkerContext) -> None:
    settings = ctx.settings.model_copy(
        update={"pool": "default=3, gh:org/repo@main=2,https://example.org/x.git=1"}
    )
    found = {p.key: (p.spec, p.minimum) for p in pools(settings)}
    assert not any(p.by_demand or p.minimum != p.maximum for p in pools(settings))
    assert found == {
        DEFAULT: ({"image": "default"}, 3),
        "repo:https://github.com/org/repo@main": (
            {"repo": "https://github.com/org/repo", "ref": "main"},
            2,
        ),
        "repo:https://example.org/x.git@HEAD": (
            {"repo": "https://example.org/x.git", "ref": "HEAD"},
            1,
        ),
    }
    assert pool_key({"image": "default:latest"}) == DEFAULT


def test_the_pool_fills_to_its_size_with_servers_nobody_can_use_yet(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 3)
    waiting = fill(ctx, broker)
    assert len(waiting) == 3
    for launch_id in waiting:
        launch = load(ctx, launch_id)
        assert launch.hub_user in hub.users and hub.users[launch.hub_user]["servers"] == {
            "": "ready"
        }
        # No token, no lifetime yet: both start when a visitor's launch takes it.
        assert launch.token_ciphertext is None and launch.expires_at is None
    assert hub.tokens == {}
    assert pool.maintain(ctx).started == {}  # full: nothing more


def test_a_launch_takes_the_longest_waiting_server_and_its_lifetime_starts_then(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker, clock: Clock
) -> None:
    ctx = pooled(ctx, 2)
    first, _second = fill(ctx, broker)
    server = load(ctx, first).hub_user
    starts = [c for c in hub.calls if c[0] == "start_server"]
    clock.advance(300)
    launch_id = visitor(ctx)
    assert advance(ctx, launch_id) == DONE
    launch = load(ctx, launch_id)
    assert launch.status == Status.ready and launch.hub_user == server
    assert launch.expires_at is not None and launch.ready_at is not None
    assert as_utc(launch.ready_at) == clock()
    assert as_utc(launch.expires_at) == clock() + timedelta(seconds=600)
    assert [c for c in hub.calls if c[0] == "start_server"] == starts  # no new server
    assert list(hub.tokens.values()) == [server]
    given = load(ctx, first)
    assert given.status == Status.ended and given.end_reason == EndReason.handed_over
    assert given.hub_user is None and given.user_removed_at is not None
    assert broker.arguments(POOL_TASK)  # a refill asked for at once


def test_each_pooled_server_goes_to_one_launch_ever(
    ctx: WorkerContext, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 3)
    fill(ctx, broker)
    visitors = [visitor(ctx) for _ in range(10)]
    with ThreadPoolExecutor(10) as threads:
        names = list(threads.map(lambda v: pool.claim(ctx, v, {"image": "default"}), visitors))
    got = [name for name in names if name is not None]
    assert len(got) == 3 and len(set(got)) == 3
    assert len(rows(ctx, Status.pooled)) == 0
    assert pool.claim(ctx, visitor(ctx), {"image": "default"}) is None  # empty: a miss


def test_a_server_that_died_in_the_pool_is_not_handed_out_and_the_next_is(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 2)
    oldest, other = (load(ctx, launch_id).hub_user for launch_id in fill(ctx, broker))
    assert oldest is not None and other is not None
    del hub.users[oldest]["servers"][""]  # it crashed behind the pool's back
    starts = [c for c in hub.calls if c[0] == "start_server"]
    launch_id = visitor(ctx)
    assert advance(ctx, launch_id) == DONE
    launch = load(ctx, launch_id)
    assert launch.status == Status.ready and launch.hub_user == other
    assert [c for c in hub.calls if c[0] == "start_server"] == starts  # no server started
    assert oldest not in hub.users  # the dead one's (never used) user is removed


def test_when_the_last_pooled_server_is_dead_the_launch_starts_a_fresh_one(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 1)
    [waiting] = fill(ctx, broker)
    name = load(ctx, waiting).hub_user
    assert name is not None
    del hub.users[name]["servers"][""]
    launch_id = visitor(ctx)
    assert advance(ctx, launch_id) == DONE
    launch = load(ctx, launch_id)
    # For the same (never used) user: a new server, never the dead one.
    assert launch.status == Status.ready and launch.hub_user == name
    assert [c for c in hub.calls if c == ("start_server", name)] == [("start_server", name)] * 2


def test_a_launch_for_another_spec_never_takes_a_pooled_server(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 1)
    hub.known_images = ("default", "other")
    fill(ctx, broker)
    launch_id = visitor(ctx, "other")
    assert advance(ctx, launch_id) == DONE
    assert len(rows(ctx, Status.pooled)) == 1
    assert load(ctx, launch_id).status == Status.ready


def test_shrinking_the_pool_drains_the_surplus(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    waiting = fill(pooled(ctx, 3), broker)
    report = pool.maintain(pooled(ctx, 1))
    assert report.drained == {DEFAULT: 2} and report.started == {}
    drained = broker.arguments(TEARDOWN_TASK)
    assert len(drained) == 2 and set(drained) <= set(waiting)
    for launch_id in drained:
        assert teardown(ctx, launch_id) == DONE
        launch = load(ctx, launch_id)
        assert launch.status == Status.ended and launch.end_reason == EndReason.drained
        assert launch.hub_user not in hub.users
    assert len(rows(ctx, Status.pooled)) == 1


def test_a_new_commit_drains_a_repository_pool(ctx: WorkerContext, broker: RecordingBroker) -> None:
    spec = "https://example.org/x.git@main"
    key = "repo:https://example.org/x.git@main"
    ctx = pooled(ctx, 2, spec)
    ctx = dataclasses.replace(ctx, resolve=lambda _spec, _settings: "b" * 40)
    with ctx.units.begin() as uow:
        old = transitions.create_many(
            uow,
            [
                transitions.NewLaunch({"repo": "https://example.org/x.git", "ref": "main"}, 600)
                for _ in range(2)
            ],
            timeout=600,
            now=ctx.clock(),
            pool_keys=[key, key],
        )
        uow.db.execute(
            update(Launch)
            .where(Launch.id.in_(old))
            .values(status=Status.pooled, commit="a" * 40, hub_user=None)
        )
    report = pool.maintain(ctx)
    assert report.drained == {key: 2} and report.started == {key: 2}
    assert set(broker.arguments(TEARDOWN_TASK)) == set(old)


def test_a_pool_whose_launches_keep_failing_is_not_refilled(
    ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 1, "broken-image")  # the Hub refuses it
    for _ in range(2):
        pool.maintain(ctx)
        run_sent(ctx, broker)
    assert pool.maintain(ctx).started == {}


def test_refills_stop_at_the_cap_on_active_sessions(
    ctx: WorkerContext, broker: RecordingBroker
) -> None:
    ctx = pooled(ctx, 5)
    ctx = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"max_active": 2}))
    assert pool.maintain(ctx).started == {DEFAULT: 2}


def test_cleanup_leaves_waiting_servers_alone_and_drains_stopped_ones(
    ctx: WorkerContext, broker: RecordingBroker, clock: Clock
) -> None:
    hub = ListingHub()
    ctx = dataclasses.replace(pooled(ctx, 2), hub=hub)  # type: ignore[arg-type]
    first, second = fill(ctx, broker)
    # Idle since they started, long past the idle timeout: a pooled server is never culled as
    # idle (nobody has used it; that is the point).
    for name in list(hub.users):
        hub.created[name] = hub.activity[name] = clock()
    clock.advance(ctx.settings.idle_timeout * 10)
    cull_pass(ctx)
    assert set(rows(ctx, Status.pooled)) == {first, second}
    dead = load(ctx, second).hub_user
    assert dead is not None
    del hub.users[dead]["servers"][""]
    cull_pass(ctx)
    assert rows(ctx, Status.pooled) == [first]
    assert dead not in hub.users and load(ctx, second).status == Status.ended


def test_a_session_from_a_long_waiting_pooled_server_is_not_culled_as_idle(
    ctx: WorkerContext, broker: RecordingBroker, clock: Clock
) -> None:
    """The server sat unused in the pool far longer than the idle timeout; its activity says
    so. The session that took it has only just started, and keeps running."""
    hub = ListingHub()
    ctx = dataclasses.replace(pooled(ctx, 1), hub=hub)  # type: ignore[arg-type]
    [waiting] = fill(ctx, broker)
    name = load(ctx, waiting).hub_user
    assert name is not None
    hub.created[name] = hub.activity[name] = clock()
    clock.advance(ctx.settings.idle_timeout * 3)
    launch_id = visitor(ctx)
    assert advance(ctx, launch_id) == DONE
    cull_pass(ctx)
    assert load(ctx, launch_id).status == Status.ready
    # Once it has been ready for the idle timeout with no activity, it is idle.
    clock.advance(ctx.settings.idle_timeout + 1)
    cull_pass(ctx)
    assert load(ctx, launch_id).end_requested_at is not None


# -- several Hubs (issue 14): each Hub that answers keeps its own pool ----------------------


def test_each_hub_keeps_its_own_pool_and_a_hit_stays_on_its_hub(
    ctx: WorkerContext, broker: RecordingBroker, clock: Clock
) -> None:
    fleet = {name: FakeHub(name=name) for name in ("a", "b")}
    entries = [
        {"name": n, "api_url": f"http://{n}/hub/api", "api_token": "t", "public_url": f"http://{n}"}
        for n in fleet
    ]
    settings = ctx.settings.model_copy(update={"pool": "default=2", "hubs": json.dumps(entries)})
    ctx = dataclasses.replace(ctx, settings=settings, hub=fleet["a"], hubs=fleet)  # type: ignore[arg-type]
    waiting = fill(ctx, broker)
    assert sorted(str(load(ctx, i).hub) for i in waiting) == ["a", "a", "b", "b"]
    for launch_id in waiting:
        launch = load(ctx, launch_id)
        assert launch.hub_user in fleet[str(launch.hub)].users
    assert pool.maintain(ctx).started == {}  # each Hub's pool is full

    # A hit takes a server where it is: the visitor's launch runs on that server's Hub.
    launch_id = visitor(ctx)
    assert advance(ctx, launch_id) == DONE
    hit = load(ctx, launch_id)
    assert hit.status == Status.ready and hit.hub_user in fleet[str(hit.hub)].users
    # The refill goes to the Hub that gave one, and a Hub that is down gets none.
    with ctx.units.begin() as uow:
        hub_health.record(uow.db, "b", ok=False, error="refused", now=clock())
    started = pool.maintain(ctx).started
    assert started == ({DEFAULT: 1} if hit.hub == "a" else {})
