"""The hublaunch domain: settings, database, Hub client, launch steps and Celery tasks."""
