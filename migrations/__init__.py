"""Alembic migrations for the hublaunch database."""
