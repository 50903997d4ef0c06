"""Run model-generated Python, which is hostile input, in a throwaway locked-down process.

Code verifiers (:func:`lnkit.verify.verify_code`) and RL rewards run thousands of tiny programs written by a
model that is being optimised to make them pass; some will loop, allocate, fork, print without end, poke at
files or the network, or print a fake verdict. Each run costs one fresh interpreter, two forks and a
few dozen mounts (about 85 ms on a 2-core CPU as root, 45 ms without the own root), so a verdict stays cheap.

What runs where: this module is the API (limits, result, the two entry points, input checks) and holds
no machinery. ``host.py`` runs in the caller's process: it leases the uid, starts the child, feeds and reads
its pipes under the caps and the deadline, kills and reaps everything, and turns the child's records into a
verdict. ``child.py`` runs inside the child, and only there: namespaces, rlimits, the uid drop, the audit
hook, then the user's program (and, for :func:`check_function`, its calls). It is a standalone stdlib-only
script: the host starts it by path, ``<base interpreter> -I -S -B <package dir>/child.py``, with a working
directory of its own, ``start_new_session`` and a three-variable environment, and sends it a header (nonce,
result fd, limits, source, the cases' arguments) then the program's stdin on its stdin; it never imports
lnkit (the interpreter could not even find it: ``-I -S`` leaves only the stdlib on ``sys.path``).

Threat model: the program is hostile and knows this code. It may use anything the interpreter offers,
including reading the child's own frames (the nonce, the result fd); it must not affect the host (files,
processes, network, other runs), outlast the limits, or get a case judged passed that it did not compute.

Defence layers, outermost first (the OS ones are the wall, the audit hook is a second line):

1. **A parent that never trusts the child.** Wall-clock timeout, then ``SIGKILL`` to the whole process group
   (the child is a session leader) and, as root, to every process of the run's private uid (catches those
   that called ``setsid`` where there is no PID namespace). stdout/stderr are read incrementally; a stream
   that passes ``output_bytes`` gets the run killed ("output limit"), so a flood costs neither time nor host
   memory. :func:`check_function` keeps the expected values in the parent and sends only the arguments: the
   child reports what the function *returned* (plain literals only, type-checked before ``repr``) on a pipe
   of its own, each line tagged with a per-run random nonce, and the parent compares. Printing ``PASS``, or
   forging result lines (even with a stolen nonce), cannot pass a case whose answer the program does not
   compute; a result reported twice is flagged as forged.
2. **rlimits**: ``RLIMIT_CPU`` (SIGXCPU, SIGKILL a second later), ``RLIMIT_AS`` (memory bombs get a
   ``MemoryError``), ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``, no core files, 64 fds; the hard limits are set too,
   so the child cannot raise them.
3. **A clean process image**: ``python -I -S -B`` (no site, no user dirs, no ``PYTHON*`` variables) from the
   real base interpreter, so no virtualenv packages, stdlib only; ``env`` holds only ``LC_ALL``, ``HOME`` and
   ``TMPDIR`` (the parent's variables never reach the child); a fresh working directory, removed afterwards.
4. **Namespaces, a root of its own, a memory cgroup and a private uid, when the parent is root** (these
   machines and CI). Before any user code the child (``child.py``) joins a memory cgroup the host made for
   the run (:mod:`lnkit.sandbox.memcg`: it counts everything the run holds, memfd and tmpfs files, SysV
   segments and pipes included, not only the address space; a run it kills reads "memory") and enters new
   namespaces: *network* (only a down loopback: no connection to anything, loopback and abstract Unix
   sockets included); *IPC* (SysV segments and queues of its own, small ``shmmax``/``shmall``, all gone
   with the run); *mount*, in which it pivots into a root of its own (:mod:`lnkit.sandbox.rootfs`): a
   read-only tmpfs holding only the interpreter's ``sys.path``, the shared libraries its modules link,
   four character devices and a working directory that is a small private tmpfs mounted ``noexec``; the
   host's root is detached, so no host path (``/proc/self/root/...``, ``/proc/<pid>/root``, ``..``, a
   symlink, a host Unix socket) exists in any spelling, and without an ELF interpreter in it no program can
   be executed; *PID*, with a ``/proc`` of its own, memfds sealed non-executable for the namespace
   (``vm.memfd_noexec=2``), and an init that reaps and, when the user process dies, the kernel kills
   everything left, forked or ``setsid`` or not. Then ``PR_SET_NO_NEW_PRIVS`` and a drop to a uid/gid of
   its own (one of ``host._UID_SLOTS`` uids from ``host._UID_BASE``, leased with ``flock`` so concurrent
   runs never share one): that is what makes ``RLIMIT_NPROC`` mean "this run" (root ignores it, and a
   shared ``nobody`` would count every other sandbox and daemon) and makes "kill every process of the uid"
   safe.
5. **An audit hook** (``sys.addaudithook``) installed before user code, denying: sockets; ``subprocess``,
   ``os.system``, ``os.exec*``, ``os.fork``, ``os.posix_spawn``, ``os.kill``; ``ctypes`` and the modules
   that reach raw memory or fork (``_posixsubprocess``, ``_xxsubinterpreters``, ``_test*``); writes, renames,
   removals, ``chmod`` and links outside the working directory; reads and directory listings outside the
   interpreter, ``/usr``, ``/lib``, ``/etc``, ``/dev``, the process's own ``/proc`` entry and the working
   directory, with paths resolved as the kernel resolves them (symlinks followed: ``/dev/fd/../root`` is
   the host's ``/``) and the ``/proc`` entries that are doors to other paths (``root``, ``cwd``, ``exe``,
   ``fd``, ``map_files``) closed; ``setrlimit``; swapping a function's ``__code__``. Audit hooks are
   bypassable in theory (crafted bytecode, calls that raise no event such as ``os.mkfifo`` or
   ``signal.pidfd_send_signal``), which is why they sit behind the OS layers.

The parent also bounds what it parses: a checked function's value whose ``repr`` is longer than
``SandboxLimits.result_bytes`` fails its case unparsed, so a huge return value costs the verifier nothing.

**When not root**, layer 4 shrinks to what an unprivileged process can do. The child tries an
unprivileged user namespace with new network and PID namespaces (kernels that allow it, most do: no
network, and the kill-everything-on-exit holds); the rest is weaker: no root of its own (the audit hook's
path checks are the only wall around host files), no ``noexec`` working directory (a shared object the
program writes could be imported as an extension module), no memory cgroup (the descriptor limit is cut
so that memfd files, each at most ``file_mb``, total about ``memory_mb``). The child keeps the caller's
uid, so ``RLIMIT_NPROC`` is set to the uid's current task count plus ``nproc`` (it counts the caller's
other processes too); the filesystem is as writable and readable as it is for the caller, guarded only by
the audit hook, with ``RLIMIT_FSIZE`` bounding each file but not their number; other processes of the uid
could be signalled or read through ``/proc`` if the hook were bypassed; there is no sweep by uid (it would
kill the caller), and without a PID namespace a process that calls ``setsid`` escapes the group kill.
Without ``CAP_SYS_ADMIN`` as root (a default Docker container) the namespaces fail the same way while the
uid drop still works (if strangers cannot read the interpreter, only modules already loaded can be
imported). ``SandboxResult.layers`` names the layers a run actually got.

Tests: ``pytest tests/test_sandbox.py tests/test_sandbox_host_isolation.py`` (about 30 s on 2 cores;
hostile programs, each wall alone, and ``child.py`` run on its own to show it is standalone).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from lnkit.sandbox import host


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    wall_s: wall-clock seconds until the whole run is killed ("timeout").
    cpu_s: CPU seconds (RLIMIT_CPU); keep it below ``wall_s`` so a busy loop dies of "cpu time" first.
    memory_mb: address space (RLIMIT_AS); the interpreter alone maps about 20 MB.
    file_mb: largest file the program may write (RLIMIT_FSIZE); also sizes the private tmpfs (2x).
    nproc: processes+threads of the run's uid (RLIMIT_NPROC). As root the uid is private to the run, so the
        count starts at zero: 32 leaves room for threads and still stops a fork bomb. Not root, the uid is
        the caller's and its current task count is added.
    output_bytes: bytes of stdout and of stderr kept; a stream that goes past it kills the run.
    result_bytes: longest ``repr`` of one checked function's return value; a longer one fails its case
        unparsed ("returned a value too large to report"), so the parent's cost of parsing stays bounded.

    >>> SandboxLimits(wall_s=2.0).cpu_s
    4
    >>> SandboxLimits(memory_mb=0)
    Traceback (most recent call last):
    ...
    ValueError: SandboxLimits.memory_mb must be > 0, got 0
    """

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    file_mb: int = 8
    nproc: int = 32
    output_bytes: int = 65536
    result_bytes: int = 65536

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "file_mb", "nproc", "output_bytes", "result_bytes"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did.

    ok: exited 0 within every limit (and, for :func:`check_function`, every case passed).
    returncode: the child's exit status (negative: killed by that signal), None if it never started.
    stdout, stderr: decoded output, each cut to ``output_bytes``.
    timed_out: the wall-clock limit was hit.
    reason: '' when ok, else short and human: 'timeout', 'cpu time', 'memory', 'output limit',
        'killed by signal 9', 'syntax error: ...', 'exit code 1: ZeroDivisionError: ...',
        'case 2: got 5, expected 6'.
    wall_s: seconds from start to the last process killed.
    layers: the defence layers this run actually got (e.g. 'netns', 'mountns', 'uid', 'audit').
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str
    wall_s: float
    layers: tuple[str, ...] = ()


def run_python(source: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as ``__main__`` in the sandbox, feeding it ``stdin``.

    >>> r = run_python("print(int(input()) + 1)", stdin="41\\n")
    >>> r.ok, r.stdout
    (True, '42\\n')
    >>> run_python("import socket; socket.socket()").reason
    'exit code 1: PermissionError: lnkit sandbox: socket.__new__ is not allowed'
    """
    return _run(source, stdin, limits)


def check_function(
    source: str,
    func_name: str,
    cases: list[tuple[tuple, object]],
    *,
    limits: SandboxLimits = SandboxLimits(),
) -> SandboxResult:
    """Run ``source`` (as module ``__sandbox__``), then ``func_name(*args)`` for each ``(args, expected)``.

    ok only if every call returns a value ``== expected``. Arguments and expected values must be Python
    literals (``ast.literal_eval`` round-trips them); the expected values never enter the sandbox, and the
    function's results must be plain literals too (int, float, str, bytes, bool, None, complex, and
    list/tuple/dict/set of them), so a program can neither read the answers nor fake them with an object
    whose ``__eq__`` or ``__repr__`` lies. The first failing case is named in ``reason``.

    >>> check_function("def f(x):\\n    return x + 3", "f", [((1,), 4), ((2,), 5)]).ok
    True
    >>> check_function("def f(x):\\n    return x + 2", "f", [((1,), 3), ((3,), 6)]).reason
    'case 1: got 5, expected 6'
    >>> check_function("print('PASS')", "f", [((1,), 4)]).reason
    "missing function 'f'"
    """
    cases = [(tuple(args), expected) for args, expected in cases]
    for i, (args, expected) in enumerate(cases):
        for what, value in (("arguments", args), ("expected value", expected)):
            if not _is_literal(value):
                raise ValueError(f"check_function case {i}: {what} {value!r:.80} is not a Python literal")
    return _run(source, "", limits, func_name=func_name, cases=cases)


def _is_literal(value) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except Exception:  # noqa: BLE001 -- any failure to round-trip is the answer: not a literal
        return False


def _run(source: str, stdin: str, limits: SandboxLimits, **how) -> SandboxResult:
    """One run through :func:`lnkit.sandbox.host.run`; ``how`` is its ``func_name``/``cases`` and, for tests
    only, its ``isolate``/``audit`` layer switches."""
    return SandboxResult(**host.run(source, stdin, limits, **how))
