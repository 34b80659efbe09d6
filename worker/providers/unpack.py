"""Copy a downloaded record into a work folder, or unpack it when it is a single zip.

Run INSIDE the build's box as its unprivileged uid, never by the worker (the zip is the
visitor's): ``python -I -c "$UNPACK_SCRIPT" <download folder> <destination> <byte limit>``.
Standard library only, Python 3.9 and later. The source is shipped as text
(``worker.providers.UNPACK_SCRIPT``); nothing imports this module.

A record that is one ``.zip`` (repo2docker's rule for Zenodo, Figshare and Dataverse bundles)
is extracted; if the zip holds one top-level folder, its contents are moved up, and for a
HydroShare bag (``<id>/bagit.txt``) only ``<id>/data/contents/`` is kept. Every entry's name
and type is checked before the first byte is written: absolute names, '..' segments, control
characters, links and device files are refused. Bytes are counted as they are written (headers
are not trusted) and held to the limit. Any refusal exits 1 with one line on stderr.
"""

from __future__ import annotations

import os
import stat
import sys
import zipfile
import zlib
from typing import IO

CHUNK = 1 << 20
MAX_ENTRIES = 100_000
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
BAG_CONTENTS = ["data", "contents"]
# Finder's resource forks, beside the real top folder in zips made on a Mac.
IGNORED_TOP = "__MACOSX"


class Refused(Exception):
    pass


class Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit
        self.entries = 0

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise Refused(f"the files are larger than the limit of {self.limit} bytes")

    def entry(self) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise Refused(f"more than {MAX_ENTRIES} files and folders")


def checked_parts(name: str) -> list[str]:
    """The segments of a relative name that stays inside the destination, or Refused."""
    shown = repr(name[:100])
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or "\\" in name:
        raise Refused(f"the name {shown} holds control characters or backslashes")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise Refused(f"the name {shown} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"the name {shown} leads outside the folder ('..')")
    return parts


def open_parent(root: int, parts: list[str]) -> int:
    """A descriptor of the folder the last of ``parts`` goes in, made as needed, never
    through a link."""
    fd = os.dup(root)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            child = os.open(part, OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            if made:
                os.fchmod(fd, 0o755)  # whatever the umask
    except OSError:
        os.close(fd)
        raise
    return fd


def write(root: int, parts: list[str], source: IO[bytes], mode: int, budget: Budget) -> None:
    parent = open_parent(root, parts)
    try:
        try:
            fd = os.open(parts[-1], OPEN_NEW, mode, dir_fd=parent)
        except FileExistsError:
            raise Refused(f"{'/'.join(parts)!r} appears twice") from None
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, mode)
            while True:
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                budget.spend(len(chunk))
                out.write(chunk)
    finally:
        os.close(parent)


def make_folder(root: int, parts: list[str]) -> None:
    os.close(open_parent(root, [*parts, ""]))


def listing(source: str) -> list[str]:
    """Relative names of the regular files under ``source``; a link or a special file is
    refused (the worker wrote only regular files)."""
    found: list[str] = []
    for folder, dirs, files in os.walk(source):
        for name in dirs + files:
            path = os.path.join(folder, name)
            kind = os.lstat(path).st_mode
            if stat.S_ISLNK(kind) or not (stat.S_ISDIR(kind) or stat.S_ISREG(kind)):
                raise Refused(f"{os.path.relpath(path, source)!r} is not a file or a folder")
            if stat.S_ISREG(kind):
                found.append(os.path.relpath(path, source))
    return sorted(found)


def copy(source: str, names: list[str], root: int, budget: Budget) -> None:
    for name in names:
        budget.entry()
        fd = os.open(os.path.join(source, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as data:
            write(root, checked_parts(name), data, 0o644, budget)


Entry = tuple[list[str], zipfile.ZipInfo, bool]  # segments, entry, is a folder


def entries(archive: zipfile.ZipFile) -> list[Entry]:
    """Every entry's segments, all checked before anything is written."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise Refused(f"the zip holds more than {MAX_ENTRIES} entries")
    found: list[Entry] = []
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise Refused(f"the zip entry {info.filename[:100]!r} is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise Refused(f"the zip entry {info.filename[:100]!r} is not a file or a folder")
        parts = checked_parts(info.filename)
        if parts and parts[0] != IGNORED_TOP:
            found.append((parts, info, info.is_dir() or kind == stat.S_IFDIR))
    return found


def strip_prefix(found: list[Entry]) -> list[str]:
    """The folder whose contents are moved up: the single top-level folder, or a HydroShare
    bag's data/contents; [] when the zip has several top-level names."""
    tops = {parts[0] for parts, _, _ in found}
    if len(tops) != 1:
        return []
    top = tops.pop()
    if any(parts == [top] and not folder for parts, _, folder in found):
        return []  # one top-level file, not a folder
    names = {tuple(parts) for parts, _, _ in found}
    bag = [top, *BAG_CONTENTS]
    if (top, "bagit.txt") in names and any(parts[:3] == bag for parts, _, _ in found):
        return bag
    return [top]


def extract(path: str, root: int, budget: Budget) -> None:
    with zipfile.ZipFile(path) as archive:
        found = entries(archive)
        prefix = strip_prefix(found)
        for parts, info, folder in found:
            if parts[: len(prefix)] != prefix or len(parts) == len(prefix):
                continue  # a bag's metadata, or the top folder itself
            inside = parts[len(prefix) :]
            budget.entry()
            if folder:
                make_folder(root, inside)
                continue
            # Owner-executable entries stay executable (postBuild, start); nothing else.
            mode = 0o755 if (info.external_attr >> 16) & 0o100 else 0o644
            with archive.open(info) as data:
                write(root, inside, data, mode, budget)


def main(argv: list[str]) -> None:
    if len(argv) != 3 or not argv[2].isdigit():
        raise Refused("usage: <download folder> <destination folder> <byte limit>")
    source, destination, limit = argv[0], argv[1], int(argv[2])
    os.makedirs(destination, mode=0o755, exist_ok=True)
    root = os.open(destination, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        budget = Budget(limit)
        names = listing(source)
        if not names:
            raise Refused("the download folder holds no files")
        if len(names) == 1 and names[0].lower().endswith(".zip"):
            extract(os.path.join(source, names[0]), root, budget)
        else:
            copy(source, names, root, budget)
    finally:
        os.close(root)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Refused as e:
        sys.exit(f"unpack refused: {e}")
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as e:
        sys.exit(f"unpack failed: {type(e).__name__}: {e}".replace("\n", " ")[:500])
    except (RuntimeError, NotImplementedError, ValueError) as e:
        # zipfile: encrypted entries, unsupported compression, broken headers.
        sys.exit(f"unpack failed: {e}".replace("\n", " ")[:500])
