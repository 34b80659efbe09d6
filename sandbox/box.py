"""Start, find again and end a box: bubblewrap started as root, then ``setpriv`` to the box's uid.

Why root first: bubblewrap run as root can bind any folder the box needs (a Python under /root,
say) and sets up every namespace, then ``setpriv`` changes the real uid and drops every
capability before the untrusted command starts. (``bwrap --uid`` alone, as root, only renames
root inside a user namespace: the process would still be root on the machine.) No user
namespace is made, so nothing inside can gain capabilities back, and ``no_new_privs`` stops
set-uid programs.

The box's PID 1 is bubblewrap's reaper; ending it ends every process in the PID namespace, and
the cgroups catch anything that might still be exiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.cgroups import Group, Limits, supported

# What every box sees of the system, read-only. /etc has no secrets a box's uid can read
# (/etc/shadow and private keys are root-only); Debian's /bin, /lib... are links into /usr.
SYSTEM = ("/usr", "/etc")
USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass
class BoxSpec:
    name: str  # unique among running boxes: names its cgroups
    uid: int
    command: list[str]
    env: dict[str, str]
    cwd: str
    read_only: list[str | tuple[str, str]] = field(default_factory=list)  # path or (host, box)
    writable: list[tuple[str, str]] = field(default_factory=list)  # (host, box), box-owned
    home: str | None = None  # a private tmpfs owned by the box's uid
    home_size: int = 2**30
    tmp_size: int = 2**30
    hostname: str = "box"
    limits: Limits = field(default_factory=Limits)
    # Builds: the box dies with the worker thread that started it. Sessions: no, they outlive
    # a restart of the Hub, which finds them again.
    die_with_parent: bool = False

    @property
    def gid(self) -> int:
        return self.uid  # one private group per uid, never shared


def unavailable() -> str | None:
    """None when boxes can be made here, else a sentence saying what is missing."""
    if os.geteuid() != 0:
        return "the sandbox needs root (to start bubblewrap and switch to per-session uids)"
    for tool in ("bwrap", "setpriv"):
        if shutil.which(tool) is None:
            package = "bubblewrap" if tool == "bwrap" else "util-linux"
            return f"'{tool}' is not installed (Debian package {package})"
    return supported()


def argv(spec: BoxSpec, info_fd: int, block_fd: int) -> list[str]:
    """The bubblewrap command line: only paths and numbers, never a secret (it is public in
    /proc); the environment carries the rest."""
    args = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--new-session",  # no TIOCSTI into a terminal outside
        *(["--die-with-parent"] if spec.die_with_parent else []),
        "--hostname",
        spec.hostname,
        "--info-fd",
        str(info_fd),
        "--block-fd",
        str(block_fd),
    ]
    for path in SYSTEM:
        args += ["--ro-bind", path, path]
    for link in USR_LINKS:
        if os.path.islink(f"/{link}"):
            args += ["--symlink", f"usr/{link}", f"/{link}"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for tmp in ("/tmp", "/dev/shm"):  # noqa: S108 - fresh, private to the box
        args += ["--perms", "1777", "--size", str(spec.tmp_size), "--tmpfs", tmp]
    binds = [(e, e) if isinstance(e, str) else e for e in spec.read_only]
    # bubblewrap gives the folders it makes on the way to a mount the host's modes (/root is
    # 0700): make them first, searchable, so the box's uid can reach what it is given.
    targets = [inside for _, inside in binds + spec.writable]
    if spec.home:
        targets.append(spec.home)
    for folder in _ancestors(targets):
        args += ["--perms", "0755", "--dir", folder]
    for host, inside in binds:
        args += ["--ro-bind", host, inside]
    for host, inside in spec.writable:
        args += ["--bind", host, inside]
    owned = []
    if spec.home:
        args += ["--perms", "0700", "--size", str(spec.home_size), "--tmpfs", spec.home]
        owned.append(spec.home)
    args += ["--chdir", spec.cwd]
    drop = [
        shutil.which("setpriv") or "setpriv",
        f"--reuid={spec.uid}",
        f"--regid={spec.gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        *spec.command,
    ]
    if owned:
        # Still root inside the box: hand its home to its uid, then drop to that uid.
        script = 'chown "$1:$1" -- "$2" && shift 2 && exec "$@"'
        return [*args, "/bin/sh", "-c", script, "sh", str(spec.uid), owned[0], *drop]
    return [*args, *drop]


def _ancestors(paths: list[str]) -> list[str]:
    found: set[str] = set()
    for path in paths:
        parent = os.path.dirname(os.path.normpath(path))
        while parent not in ("/", "") and not parent.startswith(SYSTEM):
            found.add(parent)
            parent = os.path.dirname(parent)
    return sorted(found, key=lambda p: p.count("/"))


@dataclass
class Box:
    """A running box: ``pid`` is its reaper (PID 1 inside), ``netns`` its namespace's inode."""

    name: str
    pid: int
    netns: int
    process: subprocess.Popen[bytes] | None = None
    _block_fd: int | None = None

    def release(self) -> None:
        """Let the box's command run (it waits until then, already inside its cgroups)."""
        if self._block_fd is not None:
            os.write(self._block_fd, b"1")
            os.close(self._block_fd)
            self._block_fd = None

    @property
    def group(self) -> Group:
        return Group(self.name)

    def ns_fd(self) -> int:
        """A descriptor of the box's network namespace (the caller closes it)."""
        fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != self.netns:
            os.close(fd)
            raise ProcessLookupError(f"box {self.name} is gone (pid {self.pid} was reused)")
        return fd

    def alive(self) -> bool:
        """Whether the box's command still runs. Its PID 1 outlives the command while anything
        the command left behind runs, so that alone does not say it."""
        if self.process is not None:
            return self.process.poll() is None
        try:
            if os.stat(f"/proc/{self.pid}/ns/net").st_ino != self.netns:
                return False
            # After a restart of its owner: the command is PID 1's first child.
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except FileNotFoundError:
            return False
        return bool(children.split())

    def exists(self) -> bool:
        """Whether anything of the box is left (its PID 1, or a process in its cgroups)."""
        try:
            return os.stat(f"/proc/{self.pid}/ns/net").st_ino == self.netns
        except FileNotFoundError:
            return bool(self.group.pids())

    def signal_all(self, signum: int) -> None:
        """Send a signal to every process of the box but its reaper (which only SIGKILL ends)."""
        for pid in self.group.pids() - {self.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def end(self) -> None:
        """Kill everything in the box and remove its cgroups. Safe to call twice."""
        if self._block_fd is not None:
            os.close(self._block_fd)
            self._block_fd = None
        with contextlib.suppress(ProcessLookupError):
            if self.exists():
                os.kill(self.pid, signal.SIGKILL)  # PID 1 gone: the kernel ends the rest
        self.group.kill()
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)


def start(spec: BoxSpec, *, stdout: int | None = None) -> Box:
    """Start the box and put it in its cgroups; its command waits for ``Box.release()`` so the
    caller can set up its network first. Raises OSError if bubblewrap cannot start it (its
    message goes to ``stdout``)."""
    group = Group(spec.name)
    group.create(spec.limits)
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    try:
        process = subprocess.Popen(
            argv(spec, info_w, block_r),
            env=spec.env,
            pass_fds=(info_w, block_r),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
        )
    except BaseException:
        for fd in (info_r, info_w, block_r, block_w):
            os.close(fd)
        group.remove()
        raise
    os.close(info_w)
    os.close(block_r)
    box: Box | None = None
    try:
        info = _read_info(info_r)
        if info is None:
            raise OSError(f"bubblewrap failed to start box {spec.name} (exit {process.wait()})")
        box = Box(spec.name, int(info["child-pid"]), int(info["net-namespace"]), process, block_w)
        # In its groups before its command runs: no fork can escape the limits.
        group.attach(box.pid)
    except BaseException:
        if box is not None:
            box.end()
        else:
            os.close(block_w)
            process.kill()
            process.wait()
            group.remove()
        raise
    finally:
        os.close(info_r)
    return box


def _read_info(fd: int) -> dict[str, int] | None:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
        with contextlib.suppress(ValueError):
            return dict(json.loads(data))
    return None
