"""At-least-once delivery settings, so a lost worker's launch runs again instead of vanishing."""

from __future__ import annotations

from worker.broker import LAUNCH_TASK, TEARDOWN_TASK
from worker.celery_app import celery_config, create_celery
from worker.settings import Settings


def test_delivery_is_at_least_once_with_json_and_time_limits() -> None:
    config = celery_config(Settings(launch_timeout=300, queue="q1"))
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert config["task_time_limit"] == 420 and config["task_soft_time_limit"] < 420
    # Redis must not re-deliver a message while its task may still be running.
    assert config["broker_transport_options"]["visibility_timeout"] >= config["task_time_limit"]
    assert config["task_default_queue"] == "q1"


def test_tasks_have_explicit_names() -> None:
    import worker.tasks  # noqa: F401  (registers the tasks on the shared app)
    from worker.celery_app import app

    assert {LAUNCH_TASK, TEARDOWN_TASK} <= set(app.tasks)


def test_embedded_filesystem_broker_gets_its_folders(tmp_path: object) -> None:
    app = create_celery(Settings(broker_url=f"filesystem://{tmp_path}"))
    assert app.conf.broker_url == "filesystem://"
    assert app.conf.broker_transport_options["data_folder_in"] == str(tmp_path)


def test_builds_have_their_own_queue() -> None:
    settings = Settings(queue="q1")
    assert settings.build_queue == "q1.builds"
    config = celery_config(settings)
    assert config["task_routes"] == {"hublaunch.build": {"queue": "q1.builds"}}
