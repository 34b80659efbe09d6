"""The HTTP app as uvicorn serves it, on 127.0.0.1 (a TestClient would skip uvicorn's proxy-headers
middleware and its logging): X-Forwarded-* count only from HUBLAUNCH_FORWARDED_ALLOW_IPS, and
the access log never shows a token. The trusted peer is 127.0.0.2, so requests from 127.0.0.1
are the untrusted ones and the same server shows both sides."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.fernet import Fernet
from fastapi import Request

from api.main import create_app
from hublaunch.cli import uvicorn_options
from hublaunch.stack import free_port
from worker.migrate import upgrade
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PROXY = "127.0.0.2"
FORGED = {
    "X-Forwarded-For": "198.51.100.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "evil.example",
}


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def from_address(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


@pytest.fixture
def uvicorn_loggers() -> Iterator[None]:
    """uvicorn.Config applies the log config to this process; put uvicorn's loggers back."""
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(log.handlers[:], log.level, log.propagate) for log in loggers]
    yield
    for log, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        log.handlers, log.level, log.propagate = handlers, level, propagate


def test_forwarded_headers_count_only_from_the_trusted_proxy(
    settings: Settings, uvicorn_loggers: None
) -> None:
    settings = settings.model_copy(update={"forwarded_allow_ips": PROXY})
    app = create_app(settings)

    @app.get("/probe")
    def probe(request: Request) -> dict[str, str | None]:
        client = request.client.host if request.client else None
        return {"scheme": request.url.scheme, "host": request.url.hostname, "client": client}

    port = free_port()
    # The options `hublaunch api` runs uvicorn with.
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(settings))
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn to start")
        url = f"http://127.0.0.1:{port}/probe"
        with from_address("127.0.0.1") as stranger, from_address(PROXY) as proxy:
            untrusted = stranger.get(url, headers=FORGED).json()
            trusted = proxy.get(url, headers=FORGED).json()
    finally:
        server.should_exit = True
        thread.join(10)

    assert untrusted == {"scheme": "http", "host": "127.0.0.1", "client": "127.0.0.1"}
    # The control: the same headers from the proxy do change what the app sees, except the
    # host, which nothing takes from X-Forwarded-Host.
    assert trusted == {"scheme": "https", "host": "127.0.0.1", "client": "198.51.100.7"}


@pytest.fixture(scope="module")
def cli_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`hublaunch api` in a subprocess, as the stack runs it; yields (its URL, its log file)."""
    tmp = tmp_path_factory.mktemp("cli-api")
    database_url = f"sqlite:///{tmp / 'app.sqlite'}"
    upgrade(database_url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBLAUNCH_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "HUBLAUNCH_DATABASE_URL": database_url,
            "HUBLAUNCH_SECRET_KEY": Fernet.generate_key().decode(),
            "HUBLAUNCH_BROKER_URL": "memory://",
            "HUBLAUNCH_HUB_API_URL": "http://127.0.0.1:1/hub/api",
            "HUBLAUNCH_FORWARDED_ALLOW_IPS": PROXY,
        }
    )
    log_file = tmp / "api.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hublaunch.cli", "api", "--port", str(port)],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, log_file.read_text()
        try:
            return httpx.get(f"{url}/api/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, "hublaunch api to answer")
        yield url, log_file
    finally:
        proc.terminate()
        proc.wait(10)


def logged(log_file: Path, text: str) -> str:
    """The message of the log line holding ``text``, once the server has written it (the
    server logs JSON lines, as `hublaunch api` does by default)."""

    def line() -> str | None:
        messages = (json.loads(li)["msg"] for li in log_file.read_text().splitlines())
        return next((message for message in messages if text in message), None)

    found: str = wait_for(line, f"a log line with {text!r}", timeout=10)
    return found


def test_the_access_log_shows_no_token(cli_api: tuple[str, Path]) -> None:
    url, log_file = cli_api
    first, second = secrets.token_hex(16), secrets.token_hex(16)
    # What a visitor's browser sends for a session that has ended (the proxy's default route).
    assert httpx.get(f"{url}/user/hl-gone/?token={first}").status_code == 404
    assert httpx.get(f"{url}/user/hl-gone/lab?x=1&token={second}&y=2").status_code == 404

    assert '"GET /user/hl-gone/?token=[secret] HTTP/1.1" 404' in logged(log_file, "/?token=")
    assert "/user/hl-gone/lab?x=1&token=[secret]&y=2 " in logged(log_file, "/lab?x=1")
    text = log_file.read_text()
    assert first not in text and second not in text


def test_the_access_log_takes_the_client_from_the_trusted_proxy_only(
    cli_api: tuple[str, Path],
) -> None:
    url, log_file = cli_api
    with from_address("127.0.0.1") as stranger, from_address(PROXY) as proxy:
        stranger.get(f"{url}/user/hl-stranger/", headers=FORGED)
        proxy.get(f"{url}/user/hl-proxied/", headers=FORGED)
    stranger_line = logged(log_file, "/user/hl-stranger/")
    # An access line's message starts with the client's address.
    assert stranger_line.startswith("127.0.0.1:") and "198.51.100.7" not in stranger_line
    assert logged(log_file, "/user/hl-proxied/").startswith("198.51.100.7:")
