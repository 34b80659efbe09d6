"""Repository specs: shorthands, what is refused, deterministic environment names."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from worker.builders import NAME_RE, environment_name
from worker.repos import (
    RepoSpec,
    ResolveError,
    SpecBanned,
    SpecError,
    git_options,
    normalize,
    resolve,
)
from worker.settings import Settings

STRICT = Settings()
LOCAL = Settings(allow_local_repos=True)


def test_shorthands_expand_to_the_public_hosts() -> None:
    assert normalize("gh:jupyterhub/binderhub", None, STRICT) == RepoSpec(
        "https://github.com/jupyterhub/binderhub", "HEAD"
    )
    assert (
        normalize("gl:group/sub/project", "v1", STRICT).url
        == "https://gitlab.com/group/sub/project"
    )


@pytest.mark.parametrize(
    ("repo", "ref", "message"),
    [
        ("http://example.org/x", None, "scheme"),
        ("file:///srv/x", None, "scheme"),
        ("ssh://example.org/x", None, "scheme"),
        ("ext::sh -c touch% /tmp/pwned", None, "must be a URL"),
        ("--upload-pack=touch /tmp/pwned", None, "must be a URL"),
        ("https://example.org/x", "-oops", "ref must"),
        ("https://example.org/x", "--upload-pack=id", "ref must"),
        ("https://example.org/x", "a..b", "ref must"),
        ("https://user:pw@example.org/x", None, "credentials"),
        ("https:///x", None, "must name a host"),
    ],
)
def test_unsafe_specs_are_refused(repo: str, ref: str | None, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        normalize(repo, ref, STRICT)


def test_local_schemes_only_when_allowed() -> None:
    assert normalize("file:///srv/x", None, LOCAL).url == "file:///srv/x"
    assert normalize("http://127.0.0.1:9/x", "main", LOCAL).ref == "main"


def test_banned_patterns_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBLAUNCH_BANNED_SPECS", r"^https://github\.com/evil/, @crypto-miner$")
    settings = Settings()
    assert settings.banned_specs == [r"^https://github\.com/evil/", "@crypto-miner$"]
    with pytest.raises(SpecBanned):
        normalize("gh:evil/thing", None, settings)
    with pytest.raises(SpecBanned):
        normalize("gh:good/thing", "crypto-miner", settings)
    assert normalize("gh:good/thing", "main", settings).ref == "main"


def test_environment_names_are_deterministic_and_safe() -> None:
    commit = "a" * 40
    name = environment_name("https://github.com/Org/My_Repo.git", commit, "venv-1")
    assert name == environment_name("https://github.com/Org/My_Repo.git", commit, "venv-1")
    assert name.startswith("my-repo-") and name.endswith(f"-{commit}-venv-1")
    assert NAME_RE.match(name)
    assert name != environment_name("https://github.com/Other/My_Repo.git", commit, "venv-1")
    assert name != environment_name("https://github.com/Org/My_Repo.git", "b" * 40, "venv-1")
    assert name != environment_name("https://github.com/Org/My_Repo.git", commit, "venv-2")
    assert NAME_RE.match(environment_name("file:///", commit, "r2d-1"))


def test_git_never_follows_redirects_and_pins_the_checked_address() -> None:
    options = git_options("https://example.org/x", ["93.184.216.34"], STRICT)
    assert "http.followRedirects=false" in options
    assert "http.curloptResolve=example.org:443:93.184.216.34" in options
    assert "protocol.file.allow=never" in options


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_resolve_reads_refs_with_ls_remote(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", "-b", "main", cwd=repo)
    (repo / "README").write_text("hi")
    _git("add", ".", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
    _git("tag", "-a", "v1", "-m", "v1", cwd=repo)
    head = _git("rev-parse", "HEAD", cwd=repo)
    url = f"file://{repo}"

    assert resolve(RepoSpec(url, "main"), LOCAL) == head
    assert resolve(RepoSpec(url, "HEAD"), LOCAL) == head
    assert resolve(RepoSpec(url, "v1"), LOCAL) == head  # the commit, not the tag object
    assert resolve(RepoSpec(url, "f" * 40), LOCAL) == "f" * 40  # a sha is used as is
    with pytest.raises(ResolveError, match="no branch or tag named 'nope'"):
        resolve(RepoSpec(url, "nope"), LOCAL)
    with pytest.raises(ResolveError, match="cannot read"):
        resolve(RepoSpec(f"file://{tmp_path}/missing", "main"), LOCAL)
