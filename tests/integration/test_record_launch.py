"""Records of research data repositories launched for real (issue 13): /build/zenodo/<DOI> and
the rest against local stand-ins of each provider's HTTP API, built in the sandbox by the venv
builder, started on the Hub; a record launched twice builds once; hostile records fail with
their reason and leave nothing behind."""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import func, select

from hublaunch.stack import Stack
from tests.integration.conftest import hub_user_names
from tests.standins.providers import (
    CkanDataset,
    DataverseDataset,
    Standin,
    StandinFile,
    bag_zip,
    make_zip,
)
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Build

# The PostgreSQL stack is the one pointed at the stand-ins (and allowed local addresses).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("stack", ["postgresql"], indirect=True),
    pytest.mark.usefixtures("cleanup_users"),
]

NOTEBOOK = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


def content(marker: str) -> dict[str, bytes]:
    return {"requirements.txt": b"# nothing to install\n", f"{marker}.ipynb": NOTEBOOK.encode()}


def files(marker: str) -> list[StandinFile]:
    return [StandinFile(name, data) for name, data in content(marker).items()]


def publish(records: Standin, provider: str, marker: str) -> str:
    """Put a record holding ``content(marker)`` in the stand-in; returns its /build spec."""
    number = secrets.randbelow(10**8) + 10**7
    if provider == "zenodo":
        records.zenodo[number] = files(marker)
        return f"zenodo/10.5281/zenodo.{number}"
    if provider == "figshare":  # one zip holding a folder: unpacked, the folder moved up
        bundle = make_zip({f"bundle/{k}": v for k, v in content(marker).items()})
        records.figshare[number] = {1: [StandinFile("bundle.zip", bundle)]}
        return f"figshare/10.6084/m9.figshare.{number}.v1"
    if provider == "dataverse":
        doi = f"10.7910/DVN/T{number}"
        records.dois[doi] = f"{records.url}/citation?persistentId=doi:{doi}"
        records.dataverse[doi] = DataverseDataset(files(marker))
        return f"dataverse/{doi}"
    if provider == "hydroshare":
        resource = secrets.token_hex(16)
        records.hydroshare[resource] = ("2026-11-30T10:00:00Z", bag_zip(resource, content(marker)))
        return f"hydroshare/{resource}"
    name = f"dataset-{number}"
    records.ckan[name] = CkanDataset(files(marker))
    return f"ckan/{quote(f'{records.url}/ckan/dataset/{name}', safe='')}"


def stream(stack: Stack, path: str) -> list[dict[str, Any]]:
    events = []
    with (
        httpx.Client(base_url=stack.public_url, timeout=120) as client,
        client.stream("GET", path) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


@pytest.mark.parametrize("provider", ["zenodo", "figshare", "dataverse", "hydroshare", "ckan"])
def test_a_record_of_each_provider_is_built_and_launched(
    stack: Stack, records: Standin, provider: str
) -> None:
    marker = f"from-{provider}"
    spec = publish(records, provider, marker)
    events = stream(stack, f"/build/{spec}")
    phases = [event["phase"] for event in events]
    assert phases[-1] == "ready", events[-3:]
    assert "built" in phases
    ready = events[-1]
    assert ready["binder_request"] == ready["binder_persistent_request"] == f"v2/{spec}"
    assert ready["repo_url"] and ready["binder_ref_url"]
    served = httpx.get(f"{ready['url']}?token={ready['token']}", timeout=10)
    assert served.status_code == 200
    # The record's files are the session's files (the environment's repository folder).
    found = list(stack.config.data_dir.rglob(f"{ready['image']}/repo/{marker}.ipynb"))
    assert len(found) == 1, ready["image"]


def test_a_record_launched_twice_is_built_once(stack: Stack, records: Standin) -> None:
    spec = publish(records, "zenodo", "twice")
    first = stream(stack, f"/build/{spec}")
    second = stream(stack, f"/build/{spec}")
    assert first[-1]["phase"] == second[-1]["phase"] == "ready"
    assert first[-1]["image"] == second[-1]["image"]
    assert "Found a built environment" in [event["message"] for event in second]
    with session_scope(stack.config.database_url) as db:
        builds = db.scalar(
            select(func.count()).select_from(Build).where(Build.name == first[-1]["image"])
        )
    assert builds == 1


def test_a_record_built_only_starts_no_server(
    stack: Stack, records: Standin, hub: HubClient
) -> None:
    before = hub_user_names(hub)
    spec = publish(records, "zenodo", "build-only")
    events = stream(stack, f"/build/{spec}?build_only=true")
    ready = events[-1]
    assert ready["phase"] == "ready" and ready["imageName"]
    assert "url" not in ready and "token" not in ready
    assert hub_user_names(hub) == before


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        # A zip whose entries climb out of the folder: refused before a byte is written.
        ([StandinFile("data.zip", make_zip({"../../escaped.txt": b"x"}))], "unpack"),
        # A zip holding a symbolic link to a file of the machine.
        ([StandinFile("data.zip", make_zip({}, links={"passwd": "/etc/passwd"}))], "unpack"),
        # Bytes that are not what the record's checksum says.
        ([StandinFile("requirements.txt", b"evil\n", md5="0" * 32)], "checksum"),
        # More bytes than the record declares.
        ([StandinFile("requirements.txt", b"x" * 4096, size=10)], "larger than"),
    ],
    ids=["zip-slip", "symlink", "checksum", "size"],
)
def test_a_hostile_record_fails_with_its_reason_and_leaves_nothing(
    stack: Stack, records: Standin, hub: HubClient, record: list[StandinFile], reason: str
) -> None:
    before = hub_user_names(hub)
    number = secrets.randbelow(10**8) + 10**7
    records.zenodo[number] = record
    events = stream(stack, f"/build/zenodo/10.5281/zenodo.{number}")
    assert events[-1]["phase"] == "failed", events[-3:]
    assert reason in events[-1]["message"].lower(), events[-1]["message"]
    assert hub_user_names(hub) == before
    assert not list(stack.config.data_dir.rglob("escaped.txt"))
