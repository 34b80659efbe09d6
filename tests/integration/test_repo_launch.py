"""Launching git repositories: resolve, build only when needed, once, and really use it."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from hublaunch.stack import Stack
from tests.integration.conftest import hub_user_names, read_events
from tests.integration.gitserver import GitServer
from tests.integration.kernel import run_code
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Build

pytestmark = pytest.mark.integration


def launch(api: httpx.Client, repo: str, ref: str = "main") -> tuple[str, list[dict[str, Any]]]:
    response = api.post("/api/launches", json={"repo": repo, "ref": ref})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    return launch_id, read_events(api, launch_id)


def builds_of(stack: Stack) -> dict[str, Build]:
    with session_scope(stack.config.database_url) as db:
        return {b.name: b for b in db.scalars(select(Build))}


def test_a_repository_builds_and_its_server_uses_the_environment(
    real_stack: Stack, git_server: GitServer
) -> None:
    commit = git_server.commit("cowsay-repo", {"requirements.txt": "cowsay==6.1\n"})
    with httpx.Client(base_url=real_stack.public_url, timeout=60) as api:
        launch_id, events = launch(api, git_server.url("cowsay-repo"))
        phases = [e["phase"] for e in events]
        assert phases[:3] == ["waiting", "fetching", "building"]
        assert phases[-3:] == ["built", "launching", "ready"] or phases[-1] == "ready"
        assert "built" in phases
        log = "\n".join(e["message"] for e in events if e["phase"] == "building")
        assert "cowsay" in log  # pip's output reached the stream
        status = api.get(f"/api/launches/{launch_id}").json()
        assert status["spec"] == {"repo": git_server.url("cowsay-repo"), "ref": "main"}

        ready = events[-1]
        output = run_code(
            ready["url"],
            ready["token"],
            "import cowsay, sys; print(cowsay.__file__); print(sys.prefix)",
        )
        module_path, prefix = output.strip().splitlines()
        envs = str(real_stack.config.data_dir / "envs")
        assert prefix.startswith(envs) and commit in prefix  # the kernel runs in the built env
        assert module_path.startswith(prefix)

        # The same commit again: no build at all.
        again_id, again = launch(api, git_server.url("cowsay-repo"))
        assert "building" not in [e["phase"] for e in again]
        assert [e["phase"] for e in again][-1] == "ready"
        for launch_ids in (launch_id, again_id):
            api.delete(f"/api/launches/{launch_ids}")
    [build] = [b for b in builds_of(real_stack).values() if b.commit == commit]
    assert build.attempts == 1 and build.status == "built"


@pytest.fixture
def pg_stack(fake_stacks: dict[str, Stack]) -> Stack:
    return fake_stacks["postgresql"]


@pytest.fixture
def pg_api(pg_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pg_stack.public_url, timeout=60) as client:
        yield client


def test_same_commit_builds_once_for_simultaneous_launches_and_a_new_commit_builds_again(
    pg_stack: Stack, pg_api: httpx.Client, git_server: GitServer
) -> None:
    stack, api = pg_stack, pg_api
    repo = git_server.url("five")
    first = git_server.commit("five", {"requirements.txt": ""})
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: launch(api, repo), range(5)))
    assert [events[-1]["phase"] for _, events in results] == ["ready"] * 5
    same = [b for b in builds_of(stack).values() if b.commit == first]
    assert len(same) == 1 and same[0].attempts == 1  # five launches, one build

    second = git_server.commit("five", {"README.md": "new"})
    _, events = launch(api, repo)
    assert "building" in [e["phase"] for e in events] and events[-1]["phase"] == "ready"
    assert {b.commit for b in builds_of(stack).values()} >= {first, second}
    for launch_id, _ in results:
        api.delete(f"/api/launches/{launch_id}")


def test_a_broken_requirements_file_fails_with_pips_words_and_no_hub_user(
    pg_stack: Stack, pg_api: httpx.Client, git_server: GitServer
) -> None:
    hub = HubClient(pg_stack.hub_api_url, pg_stack.hub_token)
    users = hub_user_names(hub)
    git_server.commit(
        "broken",
        {
            "binder/requirements.txt": "hublaunch-no-such-package==0.0.1\n",
            "requirements.txt": "cowsay\n",
        },
    )
    launch_id, events = launch(pg_api, git_server.url("broken"))

    assert events[-1]["phase"] == "failed"
    status = pg_api.get(f"/api/launches/{launch_id}").json()
    assert status["status"] == "failed"
    assert status["error"].startswith("The environment could not be built.")
    # binder/ is looked in first, as repo2docker does; pip's own complaint is in the message.
    assert "hublaunch-no-such-package" in status["error"]
    assert "No matching distribution" in status["error"] or "ERROR" in status["error"]
    assert status["user"] is None and hub_user_names(hub) <= users  # none was created
    hub.close()


def test_unknown_refs_and_unreachable_repositories_fail_clearly(
    pg_api: httpx.Client, git_server: GitServer
) -> None:
    git_server.commit("refs", {"a": "1"})
    launch_id, events = launch(pg_api, git_server.url("refs"), ref="no-such-branch")
    assert events[-1]["phase"] == "failed"
    assert pg_api.get(f"/api/launches/{launch_id}").json()["error"] == (
        f"The repository could not be resolved: {git_server.url('refs')} "
        "has no branch or tag named 'no-such-branch'"
    )


@pytest.mark.parametrize(
    ("body", "expected", "message"),
    [
        ({"repo": "http://127.0.0.1:1/x.git"}, 422, "scheme must be one of: https"),
        ({"repo": "https://127.0.0.1:1/x.git"}, 422, "not a public address"),
        ({"repo": "https://192.168.1.1/x.git"}, 422, "not a public address"),
        ({"repo": "https://127.0.0.1/x.git", "ref": "-c core.sshCommand=id"}, 422, "ref must"),
        ({"repo": "--upload-pack=id"}, 422, "must be a URL"),
    ],
)
def test_production_defaults_refuse_unsafe_repositories(
    fake_stacks: dict[str, Stack], body: dict[str, str], expected: int, message: str
) -> None:
    strict = fake_stacks["sqlite"]  # this stack keeps HUBLAUNCH_ALLOW_LOCAL_REPOS unset
    response = httpx.post(f"{strict.public_url}/api/launches", json=body, timeout=30)
    assert response.status_code == expected
    assert message in response.json()["detail"]
