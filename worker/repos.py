"""Repository specs: expand shorthands, refuse unsafe URLs and refs, resolve a ref to a commit.

Nothing here lets a URL or ref become an option to git (BinderHub's CVE-2021-39159 was exactly
that): both are checked to not start with ``-`` and are passed after ``--``. Hosts that resolve
to loopback, private, link-local or otherwise non-public addresses are refused (SSRF) unless
local repositories are allowed, and so are IPv6 addresses that carry such an IPv4 address
(NAT64, 6to4, Teredo, IPv4-mapped). The checked addresses are pinned for git's connection
(``http.curloptResolve``), and git is told not to follow redirects, so a redirect or a DNS
change between the check and the fetch cannot reach an internal address. ``git://`` is refused:
git opens that connection itself, so the pin (a curl option) cannot hold it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from sandbox.egress import leads_to
from worker.settings import Settings

# BinderHub's gist provider clones https://gist.github.com/<user>/<id>.git.
SHORTHANDS = {
    "gh": "https://github.com/{}",
    "gl": "https://gitlab.com/{}",
    "gist": "https://gist.github.com/{}.git",
}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# git check-ref-format, roughly: no control chars, spaces, ~^:?*[\, "..", "@{", leading "-".
REF_RE = re.compile(r"^(?!-)(?!.*\.\.)(?!.*@\{)[^\x00-\x20~^:?*\[\\]{1,255}$")
# owner/repo: no "." or ".." segment (gh:../x would be https://github.com/../x).
OWNER_REPO_RE = re.compile(r"^(?!(?:.*/)?\.{1,2}(?:/|$))[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")
MAX_URL = 2048
# Local-use NAT64 (RFC 8215): the operator's own translator, the IPv4 position varies; refused.
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
# Deprecated IPv4-compatible addresses (::a.b.c.d); :: and ::1 are caught as non-global anyway.
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class SpecError(ValueError):
    """The repository spec is not acceptable; the message says what to fix."""


class SpecBanned(SpecError):
    """The spec matches a banned pattern."""


class ResolveError(Exception):
    """The ref could not be resolved (unknown ref, unreachable repository, timeout)."""


@dataclass(frozen=True)
class RepoSpec:
    url: str
    ref: str

    def as_dict(self) -> dict[str, str]:
        return {"repo": self.url, "ref": self.ref}


def normalize(repo: str, ref: str | None, settings: Settings) -> RepoSpec:
    """Expand shorthands and check the URL, the ref and the banned patterns (no network)."""
    repo = repo.strip()
    ref = (ref or "HEAD").strip()
    scheme, _, rest = repo.partition(":")
    if scheme in SHORTHANDS and not rest.startswith("//"):
        if not OWNER_REPO_RE.match(rest):
            raise SpecError(f"'{scheme}:' takes owner/repo, e.g. {scheme}:jupyterhub/binderhub")
        repo = SHORTHANDS[scheme].format(rest)
    if len(repo) > MAX_URL:
        raise SpecError(f"repo URLs are at most {MAX_URL} characters")
    if repo.startswith("-") or any(c.isspace() or ord(c) < 32 for c in repo):
        raise SpecError("repo must be a URL such as https://host/owner/repo")
    # git:// is refused: git connects by itself (not through curl), so http.curloptResolve
    # cannot pin it to the checked address and a DNS change could point it inside; it is also
    # unencrypted. Local mode checks no address, so it may use it.
    allowed = {"https"} | ({"http", "file", "git"} if settings.allow_local_repos else set())
    parts = split_url(repo)
    if parts.scheme == "git" and "git" not in allowed:
        raise SpecError(
            "git:// URLs are not accepted (unencrypted, and their connection cannot be pinned "
            "to the checked address); use the repository's https:// URL"
        )
    if parts.scheme not in allowed:
        raise SpecError(f"repo URL scheme must be one of: {', '.join(sorted(allowed))}")
    if parts.scheme != "file" and not parts.hostname:
        raise SpecError("repo URL must name a host")
    if parts.username or parts.password:
        raise SpecError("repo URLs must not carry credentials")
    if not REF_RE.match(ref):
        raise SpecError("ref must be a branch, tag or commit name (no spaces, not starting '-')")
    spec = RepoSpec(repo, ref)
    check_banned(spec, settings)
    return spec


def check_banned(spec: RepoSpec, settings: Settings) -> None:
    for pattern in settings.banned_specs:
        if re.search(pattern, f"{spec.url}@{spec.ref}"):
            raise SpecBanned("This repository is not allowed on this service.")


def split_url(url: str) -> SplitResult:
    """``urlsplit``, with what it (or reading ``.port`` and ``.hostname`` later) would raise a
    ValueError for said as a SpecError: an unclosed ``[``, a bracketed host that is no IP
    address, a port that is not a number from 0 to 65535. Once a URL has passed here, reading
    its host and port cannot fail."""
    try:
        parts = urlsplit(url)
        _ = parts.hostname
        port = parts.port
    except ValueError as e:
        raise SpecError(f"repo URL cannot be read ({e}); {_URL_FORM}") from e
    if port == 0:
        raise SpecError(f"repo URL port must be from 1 to 65535; {_URL_FORM}")
    return parts


_URL_FORM = "write it as https://host[:port]/owner/repo"


def check_host(url: str, settings: Settings) -> list[str]:
    """Resolve the URL's host and refuse non-public addresses; returns the addresses."""
    parts = split_url(url)
    if parts.scheme == "file":
        return []
    host = parts.hostname or ""
    port = parts.port or {"https": 443, "http": 80, "git": 9418}[parts.scheme]
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise SpecError(f"repo host {host!r} does not resolve") from e
    addresses = sorted({str(info[4][0]) for info in infos})
    if not settings.allow_local_repos:
        for address in addresses:
            if not is_public(ipaddress.ip_address(address.split("%")[0])):
                raise SpecError(f"repo host {host!r} is not a public address; it is refused")
    return addresses


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global, and so is every IPv4 address it leads to (an IPv6 address can carry one)."""
    if isinstance(address, ipaddress.IPv6Address) and (
        address in LOCAL_NAT64 or address in IPV4_COMPATIBLE
    ):
        return False
    return all(ip.is_global for ip in leads_to(address))


def git_env() -> dict[str, str]:
    # Never prompt, never read the user's git config or credential helpers.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ASKPASS": "/bin/false",
        "LC_ALL": "C",
    }


def git_options(url: str, addresses: list[str], settings: Settings) -> list[str]:
    """`-c` options that pin the checked addresses and refuse redirects and other protocols."""
    options = ["-c", "http.followRedirects=false", "-c", "protocol.ext.allow=never"]
    if not settings.allow_local_repos:
        options += ["-c", "protocol.file.allow=never", "-c", "protocol.git.allow=never"]
    parts = split_url(url)
    host = parts.hostname or ""
    # An IP literal is never looked up, so there is nothing to pin (and curl cannot parse an
    # entry whose HOST is an IPv6 literal). IPv6 addresses are bracketed, the form curl
    # documents for CURLOPT_RESOLVE ("HOST:PORT:[ADDR]").
    if parts.scheme in ("http", "https") and addresses and not _is_ip_literal(host):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
        options += ["-c", f"http.curloptResolve={host}:{port}:{pinned}"]
    return options


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


def resolve(spec: RepoSpec, settings: Settings) -> str:
    """The commit a ref names, with `git ls-remote` (no host API needed); a sha is used as is."""
    if SHA_RE.match(spec.ref):
        return spec.ref
    addresses = check_host(spec.url, settings)
    command = ["git", *git_options(spec.url, addresses, settings), "ls-remote", "--", spec.url]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=settings.resolve_timeout,
            env=git_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ResolveError(f"{spec.url} did not answer within {settings.resolve_timeout} s") from e
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["no answer"]
        raise ResolveError(f"cannot read {spec.url}: {detail[0][:300]}")
    refs: dict[str, str] = {}
    for line in result.stdout.splitlines():
        sha, _, name = line.partition("\t")
        refs.setdefault(name, sha)
    for candidate in (
        spec.ref,
        f"refs/heads/{spec.ref}",
        f"refs/tags/{spec.ref}^{{}}",
        f"refs/tags/{spec.ref}",
    ):
        if candidate in refs:
            return refs[candidate]
    if re.fullmatch(r"[0-9a-f]{7,39}", spec.ref):
        raise ResolveError(
            "abbreviated commits cannot be resolved remotely; give all 40 hex digits"
        )
    raise ResolveError(f"{spec.url} has no branch or tag named {spec.ref!r}")
