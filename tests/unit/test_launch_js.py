"""The launch page's script, run by Node.js: the URL it opens (with the token) stays inside the
session's own server, whatever path a link or the form gives it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "api" / "static" / "launch.js"
EVENT = {"url": "https://hub.example/user/hl-a/", "token": "0123456789abcdef0123456789abcdef"}
ROOT = f"{EVENT['url']}?token={EVENT['token']}"


def in_node(cases: list[tuple[str, str]], call: str) -> list[str]:
    """``call`` (JavaScript, of ``a`` and ``b``) for each case, run by Node.js on the page's
    script as a browser loads it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed (make install puts configurable-http-proxy there)")
    program = (
        f"globalThis.window = {{}}; require({json.dumps(str(SCRIPT))});"
        f"const cases = {json.dumps(cases)}, event = {json.dumps(EVENT)};"
        f"console.log(JSON.stringify(cases.map(([a, b]) => {call})));"
    )
    result = subprocess.run(
        [node, "-e", program], capture_output=True, text=True, timeout=30, check=True
    )
    found: list[str] = json.loads(result.stdout)
    return found


def server_urls(cases: list[tuple[str, str]]) -> list[str]:
    return in_node(cases, "window.HubLaunch.serverUrl(event, a, b)")


HOSTILE = [
    ("../hl-b/lab", ""),
    ("lab/../../hl-b/", ""),
    ("%2e%2e/hl-b/", ""),
    (".%2E/hl-b/", ""),
    ("lab%2f..%2f..%2fhl-b", ""),
    ("..\\hl-b\\", ""),
    ("/user/hl-b/", ""),
    ("//evil.example/collect", ""),
    ("http://evil.example/", ""),
    ("javascript:alert(1)", ""),
    (".\t./hl-b/", ""),
    ("", "../../hl-b/"),
    ("", "..%2f..%2fhl-b"),
]


def test_paths_that_would_leave_the_server_open_its_root() -> None:
    assert server_urls(HOSTILE) == [ROOT] * len(HOSTILE)


def test_paths_inside_the_server_are_kept_and_the_token_appended() -> None:
    base = EVENT["url"]
    token = f"token={EVENT['token']}"
    assert server_urls(
        [
            ("", ""),
            ("lab/tree/index.ipynb", ""),
            ("", "notebooks/my file.ipynb"),
            ("git-pull?repo=https%3A%2F%2Fgithub.com%2Fo%2Fr", ""),
            ("lab#section", ""),
        ]
    ) == [
        ROOT,
        f"{base}lab/tree/index.ipynb?{token}",
        f"{base}lab/tree/notebooks/my%20file.ipynb?{token}",
        f"{base}git-pull?repo=https%3A%2F%2Fgithub.com%2Fo%2Fr&{token}",
        f"{base}lab?{token}#section",  # before the fragment, so it is sent
    ]


def provider_specs(cases: list[tuple[str, str]]) -> list[str]:
    return in_node(cases, "window.HubLaunch.providerSpec('repo', a, b, '')")


def test_the_forms_links_are_the_ones_the_service_reads() -> None:
    """What the form's link says is what /build and /v2 read back (api/binder.py): the same
    spec, whatever kind of repository or record was typed."""
    from api.binder import from_raw_path
    from worker import sources
    from worker.settings import Settings

    settings = Settings(database_url="sqlite://")
    cases = [
        ("gh:org/repo", "main"),
        ("https://gitlab.com/group/sub/project", "v1"),
        ("gist:someone/0123abcd", ""),
        ("https://gist.github.com/someone/0123abcd.git", "main"),
        ("zenodo:10.5281/zenodo.3242074", ""),
        ("figshare:10.6084/m9.figshare.9782777.v1", ""),
        ("hydroshare:8f7c2f0341ef4180b0bd0b1d63bdd1a2", ""),
        ("ckan:https://demo.ckan.org/dataset/sample?activity_id=1", ""),
        ("https://example.org/a/b.git", "dev/x"),
    ]
    for (typed, ref), spec in zip(cases, provider_specs(cases), strict=True):
        request = from_raw_path(f"/build/{spec}".encode(), "/build/").request()
        read = sources.normalize(request.repo or "", request.ref, settings)
        assert read == sources.normalize(typed, ref or None, settings), (typed, spec)
