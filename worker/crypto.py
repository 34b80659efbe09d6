"""Encryption of tokens at rest (Fernet: AES-128-CBC + HMAC-SHA256), and keys for other uses
derived from the same secret."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from worker.settings import Settings

__all__ = ["InvalidToken", "cipher", "derived_key", "reveal"]

log = logging.getLogger(__name__)


@functools.cache
def _key_from_file(path: Path) -> bytes:
    # Development convenience: one key per data directory, readable by its owner only.
    # O_EXCL makes the first writer win when the API and a worker start at the same moment.
    # A folder made here is the owner's alone too (the database and logs live beside the key).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the winner may not have written the key yet
            if key := path.read_bytes().strip():
                return key
            time.sleep(0.01)
        raise RuntimeError(f"{path} is empty; delete it or set HUBLAUNCH_SECRET_KEY") from None
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


@functools.cache
def _cipher(key: bytes) -> Fernet:
    return Fernet(key)


def reveal(settings: Settings, ciphertext: str | None) -> str | None:
    """The plaintext of a stored token; None when there is none or the key cannot read it."""
    if not ciphertext:
        return None
    try:
        return cipher(settings).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        log.error("a stored token does not decrypt with the configured key")
        return None


def cipher(settings: Settings) -> Fernet:
    return _cipher(_secret(settings))


def derived_key(settings: Settings, purpose: str) -> bytes:
    """A key for ``purpose``, derived from the tokens' secret (HMAC-SHA256): one secret to
    configure, and no use can be turned into another's key."""
    return _derive(_secret(settings), purpose)


@functools.cache
def _derive(secret: bytes, purpose: str) -> bytes:
    return hmac.new(secret, b"hublaunch:" + purpose.encode(), hashlib.sha256).digest()


def _secret(settings: Settings) -> bytes:
    return _secret_of(settings.secret_key.get_secret_value(), settings.secret_key_file)


@functools.cache
def _secret_of(configured: str, path: Path) -> bytes:
    # Cached: the intake derives a client digest's key on every launch, and resolving the
    # key file's path is a few system calls each time.
    return configured.encode() if configured else _key_from_file(path.resolve())
