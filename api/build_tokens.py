"""BinderHub's build tokens: a JWT (HS256) that lets one ``<provider>/<spec>`` be started on
/build until it expires.

A build token is no secret of a session: it opens no server and reads nothing. It says "this
request comes from this service's own launch page (or a tool its operator gave a token to)",
so an operator can refuse /build requests that other sites' pages or scripts make directly
(``require_build_token``). The launch page carries one for its own spec, as BinderHub's does.
"""

from __future__ import annotations

import time

import jwt

from worker.settings import Settings

ALGORITHM = "HS256"
# Claims BinderHub's tokens carry; "aud" names the one spec the token starts.
REQUIRED = ["exp", "aud"]


class BadBuildToken(Exception):
    """The token is missing where one is required, or does not hold (a 403, as BinderHub)."""


def issue(settings: Settings, provider_spec: str, *, now: float | None = None) -> str | None:
    """A token for ``provider_spec`` (``gh/org/repo/main``, as in the /build path); None when
    the service has no secret to sign with."""
    secret = settings.build_token_secret.get_secret_value()
    if not secret:
        return None
    issued = int(now if now is not None else time.time())
    claims = {"aud": provider_spec, "iat": issued, "exp": issued + settings.build_token_lifetime}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def check(settings: Settings, token: str | None, provider_spec: str) -> bool:
    """Whether a valid token came with this /build request; raises BadBuildToken when the token
    is bad, or missing where the settings require one. With no secret, tokens are not read."""
    secret = settings.build_token_secret.get_secret_value()
    if not secret:
        if settings.require_build_token:
            raise BadBuildToken("This service requires build tokens but cannot check them.")
        return False
    if not token:
        if settings.require_build_token:
            raise BadBuildToken(
                "A build token is required: start this launch from its launch page "
                f"(/v2/{provider_spec})."
            )
        return False
    try:
        jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=provider_spec,
            options={"require": REQUIRED},
        )
    except jwt.ExpiredSignatureError as e:
        raise BadBuildToken("The build token has expired; load the launch page again.") from e
    except jwt.InvalidAudienceError as e:
        raise BadBuildToken("The build token is for another launch.") from e
    except jwt.InvalidTokenError as e:
        raise BadBuildToken("The build token is not valid.") from e
    return True
