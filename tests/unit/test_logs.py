"""Log lines (worker/logs.py): one JSON object per line, the launch (and Hub user) on every line
about one, bound per task, request and thread; and never a token, in either format."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

import hub.redact
from api.logs import uvicorn_log_config
from api.main import create_app
from tests.fakes import RecordingBroker
from worker import celery_app
from worker.broker import BUILD_TASK, LAUNCH_TASK
from worker.logs import (
    JsonFormatter,
    LogFormat,
    TextFormatter,
    bind_build,
    bind_launch,
    bind_user,
    configure,
    current,
    formatter,
    handler_filters,
)
from worker.settings import Settings


def a_token() -> str:
    return secrets.token_hex(16)  # the shape of a JupyterHub token


class Capture:
    """A logger of its own whose handler is set up as ``configure`` sets the root's."""

    def __init__(self, name: str, log_format: LogFormat = "json", process: str = "worker"):
        self.out = io.StringIO()
        handler = logging.StreamHandler(self.out)
        handler.setFormatter(formatter(log_format, process))
        for log_filter in handler_filters():
            handler.addFilter(log_filter)
        self.log = logging.getLogger(name)
        self.log.handlers, self.log.filters = [handler], []
        self.log.setLevel(logging.DEBUG)
        self.log.propagate = False

    @property
    def text(self) -> str:
        return self.out.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() changes the process's logging; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level, factory = root.handlers[:], root.level, logging.getLogRecordFactory()
    yield
    root.handlers, root.level = handlers, level
    logging.setLogRecordFactory(factory)
    hub.redact._factory_wrapped = False
    root.removeFilter(hub.redact._filter)
    logging.captureWarnings(False)


def test_a_json_line_is_one_object_with_the_launch_and_user_inside_a_bind_only() -> None:
    capture = Capture("test-logs-shape")
    capture.log.info("before")
    with bind_launch("L1", "hl-abc"):
        capture.log.info("step %d of %s", 2, "three")
        with bind_build("env-1"):
            capture.log.warning("building")
    capture.log.info("after")

    assert capture.text.count("\n") == 4
    before, inside, building, after = capture.lines()
    assert set(before) == {"ts", "level", "logger", "process", "msg"}
    assert before["logger"] == "test-logs-shape" and before["process"] == "worker"
    assert inside["msg"] == "step 2 of three" and inside["level"] == "INFO"
    assert inside["launch_id"] == "L1" and inside["hub_user"] == "hl-abc"
    assert building["env"] == "env-1" and building["launch_id"] == "L1"
    assert "launch_id" not in after and "hub_user" not in after and "env" not in after
    stamp = datetime.fromisoformat(inside["ts"].replace("Z", "+00:00"))
    assert inside["ts"].endswith("Z") and stamp.utcoffset() is not None
    assert current() == {}


def test_the_user_is_bound_once_known_and_only_within_the_launch() -> None:
    capture = Capture("test-logs-user")
    bind_user("hl-nobody")  # no launch bound: nothing to attach it to, nothing leaks
    with bind_launch("L2"):
        capture.log.info("queued")
        bind_user("hl-known")
        capture.log.info("launching")
    capture.log.info("done")
    queued, launching, done = capture.lines()
    assert queued["launch_id"] == "L2" and "hub_user" not in queued
    assert launching["hub_user"] == "hl-known"
    assert "hub_user" not in done and "launch_id" not in done


def test_a_thread_sees_only_what_is_bound_in_it() -> None:
    capture = Capture("test-logs-threads")
    seen: dict[str, dict[str, str]] = {}

    def unbound() -> None:
        seen["unbound"] = current()
        capture.log.info("in a thread")

    def bound() -> None:
        with bind_launch("L-thread", "hl-t"):
            seen["bound"] = current()
            capture.log.info("in a bound thread")
        seen["after"] = current()

    with bind_launch("L-main", "hl-m"):
        for target in (unbound, bound):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        seen["main"] = current()

    assert seen["unbound"] == {}
    assert seen["bound"] == {"launch_id": "L-thread", "hub_user": "hl-t"}
    assert seen["after"] == {}
    assert seen["main"] == {"launch_id": "L-main", "hub_user": "hl-m"}
    unbound_line, bound_line = capture.lines()
    assert "launch_id" not in unbound_line and bound_line["launch_id"] == "L-thread"


SECRET_LINES = [
    "GET /user/hl-a/lab?token={t} (127.0.0.1)",
    "/hub/login?next=%2Fuser%2Fhl-a%2F%3Ftoken%3D{t}",
    "Authorization: token {t}",
    "Authorization: Bearer {t}",
    '{{"url": "/user/hl-a/", "token": "{t}"}}',
]


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize("line", SECRET_LINES)
def test_no_token_in_a_message_its_arguments_or_a_traceback(
    log_format: LogFormat, line: str
) -> None:
    capture = Capture(f"test-logs-secret-{log_format}", log_format)
    token = a_token()
    secret = line.format(t=token)
    with bind_launch("L3", "hl-s"):
        capture.log.info(secret)
        capture.log.info("opening %s", secret)
        capture.log.info("as an object: %s", {"detail": secret})
        try:
            raise RuntimeError(secret)
        except RuntimeError:
            capture.log.exception("failed")
    assert token not in capture.text
    assert "[secret]" in capture.text
    if log_format == "json":
        lines = capture.lines()
        assert len(lines) == 4
        assert "RuntimeError" in lines[3]["exc_info"] and "[secret]" in lines[3]["exc_info"]
        assert all(entry["launch_id"] == "L3" for entry in lines)
    else:
        assert "[launch=L3 user=hl-s]" in capture.text


def test_a_traceback_formatted_by_the_formatter_alone_is_redacted() -> None:
    """Without the filter (a handler someone else set up), the formatter still redacts."""
    token = a_token()
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "failed: %s", (f"?token={token}",), None
    )
    try:
        raise ValueError(f"Authorization: token {token}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    for fmt in (JsonFormatter("api"), TextFormatter()):
        record.exc_text = None
        assert token not in fmt.format(record)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_token_as_the_argument_of_token_equals_percent_s_never_shows(
    log_format: LogFormat, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """hub.redact once rewrote ``token=%s`` in the format string itself, so the argument no
    longer fitted and logging's own error report printed the arguments (the token) to stderr.
    It now leaves placeholders alone and masks the argument that follows a token prefix."""
    out = io.StringIO()
    configure(level="INFO", log_format=log_format, process="worker", stream=out)
    token = a_token()
    logging.getLogger("test-logs-unfit").info("open /user/hl-a/?token=%s", token)
    assert "open /user/hl-a/?token=[secret]" in out.getvalue()
    assert "arguments omitted" not in out.getvalue()
    assert out.getvalue().count("\n") == 1
    if log_format == "json":
        json.loads(out.getvalue())
    assert token not in out.getvalue() + capsys.readouterr().err


def test_a_text_line_names_the_launch_after_the_message() -> None:
    capture = Capture("test-logs-text", "text")
    capture.log.info("plain")
    with bind_launch("L4", "hl-x"):
        capture.log.info("about a launch")
    with bind_build("env-9"):
        capture.log.info("about a build")
    plain, launch, build = capture.text.splitlines()
    assert plain.endswith(" INFO test-logs-text: plain")
    assert launch.endswith("test-logs-text: about a launch [launch=L4 user=hl-x]")
    assert build.endswith("about a build [env=env-9]")


def test_configure_makes_the_root_write_json_lines_and_warnings_too(root_logging: None) -> None:
    out = io.StringIO()
    logging.basicConfig(format="%(message)s")  # what was set up before is replaced
    configure(level="INFO", log_format="json", process="api", stream=out)
    token = a_token()
    logging.getLogger("test-logs-root").info("open %s", f"/user/hl-a/?token={token}")
    import warnings

    warnings.warn("a warning", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(logging.getLogger().handlers) == 1
    assert lines[0]["process"] == "api" and lines[0]["msg"] == "open /user/hl-a/?token=[secret]"
    assert lines[1]["logger"] == "py.warnings" and "a warning" in lines[1]["msg"]
    assert token not in out.getvalue()


def test_uvicorn_access_lines_are_json_redacted_and_carry_the_launch() -> None:
    out = io.StringIO()
    config = uvicorn_log_config("json", process="api")
    config["handlers"]["access"]["stream"] = out
    loggers = {name: logging.getLogger(name) for name in config["loggers"]}
    saved = {name: (log.handlers[:], log.level, log.propagate) for name, log in loggers.items()}
    logging.config.dictConfig(config)
    token = a_token()
    try:
        with bind_launch("L5"):
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
    [line] = [json.loads(text) for text in out.getvalue().splitlines()]
    assert line["process"] == "api" and line["logger"] == "uvicorn.access"
    assert line["msg"] == '203.0.113.9:4711 - "GET /user/hl-gone/lab?token=[secret] HTTP/1.1" 404'
    assert line["launch_id"] == "L5"
    assert token not in out.getvalue()


def test_requests_about_a_launch_log_its_id(settings: Settings) -> None:
    capture = Capture("api.routes.launches", process="api")
    try:
        broker = RecordingBroker(settings.database_url)
        with TestClient(create_app(settings, broker=broker)) as client:
            launch_id = client.post("/api/launches", json={"image": "default"}).json()["id"]
            assert client.delete(f"/api/launches/{launch_id}").status_code == 202
            assert client.get(f"/api/launches/{launch_id}").status_code == 200
    finally:
        capture.log.handlers, capture.log.propagate = [], True
    accepted, ended = capture.lines()
    assert accepted["msg"].startswith(f"launch {launch_id} accepted")
    assert ended["msg"].startswith(f"launch {launch_id}: end requested")
    assert accepted["launch_id"] == ended["launch_id"] == launch_id
    assert current() == {}


class FakeTask:
    def __init__(self, name: str) -> None:
        self.name = name


def test_celery_lines_of_a_task_carry_its_launch_or_environment() -> None:
    capture = Capture("test-logs-celery")
    celery_app._bind_task(task_id="t1", task=FakeTask(LAUNCH_TASK), args=["L6"])
    capture.log.info("Task hublaunch.launch[t1] succeeded")
    celery_app._unbind_task(task_id="t1")
    celery_app._bind_task(task_id="t2", task=FakeTask(BUILD_TASK), args=("env-2",))
    capture.log.info("building")
    celery_app._unbind_task(task_id="t2")
    capture.log.info("idle")
    launch, build, idle = capture.lines()
    assert launch["launch_id"] == "L6" and build["env"] == "env-2"
    assert "launch_id" not in idle and "env" not in idle and current() == {}


def test_the_received_line_carries_the_launch_from_the_message_arguments() -> None:
    capture = Capture("test-logs-received")
    capture.log.addFilter(celery_app.ReceivedLaunch())
    for name, args in ((LAUNCH_TASK, "('L7',)"), ("hublaunch.cull", "()"), (LAUNCH_TASK, "<x>")):
        data = {"id": "t", "name": name, "args": args, "kwargs": "{}", "eta": None}
        capture.log.info("Task %(name)s[%(id)s] received", data, extra={"data": data})
    received, cull, garbled = capture.lines()
    assert received["launch_id"] == "L7" and received["msg"] == f"Task {LAUNCH_TASK}[t] received"
    assert "launch_id" not in cull and "launch_id" not in garbled


def test_each_removal_of_the_cleanup_pass_is_bound_in_its_own_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from worker import cull
    from worker.outcome import DONE

    seen: dict[str, dict[str, str]] = {}

    def teardown(_ctx: Any, launch_id: str, **_: Any) -> Any:
        seen[launch_id] = current()
        return DONE

    monkeypatch.setattr(cull, "teardown", teardown)
    claimed = [("expired", "hl-a", "L-a"), ("idle", "hl-b", "L-b")]
    with ThreadPoolExecutor(2) as pool:
        actions = list(pool.map(lambda c: cull._remove_launch_user(None, *c, {}), claimed))  # type: ignore[arg-type]
    assert [a.result for a in actions] == ["ended", "ended"]
    assert seen == {
        "L-a": {"launch_id": "L-a", "hub_user": "hl-a"},
        "L-b": {"launch_id": "L-b", "hub_user": "hl-b"},
    }


def test_what_celery_prints_from_a_signal_handler_is_a_json_line(tmp_path: Any) -> None:
    from hublaunch.cli import _say_as_json

    path = tmp_path / "worker.log"
    with path.open("w") as f:
        _say_as_json("worker: Warm shutdown (MainProcess)", f)
    [line] = path.read_text().splitlines()
    entry = json.loads(line)
    assert entry["msg"] == "worker: Warm shutdown (MainProcess)" and entry["process"] == "worker"
