"""A resolved record, its files, and the checks every provider's answer goes through.

Everything in a provider's JSON is hostile: shapes are read with the ``as_*`` helpers (a wrong
shape is a RecordError, never a KeyError or TypeError), paths with ``safe_path``, and the whole
list with ``make_record`` (file count, declared size, duplicates).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from worker.settings import Settings

# Algorithms a record's checksum may name (hashlib names); others are not verified.
ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
HEX_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
MAX_PATH = 1024
MAX_SEGMENT = 255
VERSION_RE = re.compile(r"^[\x21-\x7e]{1,100}$")


class RecordError(Exception):
    """A record cannot be resolved or fetched; ``str(e)`` is the sentence for the visitor."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    url: str
    size: int | None
    checksum: tuple[str, str] | None  # (hashlib algorithm, lowercase hex)


@dataclass(frozen=True)
class Record:
    provider: str
    id: str
    version: str
    landing_url: str
    files: tuple[RemoteFile, ...]

    def fingerprint(self) -> str:
        """Stands in for a git commit: it changes whenever the record's content may have.
        URLs are left out (signed download URLs change on every answer)."""
        entries = sorted(
            (json.dumps([f.path, f.size, list(f.checksum) if f.checksum else None]))
            for f in self.files
        )
        text = json.dumps([self.provider, self.id, self.version, entries])
        return hashlib.sha256(text.encode()).hexdigest()[:40]


def shape_error(what: str) -> RecordError:
    return RecordError(f"{what} is not in the form the provider documents; it cannot be used")


def as_dict(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise shape_error(what)
    return value


def as_list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise shape_error(what)
    return value


def as_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise shape_error(what)
    return value


def as_int(value: object, what: str) -> int:
    # bool is an int to Python, never to a JSON schema.
    if isinstance(value, bool) or not isinstance(value, int):
        raise shape_error(what)
    return value


def opt_size(value: object, what: str) -> int | None:
    """A declared size: a non-negative integer, or absent (None); a digit string is read too
    (CKAN stores what the uploader typed)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    size = as_int(value, what)
    if size < 0:
        raise shape_error(what)
    return size


def checksum(algorithm: str, value: object, what: str) -> tuple[str, str] | None:
    """A (algorithm, hex) pair if ``value`` is hex of that algorithm's length, else None when
    empty; anything else is a shape error."""
    if value is None or value == "":
        return None
    text = as_str(value, what).strip().lower()
    algorithm = algorithm.lower().replace("-", "")
    if algorithm not in ALGORITHMS:
        return None
    if HEX_LENGTHS.get(len(text)) != algorithm or not re.fullmatch(r"[0-9a-f]+", text):
        raise shape_error(what)
    return algorithm, text


def safe_path(path: str, what: str) -> str:
    """A relative path that stays inside the folder: no leading '/', no '.' or '..' or empty
    segments, no NUL or control characters, within sane lengths."""
    bad = (
        not path
        or len(path) > MAX_PATH
        or path.startswith("/")
        or any(ord(c) < 32 or ord(c) == 127 for c in path)
        or any(s in ("", ".", "..") or len(s.encode()) > MAX_SEGMENT for s in path.split("/"))
    )
    if bad:
        shown = path[:100].encode("unicode_escape").decode()
        raise RecordError(
            f"{what} has a file path that would leave its folder or cannot be a file name "
            f"({shown!r}); the record is refused"
        )
    return path


def safe_version(version: str, what: str) -> str:
    if not VERSION_RE.match(version):
        raise shape_error(f"{what}'s version")
    return version


def make_record(
    provider: str,
    identifier: str,
    version: str,
    landing_url: str,
    files: list[RemoteFile],
    settings: Settings,
    what: str,
) -> Record:
    """The record, after the checks every provider shares."""
    if not files:
        raise RecordError(f"{what} has no files that can be fetched")
    if len(files) > settings.record_files_limit:
        raise RecordError(
            f"{what} has {len(files)} files; at most {settings.record_files_limit} are fetched"
        )
    declared = sum(f.size or 0 for f in files)
    if declared > settings.clone_size_limit:
        raise RecordError(
            f"{what} holds {declared} bytes, over the limit of {settings.clone_size_limit}"
        )
    seen: set[str] = set()
    folders: set[str] = set()
    for f in files:
        safe_path(f.path, what)
        if f.path in seen:
            raise RecordError(f"{what} lists the file {f.path!r} twice; the record is refused")
        seen.add(f.path)
        parts = f.path.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(seen & folders)
    if clash:
        raise RecordError(
            f"{what} has {clash[0]!r} both as a file and as a folder; the record is refused"
        )
    return Record(provider, identifier, safe_version(version, what), landing_url, tuple(files))
