"""What the local stack puts in its children's environment (no child is started here), and the
ports it picks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hublaunch.stack import Stack, StackConfig, free_port


def stack(tmp_path: Path, **env: str) -> Stack:
    return Stack(StackConfig(tmp_path, "sqlite:///x.sqlite", "memory://", env=env))


@pytest.mark.parametrize("quiet", ["WARNING", "error"])
def test_children_log_at_info_at_least_so_the_stack_sees_them_start(
    tmp_path: Path, quiet: str
) -> None:
    # The stack waits for the worker's "ready." and beat's "beat: Starting..." (INFO lines).
    assert stack(tmp_path, HUBLAUNCH_LOG_LEVEL=quiet).environ("worker")["HUBLAUNCH_LOG_LEVEL"] == (
        "INFO"
    )


def test_a_more_verbose_level_is_kept(tmp_path: Path) -> None:
    assert stack(tmp_path, HUBLAUNCH_LOG_LEVEL="DEBUG").environ("beat")["HUBLAUNCH_LOG_LEVEL"] == (
        "DEBUG"
    )


def test_each_hubs_token_reaches_the_worker_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several Hubs: the worker drives them (every token); the app and beat only ask which
    Hubs there are (no token); the Hubs get no list at all. A list in the caller's own
    environment reaches no other child either."""
    monkeypatch.setenv("HUBLAUNCH_HUBS", '[{"api_token": "from-the-caller"}]')
    several = Stack(StackConfig(tmp_path, "sqlite:///x.sqlite", "memory://", extra_hubs=2))
    tokens = [several.hub_token, *(extra.token for extra in several.extra.values())]
    worker = several.environ("worker")["HUBLAUNCH_HUBS"]
    assert all(token in worker for token in tokens)
    for child in ("api", "beat"):
        listed = several.environ(child)["HUBLAUNCH_HUBS"]
        assert "hub-3" in listed and "api_token" not in listed, child
    assert "HUBLAUNCH_HUBS" not in several.environ("hub")
    single = Stack(StackConfig(tmp_path / "one", "sqlite:///x.sqlite", "memory://"))
    assert all("HUBLAUNCH_HUBS" not in single.environ(c) for c in ("api", "beat", "hub"))


def test_a_process_is_never_given_one_port_twice() -> None:
    # Closed at once, a port bound to 0 comes back from the kernel often (a few times in 500
    # here): a stack's Hub was once given its proxy's port. Each still binds when handed out.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
