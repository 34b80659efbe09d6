"""What the local stack puts in its children's environment (no child is started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hublaunch.stack import Stack, StackConfig


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
