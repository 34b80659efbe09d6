"""BinderHub's own JavaScript client (``@jupyterhub/binderhub-client``, unmodified) drives real
launches through ``/build``, as a Binder web page would: binder_client.mjs runs it under Node and
prints the events it yields (test_binder.py reads the same stream with httpx)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import select

from hublaunch.stack import Stack
from tests.integration.conftest import hub_user_names
from tests.integration.gitserver import GitServer
from tests.unit.test_binder_compat import binderhub_ready
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Launch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("binder_client.mjs")
# Repository launches run on the one shared stack that may fetch repositories served on
# 127.0.0.1 (conftest.LOCAL_REPOS); `api`, `hub` and `cleanup_users` then follow it there.
local_repos = pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
# BinderHub launches repositories only: an image launch has no repository to name.
REPOSITORY_FIELDS = {"repo_url", "binder_ref_url"}
COMMIT = re.compile(r"[0-9a-f]{40}")


def run_client(stack: Stack, provider_spec: str, *flags: str) -> list[dict[str, Any]]:
    """The events BinderHub's client yields for one /build request, up to ready or failed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: these tests run BinderHub's JavaScript client (Node 20)")
    result = subprocess.run(
        [node, str(CLIENT), f"{stack.public_url}/build", provider_spec, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(
            f"binder_client.mjs {provider_spec} {' '.join(flags)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return [json.loads(line) for line in result.stdout.splitlines()]


def missing_binderhub_fields(ready: dict[str, Any], *, repository: bool) -> set[str]:
    """Fields of BinderHub's own ready event (its client's test fixture) this one lacks."""
    theirs = set(binderhub_ready())
    return (theirs if repository else theirs - REPOSITORY_FIELDS) - set(ready)


def served(ready: dict[str, Any]) -> int:
    return httpx.get(f"{ready['url']}?token={ready['token']}", timeout=10).status_code


def test_the_binderhub_client_launches_an_image(stack: Stack) -> None:
    events = run_client(stack, "image/default")

    assert [e["phase"] for e in events][-1] == "ready", events
    ready = events[-1]
    for field in (
        "url",
        "token",
        "image",
        "binder_launch_host",
        "binder_request",
        "binder_persistent_request",
    ):
        assert ready.get(field), (field, ready)
    assert missing_binderhub_fields(ready, repository=False) == set()
    assert served(ready) == 200


@local_repos
def test_the_binderhub_client_launches_a_repository_at_its_commit(
    stack: Stack, git_server: GitServer
) -> None:
    commit = git_server.commit("js-client", {"requirements.txt": "# nothing\n"})
    url = git_server.url("js-client")
    escaped = quote(url, safe="")

    events = run_client(stack, f"git/{escaped}/main")

    ready = events[-1]
    assert ready["phase"] == "ready", events
    assert ready["repo_url"] == url and ready["binder_ref_url"] == url
    pinned = ready["binder_persistent_request"]
    assert pinned == f"v2/git/{escaped}/{commit}" and COMMIT.fullmatch(pinned.rsplit("/", 1)[1])
    assert missing_binderhub_fields(ready, repository=True) == set()
    assert served(ready) == 200


def test_the_binderhub_client_reports_an_unknown_image_as_failed(stack: Stack) -> None:
    events = run_client(stack, "image/no-such-image")  # exits 0: failed is an answer

    failed = events[-1]
    assert failed["phase"] == "failed" and "ready" not in [e["phase"] for e in events], events
    assert failed["message"].strip()
    # Said by the server, not made up by the client after a broken stream.
    assert not failed["message"].startswith(("Event stream", "Failed to connect", "Error in")), (
        failed
    )


@local_repos
def test_build_only_builds_and_launches_nothing(
    stack: Stack, hub: HubClient, git_server: GitServer
) -> None:
    """BinderHub's build-only contract (binderhub PR #1647): the image is built, no server is
    started; the stream ends with ``ready`` naming the image and carrying no URL or token."""
    git_server.commit("js-client-build-only", {"requirements.txt": "# nothing\n"})
    url = git_server.url("js-client-build-only")
    users_before = hub_user_names(hub)
    started = datetime.now(UTC)

    events = run_client(stack, f"git/{quote(url, safe='')}/main", "--build-only")

    phases = [e["phase"] for e in events]
    ready = events[-1]
    assert ready["phase"] == "ready", events
    assert ready.get("imageName") and ready.get("message"), ready
    assert "url" not in ready and "token" not in ready, ready
    assert "built" in phases[:-1], phases
    assert hub_user_names(hub) - users_before == set()
    with session_scope(stack.config.database_url) as db:
        since = db.scalars(select(Launch.hub_user).where(Launch.created_at >= started)).all()
    assert all(user is None for user in since), since
