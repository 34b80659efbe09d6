"""cgroup v1 limits for one box: ``memory``, ``pids`` and ``cpu`` groups under ``hublaunch/``.

Every process of a box is in its groups (children inherit them), so a limit holds for the whole
tree however it forks, and ending the box can find every process it left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
PARENT = "hublaunch"
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """Per-box limits; 0 means no limit for that resource."""

    memory: int = 2 * 2**30  # bytes, swap included
    pids: int = 512
    cpu: float = 1.0  # CPUs' worth of time per period


def supported() -> str | None:
    """None when the limits can be applied here, else why not."""
    for controller in CONTROLLERS:
        path = ROOT / controller
        if not (path / "cgroup.procs").is_file():
            return f"cgroup v1 controller '{controller}' is not mounted at {path}"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable (hublaunch must run as root to limit sessions)"
    return None


class Group:
    """The groups of one box, by name (``session-<user>``, ``build-<name>``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.paths = {c: ROOT / c / PARENT / name for c in CONTROLLERS}

    def create(self, limits: Limits) -> None:
        for path in self.paths.values():
            path.mkdir(parents=True, exist_ok=True)
        memory = self.paths["memory"]
        if limits.memory:
            _write(memory / "memory.limit_in_bytes", limits.memory)
            # Swap counts too, else a box could grow past its limit into swap.
            swap = memory / "memory.memsw.limit_in_bytes"
            if swap.exists():
                _write(swap, limits.memory)
        if limits.pids:
            _write(self.paths["pids"] / "pids.max", limits.pids)
        if limits.cpu:
            _write(self.paths["cpu"] / "cpu.cfs_period_us", CFS_PERIOD_US)
            _write(self.paths["cpu"] / "cpu.cfs_quota_us", int(CFS_PERIOD_US * limits.cpu))

    def attach(self, pid: int) -> None:
        for path in self.paths.values():
            _write(path / "cgroup.procs", pid)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths.values():
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return found

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going past the memory limit."""
        try:
            text = (self.paths["memory"] / "memory.oom_control").read_text()
        except FileNotFoundError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the groups until none is left, then remove the groups."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.remove()

    def remove(self) -> None:
        for path in self.paths.values():
            # rmdir fails while a process is still exiting; give it a moment.
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _write(path: Path, value: int) -> None:
    path.write_text(f"{value}\n")
