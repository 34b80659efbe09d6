"""HydroShare: ``hydroshare:<resource id>`` (32 hex digits). Resources are mutable, so the
version is their ``date_last_updated`` and the fingerprint changes whenever they do. The
content is one file, the resource's BagIt zip; its files are under ``<id>/data/contents/``
(UNPACK_SCRIPT moves them up)."""

from __future__ import annotations

import re

import httpx

from worker import safe_http
from worker.providers.record import Record, RecordError, RemoteFile, as_dict, as_str, make_record
from worker.repos import SpecError
from worker.settings import Settings

ID_RE = re.compile(r"^[0-9a-fA-F]{32}$")
# A bag is prepared on request: until it is, the download URL answers a JSON status instead.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def parse(identifier: str) -> str:
    if not ID_RE.match(identifier):
        raise SpecError(
            "hydroshare: takes a resource id, 32 hex digits "
            "(e.g. hydroshare:b8f6eae9d89241cf8b5904033460af61)"
        )
    return identifier.lower()


def resolve(resource: str, settings: Settings, http: httpx.Client) -> Record:
    what = f"HydroShare resource {resource}"
    base = settings.hydroshare_url.rstrip("/")
    try:
        answer = safe_http.get_json(http, f"{base}/hsapi/resource/{resource}/sysmeta/")
    except safe_http.BadStatus as e:
        if e.status in (401, 403, 404, 410):
            raise RecordError(f"HydroShare has no public resource {resource}") from e
        raise
    body = as_dict(answer, what)
    version = as_str(body.get("date_last_updated"), f"{what}'s last update")
    bag = RemoteFile(
        path=f"{resource}.zip",
        url=f"{base}/django_irods/download/bags/{resource}.zip",
        size=None,
        checksum=None,
    )
    landing = f"{base}/resource/{resource}/"
    return make_record("hydroshare", resource, version, landing, [bag], settings, what)
