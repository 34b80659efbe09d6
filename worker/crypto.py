"""Encryption of tokens at rest (Fernet: AES-128-CBC + HMAC-SHA256)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from worker.settings import Settings

__all__ = ["InvalidToken", "cipher"]


def _load_or_create_key(path: Path) -> bytes:
    # Development convenience: one key per data directory, readable by its owner only.
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


@functools.cache
def _cipher(key: bytes) -> Fernet:
    return Fernet(key)


def cipher(settings: Settings) -> Fernet:
    configured = settings.secret_key.get_secret_value()
    key = configured.encode() if configured else _load_or_create_key(settings.secret_key_file)
    return _cipher(key)
