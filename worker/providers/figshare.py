"""Figshare: ``figshare:10.6084/m9.figshare.<article>[.v<version>]``, read from
``{figshare_api_url}/articles/<article>/versions/<version>`` (without a version, the article's
current one). The version is ``<article>.v<version>``: a Figshare version never changes."""

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

DOI_RE = re.compile(r"^10\.6084/m9\.figshare\.([0-9]{1,12})(?:\.v([0-9]{1,6}))?$", re.IGNORECASE)


def parse(identifier: str) -> str:
    match = DOI_RE.match(identifier)
    if match is None:
        raise SpecError(
            "figshare: takes a Figshare DOI, 10.6084/m9.figshare.<article>[.v<version>] "
            "(e.g. figshare:10.6084/m9.figshare.9782777.v1)"
        )
    return identifier.lower()


def resolve(doi: str, settings: Settings, http: httpx.Client) -> Record:
    # parse() made ``doi``: 10.6084/m9.figshare.<article>[.v<version>]
    article, _, asked = doi.split("figshare.", 1)[1].partition(".v")
    what = f"Figshare article {doi}"
    api = settings.figshare_api_url.rstrip("/")
    url = f"{api}/articles/{article}" + (f"/versions/{asked}" if asked else "")
    try:
        answer = safe_http.get_json(http, url)
    except safe_http.BadStatus as e:
        if e.status in (404, 410):
            raise RecordError(f"Figshare has no public article {doi}") from e
        raise
    body = as_dict(answer, what)
    version = asked or str(as_int(body.get("version"), f"{what}'s version"))
    files: list[RemoteFile] = []
    for entry in as_list(body.get("files") or [], f"{what}'s file list"):
        item = as_dict(entry, f"{what}'s file list")
        # A link-only file is a pointer to some other site, not part of the article.
        if item.get("is_link_only") is True:
            continue
        files.append(
            RemoteFile(
                path=as_str(item.get("name"), f"{what}'s file name"),
                url=as_str(item.get("download_url"), f"{what}'s download URL"),
                size=opt_size(item.get("size"), f"{what}'s file size"),
                checksum=checksum("md5", item.get("computed_md5"), f"{what}'s checksum"),
            )
        )
    resolver = settings.doi_resolver_url.rstrip("/")
    landing = f"{resolver}/10.6084/m9.figshare.{article}.v{version}"
    return make_record("figshare", doi, f"{article}.v{version}", landing, files, settings, what)
