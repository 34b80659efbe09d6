"""Download a resolved record's files into a folder, worker-side.

Each file is created with O_EXCL|O_NOFOLLOW under a directory descriptor walked one segment at
a time (each opened O_NOFOLLOW), so no path, link or race can place a byte outside the folder.
The running total is held to clone_size_limit, each file to its declared size, and a declared
checksum must match; a file that fails is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import httpx

from worker import safe_http
from worker.providers.hydroshare import ZIP_MAGIC
from worker.providers.record import Record, RecordError, RemoteFile, safe_path
from worker.settings import Settings

OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def download(
    record: Record,
    folder: Path,
    settings: Settings,
    log: Callable[[str], None],
    *,
    ends: float | None = None,
) -> None:
    what = f"the {record.provider} record {record.id}"
    if len(record.files) > settings.record_files_limit:
        raise RecordError(
            f"{what} has {len(record.files)} files; at most {settings.record_files_limit} "
            "are fetched"
        )
    for remote in record.files:
        safe_path(remote.path, what)
    if not folder.exists():
        folder.mkdir(mode=0o755, parents=True)
        folder.chmod(0o755)  # whatever the umask
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    budget = settings.clone_size_limit
    try:
        with safe_http.client(settings) as http:
            for remote in record.files:
                written = _fetch(http, remote, root, budget, what, ends)
                if record.provider == "hydroshare":
                    _check_bag(root, remote.path)
                budget -= written
                log(f"Fetched {remote.path} ({written} bytes)")
    finally:
        os.close(root)


def _fetch(
    http: httpx.Client,
    remote: RemoteFile,
    root: int,
    budget: int,
    what: str,
    ends: float | None,
) -> int:
    parent = _parent(root, remote.path)
    name = remote.path.rsplit("/", 1)[-1]
    try:
        try:
            fd = os.open(name, OPEN_NEW, 0o644, dir_fd=parent)
        except FileExistsError as e:
            # Listed twice, or already there (a link too: O_EXCL never follows one).
            raise RecordError(f"the folder already holds {remote.path!r}; it is refused") from e
        except OSError as e:
            raise RecordError(f"cannot write {remote.path!r}: {e.strerror}") from e
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                written = _stream(http, remote, out, budget, what, ends)
        except BaseException:
            os.unlink(name, dir_fd=parent)  # no partial or refused file is left behind
            raise
        return written
    finally:
        os.close(parent)


def _stream(
    http: httpx.Client,
    remote: RemoteFile,
    out: BinaryIO,
    budget: int,
    what: str,
    ends: float | None,
) -> int:
    limit = budget if remote.size is None else min(remote.size, budget)
    algorithm = remote.checksum[0] if remote.checksum else None
    try:
        written, digest = safe_http.stream_to_file(
            http, remote.url, out, limit=limit, digest=algorithm, ends=ends
        )
    except safe_http.TooLarge as e:
        if remote.size is not None and remote.size <= budget:
            raise RecordError(
                f"{remote.path} is larger than its declared {remote.size} bytes; it is refused"
            ) from e
        raise RecordError(
            f"{what} is larger than this service's size limit: {remote.path} did not fit in "
            f"the {budget} bytes left"
        ) from e
    except safe_http.FetchError as e:
        raise RecordError(f"cannot fetch {remote.path}: {e}") from e
    if remote.size is not None and written != remote.size:
        raise RecordError(
            f"{remote.path} is {written} bytes, not the declared {remote.size}; it is refused"
        )
    if remote.checksum is not None and digest != remote.checksum[1]:
        raise RecordError(
            f"{remote.path} does not match its {remote.checksum[0]} checksum; it is refused"
        )
    return written


def _parent(root: int, path: str) -> int:
    """A descriptor of the folder ``path`` goes in, made (0755) as needed, never through a
    link."""
    fd = os.dup(root)
    for part in path.split("/")[:-1]:
        try:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            child = os.open(part, OPEN_DIR, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            raise RecordError(f"cannot make the folder of {path!r}: {e.strerror}") from e
        os.close(fd)
        fd = child
        if made:
            os.fchmod(fd, 0o755)
    return fd


def _check_bag(root: int, path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    try:
        head = os.read(fd, 4)
    finally:
        os.close(fd)
    if not head.startswith(ZIP_MAGIC):
        os.unlink(path, dir_fd=root)
        raise RecordError(
            "HydroShare is still preparing this resource's download; try again in a minute"
        )
