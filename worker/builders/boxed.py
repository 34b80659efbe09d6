"""Run a build's commands, each in a box of its own (``sandbox``), as the build uid.

A box sees the system, the folders it is given read-only and the build's work folder
read-write; its environment is made here from scratch (nothing of the worker's: no setting, no
secret); its network is loopback alone, where ``egress`` serves a proxy to what the step may
reach. Its output is relayed line by line, and the build's deadline ends the whole box. Where
no box can be made and builds are allowed anyway, the same commands run as the worker.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sandbox import box as boxes
from sandbox.cgroups import Limits
from sandbox.egress import Destination, Proxy, serving
from worker.builders import BuildFailed, Log
from worker.settings import Settings

LINE_LIMIT = 8192  # a longer line of build output is cut into several
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# C0 control characters but tab, and DEL, as they appear in build output: replaced by U+FFFD.
CONTROL = {c: "\ufffd" for c in (*range(0x09), *range(0x0A, 0x20), 0x7F)}
# The egress proxy's port inside a build's box (the box's loopback is its own: any port works).
EGRESS_PORT = 3128
# Before a step's command, in its box: what it writes must be readable by the sessions' uids.
UMASK_SCRIPT = 'umask 022 && exec "$@"'
# Variables naming the machine's certificate bundles (paths, no secret): HTTPS needs them.
CERT_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
)


class Steps:
    """Runs a build's commands, each in a box of its own (``mounts`` None: unsandboxed, as the
    worker), relaying their output line by line and enforcing the build's deadline."""

    def __init__(
        self,
        settings: Settings,
        work: Path,
        log: Log,
        deadline: float,
        *,
        box_name: str,
        mounts: list[str | tuple[str, str]] | None,
    ) -> None:
        self.settings, self.work, self.log, self.deadline = settings, work, log, deadline
        self.box_name, self.mounts = box_name, mounts
        self.count = 0

    def base_env(self) -> dict[str, str]:
        """Every step's environment, made from scratch: nothing of the worker's (its settings
        and secrets) reaches a build."""
        env = {
            "PATH": SYSTEM_PATH,
            "HOME": str(self.work / "home"),
            "TMPDIR": str(self.work / "tmp"),
            "LANG": "C.UTF-8",
        }
        env.update({v: os.environ[v] for v in CERT_VARIABLES if v in os.environ})
        return env

    def run(
        self,
        command: list[str],
        *,
        env: dict[str, str],
        what: str,
        cwd: Path | None = None,
        egress: list[Destination] | None = None,
    ) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailed(f"the build took longer than allowed (during {what})")
        if self.mounts is None:
            code = self._run_here(command, env, cwd, remaining)
        else:
            code = self._run_boxed(command, env, cwd, remaining, self.mounts, egress, what)
        if time.monotonic() >= self.deadline:
            raise BuildFailed(f"the build took longer than allowed (during {what})")
        if code != 0:
            raise BuildFailed(f"{what} failed (exit {code})")

    def _run_boxed(
        self,
        command: list[str],
        env: dict[str, str],
        cwd: Path | None,
        remaining: float,
        mounts: list[str | tuple[str, str]],
        egress: list[Destination] | None,
        what: str,
    ) -> int:
        self.count += 1
        if egress is not None:
            # curl (git) reads only the lower-case http_proxy; pip reads either.
            names = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
            env = {**env, **dict.fromkeys(names, f"http://127.0.0.1:{EGRESS_PORT}")}
        spec = boxes.BoxSpec(
            name=f"{self.box_name}-{self.count}",
            uid=self.settings.build_uid,
            command=["/bin/sh", "-c", UMASK_SCRIPT, "sh", *command],
            env=env,
            cwd=str(cwd or self.work),
            read_only=mounts,
            writable=[(str(self.work), str(self.work))],
            hostname="build",
            die_with_parent=True,  # a worker killed mid-build takes its box with it
            limits=Limits(
                memory=self.settings.build_memory,
                pids=self.settings.build_pids,
                cpu=self.settings.build_cpus,
            ),
        )
        read_fd, write_fd = os.pipe()
        try:
            try:
                box = boxes.start(spec, stdout=write_fd)
            finally:
                os.close(write_fd)
        except OSError as e:
            _relay(read_fd, self.log)  # bubblewrap's own complaint
            os.close(read_fd)
            raise BuildFailed(f"{what} could not start its sandbox") from e
        # Past the deadline the whole box ends, whatever runs in it; its output then ends too.
        timer = threading.Timer(remaining, box.end)
        reader = threading.Thread(target=_relay, args=(read_fd, self.log), daemon=True)
        try:
            with self._egress(box, egress, what):
                box.release()
                timer.start()
                reader.start()
                code = box.process.wait() if box.process is not None else -1
                # bubblewrap returns when the command does, but what the command left running
                # (a daemon of the repository's) keeps the box and its output open: end them.
                box.end()
                reader.join()
                return code
        finally:
            timer.cancel()
            if timer.ident is not None:
                timer.join()
            box.end()  # safe twice; here also on the way out of an error
            if reader.ident is not None:
                reader.join()  # the box is gone, so its output has ended
            os.close(read_fd)

    @contextlib.contextmanager
    def _egress(
        self, box: boxes.Box, egress: list[Destination] | None, what: str
    ) -> Iterator[None]:
        if egress is None:
            yield
            return
        ns_fd = box.ns_fd()
        try:
            with serving(ns_fd, EGRESS_PORT, Proxy(egress, f"{what}, {self.box_name}")):
                yield
        finally:
            os.close(ns_fd)

    def _run_here(
        self, command: list[str], env: dict[str, str], cwd: Path | None, remaining: float
    ) -> int:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        timer = threading.Timer(remaining, proc.kill)
        timer.start()
        try:
            if proc.stdout is not None:
                _relay(proc.stdout.fileno(), self.log)
            return proc.wait()
        finally:
            timer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()


def _relay(fd: int, log: Log) -> None:
    """Each non-blank line read from ``fd`` until its end, to ``log``. The output is the
    repository's: bytes that are not UTF-8 and control characters (a NUL cannot be stored in
    PostgreSQL text) are replaced, not fatal."""
    with open(fd, "rb", closefd=False) as stream:
        for raw in iter(lambda: stream.readline(LINE_LIMIT), b""):
            line = raw.decode("utf-8", "replace").rstrip().translate(CONTROL)
            if line.strip():
                log(line)
