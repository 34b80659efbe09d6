"""Boxes for untrusted code: sessions (run by the Hub's spawner) and builds (run by the worker).

A box is a process tree that bubblewrap starts as root and that then drops to an unprivileged
uid: its own mount, PID, IPC, UTS and network namespaces, the system read-only, only the folders
it is given, and cgroup limits on memory, processes and CPU. Its network namespace holds nothing
but loopback; the host reaches into it (and it out) only through sockets made by ``netns``, so no
link, address or route is ever added to the machine.

- ``box``: the bubblewrap command line, starting a box, finding it again, ending it.
- ``cgroups``: the limits (cgroup v1 memory, pids, cpu) and the out-of-memory count.
- ``netns``: sockets inside a box's network namespace and the forwarders built on them.
"""
