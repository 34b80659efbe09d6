"""CKAN: ``ckan:<base>/dataset/<name or id>[?activity_id=<id>]``, read with the action API
(``package_show``, or ``activity_data_show`` for the dataset as one activity left it). The
version is the dataset's ``metadata_modified``, or the activity id.

Resources link anywhere: only those whose URL passes the fetch rules (scheme, a public host)
are part of the record, the rest are left out.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import httpx

from worker import safe_http
from worker.providers.record import (
    ALGORITHMS,
    HEX_LENGTHS,
    Record,
    RecordError,
    RemoteFile,
    as_dict,
    as_list,
    as_str,
    checksum,
    make_record,
    opt_size,
)
from worker.repos import MAX_URL, SpecError, check_host, split_url
from worker.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
BASE_PATH_RE = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")
FORM = (
    "ckan: takes a dataset URL, https://<site>/dataset/<name or id>[?activity_id=<id>] "
    "(e.g. ckan:https://demo.ckan.org/dataset/sample-dataset-1)"
)


def parse(identifier: str) -> str:
    if len(identifier) > MAX_URL or any(c.isspace() or ord(c) < 32 for c in identifier):
        raise SpecError(FORM)
    try:
        parts = split_url(identifier)
    except SpecError as e:
        raise SpecError(FORM) from e
    base_path, sep, name = parts.path.rstrip("/").rpartition("/dataset/")
    query = parts.query
    activity = query.removeprefix("activity_id=") if query.startswith("activity_id=") else ""
    bad = (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.fragment
        or not sep
        or not NAME_RE.match(name)
        or not BASE_PATH_RE.match(base_path)
        or any(s in (".", "..") for s in base_path.split("/"))
        or (query and not NAME_RE.match(activity))
    )
    if bad:
        raise SpecError(FORM)
    dataset = f"{parts.scheme}://{parts.netloc}{base_path}/dataset/{name}"
    return f"{dataset}?activity_id={activity}" if activity else dataset


def resolve(identifier: str, settings: Settings, http: httpx.Client) -> Record:
    dataset, _, query = identifier.partition("?activity_id=")
    base, _, name = dataset.rpartition("/dataset/")
    what = f"CKAN dataset {dataset}"
    if query:
        url = f"{base}/api/3/action/activity_data_show?id={query}&object_type=package"
    else:
        url = f"{base}/api/3/action/package_show?id={name}"
    try:
        answer = safe_http.get_json(http, url)
    except safe_http.BadStatus as e:
        if e.status in (403, 404, 410):
            missing = f"activity {query} of dataset {name}" if query else f"dataset {name}"
            raise RecordError(f"{base} has no public {missing}") from e
        raise
    body = as_dict(answer, what)
    if body.get("success") is not True:
        raise RecordError(f"{base} did not return the dataset {name}")
    package = as_dict(body.get("result"), what)
    if query and name not in (package.get("name"), package.get("id")):
        raise RecordError(f"activity {query} is not an activity of the dataset {name}")
    version = query or as_str(package.get("metadata_modified"), f"{what}'s modification time")
    resources = as_list(package.get("resources") or [], f"{what}'s resource list")
    # Counted before any resource's host is looked up, so a huge list costs no lookups.
    if len(resources) > settings.record_files_limit:
        raise RecordError(
            f"{what} has {len(resources)} resources; at most {settings.record_files_limit} "
            "are fetched"
        )
    hosts: dict[str, bool] = {}
    files = [
        found
        for entry in resources
        if (found := _resource(entry, settings, hosts, what)) is not None
    ]
    return make_record("ckan", identifier, version, identifier, files, settings, what)


def _resource(
    entry: object, settings: Settings, hosts: dict[str, bool], what: str
) -> RemoteFile | None:
    """The resource as a file, or None when its URL is not one this service fetches (the
    connection is checked again when it is fetched: an address can change)."""
    item = as_dict(entry, f"{what}'s resource list")
    url = as_str(item.get("url") or "", f"{what}'s resource URL")
    if not _fetchable(url, settings, hosts):
        return None
    name = unquote(split_url(url).path.rsplit("/", 1)[-1])
    if not name:
        name = as_str(item.get("id"), f"{what}'s resource id")
    return RemoteFile(
        path=name,
        url=url,
        size=opt_size(item.get("size"), f"{what}'s resource size"),
        checksum=_hash(item.get("hash"), what),
    )


def _fetchable(url: str, settings: Settings, hosts: dict[str, bool]) -> bool:
    try:
        safe_http.check_url(url, settings)
    except safe_http.FetchError:
        return False
    parts = split_url(url)
    key = f"{parts.scheme}://{parts.netloc}"
    if key not in hosts:
        try:
            check_host(url, settings)
            hosts[key] = True
        except SpecError:
            hosts[key] = False
    return hosts[key]


def _hash(value: object, what: str) -> tuple[str, str] | None:
    """CKAN's free-form ``hash``: "<algorithm>:<hex>", or bare hex whose length names the
    algorithm; anything else is not verified."""
    if not isinstance(value, str) or not value.strip():
        return None
    algorithm, sep, digest = value.strip().lower().rpartition(":")
    if not sep:
        algorithm = HEX_LENGTHS.get(len(digest), "")
    if algorithm.replace("-", "") not in ALGORITHMS:
        return None
    try:
        return checksum(algorithm, digest, f"{what}'s resource hash")
    except RecordError:
        # A hash CKAN holds is whatever the publisher typed; a malformed one is not a check.
        return None
