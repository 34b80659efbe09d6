"""BinderHub's API beyond the event stream: build tokens, build-only runs, /_config, and the
links of every provider (gist and the data records) — over the app, with no Hub here."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jwt
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select

from api import build_tokens
from api.binder import PROVIDERS, from_raw_path, link_for, ready_fields
from api.main import create_app
from tests.fakes import RecordingBroker
from worker import sources
from worker.db import session_scope
from worker.models import Launch
from worker.repos import SpecBanned, SpecError
from worker.settings import Settings

SECRET = "a-build-token-secret-for-tests-0123456789"


def launches(settings: Settings) -> int:
    with session_scope(settings.database_url) as db:
        return db.scalar(select(func.count()).select_from(Launch)) or 0


@pytest.fixture
def signing(settings: Settings) -> Settings:
    return settings.model_copy(update={"build_token_secret": SecretStr(SECRET)})


def client_for(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, broker=RecordingBroker(settings.database_url))) as c:
        yield c


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    yield from client_for(settings)


def failure(response: object) -> dict[str, object]:
    text = getattr(response, "text", "")
    [line] = [line for line in text.splitlines() if line.startswith("data:")]
    event: dict[str, object] = json.loads(line[5:])
    return event


# -- build tokens -------------------------------------------------------------------------


def test_a_build_token_starts_its_own_spec_only_and_expires(signing: Settings) -> None:
    token = build_tokens.issue(signing, "gh/org/repo/main")
    assert token is not None
    assert build_tokens.check(signing, token, "gh/org/repo/main") is True
    with pytest.raises(build_tokens.BadBuildToken, match="another launch"):
        build_tokens.check(signing, token, "gh/org/other/main")
    old = build_tokens.issue(signing, "gh/org/repo/main", now=1_000_000)
    with pytest.raises(build_tokens.BadBuildToken, match="expired"):
        build_tokens.check(signing, old, "gh/org/repo/main")


@pytest.mark.parametrize(
    "forged",
    [
        jwt.encode(
            {"aud": "image/default", "exp": 4_000_000_000}, "another-secret-000000000000000000"
        ),
        jwt.encode({"aud": "image/default", "exp": 4_000_000_000}, "", algorithm="none"),
        jwt.encode({"aud": "image/default"}, SECRET),  # no expiry: refused, never forever
        "not.a.token",
        "",
    ],
)
def test_forged_build_tokens_are_refused(signing: Settings, forged: str) -> None:
    required = signing.model_copy(update={"require_build_token": True})
    with pytest.raises(build_tokens.BadBuildToken):
        build_tokens.check(required, forged, "image/default")


def test_without_a_secret_tokens_are_not_read_unless_required(settings: Settings) -> None:
    assert build_tokens.issue(settings, "image/default") is None
    assert build_tokens.check(settings, "anything", "image/default") is False
    required = settings.model_copy(update={"require_build_token": True})
    with pytest.raises(build_tokens.BadBuildToken, match="cannot check"):
        build_tokens.check(required, None, "image/default")


def test_build_refuses_a_bad_token_with_403_and_starts_nothing(signing: Settings) -> None:
    for client in client_for(signing):
        response = client.get("/build/image/default?build_token=forged.token.here")
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/event-stream")
    event = failure(response)
    assert event["phase"] == "failed" and event["status_code"] == 403
    assert "not valid" in str(event["message"])
    assert launches(signing) == 0


def test_a_required_token_missing_is_403_naming_the_launch_page(signing: Settings) -> None:
    required = signing.model_copy(update={"require_build_token": True})
    for client in client_for(required):
        response = client.get("/build/gh/org/repo/main")
    assert response.status_code == 403
    assert "/v2/gh/org/repo/main" in str(failure(response)["message"])
    assert launches(required) == 0


def test_the_launch_page_carries_a_token_for_its_own_spec(signing: Settings) -> None:
    for client in client_for(signing):
        page = client.get("/v2/gh/org/repo/main").text
    marker = "/build/gh/org/repo/main?build_token="
    assert marker in page
    token = page.split(marker, 1)[1].split('"', 1)[0]
    assert build_tokens.check(signing, token, "gh/org/repo/main") is True


def test_without_a_secret_the_launch_page_has_no_token(api: TestClient) -> None:
    assert "build_token" not in api.get("/v2/gh/org/repo/main").text


# -- build only ---------------------------------------------------------------------------


def test_build_only_is_recorded_with_the_spec(api: TestClient, settings: Settings) -> None:
    response = api.post("/api/launches", json={"image": "default", "build_only": True})
    assert response.status_code == 202, response.text
    with session_scope(settings.database_url) as db:
        launch = db.get(Launch, response.json()["id"])
        assert launch is not None and launch.spec["build_only"] is True


def test_build_only_refused_by_the_settings_is_400_everywhere(settings: Settings) -> None:
    refusing = settings.model_copy(update={"allow_build_only": False})
    for client in client_for(refusing):
        posted = client.post("/api/launches", json={"image": "default", "build_only": True})
        streamed = client.get("/build/image/default?build_only=true")
    assert posted.status_code == 400 and "not permitted" in posted.json()["detail"]
    assert streamed.status_code == 400 and failure(streamed)["status_code"] == 400
    assert launches(refusing) == 0


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_build_only_in_a_body_must_be_a_json_boolean(api: TestClient, value: object) -> None:
    response = api.post("/api/launches", json={"image": "default", "build_only": value})
    assert response.status_code == 422


# -- /_config and the providers' links -----------------------------------------------------


def test_config_lists_every_provider_build_takes(api: TestClient) -> None:
    config = api.get("/_config").json()
    assert tuple(config) == PROVIDERS
    for prefix, entry in config.items():
        assert entry["text"] and entry["display_name"], prefix
        assert isinstance(entry["ref_prop_disabled"], bool)
    assert config["gh"]["ref_prop_disabled"] is False
    assert config["zenodo"]["ref_prop_disabled"] is True


@pytest.mark.parametrize(
    ("path", "repo", "ref"),
    [
        ("gist/someone/0123abcd/main", "https://gist.github.com/someone/0123abcd.git", "main"),
        ("gist/someone/0123abcd", "https://gist.github.com/someone/0123abcd.git", "HEAD"),
        ("zenodo/10.5281/zenodo.3242074", "zenodo:10.5281/zenodo.3242074", "HEAD"),
        (
            "figshare/10.6084/m9.figshare.9782777.v1",
            "figshare:10.6084/m9.figshare.9782777.v1",
            "HEAD",
        ),
        ("dataverse/10.7910/DVN/TJCLKP", "dataverse:10.7910/DVN/TJCLKP", "HEAD"),
        (
            "hydroshare/8f7c2f0341ef4180b0bd0b1d63bdd1a2",
            "hydroshare:8f7c2f0341ef4180b0bd0b1d63bdd1a2",
            "HEAD",
        ),
        (
            "ckan/https%3A%2F%2Fdemo.ckan.org%2Fdataset%2Fsample",
            "ckan:https://demo.ckan.org/dataset/sample",
            "HEAD",
        ),
    ],
)
def test_every_provider_link_reads_and_writes_back(
    settings: Settings, path: str, repo: str, ref: str
) -> None:
    request = from_raw_path(f"/build/{path}".encode(), "/build/").request()
    spec = sources.normalize(request.repo or "", request.ref, settings)
    assert (spec.url, spec.ref) == (repo, ref)
    # The link a launch of it offers again is the link it came from (a gist without a ref
    # comes back with HEAD).
    assert link_for(spec.as_dict()) == (
        path if ref != "HEAD" or not path.startswith("gist") else f"{path}/HEAD"
    )


def test_a_records_ready_fields_name_its_doi(settings: Settings) -> None:
    spec = {"repo": "zenodo:10.5281/zenodo.3242074", "ref": "HEAD"}
    fields = ready_fields(spec, "a" * 40, "https://launch.example/")
    assert (
        fields["repo_url"] == fields["binder_ref_url"] == "https://doi.org/10.5281/zenodo.3242074"
    )
    assert fields["binder_request"] == fields["binder_persistent_request"]
    assert fields["binder_request"] == "v2/zenodo/10.5281/zenodo.3242074"


@pytest.mark.parametrize(
    ("repo", "ref", "problem"),
    [
        ("zenodo:10.5281/zenodo.1", "v2", "no ref"),
        ("zenodo:not-a-doi", None, "zenodo"),
        ("hydroshare:../../etc", None, "hydroshare"),
        ("ckan:file:///etc/passwd", None, "ckan"),
        ("ckan:https://ckan.example/not-a-dataset", None, "ckan"),
        ("gist:../x", None, "gist"),
        ("gh:org/..", None, "gh"),
        ("gl:./x", None, "gl"),
    ],
)
def test_hostile_record_specs_are_refused_with_the_form_to_use(
    settings: Settings, repo: str, ref: str | None, problem: str
) -> None:
    with pytest.raises(SpecError, match=problem):
        sources.normalize(repo, ref, settings)


def test_banned_patterns_hold_for_records(settings: Settings) -> None:
    banned = settings.model_copy(update={"banned_specs": [r"zenodo\.666"]})
    with pytest.raises(SpecBanned):
        sources.normalize("zenodo:10.5281/zenodo.666", None, banned)


def test_intake_refuses_a_ckan_host_on_a_private_address(
    api: TestClient, settings: Settings
) -> None:
    response = api.post("/api/launches", json={"repo": "ckan:https://127.0.0.1/dataset/x"})
    assert response.status_code == 422 and "not a public address" in response.json()["detail"]
    assert launches(settings) == 0


def test_where_tokens_are_required_the_form_goes_through_the_launch_page(
    signing: Settings,
) -> None:
    """The form's own /build request would carry no token: with tokens required it opens the
    launch page instead (which carries one for its spec)."""
    required = signing.model_copy(update={"require_build_token": True})
    for client in client_for(required):
        assert "HubLaunch.form(" in client.get("/").text
        assert ", true);</script>" in client.get("/").text
    for client in client_for(signing):
        assert ", false);</script>" in client.get("/").text
