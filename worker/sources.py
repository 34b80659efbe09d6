"""What a repository launch points at: a git repository (``worker.repos``) or a record of a
research data repository (``worker.providers``: ``zenodo:<DOI>``, ``ckan:<URL>``, ...).

Intake, Binder links, the warm pool and the worker ask here, so they agree on which is which.
A record's "commit" is its fingerprint (``Record.fingerprint``): 40 hex digits naming one
version of the record and its files, so environment names, builds and pinned links treat it
as they treat a git commit.
"""

from __future__ import annotations

from worker import providers, repos
from worker.repos import RepoSpec, ResolveError, SpecError
from worker.settings import Settings

# Records have no refs: a DOI (or a record id) already names what is launched.
NO_REF = "HEAD"


def is_record(url: str) -> bool:
    """Whether a normalized spec's URL names a data record (its scheme is a provider's)."""
    return url.partition(":")[0] in providers.PROVIDER_SCHEMES


def normalize(repo: str, ref: str | None, settings: Settings) -> RepoSpec:
    """A git repository's spec as ``repos.normalize`` checks it, or a record's spec with its
    identifier checked (no network). Banned patterns hold for both."""
    parsed = providers.parse(repo)
    if parsed is None:
        return repos.normalize(repo, ref, settings)
    scheme, identifier = parsed
    if (ref or NO_REF).strip() != NO_REF:
        raise SpecError(f"{scheme}: records have no ref (the identifier names the version)")
    spec = RepoSpec(f"{scheme}:{identifier}", NO_REF)
    repos.check_banned(spec, settings)
    return spec


def check_host(spec: RepoSpec, settings: Settings) -> None:
    """Refuse a host that resolves to a non-public address before anything is recorded: a git
    URL's, or a CKAN dataset URL's (the other providers' hosts are the operator's settings)."""
    if not is_record(spec.url):
        repos.check_host(spec.url, settings)
    elif spec.url.startswith("ckan:"):
        repos.check_host(spec.url.removeprefix("ckan:"), settings)


def resolve(spec: RepoSpec, settings: Settings) -> str:
    """The commit a git ref names, or the fingerprint of the record's current version."""
    if not is_record(spec.url):
        return repos.resolve(spec, settings)
    try:
        return providers.resolve(spec.url, settings).fingerprint()
    except providers.RecordError as e:
        raise ResolveError(str(e)) from e
