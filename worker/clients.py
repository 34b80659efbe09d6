"""Who asked for a launch, as the waiting line tells clients apart: a keyed digest of the
visitor's address (the one the rate limit counts, ``api.ratelimit.client_address``).

The address itself is never stored: the digest is an HMAC under a key derived from the
service's secret, so the database alone does not say who launched what, and a digest cannot
be turned back into an address by trying every IPv4 address without the key. One client keeps
one digest while the secret stays the same.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from worker.crypto import derived_key
from worker.models import CLIENT_LENGTH
from worker.settings import Settings


def digest(settings: Settings, address: str) -> str:
    return _digest(derived_key(settings, "client-digest"), address)


# Cached, and bounded (the addresses come from visitors): a client's launches usually come in
# runs, and an HMAC is a noticeable part of a launch's intake.
@functools.lru_cache(maxsize=4096)
def _digest(key: bytes, address: str) -> str:
    return hmac.new(key, address.encode(), hashlib.sha256).hexdigest()[:CLIENT_LENGTH]
