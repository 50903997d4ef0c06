"""A memory cgroup per sandboxed run: one bound on everything the run holds in memory.

``RLIMIT_AS`` bounds the address space, but not memory that is not mapped: ``memfd`` files, tmpfs files, SysV
segments, pipe buffers. A cgroup counts all of it. The host makes one below its own cgroup (v1 ``memory``
hierarchy, or v2 where the memory controller is delegated), the child joins it before it forks, and the
host reads whether the kernel had to kill for memory, kills whatever is left and removes the group.

Where no cgroup can be made (not root, a read-only ``/sys/fs/cgroup``), :func:`create` returns None and the
child narrows its file-descriptor limit instead (see ``child.set_limits``).
"""

from __future__ import annotations

import os
import signal
import time

PREFIX = "lnkit-sandbox-"
_V1 = "/sys/fs/cgroup/memory"
_V2 = "/sys/fs/cgroup"
_STALE_S = 3600  # a run's group older than this was left by a parent that died: removed when seen


def create(nonce: str, limit_bytes: int) -> str | None:
    """A new cgroup for one run holding at most ``limit_bytes`` (no swap), or None where none can be made."""
    parent = _own_group()
    if parent is None:
        return None
    _sweep(parent)
    path = os.path.join(parent, PREFIX + nonce[:16])
    try:
        os.mkdir(path, 0o700)
    except OSError:
        return None
    try:
        if os.path.exists(os.path.join(path, "memory.limit_in_bytes")):  # v1
            _write(path, "memory.limit_in_bytes", limit_bytes)
            if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                _write(path, "memory.memsw.limit_in_bytes", limit_bytes)
        elif os.path.exists(os.path.join(path, "memory.max")):  # v2 with the controller delegated
            _write(path, "memory.max", limit_bytes)
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(path, "memory.swap.max", 0)
            if os.path.exists(os.path.join(path, "memory.oom.group")):
                _write(path, "memory.oom.group", 1)  # an OOM kill takes the whole run, not one of it
        else:
            raise OSError("no memory controller")
    except OSError:
        os.rmdir(path)
        return None
    return path


def remove(path: str) -> bool:
    """Kill what is left in the group, remove it; True if the kernel killed a process of it for memory."""
    oom = ooms(path) > 0
    for _ in range(200):
        try:
            os.rmdir(path)
            return oom
        except FileNotFoundError:
            return oom
        except OSError:  # still has processes: exiting ones, or a straggler
            for pid in _procs(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)
    return oom  # left behind; a later run's sweep removes it


def ooms(path: str) -> int:
    """How many processes of the group the kernel killed for memory."""
    for name in ("memory.events", "memory.oom_control"):  # v2, v1
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def _own_group() -> str | None:
    """The directory of this process's memory cgroup, if it is there and writable."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            path = _V1 + rel
            break
    else:
        rel = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
        path = None if rel is None else _V2 + rel
    if path is None or not os.path.isdir(path) or not os.access(path, os.W_OK):
        return None
    return path


def _sweep(parent: str) -> None:
    now = time.time()
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            if now - os.stat(path).st_mtime > _STALE_S and not _procs(path):
                os.rmdir(path)
        except OSError:
            pass


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _write(path: str, name: str, value: int) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(str(value))
