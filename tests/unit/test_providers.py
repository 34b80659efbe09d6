"""Data providers (worker/providers) and their HTTP (worker/safe_http), against the stand-in
providers of tests/standins on 127.0.0.1: real HTTP, no mocks of httpx. UNPACK_SCRIPT runs as
it will in the box: ``python -I -c``, in a subprocess."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.standins.providers import (
    CkanDataset,
    DataverseDataset,
    Standin,
    StandinFile,
    bag_zip,
    bomb_zip,
    file_id,
    make_zip,
    serve,
)
from worker import safe_http
from worker.providers import (
    PROVIDER_SCHEMES,
    UNPACK_SCRIPT,
    Record,
    RecordError,
    RemoteFile,
    download,
    parse,
    resolve,
)
from worker.repos import SpecError
from worker.settings import Settings

HS_ID = "b8f6eae9d89241cf8b5904033460af61"
DV_DOI = "10.7910/DVN/TJCLKP"


@pytest.fixture
def standin() -> Iterator[Standin]:
    with serve() as server:
        yield server


def settings_for(standin: Standin, **override: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": "sqlite://",
        "allow_local_repos": True,
        "zenodo_url": standin.url,
        "figshare_api_url": f"{standin.url}/v2",
        "dataverse_urls": [standin.url],
        "hydroshare_url": standin.url,
        "doi_resolver_url": f"{standin.url}/doi",
        "resolve_timeout": 5.0,
    }
    values.update(override)
    return Settings(**values)


def fill(standin: Standin) -> None:
    """One record per provider."""
    standin.zenodo[123] = [
        StandinFile("environment.yml", b"dependencies: [numpy]\n"),
        StandinFile("index.ipynb", b"{}"),
    ]
    standin.zenodo_concepts[100] = 123
    standin.figshare[9782777] = {
        1: [StandinFile("data.csv", b"a,b\n1,2\n")],
        2: [StandinFile("data.csv", b"a,b\n1,3\n"), StandinFile("requirements.txt", b"pandas\n")],
    }
    standin.dois[DV_DOI] = f"{standin.url}/citation?persistentId=doi:{DV_DOI}"
    standin.dataverse[DV_DOI] = DataverseDataset(
        [
            StandinFile("README.md", b"# hi\n"),
            StandinFile("run.py", b"print(1)\n", folder="code/src"),
        ],
        major=2,
        minor=1,
    )
    bag = bag_zip(HS_ID, {"requirements.txt": b"xarray\n", "nb/a.ipynb": b"{}"})
    standin.hydroshare[HS_ID] = ("2024-03-01T12:00:00.123456Z", bag)
    standin.ckan["sample-data"] = CkanDataset([StandinFile("table.csv", b"x\n1\n")])


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# parse: no network


@pytest.mark.parametrize(
    ("repo", "expected"),
    [
        ("zenodo:10.5281/zenodo.3242074", ("zenodo", "10.5281/zenodo.3242074")),
        ("zenodo:10.5281/ZENODO.3242074", ("zenodo", "10.5281/zenodo.3242074")),
        (
            " figshare:10.6084/m9.figshare.9782777.v1 ",
            ("figshare", "10.6084/m9.figshare.9782777.v1"),
        ),
        ("figshare:10.6084/m9.figshare.9782777", ("figshare", "10.6084/m9.figshare.9782777")),
        ("dataverse:10.7910/DVN/TJCLKP", ("dataverse", "10.7910/DVN/TJCLKP")),
        ("dataverse:doi:10.7910/DVN/TJCLKP", ("dataverse", "10.7910/DVN/TJCLKP")),
        ("hydroshare:B8F6EAE9D89241CF8B5904033460AF61", ("hydroshare", HS_ID)),
        (
            "ckan:https://demo.ckan.org/dataset/sample-dataset-1",
            ("ckan", "https://demo.ckan.org/dataset/sample-dataset-1"),
        ),
        (
            "ckan:http://data.example.org:8080/portal/dataset/x_1/?activity_id=ab-12",
            ("ckan", "http://data.example.org:8080/portal/dataset/x_1?activity_id=ab-12"),
        ),
        ("gh:jupyterhub/binderhub", None),
        ("https://github.com/org/repo", None),
        ("zenodo", None),
    ],
)
def test_parse_accepts_each_providers_form(repo: str, expected: tuple[str, str] | None) -> None:
    assert parse(repo) == expected


@pytest.mark.parametrize(
    ("repo", "says"),
    [
        ("zenodo:10.1234/zenodo.1", "10.5281/zenodo.<record number>"),
        ("zenodo:10.5281/zenodo.abc", "10.5281/zenodo.<record number>"),
        ("zenodo:", "Zenodo DOI"),
        ("figshare:10.6084/m9.figshare.x1", "10.6084/m9.figshare.<article>"),
        ("figshare:10.6084/m9.figshare.1.v1.v2", "10.6084/m9.figshare.<article>"),
        ("dataverse:10.12/DVN/X", "10.<digits>/<suffix>"),
        ("dataverse:10.7910/../../etc", "10.<digits>/<suffix>"),
        ("dataverse:10.7910/DVN//X", "10.<digits>/<suffix>"),
        ("dataverse:10.7910/DVN X", "10.<digits>/<suffix>"),
        ("dataverse:10.7910/DVN\x00X", "10.<digits>/<suffix>"),
        ("dataverse:10.7910/" + "X" * 201, "10.<digits>/<suffix>"),
        ("hydroshare:b8f6eae9d89241cf8b5904033460af6", "32 hex digits"),
        ("hydroshare:g8f6eae9d89241cf8b5904033460af61", "32 hex digits"),
        ("ckan:ftp://demo.ckan.org/dataset/x", "dataset URL"),
        ("ckan:https://demo.ckan.org/datasets/x", "dataset URL"),
        ("ckan:https://user:pw@demo.ckan.org/dataset/x", "dataset URL"),
        ("ckan:https://demo.ckan.org/dataset/x?activity_id=a&b=c", "dataset URL"),
        ("ckan:https://demo.ckan.org/dataset/x?other=1", "dataset URL"),
        ("ckan:https://demo.ckan.org/a/../dataset/x", "dataset URL"),
        ("ckan:https://demo.ckan.org/dataset/x#top", "dataset URL"),
        ("ckan:https://demo.ckan.org/dataset/a b", "dataset URL"),
        ("ckan:https://demo.ckan.org:99999/dataset/x", "dataset URL"),
        ("ckan:https://[zz]/dataset/x", "dataset URL"),
    ],
)
def test_parse_says_the_expected_form(repo: str, says: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(repo)
    assert says in str(caught.value)
    assert caught.value.args[0].split(":")[0] in PROVIDER_SCHEMES


# resolve and download, each provider


def test_zenodo_record_resolves_and_downloads(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    settings = settings_for(standin)
    record = resolve("zenodo:10.5281/zenodo.123", settings)
    assert (record.provider, record.id, record.version) == (
        "zenodo",
        "10.5281/zenodo.123",
        "123",
    )
    assert record.landing_url == f"{standin.url}/records/123"
    assert [(f.path, f.size) for f in record.files] == [("environment.yml", 22), ("index.ipynb", 2)]
    assert record.files[0].checksum == ("md5", hashlib.md5(b"dependencies: [numpy]\n").hexdigest())
    lines: list[str] = []
    download(record, tmp_path / "dl", settings, lines.append)
    assert files_under(tmp_path / "dl") == {
        "environment.yml": b"dependencies: [numpy]\n",
        "index.ipynb": b"{}",
    }
    assert lines == ["Fetched environment.yml (22 bytes)", "Fetched index.ipynb (2 bytes)"]
    assert stat.S_IMODE((tmp_path / "dl").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "dl" / "index.ipynb").stat().st_mode) == 0o644


def test_a_zenodo_concept_doi_is_its_latest_version(standin: Standin) -> None:
    fill(standin)
    record = resolve("zenodo:10.5281/zenodo.100", settings_for(standin))
    assert (record.id, record.version) == ("10.5281/zenodo.100", "123")


def test_figshare_versions(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    settings = settings_for(standin)
    latest = resolve("figshare:10.6084/m9.figshare.9782777", settings)
    first = resolve("figshare:10.6084/m9.figshare.9782777.v1", settings)
    assert latest.version == "9782777.v2"
    assert first.version == "9782777.v1"
    assert [f.path for f in latest.files] == ["data.csv", "requirements.txt"]
    assert latest.fingerprint() != first.fingerprint()
    download(first, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path / "dl") == {"data.csv": b"a,b\n1,2\n"}


def test_dataverse_through_the_doi_resolver(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    settings = settings_for(standin)
    record = resolve(f"dataverse:{DV_DOI}", settings)
    assert (record.version, record.id) == ("2.1", DV_DOI)
    assert [f.path for f in record.files] == ["README.md", "code/src/run.py"]
    assert all(f.url.endswith("?format=original") for f in record.files)
    lines: list[str] = []
    download(record, tmp_path / "dl", settings, lines.append)
    assert files_under(tmp_path / "dl") == {
        "README.md": b"# hi\n",
        "code/src/run.py": b"print(1)\n",
    }
    assert stat.S_IMODE((tmp_path / "dl" / "code" / "src").stat().st_mode) == 0o755
    # Path and size only: never the query of a (possibly signed) download URL.
    assert not any("?" in line or "format" in line for line in lines)


def test_dataverse_download_follows_a_checked_redirect_to_storage(
    standin: Standin, tmp_path: Path
) -> None:
    fill(standin)
    number = file_id("dataverse", DV_DOI, None, "README.md")
    standin.redirects[f"/api/access/datafile/{number}"] = f"{standin.url}/storage/abc?sig=1"
    standin.blobs["/storage/abc"] = b"# hi\n"
    settings = settings_for(standin)
    download(resolve(f"dataverse:{DV_DOI}", settings), tmp_path / "dl", settings, print)
    assert (tmp_path / "dl" / "README.md").read_bytes() == b"# hi\n"
    assert "/storage/abc?sig=1" in standin.requests


def test_hydroshare_bag_resolves_downloads_and_unpacks(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    settings = settings_for(standin)
    record = resolve(f"hydroshare:{HS_ID}", settings)
    assert record.version == "2024-03-01T12:00:00.123456Z"
    assert record.landing_url == f"{standin.url}/resource/{HS_ID}/"
    assert [(f.path, f.size, f.checksum) for f in record.files] == [(f"{HS_ID}.zip", None, None)]
    download(record, tmp_path / "dl", settings, lambda line: None)
    result = unpack(tmp_path / "dl", tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work") == {"requirements.txt": b"xarray\n", "nb/a.ipynb": b"{}"}


def test_hydroshare_bag_not_ready_is_said(standin: Standin, tmp_path: Path) -> None:
    standin.hydroshare[HS_ID] = ("2024-01-01", b'{"bag_status": "Not ready"}')
    settings = settings_for(standin)
    record = resolve(f"hydroshare:{HS_ID}", settings)
    with pytest.raises(RecordError, match=r"still preparing"):
        download(record, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path / "dl") == {}


def test_ckan_dataset_and_activity(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    old = CkanDataset([StandinFile("table.csv", b"x\n0\n")], modified="2023-01-01T00:00:00")
    standin.ckan_activities["act-1"] = ("sample-data", old)
    standin.ckan_activities["act-2"] = ("other-data", old)
    settings = settings_for(standin)
    dataset = f"{standin.url}/ckan/dataset/sample-data"
    record = resolve(f"ckan:{dataset}", settings)
    assert (record.version, record.landing_url) == ("2024-05-01T10:00:00.000000", dataset)
    assert [(f.path, f.size) for f in record.files] == [("table.csv", 4)]
    then = resolve(f"ckan:{dataset}?activity_id=act-1", settings)
    assert then.version == "act-1"
    assert then.fingerprint() != record.fingerprint()
    download(then, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path / "dl") == {"table.csv": b"x\n0\n"}
    with pytest.raises(RecordError, match=r"not an activity of the dataset sample-data"):
        resolve(f"ckan:{dataset}?activity_id=act-2", settings)


def test_ckan_leaves_out_resources_it_may_not_fetch(standin: Standin) -> None:
    standin.ckan["mixed"] = CkanDataset(
        [
            StandinFile("ok.csv", b"1"),
            StandinFile("f.csv", b"2", url="file:///etc/passwd"),
            StandinFile("ftp.csv", b"3", url="ftp://example.org/x.csv"),
            StandinFile("nx.csv", b"4", url="https://no-such-host.invalid/nx.csv"),
        ]
    )
    record = resolve(f"ckan:{standin.url}/ckan/dataset/mixed", settings_for(standin))
    assert [f.path for f in record.files] == ["ok.csv"]


def test_fingerprint_is_stable_and_follows_the_metadata(standin: Standin) -> None:
    fill(standin)
    settings = settings_for(standin)
    specs = [
        "zenodo:10.5281/zenodo.123",
        "figshare:10.6084/m9.figshare.9782777.v2",
        f"dataverse:{DV_DOI}",
        f"hydroshare:{HS_ID}",
        f"ckan:{standin.url}/ckan/dataset/sample-data",
    ]
    before = {spec: resolve(spec, settings).fingerprint() for spec in specs}
    assert before == {spec: resolve(spec, settings).fingerprint() for spec in specs}
    assert all(len(f) == 40 and f == f.lower() and int(f, 16) >= 0 for f in before.values())
    assert len(set(before.values())) == len(specs)
    # One byte of each record's metadata changed.
    standin.zenodo[123][1].md5 = "0" * 31 + "1"
    standin.figshare[9782777][2][1].size = 8
    standin.dataverse[DV_DOI].files[1].folder = "code/srd"
    standin.hydroshare[HS_ID] = ("2024-03-01T12:00:00.123457Z", standin.hydroshare[HS_ID][1])
    standin.ckan["sample-data"].modified = "2024-05-01T10:00:00.000001"
    after = {spec: resolve(spec, settings).fingerprint() for spec in specs}
    assert all(before[spec] != after[spec] for spec in specs)


def test_fingerprint_ignores_download_urls() -> None:
    files = (RemoteFile("a", "https://x/a?sig=1", 1, None),)
    signed = Record("zenodo", "10.5281/zenodo.1", "1", "https://x", files)
    again = Record(
        "zenodo",
        "10.5281/zenodo.1",
        "1",
        "https://x",
        (RemoteFile("a", "https://x/a?sig=2", 1, None),),
    )
    assert signed.fingerprint() == again.fingerprint()


# Hostile records


def test_a_file_larger_than_declared_is_refused(standin: Standin, tmp_path: Path) -> None:
    standin.zenodo[5] = [
        StandinFile("ok.txt", b"fine"),
        StandinFile("big.bin", b"x" * 5000, size=10),
    ]
    settings = settings_for(standin)
    record = resolve("zenodo:10.5281/zenodo.5", settings)
    with pytest.raises(RecordError, match=r"big.bin is larger than its declared 10 bytes"):
        download(record, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path) == {"dl/ok.txt": b"fine"}


def test_a_file_smaller_than_declared_is_refused(standin: Standin, tmp_path: Path) -> None:
    standin.zenodo[5] = [StandinFile("short.bin", b"x" * 10, size=50)]
    settings = settings_for(standin)
    with pytest.raises(RecordError, match=r"short.bin is 10 bytes, not the declared 50"):
        download(resolve("zenodo:10.5281/zenodo.5", settings), tmp_path, settings, print)
    assert files_under(tmp_path) == {}


@pytest.mark.parametrize("provider", ["zenodo", "figshare", "dataverse", "ckan"])
def test_a_wrong_checksum_is_refused(standin: Standin, tmp_path: Path, provider: str) -> None:
    bad = [StandinFile("data.bin", b"payload", md5="0" * 32)]
    standin.zenodo[5] = bad
    standin.figshare[5] = {1: bad}
    standin.dois["10.1234/BAD"] = f"{standin.url}/dataset.xhtml?persistentId=doi:10.1234/BAD"
    standin.dataverse["10.1234/BAD"] = DataverseDataset(bad)
    standin.ckan["bad"] = CkanDataset(bad)
    spec = {
        "zenodo": "zenodo:10.5281/zenodo.5",
        "figshare": "figshare:10.6084/m9.figshare.5",
        "dataverse": "dataverse:10.1234/BAD",
        "ckan": f"ckan:{standin.url}/ckan/dataset/bad",
    }[provider]
    settings = settings_for(standin)
    record = resolve(spec, settings)
    with pytest.raises(RecordError, match=r"data.bin does not match its md5 checksum"):
        download(record, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path) == {}


def test_undeclared_sizes_are_held_to_the_size_limit(standin: Standin, tmp_path: Path) -> None:
    standin.zenodo[5] = [
        StandinFile("a.bin", b"a" * 600, size=None, md5=None),
        StandinFile("b.bin", b"b" * 600, size=None, md5=None),
    ]
    settings = settings_for(standin, clone_size_limit=1000)
    record = resolve("zenodo:10.5281/zenodo.5", settings)
    with pytest.raises(RecordError, match=r"larger than this service's size limit"):
        download(record, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path) == {"dl/a.bin": b"a" * 600}


def test_declared_size_over_the_limit_is_refused_at_resolve(standin: Standin) -> None:
    standin.zenodo[5] = [StandinFile("a.bin", b"a", size=2000), StandinFile("b.bin", b"b")]
    with pytest.raises(RecordError, match=r"holds 2001 bytes, over the limit of 1000"):
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin, clone_size_limit=1000))


@pytest.mark.parametrize("provider", ["zenodo", "figshare", "dataverse", "ckan"])
def test_a_huge_file_list_is_refused(standin: Standin, provider: str) -> None:
    many = [StandinFile(f"f{i}.txt", b"") for i in range(1001)]
    standin.zenodo[5] = many
    standin.figshare[5] = {1: many}
    standin.dois["10.1234/MANY"] = f"{standin.url}/citation?persistentId=doi:10.1234/MANY"
    standin.dataverse["10.1234/MANY"] = DataverseDataset(many)
    standin.ckan["many"] = CkanDataset(many)
    spec = {
        "zenodo": "zenodo:10.5281/zenodo.5",
        "figshare": "figshare:10.6084/m9.figshare.5",
        "dataverse": "dataverse:10.1234/MANY",
        "ckan": f"ckan:{standin.url}/ckan/dataset/many",
    }[provider]
    with pytest.raises(RecordError, match=r"has 1001 (files|resources); at most 1000"):
        resolve(spec, settings_for(standin))


@pytest.mark.parametrize(
    "name", ["../evil.txt", "/etc/evil", "a/../../evil", "a\x00b", "a\nb", "a//b", "./a", ""]
)
def test_file_names_that_leave_the_folder_are_refused(standin: Standin, name: str) -> None:
    standin.zenodo[5] = [StandinFile(name, b"x")]
    with pytest.raises(RecordError, match=r"would leave its folder"):
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin))


@pytest.mark.parametrize("folder", ["../up", "/etc", "a/../..", "a\x01"])
def test_dataverse_folders_are_held_to_the_same_rules(standin: Standin, folder: str) -> None:
    standin.dois[DV_DOI] = f"{standin.url}/citation?persistentId=doi:{DV_DOI}"
    standin.dataverse[DV_DOI] = DataverseDataset([StandinFile("x.py", b"1", folder=folder)])
    with pytest.raises(RecordError, match=r"would leave its folder"):
        resolve(f"dataverse:{DV_DOI}", settings_for(standin))


def test_duplicate_and_clashing_paths_are_refused(standin: Standin) -> None:
    standin.dois[DV_DOI] = f"{standin.url}/citation?persistentId=doi:{DV_DOI}"
    standin.dataverse[DV_DOI] = DataverseDataset(
        [StandinFile("x.py", b"1", folder="a"), StandinFile("x.py", b"2", folder="a")]
    )
    settings = settings_for(standin)
    with pytest.raises(RecordError, match=r"lists the file 'a/x.py' twice"):
        resolve(f"dataverse:{DV_DOI}", settings)
    standin.dataverse[DV_DOI] = DataverseDataset(
        [StandinFile("a", b"1"), StandinFile("x.py", b"2", folder="a")]
    )
    with pytest.raises(RecordError, match=r"'a' both as a file and as a folder"):
        resolve(f"dataverse:{DV_DOI}", settings)


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"id": "123", "files": []}',
        b'{"id": 5, "files": {"enabled": true}}',
        b'{"id": 5, "files": [{"key": 1, "size": 1, "links": {"self": "x"}}]}',
        b'{"id": 5, "files": [{"key": "a", "size": -1, "links": {"self": "x"}}]}',
        b'{"id": 5, "files": [{"key": "a", "size": true, "links": {"self": "x"}}]}',
        b'{"id": 5, "files": [{"key": "a", "links": "x"}]}',
        b'{"id": 5, "files": [{"key": "a", "checksum": "md5:zz", "links": {"self": "x"}}]}',
        b'{"id": 5, "files": [null]}',
        b"[" * 100000,
        b"not json",
    ],
)
def test_answers_not_in_the_documented_shape_are_refused(standin: Standin, body: bytes) -> None:
    standin.raw["/api/records/5"] = (200, body)
    with pytest.raises(RecordError) as caught:
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin))
    assert "documents" in str(caught.value) or "did not answer JSON" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "body", "spec"),
    [
        ("/v2/articles/5", b'{"version": "1", "files": []}', "figshare:10.6084/m9.figshare.5"),
        ("/api/datasets/:persistentId", b'{"data": {"latestVersion": []}}', f"dataverse:{DV_DOI}"),
        (
            "/api/datasets/:persistentId",
            b'{"data": {"latestVersion": {"versionNumber": 1, "versionMinorNumber": 0, '
            b'"files": [{"dataFile": {"id": "7", "filename": "a"}}]}}}',
            f"dataverse:{DV_DOI}",
        ),
        (f"/hsapi/resource/{HS_ID}/sysmeta/", b'{"date_last_updated": 5}', f"hydroshare:{HS_ID}"),
        (
            f"/hsapi/resource/{HS_ID}/sysmeta/",
            b'{"date_last_updated": "two words"}',
            f"hydroshare:{HS_ID}",
        ),
        (
            "/ckan/api/3/action/package_show",
            b'{"success": true, "result": {"resources": 5}}',
            "ckan",
        ),
    ],
)
def test_each_provider_wraps_shape_errors(
    standin: Standin, path: str, body: bytes, spec: str
) -> None:
    standin.dois[DV_DOI] = f"{standin.url}/citation?persistentId=doi:{DV_DOI}"
    standin.raw[path] = (200, body)
    if spec == "ckan":
        spec = f"ckan:{standin.url}/ckan/dataset/x"
    with pytest.raises(RecordError, match=r"not in the form the provider documents"):
        resolve(spec, settings_for(standin))


def test_unknown_records_and_errors_are_said(standin: Standin) -> None:
    settings = settings_for(standin)
    with pytest.raises(RecordError, match=r"Zenodo has no public record 10.5281/zenodo.404"):
        resolve("zenodo:10.5281/zenodo.404", settings)
    with pytest.raises(RecordError, match=r"Figshare has no public article"):
        resolve("figshare:10.6084/m9.figshare.404", settings)
    with pytest.raises(RecordError, match=r"the DOI 10.1234/NONE is not registered"):
        resolve("dataverse:10.1234/NONE", settings)
    with pytest.raises(RecordError, match=r"HydroShare has no public resource"):
        resolve(f"hydroshare:{HS_ID}", settings)
    with pytest.raises(RecordError, match=r"has no public dataset nope"):
        resolve(f"ckan:{standin.url}/ckan/dataset/nope", settings)
    standin.raw["/api/records/9"] = (503, b"down")
    with pytest.raises(RecordError, match=r"answered 503"):
        resolve("zenodo:10.5281/zenodo.9", settings)


def test_a_record_with_no_files_is_refused(standin: Standin) -> None:
    standin.zenodo[5] = []
    with pytest.raises(RecordError, match=r"has no files that can be fetched"):
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin))


def test_an_oversized_json_answer_is_refused(standin: Standin) -> None:
    standin.raw["/api/records/5"] = (200, b'{"pad": "' + b"x" * (11 * 2**20) + b'"}')
    with pytest.raises(RecordError, match=r"answered more than 10485760 bytes"):
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin))


def test_a_slow_answer_times_out(standin: Standin) -> None:
    standin.delays["/api/records/5"] = 10
    with pytest.raises(RecordError, match=r"did not answer in time"):
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin, resolve_timeout=0.3))


def test_a_dataverse_doi_must_lead_to_a_configured_installation(standin: Standin) -> None:
    elsewhere = "http://127.0.0.2:9/citation?persistentId=doi:10.1234/X"
    standin.dois["10.1234/X"] = elsewhere
    with pytest.raises(RecordError, match=r"not a Dataverse installation this service fetches"):
        resolve("dataverse:10.1234/X", settings_for(standin))
    # The redirect was read, not followed; the answer did not pick the API's host either.
    assert standin.requests == ["/doi/10.1234/X"]
    standin.raw["/doi/10.1234/Y"] = (200, b"<html>")
    with pytest.raises(RecordError, match=r"did not redirect"):
        resolve("dataverse:10.1234/Y", settings_for(standin))


# Redirects and SSRF


@pytest.mark.parametrize(
    ("location", "says"),
    [
        ("/api/records/5", "redirects more than 5 times"),
        ("ftp://127.0.0.1/x", "ftp URLs are not fetched"),
        ("file:///etc/passwd", "file URLs are not fetched"),
        ("http://user:secret@127.0.0.1:1/x", "URLs with credentials are not fetched"),
        ("http://127.0.0.2:9/x", "cannot connect"),
    ],
)
def test_each_redirect_hop_is_checked(standin: Standin, location: str, says: str) -> None:
    standin.redirects["/api/records/5"] = location
    with pytest.raises(RecordError) as caught:
        resolve("zenodo:10.5281/zenodo.5", settings_for(standin))
    assert says in str(caught.value)
    assert "secret" not in str(caught.value)


def test_a_redirect_of_a_download_is_checked(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    settings = settings_for(standin)
    record = resolve("zenodo:10.5281/zenodo.123", settings)
    standin.redirects["/api/records/123/files/index.ipynb/content"] = "file:///etc/passwd"
    with pytest.raises(RecordError, match=r"file URLs are not fetched"):
        download(record, tmp_path / "dl", settings, lambda line: None)
    assert files_under(tmp_path / "dl") == {"environment.yml": b"dependencies: [numpy]\n"}


def test_production_rules_refuse_every_stand_in_url_before_connecting(standin: Standin) -> None:
    fill(standin)
    settings = settings_for(standin, allow_local_repos=False)
    for spec in [
        "zenodo:10.5281/zenodo.123",
        "figshare:10.6084/m9.figshare.9782777",
        f"dataverse:{DV_DOI}",
        f"hydroshare:{HS_ID}",
        f"ckan:{standin.url}/ckan/dataset/sample-data",
    ]:
        with pytest.raises(RecordError, match=r"URLs are not fetched"):
            resolve(spec, settings)
    assert (standin.connections, standin.requests) == (0, [])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]"])
def test_a_non_public_address_is_refused_at_connect_time(standin: Standin, host: str) -> None:
    """https passes the scheme rule, so the refusal is the connection's own: the stand-in's
    port on loopback is never reached."""
    port = standin.url.rsplit(":", 1)[1]
    settings = settings_for(standin, allow_local_repos=False)
    with (
        safe_http.client(settings) as http,
        pytest.raises(safe_http.UnsafeURL, match=r"is not a public address"),
    ):
        safe_http.get_json(http, f"https://{host}:{port}/api/records/123")
    assert standin.connections == 0


def test_a_download_under_production_rules_never_connects(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    record = resolve("zenodo:10.5281/zenodo.123", settings_for(standin))
    seen = standin.connections
    with pytest.raises(RecordError, match=r"not fetched"):
        download(record, tmp_path / "dl", settings_for(standin, allow_local_repos=False), print)
    https = Record(
        record.provider,
        record.id,
        record.version,
        record.landing_url,
        tuple(
            RemoteFile(f.path, f.url.replace("http://", "https://"), f.size, f.checksum)
            for f in record.files
        ),
    )
    with pytest.raises(RecordError, match=r"not a public address"):
        download(https, tmp_path / "dl2", settings_for(standin, allow_local_repos=False), print)
    assert standin.connections == seen


def test_hop_rules_refuse_a_downgrade_to_http_in_production() -> None:
    production = Settings(database_url="sqlite://", allow_local_repos=False)
    safe_http.check_url("https://zenodo.org/api/records/1", production)
    with pytest.raises(safe_http.UnsafeURL, match=r"only https"):
        safe_http.check_url("http://zenodo.org/api/records/1", production)
    local = Settings(database_url="sqlite://", allow_local_repos=True)
    safe_http.check_url("http://127.0.0.1/x", local)


def test_the_host_is_looked_up_once_and_its_address_used(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy (the real lookup answers): the name is resolved by the check only, and the
    connection goes to the address it returned, so no second answer can differ."""
    fill(standin)
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def spy(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    port = standin.url.rsplit(":", 1)[1]
    with safe_http.client(settings_for(standin)) as http:
        body = safe_http.get_json(http, f"http://localhost:{port}/api/records/123")
    assert isinstance(body, dict) and body["id"] == 123
    assert looked_up.count("localhost") == 1
    assert set(looked_up) <= {"localhost", "127.0.0.1", "::1"}


def test_no_credentials_proxy_or_netrc_from_the_environment(
    standin: Standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login me password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # dead: taking it would fail
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:1")
    fill(standin)
    settings = settings_for(standin)
    download(resolve("zenodo:10.5281/zenodo.123", settings), tmp_path / "dl", settings, print)
    assert standin.headers
    for headers in standin.headers:
        assert headers["user-agent"] == "hublaunch"
        assert not {"authorization", "cookie", "proxy-authorization"} & set(headers)


# download(): the folder is the only place written


def test_download_never_writes_through_a_link(standin: Standin, tmp_path: Path) -> None:
    fill(standin)
    settings = settings_for(standin)
    record = resolve(f"dataverse:{DV_DOI}", settings)
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / "code").symlink_to(outside)
    (folder / "README.md").symlink_to(outside / "README.md")
    with pytest.raises(RecordError, match=r"already holds 'README.md'"):
        download(record, folder, settings, print)
    (folder / "README.md").unlink()
    with pytest.raises(RecordError, match=r"cannot make the folder of 'code/src/run.py'"):
        download(record, folder, settings, print)
    assert list(outside.iterdir()) == []


def test_download_refuses_paths_of_a_hand_made_record(standin: Standin, tmp_path: Path) -> None:
    record = Record("zenodo", "x", "1", "x", (RemoteFile("../evil", f"{standin.url}/x", 1, None),))
    with pytest.raises(RecordError, match=r"would leave its folder"):
        download(record, tmp_path / "dl", settings_for(standin), print)
    assert not (tmp_path / "evil").exists()
    assert standin.connections == 0


# UNPACK_SCRIPT, as the box runs it


def unpack(source: Path, destination: Path, limit: int = 2**20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-c", UNPACK_SCRIPT, str(source), str(destination), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def downloaded(tmp_path: Path, files: dict[str, bytes]) -> Path:
    source = tmp_path / "dl"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    return source


def test_unpack_copies_several_files(tmp_path: Path) -> None:
    files = {"a.txt": b"a", "sub/b.txt": b"b", "bundle.zip": make_zip({"x": b"x"})}
    result = unpack(downloaded(tmp_path, files), tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work") == files


def test_unpack_extracts_a_single_zip(tmp_path: Path) -> None:
    archive = make_zip({"postBuild": b"#!/bin/sh\n", "b/c.txt": b"c"}, executable=("postBuild",))
    result = unpack(downloaded(tmp_path, {"record.zip": archive}), tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work") == {"postBuild": b"#!/bin/sh\n", "b/c.txt": b"c"}
    assert stat.S_IMODE((tmp_path / "work" / "postBuild").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "work" / "b" / "c.txt").stat().st_mode) == 0o644


def test_unpack_moves_a_single_top_folder_up(tmp_path: Path) -> None:
    archive = make_zip({"repo-main/": b"", "repo-main/a.txt": b"a", "__MACOSX/._a.txt": b""})
    result = unpack(downloaded(tmp_path, {"Record.ZIP": archive}), tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work") == {"a.txt": b"a"}


def test_unpack_keeps_a_top_level_file_in_place(tmp_path: Path) -> None:
    archive = make_zip({"only.txt": b"o"})
    result = unpack(downloaded(tmp_path, {"r.zip": archive}), tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work") == {"only.txt": b"o"}


def test_unpack_takes_a_hydroshare_bags_contents(tmp_path: Path) -> None:
    archive = bag_zip(HS_ID, {"environment.yml": b"e", "data/x.csv": b"1"})
    result = unpack(downloaded(tmp_path, {f"{HS_ID}.zip": archive}), tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work") == {"environment.yml": b"e", "data/x.csv": b"1"}


@pytest.mark.parametrize(
    ("archive", "says"),
    [
        (make_zip({"ok.txt": b"1", "../evil.txt": b"x"}), "leads outside the folder"),
        (make_zip({"ok.txt": b"1", "a/../../evil.txt": b"x"}), "leads outside the folder"),
        (make_zip({"ok.txt": b"1", "/tmp/evil.txt": b"x"}), "is an absolute path"),
        (make_zip({"ok.txt": b"1", "C:/evil.txt": b"x"}), "is an absolute path"),
        (make_zip({"ok.txt": b"1", "..\\evil.txt": b"x"}), "backslashes"),
        (make_zip({"ok.txt": b"1"}, links={"link": "/etc/passwd"}), "is a symbolic link"),
        (b"PK\x03\x04 not really a zip", "unpack failed"),
    ],
)
def test_unpack_refuses_hostile_zips(tmp_path: Path, archive: bytes, says: str) -> None:
    result = unpack(downloaded(tmp_path, {"r.zip": archive}), tmp_path / "work")
    assert result.returncode != 0
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # Checked before the first byte: nothing written, inside or out.
    assert files_under(tmp_path / "work") == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "work"]


def test_unpack_refuses_a_duplicate_entry(tmp_path: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", b"1")
        with pytest.warns(UserWarning):
            archive.writestr("a.txt", b"2")
    result = unpack(downloaded(tmp_path, {"r.zip": buffer.getvalue()}), tmp_path / "work")
    assert result.returncode != 0 and "appears twice" in result.stderr


def test_unpack_stops_a_zip_bomb_at_the_limit(tmp_path: Path) -> None:
    archive = bomb_zip(32 * 2**20)
    assert len(archive) < 2**17
    result = unpack(downloaded(tmp_path, {"bomb.zip": archive}), tmp_path / "work", limit=2**20)
    assert result.returncode != 0
    assert "larger than the limit of 1048576 bytes" in result.stderr
    written = sum(len(data) for data in files_under(tmp_path / "work").values())
    assert written <= 2**20


def test_unpack_holds_copies_to_the_limit(tmp_path: Path) -> None:
    source = downloaded(tmp_path, {"a.bin": b"a" * 600, "b.bin": b"b" * 600})
    result = unpack(source, tmp_path / "work", limit=1000)
    assert result.returncode != 0 and "larger than the limit of 1000 bytes" in result.stderr


def test_unpack_refuses_links_in_the_download(tmp_path: Path) -> None:
    source = downloaded(tmp_path, {"a.txt": b"a"})
    os.symlink("/etc/passwd", source / "passwd")
    result = unpack(source, tmp_path / "work")
    assert result.returncode != 0 and "'passwd' is not a file or a folder" in result.stderr


def test_a_download_past_the_builds_deadline_stops_and_leaves_nothing(
    standin: Standin, tmp_path: Path
) -> None:
    """A server that drips bytes slowly holds no worker past the build's deadline: the
    download stops at the first chunk read after it, and the partial file is removed."""
    fill(standin)
    settings = settings_for(standin)
    record = resolve("zenodo:10.5281/zenodo.123", settings)
    folder = tmp_path / "dl"
    with pytest.raises(RecordError, match="took longer than the build may"):
        download(record, folder, settings, print, ends=time.monotonic() - 1)
    assert list(folder.iterdir()) == []
