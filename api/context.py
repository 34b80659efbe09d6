"""What a request's log lines are about: the launch named in its path."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from worker.logs import bind_launch


async def bind_path_launch(request: Request) -> AsyncIterator[None]:
    """A router dependency: every line logged while a request for ``/{launch_id}…`` is handled
    carries that launch id. Asynchronous, so it binds in the request's own context, which the
    handler (run in a thread) and the event stream inherit."""
    launch_id = request.path_params.get("launch_id")
    if not isinstance(launch_id, str) or not launch_id:
        yield
        return
    with bind_launch(launch_id):
        yield
