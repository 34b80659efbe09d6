"""Log lines of every process: one JSON object per line (or plain text for ``hublaunch dev``),
carrying the launch (and its Hub user) the line is about, so one grep tells a launch's story.

What a line is about lives in context variables: ``bind_launch`` (a task, a request, one removal
of the cleanup pass) and ``bind_build`` (a build, which many launches may wait for) set them
for the code they wrap, and ``LogContext``, a filter on the handlers, copies them onto each
record (``launch_id``, ``hub_user``, ``env``). A new thread starts with nothing bound: code
that works for a launch in a thread binds it there.

Tokens never reach a line: ``hub.redact``'s filter rewrites records before they are formatted,
and the formatters redact the text they produce once more (a message built from an object's
``repr``, an exception's text).

Imported by the API and the worker alike, so it imports neither's modules.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from hub.redact import RedactTokens, install, redact

LogFormat = Literal["json", "text"]
# Fields a record may carry about what it concerns, in the order a line shows them.
FIELDS = ("launch_id", "hub_user", "env")
LABELS = {"launch_id": "launch", "hub_user": "user", "env": "env"}  # in a text line

_launch: ContextVar[str | None] = ContextVar("hublaunch_launch_id", default=None)
_user: ContextVar[str | None] = ContextVar("hublaunch_hub_user", default=None)
_env: ContextVar[str | None] = ContextVar("hublaunch_env", default=None)


@contextmanager
def bind_launch(launch_id: str | None, user: str | None = None) -> Iterator[None]:
    """Lines logged inside are about this launch (and Hub user); what was bound before is
    restored on exit. ``launch_id`` None binds only the user (a Hub user with no launch)."""
    launch_token, user_token = _launch.set(launch_id), _user.set(user)
    try:
        yield
    finally:
        _user.reset(user_token)
        _launch.reset(launch_token)


def bind_user(name: str | None) -> None:
    """The Hub user of the launch already bound, once it is known; undone when that
    ``bind_launch`` exits. Does nothing when no launch is bound (it would outlive its use)."""
    if _launch.get() is not None and name:
        _user.set(name)


@contextmanager
def bind_build(env: str) -> Iterator[None]:
    """Lines logged inside are about this environment's build (field ``env``)."""
    token = _env.set(env)
    try:
        yield
    finally:
        _env.reset(token)


def current() -> dict[str, str]:
    """What is bound here: the fields a line logged now would carry."""
    values = {"launch_id": _launch.get(), "hub_user": _user.get(), "env": _env.get()}
    return {key: value for key, value in values.items() if value}


class LogContext(logging.Filter):
    """Copy what is bound onto each record; a field the record already has (``extra=``, or set
    by a logger's own filter) is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (("launch_id", _launch), ("hub_user", _user), ("env", _env)):
            if getattr(record, key, None) is None:
                setattr(record, key, value.get())
        return True


def _utc(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    """The record's message, redacted. A message whose arguments do not fit it (``hub.redact``
    rewrites ``token=%s`` in a format string, leaving an argument over) gives the format string
    alone: logging would otherwise print the arguments, the token, in its error report."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        message = f"{record.msg} [arguments omitted: they do not fit the message]"
    record.message = redact(message)
    return record.message


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601, UTC), level, logger, process, msg, then
    launch_id / hub_user / env when the line is about one, and exc_info / stack_info."""

    def __init__(self, process: str = "hublaunch") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "msg": _message(record),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value:
                entry[key] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack_info"] = redact(self.formatStack(record.stack_info))
        # Not ASCII-escaped: a line holds the message's own bytes, so a grep for its text (the
        # stack waits for "ready." and "beat: Starting...") finds it.
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> [launch=<id> user=<name>]``; the context only when
    the line is about a launch or a build. A traceback follows on the next lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        _message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        line = redact(self.formatMessage(record))
        context = [
            f"{label}={getattr(record, key)}"
            for key, label in LABELS.items()
            if getattr(record, key, None)
        ]
        if context:
            line = f"{line} [{' '.join(context)}]"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{redact(record.exc_text)}"
        if record.stack_info:
            line = f"{line}\n{redact(self.formatStack(record.stack_info))}"
        return line


def formatter(log_format: LogFormat, process: str) -> logging.Formatter:
    return JsonFormatter(process) if log_format == "json" else TextFormatter()


def handler_filters() -> list[logging.Filter]:
    """The filters every handler gets: tokens out first, then the launch's context in."""
    return [RedactTokens(), LogContext()]


def configure(
    *, level: str | int, log_format: LogFormat, process: str, stream: TextIO | None = None
) -> logging.Handler:
    """The root logger writes to ``stream`` (stderr) in ``log_format``; handlers set up before
    (a ``basicConfig``) are replaced. Python's warnings become log lines too, so a JSON log
    holds nothing but JSON."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(log_format, process))
    for log_filter in handler_filters():
        handler.addFilter(log_filter)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    install(root)  # every record this process makes is redacted as it is made
    return handler


def configured() -> bool:
    """Whether ``configure`` set up the root logger of this process."""
    return any(
        isinstance(h.formatter, JsonFormatter | TextFormatter) for h in logging.getLogger().handlers
    )
