"""The warm pool on a real stack (JupyterHub + proxy + app + worker, Redis, PostgreSQL), with the
fake spawner taking START_DELAY s a server, so a launch that took a pooled server is told apart
from one that started its own by its time alone."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from hublaunch.stack import Stack
from tests.integration.conftest import LOCAL_REPOS, run_cull, start_stack, wait_for
from tests.integration.gitserver import GitServer
from worker import pool
from worker.context import WorkerContext, build_context
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import EndReason, Launch, LaunchEvent, Status
from worker.transitions import POOL_HIT

SIZE = 5
DEFAULT = "image:default"
REPO = "pooled-repo"
START_DELAY = 3.0
FROM_POOL = POOL_HIT


@pytest.fixture(scope="module")
def repo(git_server: GitServer) -> str:
    """A repository with a pool of its own (one server), at its first commit."""
    git_server.commit(REPO, {"requirements.txt": "# nothing to install\n"})
    return git_server.url(REPO)


@pytest.fixture(scope="module")
def pool_setting(repo: str) -> str:
    return f"default={SIZE},{repo}@main=1"


@pytest.fixture(scope="module")
def pool_stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
    pool_setting: str,
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory,
        "pool",
        make_database("pool"),
        redis_url,
        spawner="fake",
        # Enough worker threads to start every launch of a burst at once.
        worker_concurrency=64,
        env={
            **LOCAL_REPOS,
            "HUBLAUNCH_POOL": pool_setting,
            "HUBLAUNCH_FAKE_START_DELAY": str(START_DELAY),
        },
    )
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def ctx(pool_stack: Stack, pool_setting: str) -> WorkerContext:
    """The worker's context, in this process: the tests run the pool's passes themselves."""
    settings = pool_stack.settings(pool=pool_setting, max_active=1000, allow_local_repos=True)
    return build_context(settings)


def pooled(stack: Stack, key: str = DEFAULT) -> list[Launch]:
    with session_scope(stack.config.database_url) as db:
        return list(
            db.scalars(
                select(Launch)
                .where(Launch.status == Status.pooled, Launch.pool_key == key)
                .order_by(Launch.ready_at)
            )
        )


def full(stack: Stack, ctx: WorkerContext) -> list[Launch]:
    pool.maintain(ctx)
    return wait_for(lambda: len(pooled(stack)) == SIZE and pooled(stack), 30, "a full pool")


def post(api: httpx.Client) -> str:
    response = api.post("/api/launches", json={"image": "default"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def launch_and_wait(api: httpx.Client) -> tuple[dict[str, object], float]:
    started = time.monotonic()
    return wait_ready(api, post(api)), time.monotonic() - started


def wait_ready(api: httpx.Client, launch_id: str) -> dict[str, object]:
    def ready() -> dict[str, object] | None:
        status = api.get(f"/api/launches/{launch_id}").json()
        assert status["status"] not in ("failed", "ended"), status
        return status if status["status"] == "ready" else None

    status: dict[str, object] = wait_for(ready, 60, "a ready launch")
    return status


def took_from_pool(stack: Stack, launch_id: str) -> bool:
    with session_scope(stack.config.database_url) as db:
        return bool(
            db.scalar(
                select(func.count()).where(
                    LaunchEvent.launch_id == launch_id, LaunchEvent.message == FROM_POOL
                )
            )
        )


@pytest.fixture
def api(pool_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pool_stack.public_url, timeout=30) as client:
        yield client


def test_the_pool_fills_to_its_size_and_survives_a_restart(
    pool_stack: Stack, ctx: WorkerContext
) -> None:
    servers = {launch.hub_user for launch in full(pool_stack, ctx)}
    assert pool.maintain(ctx).started == {}
    pool_stack.stop("worker")
    pool_stack.start_child("worker")
    # The database is the truth: the same servers, and nothing to start.
    assert {launch.hub_user for launch in pooled(pool_stack)} == servers
    assert pool.maintain(ctx).started == {}


def test_a_hit_is_ready_at_once_and_its_link_opens_the_server(
    pool_stack: Stack, ctx: WorkerContext, api: httpx.Client
) -> None:
    oldest = full(pool_stack, ctx)[0]
    status, seconds = launch_and_wait(api)
    assert status["user"] == oldest.hub_user
    assert seconds < START_DELAY  # no server was started for it
    served = httpx.get(str(status["url"]), timeout=10)
    assert served.status_code == 200 and served.json() == {"fake": True, "user": oldest.hub_user}
    assert took_from_pool(pool_stack, str(status["id"]))
    with session_scope(pool_stack.config.database_url) as db:
        given = db.get(Launch, oldest.id)
        assert given is not None and given.end_reason == EndReason.handed_over
    # The claim asked for a refill at once: the pool is full again without a pass of ours.
    wait_for(lambda: len(pooled(pool_stack)) == SIZE, 30, "the refill")


def test_fifty_launches_against_a_pool_of_five_take_each_server_once(
    pool_stack: Stack, ctx: WorkerContext, api: httpx.Client
) -> None:
    servers = {launch.hub_user for launch in full(pool_stack, ctx)}
    # All 50 at once: every claim is made before a refilled server can be ready (START_DELAY).
    with ThreadPoolExecutor(50) as threads:
        ids = list(threads.map(lambda _: post(api), range(50)))
    results = [wait_ready(api, launch_id) for launch_id in ids]
    users = [str(status["user"]) for status in results]
    assert len(set(users)) == 50  # no server (or user) went to two launches
    hits = [status for status in results if took_from_pool(pool_stack, str(status["id"]))]
    assert len(hits) == SIZE and {str(s["user"]) for s in hits} == servers


def test_a_pooled_server_killed_behind_the_pools_back_is_not_handed_out(
    pool_stack: Stack, ctx: WorkerContext, api: httpx.Client
) -> None:
    oldest, following = full(pool_stack, ctx)[:2]
    assert oldest.hub_user is not None
    hub = HubClient(pool_stack.hub_api_url, pool_stack.hub_token)
    try:
        hub.stop_server(oldest.hub_user)
        wait_for(lambda: not pool.alive(ctx, str(oldest.hub_user)), 10, "the server to stop")
        status, seconds = launch_and_wait(api)
        # The next pooled server, at once; the dead one's (never used) user is removed.
        assert status["user"] == following.hub_user and seconds < START_DELAY
        assert hub.get_user(oldest.hub_user) is None
    finally:
        hub.close()
    served = httpx.get(str(status["url"]), timeout=10)
    assert served.status_code == 200


def test_shrinking_drains_the_surplus_and_cleanup_leaves_the_rest(
    pool_stack: Stack, ctx: WorkerContext
) -> None:
    servers = full(pool_stack, ctx)
    smaller = dataclasses.replace(
        ctx, settings=ctx.settings.model_copy(update={"pool": "default=2," + repo_entry(ctx)})
    )
    report = pool.maintain(smaller)
    assert report.drained == {DEFAULT: SIZE - 2}
    wait_for(lambda: len(pooled(pool_stack)) == 2, 30, "the drained servers to end")
    hub = HubClient(pool_stack.hub_api_url, pool_stack.hub_token)
    try:
        drained = {s.hub_user for s in servers} - {s.hub_user for s in pooled(pool_stack)}
        assert len(drained) == SIZE - 2
        wait_for(lambda: not drained & {user.name for user in hub.iter_users()}, 30, "the removals")
        kept = {launch.hub_user for launch in pooled(pool_stack)}
        run_cull(pool_stack)  # a pooled server is no orphan, and never idle
        assert {launch.hub_user for launch in pooled(pool_stack)} == kept
        assert kept <= {user.name for user in hub.iter_users()}
    finally:
        hub.close()


def repo_entry(ctx: WorkerContext) -> str:
    return next(e for e in ctx.settings.pool.split(",") if not e.startswith("default="))


def test_a_new_commit_drains_a_repository_pool(
    pool_stack: Stack, ctx: WorkerContext, git_server: GitServer, repo: str
) -> None:
    key = f"repo:{repo}@main"
    pool.maintain(ctx)
    [first] = wait_for(lambda: pooled(pool_stack, key), 90, "the repository's pooled server")
    assert first.commit is not None and first.env_name is not None
    newer = git_server.commit(REPO, {"requirements.txt": "# still nothing\n"})
    report = pool.maintain(ctx)
    assert report.drained == {key: 1} and report.started.get(key) == 1
    [second] = wait_for(
        lambda: [p for p in pooled(pool_stack, key) if p.commit == newer],
        90,
        "a pooled server of the new commit",
    )
    assert second.hub_user != first.hub_user
    hub = HubClient(pool_stack.hub_api_url, pool_stack.hub_token)
    try:
        wait_for(lambda: hub.get_user(str(first.hub_user)) is None, 30, "the old one removed")
    finally:
        hub.close()
    with session_scope(pool_stack.config.database_url) as db:
        old = db.get(Launch, first.id)
        assert old is not None and old.end_reason == EndReason.drained


def test_a_pool_sized_by_demand_starts_empty_and_fills_when_launches_come(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> None:
    """Beat's own passes (every second) on a pool of 0..4: nothing is kept while nobody comes;
    the first launch (a miss, started cold) is demand, and a server is kept for the next."""
    stack = start_stack(
        tmp_path_factory,
        "pool-demand",
        make_database("pool_demand"),
        redis_url,
        spawner="fake",
        beat=True,
        env={
            "HUBLAUNCH_POOL": "default=0..4",
            "HUBLAUNCH_POOL_INTERVAL": "1",
            "HUBLAUNCH_FAKE_START_DELAY": str(START_DELAY),
        },
    )
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as api:
            time.sleep(3)  # three passes
            assert pooled(stack) == []
            first, cold = launch_and_wait(api)
            assert cold >= START_DELAY and not took_from_pool(stack, str(first["id"]))
            # One launch in the window: λT + 2√λT < 1, so one server is kept.
            wait_for(lambda: len(pooled(stack)) == 1, 30, "a server kept for the demand")
            time.sleep(3)
            assert len(pooled(stack)) == 1  # and no more
            second, warm = launch_and_wait(api)
            assert took_from_pool(stack, str(second["id"])) and warm < START_DELAY
            admin = {"Authorization": f"Bearer {stack.config.env['HUBLAUNCH_ADMIN_TOKEN']}"}
            (page,) = api.get("/api/admin/pool", headers=admin).json()
            assert page["minimum"] == 0 and page["maximum"] == 4
            assert page["size"] == 1 and page["launches_in_window"] == 2
            assert page["start_seconds"] >= START_DELAY
    finally:
        stack.stop()
