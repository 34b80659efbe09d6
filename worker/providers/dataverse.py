"""Dataverse: ``dataverse:<DOI>`` of a dataset on one of the configured installations.

A DOI does not say which installation holds it, so it is looked up at the DOI resolver, whose
redirect is read, not followed: it must lead to one of ``dataverse_urls``, and the API calls go
to that configured base (never to a host the answer names). The version is the latest
published ``<major>.<minor>``.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx

from worker import safe_http
from worker.providers.record import (
    Record,
    RecordError,
    RemoteFile,
    as_dict,
    as_int,
    as_list,
    as_str,
    checksum,
    make_record,
    opt_size,
)
from worker.repos import SpecError
from worker.settings import Settings

# Crossref's pattern for modern DOIs, with a length cap; '.'/'..' segments are refused apart.
DOI_RE = re.compile(r"^10\.[0-9]{4,9}/[-._;()/:A-Za-z0-9]{1,200}$")


def parse(identifier: str) -> str:
    doi = identifier.removeprefix("doi:")
    if not DOI_RE.match(doi) or any(s in ("", ".", "..") for s in doi.split("/")):
        raise SpecError(
            "dataverse: takes a dataset DOI, 10.<digits>/<suffix> "
            "(e.g. dataverse:10.7910/DVN/TJCLKP)"
        )
    return doi


def installation(target: str, settings: Settings) -> str | None:
    """The configured base URL ``target`` lies under, if any (scheme, host, port and path)."""
    try:
        url = httpx.URL(target)
    except httpx.InvalidURL:
        return None
    for base in settings.dataverse_urls:
        known = httpx.URL(base.rstrip("/"))
        if (url.scheme, url.host, url.port) == (known.scheme, known.host, known.port) and (
            url.path + "/"
        ).startswith(known.path.rstrip("/") + "/"):
            return base.rstrip("/")
    return None


def resolve(doi: str, settings: Settings, http: httpx.Client) -> Record:
    what = f"Dataverse dataset {doi}"
    resolver = settings.doi_resolver_url.rstrip("/")
    try:
        target = safe_http.redirect_target(http, f"{resolver}/{quote(doi, safe='/:;()')}")
    except safe_http.BadStatus as e:
        if e.status in (404, 410):
            raise RecordError(f"the DOI {doi} is not registered") from e
        raise
    base = installation(target, settings)
    if base is None:
        raise RecordError(
            f"the DOI {doi} leads to {safe_http.describe(target)}, which is not a Dataverse "
            "installation this service fetches from"
        )
    persistent = quote(f"doi:{doi}", safe=":/")
    try:
        answer = safe_http.get_json(
            http, f"{base}/api/datasets/:persistentId?persistentId={persistent}"
        )
    except safe_http.BadStatus as e:
        if e.status in (401, 403, 404, 410):
            raise RecordError(f"{base} has no published dataset {doi}") from e
        raise
    data = as_dict(as_dict(answer, what).get("data"), what)
    latest = as_dict(data.get("latestVersion"), f"{what}'s latest version")
    major = as_int(latest.get("versionNumber"), f"{what}'s version number")
    minor = as_int(latest.get("versionMinorNumber"), f"{what}'s version number")
    files = [
        _file(entry, base, what)
        for entry in as_list(latest.get("files") or [], f"{what}'s file list")
    ]
    version = f"{major}.{minor}"
    landing = f"{base}/dataset.xhtml?persistentId={persistent}&version={version}"
    return make_record("dataverse", doi, version, landing, files, settings, what)


def _file(entry: object, base: str, what: str) -> RemoteFile:
    item = as_dict(entry, f"{what}'s file list")
    data = as_dict(item.get("dataFile"), f"{what}'s file entry")
    file_id = as_int(data.get("id"), f"{what}'s file id")
    folder = item.get("directoryLabel")
    original = data.get("originalFileName")
    if original:
        # An ingested table: ?format=original serves the uploaded file, while filesize and
        # the checksum may describe the archival .tab copy; only the original's size is used.
        name = as_str(original, f"{what}'s file name")
        size = opt_size(data.get("originalFileSize"), f"{what}'s file size")
        digest = None
    else:
        name = as_str(data.get("filename"), f"{what}'s file name")
        size = opt_size(data.get("filesize"), f"{what}'s file size")
        digest = _checksum(data, what)
    path = f"{as_str(folder, f'{what} folder name')}/{name}" if folder else name
    return RemoteFile(
        path=path,
        url=f"{base}/api/access/datafile/{file_id}?format=original",
        size=size,
        checksum=digest,
    )


def _checksum(data: dict[str, object], what: str) -> tuple[str, str] | None:
    if data.get("md5"):
        return checksum("md5", data["md5"], f"{what}'s checksum")
    if data.get("checksum"):
        entry = as_dict(data["checksum"], f"{what}'s checksum")
        kind = as_str(entry.get("type"), f"{what}'s checksum type")
        return checksum(kind, entry.get("value"), f"{what}'s checksum")
    return None
