"""The development key file: readable by its owner only, in a folder only its owner can list."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from worker.crypto import cipher
from worker.settings import Settings


@pytest.fixture
def open_umask() -> Iterator[None]:
    # The most permissive umask: the modes seen are the ones the code asks for.
    previous = os.umask(0)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_file_and_its_folder_are_the_owners_alone(tmp_path: Path, open_umask: None) -> None:
    key_file = tmp_path / "data" / "secret.key"
    settings = Settings(secret_key="", secret_key_file=key_file)

    token = cipher(settings).encrypt(b"hello")

    assert mode(key_file) == 0o600
    assert mode(key_file.parent) == 0o700
    # The key in the file is the one used, and every later reader gets the same.
    assert Fernet(key_file.read_bytes().strip()).decrypt(token) == b"hello"
    assert cipher(Settings(secret_key="", secret_key_file=key_file)).decrypt(token) == b"hello"
