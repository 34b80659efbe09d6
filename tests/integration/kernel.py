"""Run code in a kernel of a running Jupyter server, through its REST and websocket API."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import websocket


def run_code(server_url: str, token: str, code: str, timeout: float = 60) -> str:
    """Start a kernel on ``server_url`` (``.../user/<name>/``), run ``code``, return its stdout."""
    headers = {"Authorization": f"token {token}"}
    started = httpx.post(f"{server_url}api/kernels", headers=headers, json={}, timeout=timeout)
    started.raise_for_status()
    kernel = started.json()["id"]
    ws_url = server_url.replace("http://", "ws://", 1) + f"api/kernels/{kernel}/channels"
    ws = websocket.create_connection(
        ws_url, header=[f"Authorization: token {token}"], timeout=timeout
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps(_execute_request(msg_id, code)))
        out: list[str] = []
        while True:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)
    finally:
        ws.close()
        httpx.delete(f"{server_url}api/kernels/{kernel}", headers=headers, timeout=timeout)


def _execute_request(msg_id: str, code: str) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": msg_id,
            "username": "test",
            "session": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
