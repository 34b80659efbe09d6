"""One HTTP server on 127.0.0.1 standing in for Zenodo, Figshare, Dataverse, HydroShare, CKAN
and the DOI resolver, answering their documented endpoints from a catalogue the test fills.

Hostile cases are set on the catalogue: declared sizes and checksums that lie (``StandinFile``
``size``/``md5``), download URLs that point elsewhere (``url``), ``redirects`` (any path to any
Location), ``delays`` (a slow answer), ``raw`` (any status and body at a path), and the zip
builders below (zip-slip, links, bombs). ``requests`` and ``connections`` tell what reached it.

    with serve() as standin:
        standin.zenodo[123] = [StandinFile("a.txt", b"hello")]
        settings = Settings(..., zenodo_url=standin.url)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

AUTO: Literal["auto"] = "auto"


@dataclass
class StandinFile:
    name: str
    data: bytes
    # What the metadata declares: "auto" is the truth, None leaves it out, else the given lie.
    size: int | Literal["auto"] | None = AUTO
    md5: str | Literal["auto"] | None = AUTO
    folder: str | None = None  # Dataverse's directoryLabel
    url: str | None = None  # a download URL to declare instead of the stand-in's own

    def declared_size(self) -> int | None:
        return len(self.data) if self.size == AUTO else self.size

    def declared_md5(self) -> str | None:
        return hashlib.md5(self.data).hexdigest() if self.md5 == AUTO else self.md5


@dataclass
class DataverseDataset:
    files: list[StandinFile]
    major: int = 1
    minor: int = 0


@dataclass
class CkanDataset:
    files: list[StandinFile]
    modified: str = "2024-05-01T10:00:00.000000"
    id: str = "6f1c2a9e-0000-4000-8000-000000000001"


@dataclass
class Standin:
    url: str = ""
    requests: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's, lower-cased
    connections: int = 0
    zenodo: dict[int, list[StandinFile]] = field(default_factory=dict)
    zenodo_concepts: dict[int, int] = field(default_factory=dict)  # concept -> latest record
    figshare: dict[int, dict[int, list[StandinFile]]] = field(default_factory=dict)
    dois: dict[str, str] = field(default_factory=dict)  # DOI -> the resolver's Location
    dataverse: dict[str, DataverseDataset] = field(default_factory=dict)
    hydroshare: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # (updated, bag)
    ckan: dict[str, CkanDataset] = field(default_factory=dict)
    ckan_activities: dict[str, tuple[str, CkanDataset]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location (302)
    delays: dict[str, float] = field(default_factory=dict)  # path -> seconds before answering
    raw: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path -> (status, body)
    blobs: dict[str, bytes] = field(default_factory=dict)  # download path -> bytes
    closing: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def blob(self, path: str, item: StandinFile) -> str:
        """The URL the metadata declares for ``item``, its bytes served at ``path``."""
        self.blobs[path] = item.data
        return item.url or f"{self.url}{path}"


def file_id(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def zenodo_json(standin: Standin, record: int, files: list[StandinFile]) -> object:
    entries = []
    for item in files:
        path = f"/api/records/{record}/files/{quote(item.name)}/content"
        md5 = item.declared_md5()
        entries.append(
            {
                "id": str(file_id("zenodo", record, item.name)),
                "key": item.name,
                "size": item.declared_size(),
                "checksum": f"md5:{md5}" if md5 else None,
                "links": {"self": standin.blob(path, item)},
            }
        )
    links = {"html": f"{standin.url}/records/{record}"}
    return {"id": record, "recid": str(record), "files": entries, "links": links}


def figshare_json(standin: Standin, article: int, version: int, files: list[StandinFile]) -> object:
    entries = []
    for item in files:
        number = file_id("figshare", article, version, item.name)
        entries.append(
            {
                "id": number,
                "name": item.name,
                "size": item.declared_size(),
                "computed_md5": item.declared_md5() or "",
                "is_link_only": False,
                "download_url": standin.blob(f"/ndownloader/files/{number}", item),
            }
        )
    return {"id": article, "version": version, "files": entries}


def dataverse_json(standin: Standin, doi: str, dataset: DataverseDataset) -> object:
    entries = []
    for item in dataset.files:
        number = file_id("dataverse", doi, item.folder, item.name)
        url = standin.blob(f"/api/access/datafile/{number}", item)
        data: dict[str, Any] = {"id": number, "filename": item.name}
        if item.declared_size() is not None:
            data["filesize"] = item.declared_size()
        if item.declared_md5():
            data["md5"] = item.declared_md5()
            data["checksum"] = {"type": "MD5", "value": item.declared_md5()}
        entry: dict[str, Any] = {"label": item.name, "restricted": False, "dataFile": data}
        if item.folder is not None:
            entry["directoryLabel"] = item.folder
        if item.url:
            standin.blobs[urlsplit(url).path] = item.data
        entries.append(entry)
    latest = {
        "versionNumber": dataset.major,
        "versionMinorNumber": dataset.minor,
        "versionState": "RELEASED",
        "files": entries,
    }
    return {
        "status": "OK",
        "data": {"id": 1, "persistentUrl": f"https://doi.org/{doi}", "latestVersion": latest},
    }


def ckan_package(standin: Standin, name: str, dataset: CkanDataset) -> object:
    resources = []
    for item in dataset.files:
        rid = f"res-{file_id('ckan', name, item.name)}"
        path = f"/ckan/dataset/{name}/resource/{rid}/download/{quote(item.name)}"
        md5 = item.declared_md5()
        resources.append(
            {
                "id": rid,
                "name": item.name.upper(),
                "url": standin.blob(path, item),
                "size": item.declared_size(),
                "hash": f"md5:{md5}" if md5 else "",
                "format": "CSV",
            }
        )
    return {
        "id": dataset.id,
        "name": name,
        "metadata_modified": dataset.modified,
        "resources": resources,
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, value: object) -> None:
        self.send(200, json.dumps(value).encode())

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        standin = self.server.standin
        standin.requests.append(self.path)
        standin.headers.append({k.lower(): v for k, v in self.headers.items()})
        parts = urlsplit(self.path)
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
        if path in standin.delays and standin.closing.wait(standin.delays[path]):
            return
        if path in standin.redirects:
            return self.redirect(standin.redirects[path])
        if path in standin.raw:
            status, body = standin.raw[path]
            return self.send(status, body)
        with standin.lock:
            answer = self.route(standin, path, query)
        if answer is None:
            return self.send(404, b'{"message": "not found"}')
        if isinstance(answer, bytes):
            return self.send(200, answer, "application/octet-stream")
        if isinstance(answer, tuple):
            return self.redirect(answer[1])
        return self.send_json(answer)

    def route(self, standin: Standin, path: str, query: dict[str, str]) -> object:
        if path in standin.blobs:
            return standin.blobs[path]
        if m := re.fullmatch(r"/api/records/(\d+)", path):
            record = int(m.group(1))
            if record in standin.zenodo_concepts:
                return ("redirect", f"{standin.url}/api/records/{standin.zenodo_concepts[record]}")
            if record in standin.zenodo:
                return zenodo_json(standin, record, standin.zenodo[record])
        if m := re.fullmatch(r"/v2/articles/(\d+)(?:/versions/(\d+))?", path):
            versions = standin.figshare.get(int(m.group(1)), {})
            if versions:
                version = int(m.group(2)) if m.group(2) else max(versions)
                if version in versions:
                    return figshare_json(standin, int(m.group(1)), version, versions[version])
        if path.startswith("/doi/"):
            doi = unquote(path.removeprefix("/doi/"))
            if doi in standin.dois:
                return ("redirect", standin.dois[doi])
        if path == "/api/datasets/:persistentId":
            doi = query.get("persistentId", "").removeprefix("doi:")
            if doi in standin.dataverse:
                return dataverse_json(standin, doi, standin.dataverse[doi])
        m = re.fullmatch(r"/hsapi/resource/([0-9a-f]{32})/sysmeta/", path)
        if m and m.group(1) in standin.hydroshare:
            updated = standin.hydroshare[m.group(1)][0]
            return {"resource_id": m.group(1), "date_last_updated": updated, "public": True}
        m = re.fullmatch(r"/django_irods/download/bags/([0-9a-f]{32})\.zip", path)
        if m and m.group(1) in standin.hydroshare:
            return standin.hydroshare[m.group(1)][1]
        name = query.get("id", "")
        if path == "/ckan/api/3/action/package_show" and name in standin.ckan:
            return {"success": True, "result": ckan_package(standin, name, standin.ckan[name])}
        if (
            path == "/ckan/api/3/action/activity_data_show"
            and query.get("object_type") == "package"
            and name in standin.ckan_activities
        ):
            dataset_name, dataset = standin.ckan_activities[name]
            return {"success": True, "result": ckan_package(standin, dataset_name, dataset)}
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: Standin

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that stops reading (a refused size, a timeout) is what those tests want.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def verify_request(self, request: object, client_address: object) -> bool:
        self.standin.connections += 1
        return True


@contextmanager
def serve() -> Iterator[Standin]:
    standin = Standin()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.standin = standin
    standin.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        standin.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# Zips, honest and hostile.


def make_zip(
    files: dict[str, bytes],
    *,
    links: dict[str, str] | None = None,
    executable: tuple[str, ...] = (),
) -> bytes:
    """A deflated zip of ``files`` (names as given, '../' and '/abs' included), plus
    ``links`` as symbolic-link entries (name -> target)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = 0o755 if name in executable else 0o644
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (0o120777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def bag_zip(resource: str, contents: dict[str, bytes]) -> bytes:
    """A HydroShare BagIt zip: metadata beside ``<id>/data/contents/``."""
    files = {
        f"{resource}/bagit.txt": b"BagIt-Version: 0.97\n",
        f"{resource}/manifest-md5.txt": b"",
        f"{resource}/data/resourcemetadata.xml": b"<rdf/>",
    }
    files.update({f"{resource}/data/contents/{k}": v for k, v in contents.items()})
    return make_zip(files)


def bomb_zip(size: int) -> bytes:
    """One entry of ``size`` zero bytes: a few kilobytes compressed."""
    buffer = io.BytesIO()
    chunk = bytes(2**20)
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("zeros.bin", "w", force_zip64=True) as entry,
    ):
        for _ in range(size // len(chunk)):
            entry.write(chunk)
    return buffer.getvalue()
