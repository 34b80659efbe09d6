"""Keep tokens out of log lines: in the Hub, in each session's server and in hublaunch itself.

tornado logs a refused request with its whole URI ("403 GET /user/<name>/?token=<token> (ip)");
JupyterHub and jupyter_server scrub their own request logs, not those warnings. ``RedactTokens``
rewrites ``token=<value>`` (also URL-escaped, ``token%3D``), ``token <value>`` and
``bearer <value>`` (an Authorization header) and ``"token": "<value>"`` in a record's message,
arguments and traceback to ``[secret]``.

The Hub's config calls ``install(log)``; a session's server loads this module as a server
extension (``_load_jupyter_server_extension``). Standard library only: this runs in the Hub and
in sessions' environments, and imports nothing of hublaunch's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

MASK = "[secret]"
PATTERNS = [
    # Query parameters: token=, access_token=, and the escaped form inside a next= URL.
    re.compile(r"(?i)(token=)[^\s&#;,'\"]+"),
    re.compile(r"(?i)(token%3D)[^\s&#;,'\"%]+"),
    # Authorization: token <t> / Bearer <t>. Tokens are long; English words after "token" are not.
    re.compile(r"(?i)(\b(?:token|bearer)\s+)[\w.~+/=-]{16,}"),
    re.compile(r"(?i)(\"token\"\s*:\s*\")[^\"]+"),
]
_formatter = logging.Formatter()
# Every pattern needs one of these words. Most lines have neither, and a search for them is a
# tenth of running the patterns (measured: the patterns on every line of every process were a
# millisecond of each launch).
_MENTIONS = re.compile(r"(?i)token|bearer")


def redact(text: str) -> str:
    if not _MENTIONS.search(text):
        return text
    for pattern in PATTERNS:
        text = pattern.sub(rf"\g<1>{MASK}", text)
    return text


def _redact_arg(arg: Any) -> Any:
    if isinstance(arg, str):
        return redact(arg)
    if arg is None or isinstance(arg, int | float):
        return arg  # keeps %d and %f working
    text = str(arg)  # a URL object, an exception, a dict: compared as the line would show it
    redacted = redact(text)
    return arg if redacted == text else redacted


# Set on a record once it was redacted, so a record passing several filters is rewritten once.
REDACTED = "_tokens_redacted"


class RedactTokens(logging.Filter):
    """Rewrite tokens in the record (its message, arguments and traceback); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, REDACTED, False):
            return True  # the record factory, or another handler's filter, did it already
        setattr(record, REDACTED, True)
        secret_slots: set[int | str] = set()
        if isinstance(record.msg, str) and record.args:
            if _MENTIONS.search(record.msg):
                secret_slots = _secret_slots(record.msg)
                record.msg = _redact_format(record.msg)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        elif record.msg is not None and not isinstance(record.msg, int | float):
            record.msg = _redact_arg(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {
                key: MASK if key in secret_slots else _redact_arg(value)
                for key, value in record.args.items()
            }
        elif isinstance(record.args, tuple):
            record.args = tuple(
                MASK if index in secret_slots else _redact_arg(arg)
                for index, arg in enumerate(record.args)
            )
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is redacted once here.
            record.exc_text = redact(_formatter.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# A %-style placeholder of a format string (``%s``, ``%(name)s``, ``%5.1f``, ``%%``).
PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")


# What, right before a placeholder, says the argument is a token ("?token=%s").
TOKEN_PREFIX = re.compile(r"(?i)(?:token=|token%3D|\b(?:token|bearer)\s+|\"token\"\s*:\s*\")$")


def _secret_slots(text: str) -> set[int | str]:
    """The arguments (by position, or by name for ``%(name)s``) that a format string puts right
    after a token prefix: the whole argument is the token, with nothing in it to recognise."""
    slots: set[int | str] = set()
    position, last = 0, 0
    for match in PLACEHOLDER.finditer(text):
        if match.group() == "%%":
            continue
        name = re.match(r"%\(([^)]*)\)", match.group())
        if TOKEN_PREFIX.search(text[last : match.start()]):
            slots.add(name.group(1) if name else position)
        position += 1
        last = match.end()
    return slots


def _redact_format(text: str) -> str:
    """Redact a format string between its placeholders, never the placeholders: ``token=%s``
    rewritten to ``token=[secret]`` would no longer fit its arguments, and logging's report of
    that error prints the arguments (the token among them) to stderr. The arguments are
    redacted on their own."""
    parts, last = [], 0
    for match in PLACEHOLDER.finditer(text):
        parts += [redact(text[last : match.start()]), match.group()]
        last = match.end()
    parts.append(redact(text[last:]))
    return "".join(parts)


_filter = RedactTokens()
_factory_wrapped = False


def install(log: logging.Logger) -> None:
    """Redact what ``log`` and its handlers see, and every record this process creates from now
    on. The record factory is what holds: tornado's loggers only propagate to ``log``'s handlers
    (a logger's filters never see its children's records), and an app that reconfigures logging
    replaces those handlers with their filters."""
    global _factory_wrapped
    for target in (log, *log.handlers):
        if _filter not in target.filters:
            target.addFilter(_filter)
    if _factory_wrapped:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        _filter.filter(record)
        return record

    logging.setLogRecordFactory(redacting_factory)
    _factory_wrapped = True


# -- a session's server loads this module as a Jupyter server extension ---------------------


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "hub.redact"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    install(serverapp.log)
