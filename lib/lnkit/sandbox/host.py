"""The host side of the sandbox: everything that runs in the caller's process, never in the child.

One run, in order (:func:`run`): lease a private uid when root (:func:`_lease_uid`), make a working directory
and the result pipe, start ``child.py`` by path from the base interpreter (``python -I -S -B .../child.py``)
in a new session, write it its header and the program's stdin while reading stdout, stderr and the result pipe
under their caps and the wall-clock deadline (:func:`_pump`), then kill the process group and every process of
the uid, reap, and remove the directory. Only then are the child's result records read (:func:`_parse_records`)
and turned into a reason (:func:`_process_reason`, :func:`_case_reason`). Nothing the child wrote is trusted:
records need the run's nonce, duplicates count as forgery, and the expected values never leave this process.
"""

from __future__ import annotations

import ast
import fcntl
import functools
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
from typing import TYPE_CHECKING

from lnkit.sandbox import memcg, rootfs

if TYPE_CHECKING:  # only for annotations: the API module imports this one
    from lnkit.sandbox import SandboxLimits

# the file the child runs; started by path, never imported there (it needs nothing but the stdlib)
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
# private uids/gids for root runs: far above real users and the low ends of container ranges, below 2**31
# (tools that treat uids as signed); one slot per concurrent run
_UID_BASE = 2_000_000_000
_UID_SLOTS = 256
_RESULT_CAP = 4 << 20  # bytes of check_function results kept; more means a forged flood or a huge value
_EXIT_GRACE_S = 0.2  # after the child exits, how long its inherited pipes may stay open (stragglers)


def run(
    source: str,
    stdin: str,
    limits: SandboxLimits,
    *,
    func_name: str | None = None,
    cases: list | None = None,
    isolate: bool = True,
    audit: bool = True,
) -> dict:
    """One sandboxed interpreter; returns the fields of a :class:`lnkit.sandbox.SandboxResult`.
    ``isolate``/``audit`` switch layers 4/5 off, only so tests can show that each layer stops hostile code
    on its own; nothing else should turn them off."""
    root = isolate and os.geteuid() == 0
    uid, lease = _lease_uid() if root else (None, None)
    workdir = result_r = result_w = cgroup = None
    nonce = secrets.token_hex(16)
    started = time.monotonic()
    out_of_memory = False
    try:
        workdir = tempfile.mkdtemp(prefix="lnkit-sandbox-")
        result_r, result_w = os.pipe()
        if uid is not None:
            os.chown(workdir, uid, uid)  # needed when the mount namespace (and its tmpfs) is unavailable
        cgroup = memcg.create(nonce, _memcg_bytes(limits)) if root else None
        config = _config(
            source, limits, nonce=nonce, result_fd=result_w, workdir=workdir, uid=uid,
            isolate=isolate, audit=audit, func_name=func_name, cases=cases, cgroup=cgroup,
        )  # fmt: skip
        payload = _payload(config, stdin)
        proc = _spawn(workdir, result_w)
        os.close(result_w)
        result_w = None
        deadline = started + limits.wall_s
        streams, overflow, timed_out = _watch(proc, payload, result_r, limits, deadline, uid, lease)
    finally:
        if cgroup is not None:
            out_of_memory = memcg.remove(cgroup)
        _clean_up((result_r, result_w), workdir, lease)
    wall = time.monotonic() - started
    return _verdict(
        proc.returncode, streams, overflow, timed_out, nonce, func_name, cases, wall,
        out_of_memory=out_of_memory, result_bytes=limits.result_bytes,
    )  # fmt: skip


def _memcg_bytes(limits: SandboxLimits) -> int:
    """What the run's memory cgroup allows: the address space, the working directory's tmpfs (2 x file_mb),
    and 32 MiB for page tables, pipes and the two small helper processes of the PID namespace."""
    return (limits.memory_mb + 2 * limits.file_mb + 32) << 20


def _config(
    source, limits, *, nonce, result_fd, workdir, uid, isolate, audit, func_name, cases, cgroup=None
) -> dict:
    """The child's header (see ``child.py``): plain literals only, as the child reads it with an ``eval``
    that has no builtins. The expected values stay here: only the cases' arguments go."""
    own_tasks = 0 if os.geteuid() == 0 else _count_tasks(os.getuid())
    plan, hide = rootfs.plan(_interpreter()) if isolate and os.geteuid() == 0 else ((), ())
    return {
        "root": plan,
        "hide": hide,
        "cgroup": cgroup,
        "result_bytes": limits.result_bytes,
        "nonce": nonce,
        "parent": os.getpid(),
        "result_fd": result_fd,
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


def _payload(config: dict, stdin: str) -> bytes:
    """What the child reads on stdin: the header's length in ten digits, the header, the program's stdin."""
    header = repr(config).encode()
    return b"%010d" % len(header) + header + stdin.encode()


def _spawn(workdir: str, result_w: int) -> subprocess.Popen:
    """Start ``child.py`` in a session of its own (so the whole group can be killed), with an environment of
    three variables: none of the parent's reach the child."""
    home = os.path.realpath(workdir)
    return subprocess.Popen(
        [_interpreter(), "-I", "-S", "-B", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env={"LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home},
        pass_fds=(result_w,),
        start_new_session=True,
    )


def _watch(proc, payload: bytes, result_r: int, limits: SandboxLimits, deadline: float, uid, lease):
    """Pump the pipes until the run ends or breaks a limit, then kill all that is left of it and reap it."""
    try:
        return _pump(proc, payload, result_r, limits, deadline)
    finally:
        _kill_group(proc.pid)  # before reaping: the group id cannot have been reused yet
        if uid is not None and _kill_uid(uid):
            os.ftruncate(lease, 0)  # slot clean: the next lease need not sweep it first
        proc.wait()


def _clean_up(fds, workdir: str | None, lease: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    if lease is not None:
        os.close(lease)  # frees the slot; one still marked "1" (a failed sweep) is swept by its next run


def _verdict(
    returncode,
    streams,
    overflow,
    timed_out,
    nonce,
    func_name,
    cases,
    wall,
    *,
    out_of_memory=False,
    result_bytes=65536,
) -> dict:
    """The result's fields, from what the run did and what its records claim."""
    records = _parse_records(bytes(streams["result"]), nonce, result_bytes)
    reason = "memory" if out_of_memory else _process_reason(returncode, overflow, timed_out, records)
    if func_name is not None and not overflow:
        reason = _case_reason(cases, records, reason)
    out, err = (bytes(streams[k]).decode("utf-8", "replace") for k in ("stdout", "stderr"))
    return {
        "ok": not reason,
        "returncode": returncode,
        "stdout": out,
        "stderr": err,
        "timed_out": timed_out,
        "reason": reason,
        "wall_s": wall,
        "layers": records["layers"],
    }


@functools.cache
def _interpreter() -> str:
    """The base interpreter, not a virtualenv's symlink to it: -I -S then sees the stdlib and nothing else."""
    base = getattr(sys, "_base_executable", "") or sys.executable
    return os.path.realpath(base if os.path.exists(base) else sys.executable)


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


def _parse_records(data: bytes, nonce: str, result_bytes: int = 65536) -> dict:
    """The child's report lines, ``<nonce> <kind> [<case>] <repr of a str>``. Lines without the nonce are
    ignored; a case (or the load line) reported twice counts as forged. What is parsed is bounded before
    parsing: a line longer than a ``result_bytes`` value can be, escaped, is not parsed but counted as a value
    too large (the child checks too, but the child is not trusted)."""
    records = {"exc": None, "layers": (), "load": None, "cases": {}, "forged": False}
    too_long = 4 * result_bytes + 64  # repr of a str escapes a character into at most 4
    for line in data.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        kind, _, rest = rest.partition(" ")
        if head != nonce:
            continue
        index = None
        if kind in ("value", "raised", "unreportable"):
            index, _, rest = rest.partition(" ")
        if len(rest) > too_long:
            text = f"a report of {len(rest)} characters, more than the limit of {result_bytes}"
            kind = "unreportable" if index is not None else kind
        else:
            try:
                text = ast.literal_eval(rest)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                continue
        if not isinstance(text, str):
            continue
        if kind == "value" and len(text) > result_bytes:
            kind, text = "unreportable", f"returned a value too large to report ({len(text)} characters)"
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
