"""Repository specs: shorthands, what is refused, deterministic environment names."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.builders import NAME_RE, environment_name
from worker.repos import (
    RepoSpec,
    ResolveError,
    SpecBanned,
    SpecError,
    check_host,
    git_env,
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
        ("git://example.org/x", None, "git:// URLs are not accepted"),
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
    assert normalize("git://127.0.0.1/x", None, LOCAL).url == "git://127.0.0.1/x"


# IPv6 addresses that lead to a non-public IPv4 address (Python's is_global calls all of these
# but the Teredo one global).
INTERNAL_BEHIND_IPV6 = [
    "64:ff9b::7f00:1",  # NAT64 -> 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 -> 169.254.169.254 (cloud metadata)
    "64:ff9b::a00:1",  # NAT64 -> 10.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
    "64:ff9b:1:ffff::808:808",  # local-use NAT64, whatever it embeds
    "2002:7f00:1::1",  # 6to4 -> 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 -> 192.168.1.1
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.1.2.3",
    "::10.1.2.3",  # IPv4-compatible (deprecated)
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
]


@pytest.mark.parametrize("address", INTERNAL_BEHIND_IPV6)
def test_ipv6_addresses_that_embed_an_internal_ipv4_are_refused(address: str) -> None:
    with pytest.raises(SpecError, match="not a public address"):
        check_host(f"https://[{address}]/owner/repo", STRICT)


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700:4700::1111"],
)
def test_ipv6_addresses_that_embed_a_public_ipv4_pass(address: str) -> None:
    assert check_host(f"https://[{address}]/owner/repo", STRICT) == [address]


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
    assert "protocol.git.allow=never" in options


def test_ipv6_addresses_are_pinned_in_brackets() -> None:
    options = git_options("https://example.org:8443/x", ["2606:4700::1", "93.184.216.34"], STRICT)
    assert "http.curloptResolve=example.org:8443:[2606:4700::1],93.184.216.34" in options


def test_an_ip_literal_host_is_not_given_an_unparsable_pin() -> None:
    # The literal is the address that was checked; curl never looks it up.
    options = git_options("https://[2606:4700::1]/x", ["2606:4700::1"], STRICT)
    assert not [o for o in options if o.startswith("http.curloptResolve")]


@pytest.fixture
def ipv6_git_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A repository served over dumb HTTP on [::1] only; yields (port, head commit)."""
    work, served = tmp_path / "work", tmp_path / "served"
    work.mkdir()
    served.mkdir()
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "README").write_text("hi")
    _git("add", ".", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(served / "r.git"), cwd=tmp_path)
    _git("update-server-info", cwd=served / "r.git")
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "::1", str(port)],
        cwd=served,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with socket.socket(socket.AF_INET6) as client:
                if client.connect_ex(("::1", port)) == 0:
                    break
            time.sleep(0.025)
        yield port, _git("rev-parse", "HEAD", cwd=work)
    finally:
        server.terminate()
        server.wait(10)


def test_git_connects_to_a_pinned_ipv6_address(ipv6_git_server: tuple[int, str]) -> None:
    # repo.invalid never resolves (RFC 6761): git can reach the server only through the pin.
    port, head = ipv6_git_server
    url = f"http://repo.invalid:{port}/r.git"

    def ls_remote(addresses: list[str]) -> subprocess.CompletedProcess[str]:
        command = ["git", *git_options(url, addresses, LOCAL), "ls-remote", "--", url]
        return subprocess.run(
            command, capture_output=True, text=True, env=git_env(), timeout=30, check=False
        )

    pinned = ls_remote(["::1"])
    assert pinned.returncode == 0, pinned.stderr
    assert f"{head}\trefs/heads/main" in pinned.stdout
    assert ls_remote([]).returncode != 0  # without the pin the name goes nowhere


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
