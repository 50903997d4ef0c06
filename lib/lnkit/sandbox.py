"""Run model-generated Python, which is hostile input, in a throwaway locked-down process.

Code verifiers (:func:`lnkit.verify.verify_code`) and RL rewards run thousands of tiny programs written by a
model that is being optimised to make them pass; some will loop, allocate, fork, print without end, poke at
files or the network, or print a fake verdict. Each run costs one fresh interpreter plus two forks (about
30-40 ms on a 2-core CPU), so a verdict stays cheap.

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
4. **Namespaces and a private uid, when the parent is root** (these machines and CI). Before any user code
   the child's bootstrap enters new namespaces: *network* (only a down loopback: no connection to anything,
   loopback included); *mount*, in which every mount is re-mounted read-only, the working directory is a
   small private tmpfs and ``/proc`` shows only the sandbox; *PID*, where an init reaps and, when the user
   process dies, the kernel kills everything left, forked or ``setsid`` or not. Then ``PR_SET_NO_NEW_PRIVS``
   and a drop to a uid/gid of its own (one of ``_UID_SLOTS`` uids from ``_UID_BASE``, leased with ``flock``
   so concurrent runs never share one): that is what makes ``RLIMIT_NPROC`` mean "this run" (root ignores
   it, and a shared ``nobody`` would count every other sandbox and daemon) and makes "kill every process of
   the uid" safe. If the interpreter lives where strangers cannot enter (pyenv under ``/root`` here), a tmpfs
   is laid over that directory in the mount namespace with the interpreter's prefix bound back into it,
   which also hides the rest.
5. **An audit hook** (``sys.addaudithook``) installed before user code, denying: sockets; ``subprocess``,
   ``os.system``, ``os.exec*``, ``os.fork``, ``os.posix_spawn``, ``os.kill``; ``ctypes`` and the modules
   that reach raw memory or fork (``_posixsubprocess``, ``_xxsubinterpreters``, ``_test*``); writes, renames,
   removals, ``chmod`` and links outside the working directory; reads outside the interpreter, ``/usr``,
   ``/lib``, ``/etc``, ``/dev``, the process's own ``/proc`` entry and the working directory; ``setrlimit``;
   swapping a function's ``__code__``. Audit hooks are bypassable in theory (crafted bytecode, ``dir_fd``
   tricks, calls that raise no event such as ``os.mkfifo`` or ``signal.pidfd_send_signal``), which is why
   they sit behind the OS layers.

**When not root**, layer 4 shrinks to what an unprivileged process can do. The bootstrap tries an
unprivileged user namespace with new network and PID namespaces (kernels that allow it, most do: no
network, and the kill-everything-on-exit holds); the rest is weaker. The child keeps the caller's uid, so
``RLIMIT_NPROC`` is set to the uid's current task count plus ``nproc`` (it counts the caller's other
processes too); the filesystem is as writable and readable as it is for the caller, guarded only by the
audit hook, with ``RLIMIT_FSIZE`` bounding each file but not their number; other processes of the uid could
be signalled or read through ``/proc`` if the hook were bypassed; there is no sweep by uid (it would kill
the caller), and without a PID namespace a process that calls ``setsid`` escapes the group kill. Without
``CAP_SYS_ADMIN`` as root (a default Docker container) the namespaces fail the same way while the uid drop
still works (if strangers cannot read the interpreter, only modules already loaded can be imported).
``SandboxResult.layers`` names the layers a run
actually got.

Tests: ``pytest tests/test_sandbox.py`` (about 10 s on 2 cores; hostile programs, and each wall alone).
"""

from __future__ import annotations

import ast
import fcntl
import functools
import inspect
import os
import random
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# private uids/gids for root runs: far above real users and the low ends of container ranges, below 2**31
# (tools that treat uids as signed); one slot per concurrent run
_UID_BASE = 2_000_000_000
_UID_SLOTS = 256
_RESULT_CAP = 4 << 20  # bytes of check_function results kept; more means a forged flood or a huge value
_EXIT_GRACE_S = 0.2  # after the child exits, how long its inherited pipes may stay open (stragglers)


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

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "file_mb", "nproc", "output_bytes"):
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


# ---------------------------------------------------------------------------------------------------------
# Parent side.


def _run(
    source: str,
    stdin: str,
    limits: SandboxLimits,
    *,
    func_name: str | None = None,
    cases: list | None = None,
    isolate: bool = True,
    audit: bool = True,
) -> SandboxResult:
    """One sandboxed interpreter. ``isolate``/``audit`` switch layers 4/5 off, only so tests can show that
    each layer stops hostile code on its own; nothing else should turn them off."""
    uid, lease = _lease_uid() if isolate and os.geteuid() == 0 else (None, None)
    workdir = result_r = result_w = None
    nonce = secrets.token_hex(16)
    started = time.monotonic()
    try:
        workdir = tempfile.mkdtemp(prefix="lnkit-sandbox-")
        result_r, result_w = os.pipe()
        if uid is not None:
            os.chown(workdir, uid, uid)  # needed when the mount namespace (and its tmpfs) is unavailable
        own_tasks = 0 if os.geteuid() == 0 else _count_tasks(os.getuid())
        config = {
            "nonce": nonce,
            "parent": os.getpid(),
            "result_fd": result_w,
            "workdir": os.path.realpath(workdir),
            "uid": uid,
            "isolate": isolate,
            "audit": audit,
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "file_mb": limits.file_mb,
            "nproc": limits.nproc + own_tasks,
            "prefixes": sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}),
            "source": source,
            "func": func_name,
            "cases": [args for args, _ in cases or ()],
        }
        header = repr(config).encode()
        payload = b"%010d" % len(header) + header + stdin.encode()
        env = {"LC_ALL": "C.UTF-8", "HOME": config["workdir"], "TMPDIR": config["workdir"]}
        proc = subprocess.Popen(
            [_interpreter(), "-I", "-S", "-B", "-c", _bootstrap()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            pass_fds=(result_w,),
            start_new_session=True,
        )
        os.close(result_w)
        result_w = None
        try:
            streams, overflow, timed_out = _pump(proc, payload, result_r, limits, started + limits.wall_s)
        finally:
            _kill_group(proc.pid)  # before reaping: the group id cannot have been reused yet
            if uid is not None and _kill_uid(uid):
                os.ftruncate(lease, 0)  # slot clean: the next lease need not sweep it first
            proc.wait()
    finally:
        for fd in (result_r, result_w):
            if fd is not None:
                os.close(fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if lease is not None:
            os.close(lease)
    wall = time.monotonic() - started
    records = _parse_records(bytes(streams["result"]), nonce)
    reason = _process_reason(proc.returncode, overflow, timed_out, records)
    if func_name is not None and not overflow:
        reason = _case_reason(cases, records, reason)
    out, err = (bytes(streams[k]).decode("utf-8", "replace") for k in ("stdout", "stderr"))
    return SandboxResult(
        ok=not reason,
        returncode=proc.returncode,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        reason=reason,
        wall_s=wall,
        layers=records["layers"],
    )


@functools.cache
def _interpreter() -> str:
    """The base interpreter, not a virtualenv's symlink to it: -I -S then sees the stdlib and nothing else."""
    base = getattr(sys, "_base_executable", "") or sys.executable
    return os.path.realpath(base if os.path.exists(base) else sys.executable)


@functools.cache
def _bootstrap() -> str:
    """The child's code: the ``_child_*`` functions below, shipped as source (the child cannot import lnkit)."""
    parts = [inspect.getsource(f) for f in (_child_isolate, _child_limits, _child_hook, _child_main)]
    return "\n\n".join(parts) + "\n_child_main()\n"


def _lease_uid() -> tuple[int, int]:
    """A private uid for this run and the fd whose flock holds it until closed. The slot file holds "1"
    while a run may have processes on the uid; a parent that died mid-run leaves it so, and the next lease
    sweeps the uid first."""
    lockdir = os.path.join(tempfile.gettempdir(), "lnkit-sandbox-uids")
    try:
        os.mkdir(lockdir, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(lockdir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{lockdir} is not a root-owned private directory; refusing to lease sandbox uids")
    first = random.randrange(_UID_SLOTS)
    for attempt in range(2 * _UID_SLOTS):
        slot = (first + attempt) % _UID_SLOTS
        fd = os.open(os.path.join(lockdir, str(slot)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # the second round blocks: more than _UID_SLOTS concurrent runs wait for one to finish
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if attempt < _UID_SLOTS else 0))
        except BlockingIOError:
            os.close(fd)
            continue
        if os.pread(fd, 1, 0):
            _kill_uid(_UID_BASE + slot)
        os.pwrite(fd, b"1", 0)
        return _UID_BASE + slot, fd
    raise RuntimeError("no sandbox uid slot could be leased")


def _proc_tasks():
    """(pid, real uid, state, threads) of every live process, read from /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                text = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
        try:
            yield (
                int(name),
                int(fields[b"Uid"].split()[0]),
                fields[b"State"].split()[0].decode(),
                int(fields[b"Threads"]),
            )
        except (KeyError, ValueError, IndexError):
            continue


def _count_tasks(uid: int) -> int:
    return sum(threads for _, u, state, threads in _proc_tasks() if u == uid and state != "Z")


def _kill_uid(uid: int) -> bool:
    """SIGKILL every live process of ``uid`` until none is left (True) or 100 sweeps failed (False); catches
    the processes that left the process group."""
    for _ in range(100):  # a forking straggler can add one between two scans; RLIMIT_NPROC bounds how many
        alive = [pid for pid, u, state, _ in _proc_tasks() if u == uid and state != "Z"]
        if not alive:
            return True
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc, payload: bytes, result_r: int, limits: SandboxLimits, deadline: float):
    """Feed stdin and read stdout, stderr and the result pipe, without blocking and without keeping more than
    the caps, until all close and the child exits, a cap is passed or the deadline comes."""
    sel = selectors.DefaultSelector()
    streams = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray()}
    caps = {"stdout": limits.output_bytes, "stderr": limits.output_bytes, "result": _RESULT_CAP}
    for name, fd in (
        ("stdout", proc.stdout.fileno()),
        ("stderr", proc.stderr.fileno()),
        ("result", result_r),
    ):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE, "stdin")
    sent, open_reads, exited_at = 0, 3, None
    overflow = timed_out = False
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and _has_exited(proc.pid):
                exited_at = now
            if exited_at is not None and (not open_reads or now - exited_at > _EXIT_GRACE_S):
                break  # done; or the child is gone and something it left behind holds the pipes open
            if not open_reads:  # output done, the monitor is passing the exit status on
                time.sleep(0.001)
                continue
            for key, _ in sel.select(min(deadline - now, 0.05)):
                name = key.data
                if name == "stdin":
                    try:
                        sent += os.write(key.fd, payload[sent : sent + 65536])
                    except BrokenPipeError:
                        sent = len(payload)
                    if sent >= len(payload):
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    open_reads -= 1
                    continue
                room = caps[name] - len(streams[name])
                streams[name] += chunk[:room]
                overflow = overflow or len(chunk) > room
            if overflow:
                break
    finally:
        sel.close()
        if not proc.stdin.closed:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        proc.stdout.close()
        proc.stderr.close()
    return streams, overflow, timed_out


def _has_exited(pid: int) -> bool:
    """True once the child has exited, without reaping it: its pid (and process group id) stay reserved, so
    the group kill that follows cannot hit an unrelated process that reused the number."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _parse_records(data: bytes, nonce: str) -> dict:
    """The child's report lines, ``<nonce> <kind> [<case>] <repr of a str>``. Lines without the nonce are
    ignored; a case (or the load line) reported twice counts as forged."""
    records = {"exc": None, "layers": (), "load": None, "cases": {}, "forged": False}
    for line in data.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        kind, _, rest = rest.partition(" ")
        if head != nonce:
            continue
        index = None
        if kind in ("value", "raised", "unreportable"):
            index, _, rest = rest.partition(" ")
        try:
            text = ast.literal_eval(rest)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            continue
        if not isinstance(text, str):
            continue
        if kind == "layers":
            records["layers"] = tuple(text.split())
        elif kind == "exc":
            records["exc"] = text
        elif kind == "load":
            records["forged"] |= records["load"] is not None
            records["load"] = text
        elif index is not None:
            records["forged"] |= index in records["cases"]
            records["cases"][index] = (kind, text)
    return records


def _process_reason(returncode: int, overflow: bool, timed_out: bool, records: dict) -> str:
    if overflow:
        return "output limit"
    if timed_out:
        return "timeout"
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "cpu time"
        if sig == signal.SIGXFSZ:
            return "file size"
        return f"killed by signal {sig}"
    if returncode:
        exc = records["exc"]
        if exc is None:
            return f"exit code {returncode}"
        name = exc.split(":", 1)[0]
        if name == "MemoryError":
            return "memory"
        if name in ("SyntaxError", "IndentationError", "TabError"):
            return "syntax error: " + _short(exc.split(":", 1)[-1].strip())
        return f"exit code {returncode}: {_short(exc)}"
    return ""


def _case_reason(cases: list, records: dict, process_reason: str) -> str:
    """The first failing case, in words; '' when all passed and the process ended cleanly."""
    if records["forged"]:
        return "forged verdict: a result was reported twice"
    if records["load"] is None:
        return process_reason or "program exited before its function could be checked"
    if records["load"] != "ok":
        return _short(records["load"])
    for i, (_, expected) in enumerate(cases):
        kind, text = records["cases"].get(str(i), (None, ""))
        if kind is None:
            return f"case {i}: {process_reason or 'no result'}"
        if kind == "raised":
            return f"case {i}: raised {_short(text)}"
        if kind == "unreportable":
            return f"case {i}: {_short(text)}"
        try:
            got = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return f"case {i}: got unreadable value {_short(text)}"
        if got != expected:
            return f"case {i}: got {_short(text)}, expected {_short(repr(expected))}"
    return process_reason


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# Child side. These functions are sent as source to ``python -I -S -c`` and run there as root (when the
# parent is root) before any user code; they must import what they use and touch no module globals.


def _child_isolate(cfg):
    """Namespaces, read-only mounts, a private tmpfs, no-new-privileges; returns the layers obtained.

    With a new PID namespace this process forks twice: it stays outside as a monitor that waits and passes
    the exit status on; its child is pid 1 of the namespace, an init that only reaps; the grandchild returns
    from here and runs the user code as an ordinary process (pid 1 would ignore SIGXCPU). When the user
    process dies, init exits and the kernel kills and reaps everything left in the namespace, setsid or not.
    """
    import _signal
    import codecs
    import ctypes
    import gc
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, clone_newnet, clone_newuser, clone_newpid = 0x00020000, 0x40000000, 0x10000000, 0x20000000
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount = 1, 2, 4, 8, 32
    ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18
    keep = {"nosuid": ms_nosuid, "nodev": ms_nodev, "noexec": ms_noexec, "noatime": 1024, "nodiratime": 2048}
    keep["relatime"] = 1 << 21
    layers = []

    def mount(src, dst, fstype, flags, data):
        def b(x):
            return x.encode() if isinstance(x, str) else x

        if libc.mount(b(src), b(dst), b(fstype), ctypes.c_ulong(flags), b(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox setup: mount {src} on {dst}: {os.strerror(err)}")

    zero = ctypes.c_ulong(0)

    def die_with_parent():  # PR_SET_PDEATHSIG: if the parent crashes, its sandbox goes with it
        libc.prctl(1, ctypes.c_ulong(_signal.SIGKILL), zero, zero, zero)

    def enter_pidns(mount_proc):
        status_r, status_w = os.pipe()
        init = os.fork()
        if init:  # the monitor: holds nothing, waits, passes the user process's status on as its own
            os.close(status_w)
            for fd in (0, 1, 2, cfg["result_fd"]):
                os.close(fd)
            os.waitpid(init, 0)
            status = int(os.read(status_r, 32) or _signal.SIGKILL)  # no status: init was killed
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
                    _signal.signal(sig, _signal.SIG_DFL)
                os.kill(os.getpid(), sig)
                os._exit(128 + sig)
            os._exit(os.WEXITSTATUS(status))
        os.close(status_r)
        die_with_parent()
        if mount_proc:  # a /proc of our own: the host's processes (and their command lines) disappear
            mount("proc", "/proc", "proc", ms_nosuid | ms_nodev | ms_noexec | ms_rdonly, None)
            layers.append("proc")
        user = os.fork()
        if user == 0:
            os.close(status_w)
            return
        for fd in (0, 1, 2, cfg["result_fd"]):  # init: reap until the user process is gone, then end it all
            os.close(fd)
        while True:
            pid, status = os.wait()
            if pid == user:
                os.write(status_w, str(status).encode())
                os._exit(0)

    die_with_parent()
    if os.getppid() != cfg["parent"]:
        os._exit(70)  # the parent died before the line above
    if os.geteuid() != 0:  # unprivileged: a user namespace lets us take the network and the pid space
        if libc.unshare(clone_newuser | clone_newnet | clone_newpid) == 0:
            layers += ["netns", "pidns"]
        elif libc.unshare(clone_newuser | clone_newnet) == 0:
            layers.append("netns")
        if "pidns" in layers:
            enter_pidns(mount_proc=False)
        libc = None
        gc.collect()
        return layers

    if libc.unshare(clone_newnet) == 0:
        layers.append("netns")
    mntns = libc.unshare(clone_newns) == 0
    if libc.unshare(clone_newpid) == 0:
        layers.append("pidns")
    if mntns:
        workdir = cfg["workdir"]
        mount(None, "/", None, ms_rec | ms_private, None)  # nothing below propagates back to the host
        # the interpreter must stay reachable once we are a stranger: lay a tmpfs over the first directory
        # strangers cannot enter (e.g. /root) and bind the interpreter's prefix back into it
        for prefix in cfg["prefixes"]:
            blocked, path = None, ""
            for part in prefix.strip("/").split("/"):
                path += "/" + part
                if not os.stat(path).st_mode & 0o001:
                    blocked = path
                    break
            if blocked is None:
                continue
            keep_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
            mount("tmpfs", blocked, "tmpfs", ms_nosuid | ms_nodev, "mode=0755,size=64k,nr_inodes=256")
            os.makedirs(prefix, exist_ok=True)
            mount(f"/proc/self/fd/{keep_fd}", prefix, None, ms_bind | ms_rec, None)
            os.close(keep_fd)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:  # under host memory pressure, die first
                f.write("1000")
        except OSError:
            pass
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        readonly = True
        for fields in mounts:
            point = codecs.escape_decode(fields[4].encode())[0]
            flags = ms_remount | ms_bind | ms_rdonly
            for opt in fields[5].split(","):
                flags |= keep.get(opt, 0)
            try:
                mount(None, point, None, flags, None)
            except OSError:
                readonly = readonly and point != b"/"
        if readonly:
            layers.append("readonly")
        size_kb = 2 * cfg["file_mb"] * 1024
        opts = f"size={size_kb}k,nr_inodes=4096,mode=0700,uid={cfg['uid']},gid={cfg['uid']}"
        mount("tmpfs", workdir, "tmpfs", ms_nosuid | ms_nodev, opts)
        os.chdir(workdir)
        layers.append("mountns")
    if "pidns" in layers:
        enter_pidns(mount_proc=mntns)
    # PR_SET_NO_NEW_PRIVS: no setuid binary can hand root back, even if the audit hook is bypassed
    if libc.prctl(38, ctypes.c_ulong(1), zero, zero, zero) == 0:
        layers.append("nonewprivs")
    libc = mount = None
    gc.collect()  # the CDLL's cached function pointers must not be found later through gc.get_objects()
    return layers


def _child_limits(cfg):
    import resource

    mb = 1 << 20
    for name, soft, hard in (
        ("RLIMIT_CPU", cfg["cpu_s"], cfg["cpu_s"] + 1),  # SIGXCPU, then SIGKILL a second later
        ("RLIMIT_AS", cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
        ("RLIMIT_FSIZE", cfg["file_mb"] * mb, cfg["file_mb"] * mb),
        ("RLIMIT_NPROC", cfg["nproc"], cfg["nproc"]),
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_NOFILE", 64, 64),
        ("RLIMIT_MEMLOCK", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _child_hook(workdir, prefixes):
    """The audit hook. Everything it calls is bound as a default argument, so user code that rebinds builtins
    or module attributes cannot change what it checks (setting ``__defaults__``/``__code__`` is denied)."""
    import os
    import sys

    deny_exact = frozenset(
        ("os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.symlink", "os.link", "os.chown",
         "os.chflags", "os.lchflags", "pty.spawn", "signal.pthread_kill", "resource.setrlimit",
         "resource.prlimit", "sys.addaudithook", "code.__new__", "sqlite3.enable_load_extension",
         "sqlite3.load_extension", "os.startfile")
    )  # fmt: skip
    deny_prefix = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "_winapi.")
    # raw memory, forking, and C modules that open or create files without an "open" audit event
    deny_import = ("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_test",
                   "cffi", "_cffi_backend", "readline", "_gdbm", "_dbm", "_posixshmem")  # fmt: skip
    own_proc = ("/proc/self", "/proc/thread-self", f"/proc/{os.getpid()}")
    read_roots = (*prefixes, workdir, "/usr", "/lib", "/lib64", "/etc", "/dev", *own_proc)
    path_events = {  # event -> (index of a path argument, index of its dir_fd argument or None)
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
        "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
        "sqlite3.connect": ((0, None),),  # sqlite opens its files in C, past the "open" event
    }  # fmt: skip

    def resolve(path, dir_fd=None, _fspath=os.fspath, _getcwd=os.getcwd, _readlink=os.readlink,
                _isinstance=isinstance, _bytes=bytes):  # fmt: skip
        """Absolute, with . and .. folded lexically (no symlinks can be made, so none lead out)."""
        path = _fspath(path)
        if _isinstance(path, _bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            at_cwd = dir_fd is None or dir_fd < 0  # events report "no dir_fd" as None, -1 or AT_FDCWD
            path = (_getcwd() if at_cwd else _readlink(f"/proc/self/fd/{dir_fd}")) + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def under(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def hook(event, args, _workdir=(workdir,), _read_roots=read_roots, _deny_exact=deny_exact,
             _deny_prefix=deny_prefix, _deny_import=deny_import, _path_events=path_events, _resolve=resolve,
             _under=under, _own_proc=own_proc, _write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
             _getpid=os.getpid, _stat=os.stat, _readlink=os.readlink, _isinstance=isinstance, _str=str, _int=int, _len=len,
             _error=PermissionError):  # fmt: skip
        what = None
        if event == "open":
            path, mode, flags = args
            if _isinstance(path, _int):
                return
            full = _resolve(path)
            writing = (flags or 0) & _write_flags
            for c in mode or "":
                writing = writing or c in "wax+"
            if writing:
                if not _under(full, _workdir) and full != "/dev/null":
                    what = f"writing {full!r}"
            elif not _under(full, _read_roots) or full.startswith("/proc/") and not _under(full, _own_proc):
                what = f"reading {full!r}"
            elif mode is None and not _under(full, _workdir):
                try:
                    if _stat(full).st_mode & 0o170000 == 0o040000:
                        what = f"opening directory {full!r}"  # a dir fd would let dir_fd= calls dodge this
                except OSError:
                    pass
        elif event in _path_events:
            for path_i, fd_i in _path_events[event]:
                path = args[path_i]
                if _isinstance(path, _int):  # fchmod, ftruncate...: judge the file behind the descriptor
                    full = _readlink(f"/proc/self/fd/{path}")
                elif event == "sqlite3.connect" and _str(path).startswith("file:"):
                    full = "a sqlite URI"  # may name any file; ":memory:" and plain relative names are fine
                else:
                    full = _resolve(path, args[fd_i] if fd_i is not None and fd_i < _len(args) else None)
                if not _under(full, _workdir):
                    what = f"on {full!r}"
        elif event == "import":
            name = args[0]
            for bad in _deny_import:
                if name == bad or name.startswith(bad + ".") or bad == "_test" and name.startswith(bad):
                    what = f"of {name!r}"
        elif event == "object.__setattr__":
            if _len(args) > 1 and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                what = f"setting {args[1]}"
        elif event in _deny_exact or event.startswith(_deny_prefix):
            what = ""
        if what is not None:
            raise _error(f"lnkit sandbox: {event} {what}".rstrip() + " is not allowed")

    sys.addaudithook(hook)


def _child_main():
    """Read the config, lock the process down, run the user code, report on the result pipe."""
    import os
    import sys

    def read_exact(n):
        chunks = []
        while n:
            chunk = os.read(0, n)
            if not chunk:
                os._exit(70)
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    cfg = eval(read_exact(int(read_exact(10))).decode(), {"__builtins__": {}, "set": set})
    nonce, result_fd, write, _repr, _str, _type = cfg["nonce"], cfg["result_fd"], os.write, repr, str, type

    def report(*fields):
        line = (nonce + " " + " ".join(fields) + "\n").encode("utf-8", "backslashreplace")
        while line:
            line = line[write(result_fd, line) :]

    layers = []
    if cfg["isolate"]:
        layers += _child_isolate(cfg)
    for name in [n for n in sys.modules if n in ("ctypes", "_ctypes") or n.startswith("ctypes.")]:
        del sys.modules[name]  # forces a fresh (audited, denied) import if user code asks for ctypes
    _child_limits(cfg)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        layers.append("uid")
    layers.append("rlimits")
    os.umask(0o077)
    if cfg["audit"]:
        _child_hook(cfg["workdir"], cfg["prefixes"])
        layers.append("audit")
    report("layers", _repr(" ".join(layers)))
    sys.argv = ["solution.py"]
    sys.stdout.reconfigure(errors="backslashreplace")
    func_name, cases = cfg["func"], cfg["cases"]
    namespace = {"__name__": "__main__" if func_name is None else "__sandbox__", "__builtins__": __builtins__}
    source = cfg["source"]
    del cfg
    _callable, _enumerate, _all, _exit, _flush = callable, enumerate, all, os._exit, sys.stdout.flush
    list_types, atoms = (list, tuple, set), (int, float, complex, str, bytes, bool, _type(None))

    def plain(value, depth=0):
        t = _type(value)
        if t in atoms:
            return True
        if depth > 50:
            return False
        if t is dict:
            return _all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
        return t in list_types and _all(plain(v, depth + 1) for v in value)

    try:
        exec(compile(source, "<solution>", "exec", dont_inherit=True), namespace)  # noqa: S102 -- the point
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- hostile code may raise anything; report it, exit 1
        try:
            report("exc", _repr(_type(exc).__name__ + ": " + _str(exc)))
        except BaseException:  # noqa: BLE001, S110 -- a str() that raises only costs the reason its detail
            pass
        tb = exc.__traceback__
        exc.__traceback__ = tb.tb_next if tb is not None else None  # drop this bootstrap's own frame
        sys.excepthook(_type(exc), exc, exc.__traceback__)
        raise SystemExit(1) from None
    if func_name is None:
        return
    func = namespace.get(func_name)
    if not _callable(func):
        report("load", _repr(f"missing function {func_name!r}"))
        _exit(0)
    report("load", _repr("ok"))
    for i, args in _enumerate(cases):
        try:
            value = func(*args)
        except BaseException as exc:  # noqa: BLE001 -- a failing case, whatever it raised
            try:
                text = _type(exc).__name__ + ": " + _str(exc)
            except BaseException:  # noqa: BLE001 -- a user __str__ that raises
                text = "an exception that cannot be shown"
            report("raised", _str(i), _repr(text))
            continue
        try:
            if not plain(value):
                report(
                    "unreportable", _str(i), _repr(f"returned a {_type(value).__name__}, not a plain literal")
                )
                continue
            report("value", _str(i), _repr(_repr(value)))
        except (ValueError, RecursionError, MemoryError):
            report("unreportable", _str(i), _repr("returned a value too large to report"))
    try:
        _flush()
        sys.stderr.flush()
    finally:
        _exit(0)
