"""No token in a log line: the filter (hub/redact.py), as the Hub, a session's server and the HTTP
app's uvicorn use it, each with real log records."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

import hub.redact
from api.logs import uvicorn_log_config
from hub.redact import RedactTokens, install, redact
from hublaunch.stack import free_port

REPO = Path(__file__).resolve().parents[2]


def a_token() -> str:
    return secrets.token_hex(16)  # the shape of a JupyterHub token


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ("GET /user/hl-a/lab?token={t} (127.0.0.1)", "GET /user/hl-a/lab?token=[secret] (127"),
        ("GET /user/hl-a/?x=1&token={t}&y=2", "?x=1&token=[secret]&y=2"),
        ("GET /hub/api/oauth2/token?access_token={t}", "access_token=[secret]"),
        ("/hub/login?next=%2Fuser%2Fhl-a%2F%3Ftoken%3D{t}", "%3Ftoken%3D[secret]"),
        ("Authorization: token {t}", "Authorization: token [secret]"),
        ("Authorization: Bearer {t}", "Authorization: Bearer [secret]"),
        ('{{"url": "/user/hl-a/", "token": "{t}"}}', '"token": "[secret]"'),
        ("403 GET /user/hl-a/?TOKEN={t}", "?TOKEN=[secret]"),
    ],
)
def test_token_patterns_are_redacted(line: str, kept: str) -> None:
    token = a_token()
    redacted = redact(line.format(t=token))
    assert token not in redacted
    assert kept in redacted


def test_words_after_token_are_not_taken_for_tokens() -> None:
    line = "Token stored in cookie may have expired; token verification failed"
    assert redact(line) == line


@pytest.fixture
def logging_state() -> Iterator[None]:
    """install() changes the process's logging; put it back for the other tests."""
    factory = logging.getLogRecordFactory()
    tornado_log = logging.getLogger("tornado")
    parent, propagate = tornado_log.parent, tornado_log.propagate
    yield
    logging.setLogRecordFactory(factory)
    hub.redact._factory_wrapped = False
    tornado_log.parent, tornado_log.propagate = parent, propagate


def stream_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    log = logging.getLogger(name)
    log.handlers = [logging.StreamHandler(out)]
    log.filters = []
    log.setLevel(logging.INFO)
    log.propagate = False
    return log, out


async def refused_request(token: str) -> None:
    """A real tornado server refusing a request that carries a token in its URL."""

    class Refuse(web.RequestHandler):
        def get(self) -> None:
            raise web.HTTPError(403, "not allowed")

    [sock] = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(web.Application([(r"/user/hl-a/", Refuse)]))
    server.add_sockets([sock])
    port = sock.getsockname()[1]
    response = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/user/hl-a/?token={token}", raise_error=False
    )
    assert response.code == 403
    server.stop()


def test_tornado_403_warnings_through_the_app_log_are_redacted(logging_state: None) -> None:
    # JupyterHub and jupyter_server re-parent tornado's loggers under the app's log, whose
    # handlers print tornado's "403 GET <uri with its query> (ip): ..." warnings.
    app_log, out = stream_logger("test-hub-app")
    tornado_log = logging.getLogger("tornado")
    tornado_log.parent, tornado_log.propagate = app_log, True
    install(app_log)

    first = a_token()
    asyncio.run(refused_request(first))
    # An app that reconfigures its logging replaces the handlers (and their filters).
    replaced = io.StringIO()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"out": {"class": "logging.StreamHandler", "stream": replaced}},
            "loggers": {"test-hub-app": {"handlers": ["out"], "propagate": False}},
        }
    )
    second = a_token()
    asyncio.run(refused_request(second))

    assert "403 GET /user/hl-a/?token=[secret] (127.0.0.1)" in out.getvalue()
    assert "403 GET /user/hl-a/?token=[secret] (127.0.0.1)" in replaced.getvalue()
    assert first not in out.getvalue() and second not in replaced.getvalue()


def test_args_keep_their_types_and_tracebacks_are_redacted(logging_state: None) -> None:
    log, out = stream_logger("test-redact-args")
    log.handlers[0].addFilter(RedactTokens())
    token = a_token()
    log.warning("%d %s: %s", 403, f"GET /x?token={token}", httpx.URL(f"https://h/?token={token}"))
    try:
        raise RuntimeError(f"cannot open https://h/user/hl-a/?token={token}")
    except RuntimeError:
        log.exception("failed")
    assert "403 GET /x?token=[secret]: https://h/?token=[secret]" in out.getvalue()
    assert "RuntimeError: cannot open https://h/user/hl-a/?token=[secret]" in out.getvalue()
    assert token not in out.getvalue()


def test_uvicorn_access_log_through_its_configured_handlers_is_redacted() -> None:
    out = io.StringIO()
    config = uvicorn_log_config()
    config["handlers"]["access"]["stream"] = out
    loggers = {name: logging.getLogger(name) for name in config["loggers"]}
    saved = {name: (log.handlers[:], log.level, log.propagate) for name, log in loggers.items()}
    logging.config.dictConfig(config)
    try:
        token = a_token()
        # The record uvicorn's access logger makes (uvicorn/protocols/http/h11_impl.py).
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d',
            "203.0.113.9:4711",
            "GET",
            f"/user/hl-gone/lab?token={token}",
            "1.1",
            404,
        )
    finally:
        for name, (handlers, level, propagate) in saved.items():
            loggers[name].handlers, loggers[name].level = handlers, level
            loggers[name].propagate = propagate
    assert 'GET /user/hl-gone/lab?token=[secret] HTTP/1.1" 404' in out.getvalue()
    assert token not in out.getvalue()


def test_a_session_server_loads_the_filter_as_an_extension(tmp_path: Path) -> None:
    """jupyter_server with the argument the spawner passes; tornado's warning for a missing
    file prints the request's whole URI, token included, unless the extension is loaded."""
    token, port = a_token(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    args = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--ServerApp.root_dir={tmp_path}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.jpserver_extensions=hub.redact=True",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    log_file = tmp_path / "server.log"
    with log_file.open("wb") as log:
        server = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api", timeout=1)
                break
            except httpx.HTTPError:
                assert server.poll() is None, log_file.read_text()
                assert time.monotonic() < deadline, "jupyter_server did not start"
                time.sleep(0.1)
        response = httpx.get(f"http://127.0.0.1:{port}/api/contents/missing?token={token}")
        assert response.status_code == 404
    finally:
        server.terminate()
        server.wait(30)
    text = log_file.read_text()
    assert "hub.redact | extension was successfully loaded" in text
    assert "404 GET /api/contents/missing?token=[secret] (127.0.0.1)" in text
    assert token not in text


def test_a_placeholder_after_token_is_formatted_then_redacted(
    logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Redacting the format string alone turned "token=%s" into "token=[secret]": the arguments
    # no longer fitted, and logging's error report printed them, the token too, to stderr.
    log, out = stream_logger("test-redact-placeholder")
    log.handlers[0].addFilter(RedactTokens())
    token = a_token()
    log.warning("open https://h/user/hl-a/?token=%s (%d)", token, 3)
    log.warning("named: token=%(t)s", {"t": token})
    printed = out.getvalue() + capsys.readouterr().err
    assert "open https://h/user/hl-a/?token=[secret] (3)" in out.getvalue()
    assert "named: token=[secret]" in out.getvalue()
    assert token not in printed and "Logging error" not in printed


def test_a_record_is_redacted_once_however_many_filters_it_meets(
    logging_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The record factory, the logger's filter and each handler's filter all see one record;
    # the patterns run once, and every handler still prints it redacted.
    log, out = stream_logger("test-redact-once")
    second = io.StringIO()
    log.handlers.append(logging.StreamHandler(second))
    for target in (log, *log.handlers):
        target.addFilter(RedactTokens())
    install(log)
    calls = []
    monkeypatch.setattr(hub.redact, "_secret_slots", lambda text: calls.append(text) or {0})
    token = a_token()
    log.warning("token=%s", token)
    log.warning("%s", f"GET /x?token={token}")  # no secret word in the format: the argument
    assert calls == ["token=%s"]
    for text in (out.getvalue(), second.getvalue()):
        assert text == "token=[secret]\nGET /x?token=[secret]\n"
