"""The ``hublaunch`` command: migrate, api, worker, beat, dev."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

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
        # The access log prints /user/<gone>/?token=… (the app is the proxy's default route).
        "log_config": uvicorn_log_config(),
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
    # Tasks wait on the Hub, not the CPU: threads keep many launches in flight cheaply.
    argv = [
        "worker",
        "--pool",
        args.pool,
        "--concurrency",
        str(args.concurrency),
        "--queues",
        args.queues or f"{settings.queue},{settings.build_queue}",
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv=argv)
    return 0


def _beat(_args: argparse.Namespace) -> int:
    from worker.celery_app import app

    settings = get_settings()
    schedule = settings.beat_schedule_file
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app.start(argv=["beat", "--loglevel", settings.log_level, "--schedule", str(schedule)])
    return 0


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
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from api.logs import install_everywhere

    install_everywhere()  # no token in any log line of any command
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
