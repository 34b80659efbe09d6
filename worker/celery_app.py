"""The Celery application (``celery -A worker.celery_app worker``), configured from settings."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from worker.broker import BUILD_TASK, CULL_TASK
from worker.db import dispose_all
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
            }
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


app = create_celery()
