"""The /build stream's ``ready`` event against BinderHub's own, captured in its JavaScript
client's package (``@jupyterhub/binderhub-client``, installed by ``make install`` from the npm
registry): the same fields, with the same meaning, field by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.binder import ready_fields

FIXTURE = (
    Path(__file__).resolve().parents[2]
    / "node_modules/@jupyterhub/binderhub-client/tests/fixtures/fullbuild.eventsource"
)
COMMIT = "1479e0252b2e648bb755ee913292b79495931717"


def binderhub_events() -> list[dict[str, Any]]:
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing: run `make install` (npm install)", pytrace=False)
    return [
        json.loads(line[5:])
        for line in FIXTURE.read_text().splitlines()
        if line.startswith("data:")
    ]


def binderhub_ready() -> dict[str, Any]:
    [ready] = [e for e in binderhub_events() if e.get("phase") == "ready"]
    return ready


def binderhub_fields() -> dict[str, set[str]]:
    """The fields BinderHub's events carry, by phase (the ready event's: binderhub_ready)."""
    fields: dict[str, set[str]] = {}
    for event in binderhub_events():
        if "phase" in event:
            fields.setdefault(event["phase"], set()).update(event)
    return fields


def test_a_repository_launch_says_what_binderhub_says() -> None:
    theirs = binderhub_ready()
    spec = {"repo": "https://github.com/binder-examples/octave", "ref": "HEAD"}
    ours = ready_fields(spec, COMMIT, theirs["binder_launch_host"])
    # Every field BinderHub's ready event carries is ours too (url, token, image and message
    # come from the launch itself: tests/integration/test_binder.py).
    assert set(theirs) - {"phase", "message", "url", "token", "image"} == set(ours)
    for field in ours:
        assert ours[field] == theirs[field], field


def test_other_hosts_and_images() -> None:
    gitlab = ready_fields(
        {"repo": "https://gitlab.com/group/sub/project", "ref": "main"}, "a" * 40, "H/"
    )
    assert gitlab["binder_ref_url"] == f"https://gitlab.com/group/sub/project/-/tree/{'a' * 40}"
    assert gitlab["binder_request"] == "v2/gl/group%2Fsub%2Fproject/main"
    assert gitlab["binder_persistent_request"] == f"v2/gl/group%2Fsub%2Fproject/{'a' * 40}"
    other = ready_fields({"repo": "https://example.org/x.git", "ref": "v1"}, "b" * 40, "H/")
    assert other["binder_ref_url"] == "https://example.org/x.git"
    assert other["binder_persistent_request"] == (
        f"v2/git/https%3A%2F%2Fexample.org%2Fx.git/{'b' * 40}"
    )
    image = ready_fields({"image": "default"}, None, "H/")
    assert image == {
        "binder_launch_host": "H/",
        "binder_request": "v2/image/default",
        "binder_persistent_request": "v2/image/default",
    }
