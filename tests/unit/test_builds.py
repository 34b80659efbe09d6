"""Build deduplication and repository launches, with an in-memory builder and Hub; and the venv
builder's refusal to build where no sandbox can be made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.fakes import FakeHub, RecordingBroker
from tests.unit.conftest import Clock
from worker import builds, starting, transitions
from worker.broker import BUILD_TASK, LAUNCH_TASK
from worker.builders import BuildFailed, Log
from worker.builders.venv import VenvBuilder
from worker.context import WorkerContext
from worker.db import session_scope
from worker.models import Build, LaunchEvent, Status
from worker.outcome import DONE, Outcome
from worker.queries import get_launch
from worker.repos import RepoSpec
from worker.settings import Settings

COMMIT = "c" * 40


class FakeBuilder:
    version = "fake-1"

    def __init__(self) -> None:
        self.built: dict[str, int] = {}
        self.calls: list[str] = []
        self.fail_with: str | None = None

    def exists(self, name: str) -> bool:
        return name in self.built

    def image(self, name: str) -> str:
        return "default"  # FakeHub knows only "default"

    def build(self, name: str, repo: str, commit: str, log: Log) -> int:
        self.calls.append(name)
        log("Collecting things")
        if self.fail_with:
            raise BuildFailed("pip install failed (exit 1)", self.fail_with)
        self.built[name] = 100
        return 100

    def remove(self, name: str) -> int:
        return self.built.pop(name, 0)

    def sizes(self) -> dict[str, int]:
        return dict(self.built)


@pytest.fixture
def builder(ctx: WorkerContext) -> FakeBuilder:
    fake = FakeBuilder()
    ctx.builder = fake
    ctx.resolve = lambda spec, settings: COMMIT
    return fake


def repo_launch(ctx: WorkerContext, repo: str = "https://example.org/a/b") -> str:
    with ctx.units.begin() as uow:
        spec = RepoSpec(repo, "main").as_dict()
        return transitions.create(uow, spec, lifetime=600, timeout=600, now=ctx.clock()).id


def phases(ctx: WorkerContext, launch_id: str) -> list[str]:
    with session_scope(ctx.settings.database_url) as db:
        query = select(LaunchEvent.phase).where(LaunchEvent.launch_id == launch_id)
        return list(db.scalars(query.order_by(LaunchEvent.id)))


def status(ctx: WorkerContext, launch_id: str) -> str:
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        return launch.status


def run_build(ctx: WorkerContext, builder: FakeBuilder, name: str) -> list[str]:
    broker = sent_to(ctx)
    before = len(broker.sent)
    waiting = builds.run_build(ctx.units, builder, name, clock=ctx.clock)
    # Every launch it returns was sent on, after the commit.
    assert [m.argument for m in broker.sent[before:] if m.task == LAUNCH_TASK] == waiting
    return waiting


def sent_to(ctx: WorkerContext) -> RecordingBroker:
    broker = ctx.units.broker
    if not isinstance(broker, RecordingBroker):
        raise TypeError(type(broker))
    return broker


@dataclass(frozen=True)
class Step:
    """One run of the launch steps, and the build task it sent (after its commit), if any."""

    outcome: Outcome
    send_build: str | None

    @property
    def retry_in(self) -> float | None:
        return self.outcome.retry_in


def advance(ctx: WorkerContext, launch_id: str) -> Step:
    broker = sent_to(ctx)
    before = len(broker.sent)
    outcome = starting.advance(ctx, launch_id)
    [*sent] = [m.argument for m in broker.sent[before:] if m.task == BUILD_TASK]
    assert len(sent) <= 1
    return Step(outcome, sent[0] if sent else None)


def test_first_launch_builds_then_launches(
    ctx: WorkerContext, builder: FakeBuilder, hub: FakeHub
) -> None:
    launch_id = repo_launch(ctx)
    outcome = advance(ctx, launch_id)
    assert outcome.send_build is not None and outcome.retry_in == builds.POLL_SECONDS
    assert status(ctx, launch_id) == Status.building
    assert hub.calls == []  # no Hub user before the environment exists

    assert run_build(ctx, builder, outcome.send_build) == [launch_id]
    assert advance(ctx, launch_id).outcome == DONE
    assert status(ctx, launch_id) == Status.ready
    assert phases(ctx, launch_id) == [
        "waiting",
        "fetching",
        "building",
        "building",
        "built",
        "launching",
        "ready",
    ]


def test_concurrent_launches_share_one_build(ctx: WorkerContext, builder: FakeBuilder) -> None:
    ids = [repo_launch(ctx) for _ in range(5)]
    outcomes = [advance(ctx, i) for i in ids]
    claimed = [o.send_build for o in outcomes if o.send_build]
    assert len(claimed) == 1  # one claimer, four waiters

    assert sorted(run_build(ctx, builder, claimed[0])) == sorted(ids)
    assert builder.calls == claimed
    for launch_id in ids:
        advance(ctx, launch_id)
        assert status(ctx, launch_id) == Status.ready


def test_a_built_environment_is_not_built_again(ctx: WorkerContext, builder: FakeBuilder) -> None:
    first = repo_launch(ctx)
    name = advance(ctx, first).send_build
    assert name is not None
    run_build(ctx, builder, name)
    second = repo_launch(ctx)

    assert advance(ctx, second).outcome == DONE
    assert status(ctx, second) == Status.ready
    assert "building" not in phases(ctx, second)
    assert builder.calls == [name]


def test_a_failed_build_fails_every_waiting_launch_with_its_tail(
    ctx: WorkerContext, builder: FakeBuilder, hub: FakeHub
) -> None:
    builder.fail_with = "ERROR: No matching distribution found for nope==9"
    ids = [repo_launch(ctx) for _ in range(3)]
    [name] = [o.send_build for o in [advance(ctx, i) for i in ids] if o.send_build]

    assert run_build(ctx, builder, name) == []

    for launch_id in ids:
        with session_scope(ctx.settings.database_url) as db:
            launch = get_launch(db, launch_id)
            assert launch is not None
            assert launch.status == Status.failed
            assert launch.error is not None
            assert "No matching distribution found for nope==9" in launch.error
            assert launch.user_removed_at is not None
        assert phases(ctx, launch_id)[-1] == "failed"
    assert hub.calls == []


def test_a_build_whose_worker_died_is_claimed_again(
    ctx: WorkerContext, builder: FakeBuilder, clock: Clock
) -> None:
    first = repo_launch(ctx)
    name = advance(ctx, first).send_build  # claimed, but its worker dies: no heartbeat
    second = repo_launch(ctx)
    assert advance(ctx, second).send_build is None  # fresh heartbeat: wait

    clock.advance(builds.STALE_AFTER.total_seconds() + 1)
    again = advance(ctx, second)

    assert again.send_build == name
    with session_scope(ctx.settings.database_url) as db:
        build = db.get(Build, name)
        assert build is not None and build.attempts == 2


def test_unresolvable_refs_fail_clearly(ctx: WorkerContext, builder: FakeBuilder) -> None:
    from worker.repos import ResolveError

    def refuse(spec: RepoSpec, settings: object) -> str:
        raise ResolveError("https://example.org/a/b has no branch or tag named 'main'")

    ctx.resolve = refuse
    launch_id = repo_launch(ctx)
    assert advance(ctx, launch_id).outcome == DONE
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None and launch.status == Status.failed
        assert launch.error == (
            "The repository could not be resolved: "
            "https://example.org/a/b has no branch or tag named 'main'"
        )


def test_eviction_keeps_environments_in_use(
    ctx: WorkerContext, builder: FakeBuilder, clock: Clock
) -> None:
    names = []
    for i in range(3):
        launch_id = repo_launch(ctx, f"https://example.org/a/repo{i}")
        name = advance(ctx, launch_id).send_build
        assert name is not None
        run_build(ctx, builder, name)
        names.append(name)
        clock.advance(10)
        advance(ctx, launch_id)
        if i > 0:  # sessions 1 and 2 are over; session 0 (the oldest build) is still running
            with session_scope(ctx.settings.database_url) as db:
                launch = get_launch(db, launch_id)
                assert launch is not None
                launch.status, launch.user_removed_at = Status.ended, ctx.clock()
    evicted = builds.evict(ctx.units, builder, budget=150, clock=ctx.clock)
    assert evicted == [names[1], names[2]]  # least recently used first; names[0] is in use
    assert list(builder.built) == [names[0]]


def test_build_timeout_extends_the_launch_deadline(
    ctx: WorkerContext, builder: FakeBuilder, clock: Clock
) -> None:
    launch_id = repo_launch(ctx)
    advance(ctx, launch_id)
    clock.advance(ctx.settings.launch_timeout + 5)  # past the launch timeout, within the build's
    outcome = advance(ctx, launch_id)
    assert outcome.retry_in is not None and status(ctx, launch_id) == Status.building


def test_the_venv_builder_refuses_to_build_where_no_sandbox_can_be_made(
    settings: Settings, tmp_path: Path
) -> None:
    builder = VenvBuilder(
        settings.model_copy(update={"envs_dir": tmp_path / "envs"}),
        sandbox_missing=lambda: "'bwrap' is not installed",
    )
    with pytest.raises(BuildFailed) as refused:
        builder.build("x", "https://example.org/a/b", COMMIT, lambda _line: None)
    assert refused.value.message == (
        "Builds run in a sandbox, which this server cannot make: 'bwrap' is not installed"
    )
    assert not (tmp_path / "envs").exists()  # nothing fetched, nothing made


def test_build_output_with_nul_bytes_is_stored_as_printable_text() -> None:
    # PostgreSQL refuses NUL in text columns; a repository decides what its build prints.
    from worker.transitions import printable

    assert printable("a\x00b") == "a\ufffdb"


def test_a_build_whose_heartbeat_was_refreshed_meanwhile_is_not_claimed(
    ctx: WorkerContext, builder: FakeBuilder, clock: Clock
) -> None:
    """A launch read a stale heartbeat, then the build's worker beat before the claim: the
    claim's UPDATE re-checks the heartbeat in SQL, so the running build is not started twice."""
    first = repo_launch(ctx)
    name = advance(ctx, first).send_build
    assert name is not None
    clock.advance(builds.STALE_AFTER.total_seconds() + 1)
    with ctx.units.begin() as looker:
        build = looker.db.get(Build, name)
        assert build is not None and build.status == "building"  # stale, as read here
        with ctx.units.begin() as beat:  # the build's worker is alive after all
            beat.db.execute(update(Build).where(Build.name == name).values(heartbeat_at=clock()))
        assert not builds._claim(looker.db, build, clock())
    with session_scope(ctx.settings.database_url) as db:
        stored = db.get(Build, name)
        assert stored is not None and stored.attempts == 1


def test_a_stale_build_is_claimed_by_one_look_only(
    ctx: WorkerContext, builder: FakeBuilder, clock: Clock
) -> None:
    name = advance(ctx, repo_launch(ctx)).send_build
    assert name is not None
    clock.advance(builds.STALE_AFTER.total_seconds() + 1)
    with ctx.units.begin() as one, ctx.units.begin() as two:
        mine, theirs = one.db.get(Build, name), two.db.get(Build, name)
        assert mine is not None and theirs is not None
        assert builds._claim(one.db, mine, clock())
        one.db.commit()
        assert not builds._claim(two.db, theirs, clock())
    with session_scope(ctx.settings.database_url) as db:
        stored = db.get(Build, name)
        assert stored is not None and stored.attempts == 2


def test_a_build_only_launch_builds_and_starts_nothing(
    ctx: WorkerContext, builder: FakeBuilder, hub: FakeHub
) -> None:
    """BinderHub's ?build_only=true: the environment is built, the launch ends with a ready
    event naming it, and the Hub never hears of it (no user, no server, no token)."""
    with ctx.units.begin() as uow:
        spec = {**RepoSpec("https://example.org/a/b", "main").as_dict(), "build_only": True}
        launch_id = transitions.create(uow, spec, lifetime=600, timeout=600, now=ctx.clock()).id
    outcome = advance(ctx, launch_id)
    assert outcome.send_build is not None
    run_build(ctx, builder, outcome.send_build)
    assert advance(ctx, launch_id).outcome == DONE

    assert hub.calls == []
    with session_scope(ctx.settings.database_url) as db:
        launch = get_launch(db, launch_id)
        assert launch is not None
        assert (launch.status, launch.end_reason) == (Status.ended, "built")
        assert launch.hub_user is None and launch.user_removed_at is not None
        [ready] = db.scalars(
            select(LaunchEvent).where(
                LaunchEvent.launch_id == launch_id, LaunchEvent.phase == "ready"
            )
        )
        assert ready.data == {"imageName": builder.image(launch.env_name or "")}
    assert phases(ctx, launch_id)[-2:] == ["built", "ready"]
    # Run again (a redelivered message): nothing more happens.
    assert advance(ctx, launch_id).outcome == DONE
    assert hub.calls == []
