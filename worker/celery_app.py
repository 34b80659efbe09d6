"""The Celery application (``celery -A worker.celery_app worker``), configured from settings."""

from __future__ import annotations

import ast
import logging
from contextlib import ExitStack, suppress
from typing import Any

from celery import Celery
from celery.signals import setup_logging, task_postrun, task_prerun, worker_process_init

from worker.broker import (
    BUILD_TASK,
    CULL_TASK,
    HUB_HEALTH_TASK,
    LAUNCH_TASK,
    POOL_TASK,
    RECOVER_TASK,
    TEARDOWN_TASK,
)
from worker.db import dispose_all
from worker.hubs import hubs
from worker.logs import bind_build, bind_launch, configure, configured
from worker.settings import Settings, get_settings


def celery_config(settings: Settings) -> dict[str, Any]:
    longest_task = settings.launch_timeout + 120
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue,
        # At-least-once: a message is acknowledged only after its task ran, and re-queued when
        # the worker running it dies. Every task is idempotent, so a second run is harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_time_limit": longest_task,
        "task_soft_time_limit": longest_task - 30,
        # Redis re-delivers unacknowledged messages after this; it must outlast any task and any
        # retry countdown, or a slow launch would run twice at once.
        "broker_transport_options": {"visibility_timeout": max(3600, 2 * longest_task)},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_routes": {BUILD_TASK: {"queue": settings.build_queue}},
        "beat_schedule": {
            # Sessions must end when they expire or go idle, and whatever a crash, a lost
            # message or a dead Hub left behind must be reconciled; one pass does all of it.
            # Passes that overlap (a slow pass, two beats) are safe: rows are claimed first.
            "cleanup-pass": {
                "task": CULL_TASK,
                "schedule": settings.cull_interval,
                # A pass that waited past the next one is pointless: drop it.
                "options": {"expires": settings.cull_interval},
            },
            # A launch whose worker died is sent again within seconds (worker.claims).
            "recover-launches": {
                "task": RECOVER_TASK,
                "schedule": settings.recover_interval,
                "options": {"expires": settings.recover_interval},
            },
            # The warm pools are topped up (worker/pool.py); with no pool set, nothing runs.
            **(
                {
                    "refill-pools": {
                        "task": POOL_TASK,
                        "schedule": settings.pool_interval,
                        "options": {"expires": settings.pool_interval},
                    }
                }
                if settings.pool
                else {}
            ),
            # Several Hubs: each is checked, and one that does not answer gets no new launch
            # (worker/hub_health.py). One Hub: its launches wait for it as they always did.
            **(
                {
                    "check-hubs": {
                        "task": HUB_HEALTH_TASK,
                        "schedule": settings.hub_health_interval,
                        "options": {"expires": settings.hub_health_interval},
                    }
                }
                if len(hubs(settings)) > 1
                else {}
            ),
        },
        "include": ["worker.tasks"],
    }


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("hublaunch")
    celery.conf.update(celery_config(settings))
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_url.removeprefix("filesystem://") or ".hublaunch/broker"
        celery.conf.broker_url = "filesystem://"
        celery.conf.broker_transport_options = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "processed_folder": folder,
            "store_processed": False,
        }
    return celery


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked child must not share its parent's database connections.
    dispose_all()


# -- log lines: Celery's own (received, succeeded, retry) carry the task's launch id too --------

# Tasks whose first argument is a launch id, or an environment's name.
LAUNCH_ARGUMENT_TASKS = frozenset({LAUNCH_TASK, TEARDOWN_TASK})
_bound: dict[str, ExitStack] = {}  # task id -> what its prerun bound (threads: one per task)


def _first_argument(args: Any) -> str | None:
    return args[0] if isinstance(args, list | tuple) and args and isinstance(args[0], str) else None


@task_prerun.connect
def _bind_task(task_id: str = "", task: Any = None, args: Any = None, **_: Any) -> None:
    argument, name = _first_argument(args), getattr(task, "name", None)
    if argument is None or name not in LAUNCH_ARGUMENT_TASKS | {BUILD_TASK}:
        return
    stack = ExitStack()
    stack.enter_context(bind_launch(argument) if name != BUILD_TASK else bind_build(argument))
    _bound[task_id] = stack


@task_postrun.connect
def _unbind_task(task_id: str = "", **_: Any) -> None:
    stack = _bound.pop(task_id, None)
    if stack is not None:
        stack.close()


class ReceivedLaunch(logging.Filter):
    """ "Task hublaunch.launch[…] received" is logged by the consumer before any task code runs;
    the launch id is taken from the message's arguments that Celery passes with the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and getattr(record, "launch_id", None) is None:
            argument = None
            with suppress(ValueError, SyntaxError):
                argument = _first_argument(ast.literal_eval(str(data.get("args"))))
            if argument is not None and data.get("name") in LAUNCH_ARGUMENT_TASKS:
                record.launch_id = argument
            elif argument is not None and data.get("name") == BUILD_TASK:
                record.env = argument
        return True


logging.getLogger("celery.worker.strategy").addFilter(ReceivedLaunch())


@setup_logging.connect
def _keep_our_logging(loglevel: Any = None, **_: Any) -> None:
    """Celery leaves logging alone (a receiver of this signal means "configured"): ``hublaunch
    worker`` and ``beat`` set it up before Celery starts; ``celery -A worker.celery_app …``
    gets the same JSON (or text) lines here."""
    if not configured():
        settings = get_settings()
        configure(
            level=loglevel or settings.log_level, log_format=settings.log_format, process="celery"
        )


app = create_celery()
