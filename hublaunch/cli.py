"""The ``hublaunch`` command: migrate, api, worker, beat, dev."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Any

from worker.logs import JsonFormatter, configure
from worker.settings import Settings, get_settings


def _migrate(_args: argparse.Namespace) -> int:
    from worker.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest migration")
    return 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn serves the app (the tests start a server with the same options)."""
    from api.logs import uvicorn_log_config

    return {
        "log_level": settings.log_level.lower(),
        # The access log prints /user/<gone>/?token=… (the app is the proxy's default route);
        # in JSON mode its lines are JSON lines like the app's.
        "log_config": uvicorn_log_config(settings.log_format, process="api"),
        # X-Forwarded-For/-Proto (the visitor's address and scheme) only from the proxy's
        # addresses; from anyone else they are ignored. Generated URLs use public_url anyway.
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        **uvicorn_options(get_settings()),
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.celery_app import app

    settings = get_settings()
    if settings.log_format == "json":
        import celery.apps.worker

        # What Celery prints from its signal handlers ("worker: Warm shutdown"), as JSON lines.
        celery.apps.worker.safe_say = _say_as_json
    # Tasks wait on the Hub, not the CPU: threads keep many launches in flight cheaply.
    argv = [
        *_quiet(settings),
        "worker",
        "--pool",
        args.pool,
        "--concurrency",
        str(args.concurrency),
        "--queues",
        args.queues or ",".join(_default_queues(settings)),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv=argv)
    return 0


def _default_queues(settings: Settings) -> list[str]:
    """Everything, as one machine serves it: launches, builds, and with per-Hub builds every
    Hub's build queue (on several machines, each passes --queues for its own)."""
    from worker.hubs import build_queue, hubs, per_hub_builds

    queues = [settings.queue, settings.build_queue]
    if per_hub_builds(settings):
        queues += [build_queue(settings, hub.name) for hub in hubs(settings)]
    return queues


def _beat(_args: argparse.Namespace) -> int:
    from worker.celery_app import app

    settings = get_settings()
    schedule = settings.beat_schedule_file
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app.start(
        argv=[
            *_quiet(settings),
            "beat",
            "--loglevel",
            settings.log_level,
            "--schedule",
            str(schedule),
        ]
    )
    return 0


def _say_as_json(message: str, f: Any = sys.__stderr__) -> None:
    """Celery's ``safe_say`` in JSON: one write, no logging lock (it runs in signal handlers)."""
    record = logging.LogRecord("celery.apps.worker", logging.INFO, __file__, 0, message, None, None)
    with contextlib.suppress(OSError, AttributeError, ValueError):
        os.write(f.fileno(), f"{JsonFormatter('worker').format(record)}\n".encode())


def _quiet(settings: Settings) -> list[str]:
    """Celery prints a banner (its configuration, the task list) straight to stdout; a log of
    JSON lines holds JSON lines only, so it is left out then."""
    return ["--quiet"] if settings.log_format == "json" else []


def _cull(args: argparse.Namespace) -> int:
    from worker.context import worker_context
    from worker.cull import cull_pass

    actions = cull_pass(worker_context(), dry_run=args.dry_run)
    rows = [("CATEGORY", "HUB USER", "LAUNCH", "RESULT")]
    rows += [(a.category, a.user or "-", a.launch_id or "-", a.result) for a in actions]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        padded = (cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        print("  ".join([*padded, row[3]]))
    print(f"{len(actions)} action(s){' (dry run: nothing changed)' if args.dry_run else ''}")
    return 1 if any(a.result.startswith("error") for a in actions) else 0


def _dev(args: argparse.Namespace) -> int:
    from hublaunch.dev import run

    return run(port=args.port, spawner=args.spawner, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hublaunch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=_migrate)
    api = sub.add_parser("api", help="serve the HTTP app")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8010)
    api.set_defaults(func=_api)
    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--concurrency", type=int, default=16)
    worker.add_argument("--pool", default="threads", choices=["threads", "prefork", "solo"])
    worker.add_argument(
        "--queues", default="", help="comma-separated; default: the launch and build queues"
    )
    worker.set_defaults(func=_worker)
    sub.add_parser("beat", help="run the Celery beat scheduler").set_defaults(func=_beat)
    cull = sub.add_parser("cull", help="run one cleanup pass now and print what it did")
    cull.add_argument("--dry-run", action="store_true", help="report, change nothing")
    cull.set_defaults(func=_cull)
    dev = sub.add_parser("dev", help="run the whole local stack")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument(
        "--spawner",
        default="sandbox",
        choices=["sandbox", "local", "fake"],
        help="sandbox (default; falls back to local, loudly, where no box can be made), "
        "local (unsandboxed) or fake (stand-in servers)",
    )
    dev.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the migrations' and the readiness checks' INFO lines "
        "(as does HUBLAUNCH_LOG_LEVEL=DEBUG)",
    )
    dev.set_defaults(func=_dev)
    args = parser.parse_args(argv)
    settings = get_settings()
    # One JSON line per event (HUBLAUNCH_LOG_FORMAT=text for plain lines). `hublaunch dev`
    # prints to a person: text, whatever the setting; its children's logs follow the setting.
    configure(
        level=settings.log_level,
        log_format="text" if args.command == "dev" else settings.log_format,
        process=args.command,
    )
    from api.logs import install_everywhere

    install_everywhere()  # no token in any log line of any command
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
