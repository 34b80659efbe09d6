"""Records of research data repositories as launchable specs, as BinderHub takes them:
``zenodo:<DOI>``, ``figshare:<DOI>``, ``dataverse:<DOI>``, ``hydroshare:<resource id>`` and
``ckan:<dataset URL>``.

``parse`` checks a spec without network; ``resolve`` reads the provider's metadata API (through
``worker.safe_http``: every connection held to the SSRF rules) into a ``Record``, whose
``fingerprint()`` stands in for a git commit; ``download`` fetches its files into a folder,
worker-side, bytes and checksums checked; ``UNPACK_SCRIPT`` is run later inside the build's box
to copy or unzip them into the work folder (a zip is the visitor's: never opened here).
Every failure is a ``RecordError`` whose message is for the visitor; a malformed spec is a
``worker.repos.SpecError``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

import httpx

from worker import safe_http
from worker.providers import ckan, dataverse, figshare, hydroshare, zenodo
from worker.providers.fetch import download
from worker.providers.record import Record, RecordError, RemoteFile
from worker.repos import SpecError
from worker.settings import Settings

__all__ = [
    "PROVIDER_SCHEMES",
    "UNPACK_SCRIPT",
    "Record",
    "RecordError",
    "RemoteFile",
    "download",
    "parse",
    "resolve",
]

PROVIDER_SCHEMES = ("zenodo", "figshare", "dataverse", "hydroshare", "ckan")
LABELS = {
    "zenodo": "Zenodo",
    "figshare": "Figshare",
    "dataverse": "Dataverse",
    "hydroshare": "HydroShare",
    "ckan": "CKAN",
}
_Parse = Callable[[str], str]
_Resolve = Callable[[str, Settings, httpx.Client], Record]
_PROVIDERS: dict[str, tuple[_Parse, _Resolve]] = {
    "zenodo": (zenodo.parse, zenodo.resolve),
    "figshare": (figshare.parse, figshare.resolve),
    "dataverse": (dataverse.parse, dataverse.resolve),
    "hydroshare": (hydroshare.parse, hydroshare.resolve),
    "ckan": (ckan.parse, ckan.resolve),
}
UNPACK_SCRIPT: str = resources.files(__name__).joinpath("unpack.py").read_text(encoding="utf-8")


def parse(repo: str) -> tuple[str, str] | None:
    """``(scheme, identifier)`` for a provider's spec, the identifier checked and normalized;
    None when the scheme is no provider's. A bad identifier raises SpecError saying the form."""
    scheme, sep, identifier = repo.strip().partition(":")
    if not sep or scheme not in _PROVIDERS:
        return None
    return scheme, _PROVIDERS[scheme][0](identifier.strip())


def resolve(repo: str, settings: Settings) -> Record:
    """The record as the provider describes it now (network, through safe_http)."""
    parsed = parse(repo)
    if parsed is None:
        schemes = ", ".join(f"{s}:" for s in PROVIDER_SCHEMES)
        raise SpecError(f"a data repository spec starts with one of {schemes}")
    scheme, identifier = parsed
    try:
        with safe_http.client(settings) as http:
            record = _PROVIDERS[scheme][1](identifier, settings, http)
    except safe_http.FetchError as e:
        raise RecordError(f"cannot read the {LABELS[scheme]} record {identifier}: {e}") from e
    for remote in record.files:
        try:
            safe_http.check_url(remote.url, settings)
        except safe_http.UnsafeURL as e:
            raise RecordError(f"{remote.path} of {identifier} cannot be fetched: {e}") from e
    return record
