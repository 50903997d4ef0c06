"""What the sandbox's own root holds: the plan the child (``child.own_root``) builds its root file system from.

Only what the base interpreter needs once it is running: the directories on its ``sys.path`` (the stdlib,
``lib-dynload``), every shared library those extension modules and the interpreter link against (found with
``ldd``, the loader's own view), the loader's cache so ``dlopen`` finds them, and ``/dev/null``, ``/dev/zero``,
``/dev/random`` and ``/dev/urandom``. The ELF interpreter itself (``ld-linux*``) is left out on purpose: it is
already mapped into the running process, and without it no dynamically linked program can be executed.
Symlinks on the way to a path (``/lib -> usr/lib`` on merged-/usr systems, ``libffi.so.8 -> libffi.so.8.1.2``)
are recreated as symlinks, and the path they lead to is bound, so a path resolves in the sandbox as it
does on the host.

The plan is a tuple of ``(path, kind, target)`` rows, kind one of ``dir``, ``file``, ``dev`` (bound from
the host) or ``link`` (a symlink to ``target``), sorted so that a row's parents come first.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import stat
import subprocess

DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
LOADER_CACHE = "/etc/ld.so.cache"
# where shared libraries live when ldd is missing: bound whole, a wider view than the exact list
LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")


@functools.cache
def plan(interpreter: str) -> tuple[tuple[tuple[str, str, str], ...], tuple[str, ...]]:
    """(rows, hidden): the rows that make up the root for ``interpreter`` (started ``-I -S``), and the
    directories inside them to cover with an empty tmpfs (its ``site-packages``: ``-S`` keeps them off the
    path, this keeps them unreadable). Computed once per process (about 0.3 s, mostly ``ldd``)."""
    path = _sys_path(interpreter)
    paths = [p for p in path if os.path.exists(p)]
    libraries = _libraries([interpreter, *_extension_modules(path)])
    if libraries is None:
        paths += [d for d in LIBRARY_DIRS if os.path.isdir(d)]
    else:
        paths += libraries
    paths += [p for p in (LOADER_CACHE, *DEVICES) if os.path.exists(p)]
    rows: dict[str, tuple[str, str]] = {}
    for p in paths:
        _add(p, rows)
    hidden = sorted({os.path.realpath(d) for p in path for d in glob.glob(os.path.join(p, "site-packages"))})
    return tuple((p, kind, target) for p, (kind, target) in sorted(rows.items())), tuple(hidden)


def _sys_path(interpreter: str) -> list[str]:
    out = subprocess.run(
        [interpreter, "-I", "-S", "-c", "import sys; print(repr([p for p in sys.path if p]))"],
        capture_output=True, text=True, check=True, env={"LC_ALL": "C.UTF-8"}, timeout=60,
    )  # fmt: skip
    return [os.path.abspath(p) for p in ast.literal_eval(out.stdout)]


def _extension_modules(path: list[str]) -> list[str]:
    return sorted(f for p in path if os.path.isdir(p) for f in glob.glob(os.path.join(p, "*.so")))


def _libraries(objects: list[str]) -> list[str] | None:
    """The shared libraries ``objects`` load, as ``ldd`` resolves them, minus the ELF interpreter; None
    when ``ldd`` is not there or fails."""
    try:
        out = subprocess.run(
            ["ldd", *objects], capture_output=True, text=True, timeout=120, env={"LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = set()
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/") and not word.endswith(":"):
                found.add(word)
    if not found:
        return None
    return sorted(f for f in found if not os.path.basename(f).startswith(("ld-linux", "ld64.so", "ld-musl")))


def _add(path: str, rows: dict[str, tuple[str, str]], depth: int = 0) -> None:
    """Rows that make ``path`` resolve as on the host: each symlink met on the way becomes a ``link`` row
    and the walk goes on from its target; the real path at the end is bound."""
    if depth > 40:
        raise RuntimeError(f"sandbox root: too many symlinks resolving {path}")
    parts = path.strip("/").split("/")
    current = ""
    for i, part in enumerate(parts):
        current += "/" + part
        if os.path.islink(current):
            target = os.readlink(current)
            rows.setdefault(current, ("link", target))
            rest = os.path.join(os.path.dirname(current), target, *parts[i + 1 :])
            _add(os.path.normpath(rest), rows, depth + 1)
            return
    mode = os.stat(path).st_mode
    kind = "dir" if stat.S_ISDIR(mode) else "dev" if stat.S_ISCHR(mode) else "file"
    rows[path] = (kind, "")
