"""The HTTP intake: a thin FastAPI adapter over the worker's domain."""
