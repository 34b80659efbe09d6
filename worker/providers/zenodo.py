"""Zenodo: ``zenodo:10.5281/zenodo.<record>``, read from ``{zenodo_url}/api/records/<record>``.

Zenodo records are immutable, so the version is the record's id; a concept DOI (all versions)
is redirected by the API to its latest version's record, whose id becomes the version.
"""

from __future__ import annotations

import re

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

DOI_RE = re.compile(r"^10\.5281/zenodo\.([0-9]{1,12})$", re.IGNORECASE)


def parse(identifier: str) -> str:
    match = DOI_RE.match(identifier)
    if match is None:
        raise SpecError(
            "zenodo: takes a Zenodo DOI, 10.5281/zenodo.<record number> "
            "(e.g. zenodo:10.5281/zenodo.3242074)"
        )
    return f"10.5281/zenodo.{match.group(1)}"


def resolve(doi: str, settings: Settings, http: httpx.Client) -> Record:
    what = f"Zenodo record {doi}"
    base = settings.zenodo_url.rstrip("/")
    number = doi.rsplit(".", 1)[1]
    try:
        answer = safe_http.get_json(http, f"{base}/api/records/{number}")
    except safe_http.BadStatus as e:
        if e.status in (404, 410):
            raise RecordError(f"Zenodo has no public record {doi}") from e
        raise
    body = as_dict(answer, what)
    record_id = str(as_int(body.get("id"), f"{what}'s id"))
    files: list[RemoteFile] = []
    for entry in as_list(body.get("files") or [], f"{what}'s file list"):
        item = as_dict(entry, f"{what}'s file list")
        digest = as_str(item.get("checksum") or "", f"{what}'s checksum")
        algorithm, _, value = digest.partition(":")
        files.append(
            RemoteFile(
                path=as_str(item.get("key"), f"{what}'s file name"),
                url=as_str(as_dict(item.get("links"), what).get("self"), f"{what}'s file link"),
                size=opt_size(item.get("size"), f"{what}'s file size"),
                checksum=checksum(algorithm, value, f"{what}'s checksum") if value else None,
            )
        )
    landing = f"{base}/records/{record_id}"
    return make_record("zenodo", doi, record_id, landing, files, settings, what)
