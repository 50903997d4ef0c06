"""Hostile programs against lnkit.sandbox: each must come back as a failed verdict, within the limits, leaving
the host untouched. Where the machine allows it (root), each wall is also tested on its own: the audit hook
without the OS layers, and the OS layers (namespaces, private uid, read-only mounts) without the hook.
"""

from __future__ import annotations

import ast
import doctest
import fcntl
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from lnkit import sandbox
from lnkit.sandbox import SandboxLimits, SandboxResult, check_function, host, run_python

FAST = SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256)  # tight, so a runaway program costs ~1-2 s
SLACK_S = 3.0  # a result must be back within wall_s + this (a behaviour bound, not a benchmark)
ROOT = os.geteuid() == 0

# The ways to run a program: everything on; the audit hook alone (no namespaces, no uid drop); the OS
# layers alone (no hook; only meaningful as root, where they exist).
MODES = [
    pytest.param({}, id="all-layers"),
    pytest.param({"isolate": False}, id="audit-hook-only"),
    pytest.param(
        {"audit": False},
        id="os-layers-only",
        marks=pytest.mark.skipif(not ROOT, reason="namespaces and the uid drop need root"),
    ),
]


def run(
    source: str, mode: dict | None = None, limits: SandboxLimits = FAST, stdin: str = ""
) -> SandboxResult:
    """A sandboxed run, checked to come back within the limit whatever the program did."""
    t0 = time.monotonic()
    source = textwrap.dedent(source)
    if mode:
        result = sandbox._run(source, stdin, limits, **mode)
    else:
        result = run_python(source, stdin=stdin, limits=limits)
    elapsed = time.monotonic() - t0
    assert elapsed < limits.wall_s + SLACK_S, (elapsed, result)
    assert result.wall_s < limits.wall_s + SLACK_S
    return result


def leftover_processes(zombies: bool = False) -> list[int]:
    """Processes of a private sandbox uid whose slot no run holds: left behind. A held slot is a run in
    progress, maybe in another test session on this machine, and none of our business."""
    lockdir = os.path.join(tempfile.gettempdir(), "lnkit-sandbox-uids")
    left = []
    for pid, uid, _, _ in host._proc_tasks():
        slot = uid - host._UID_BASE
        if not 0 <= slot < host._UID_SLOTS:
            continue
        fd = os.open(os.path.join(lockdir, str(slot)), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a run holds the slot right now
        else:  # free slot: its last run has finished, so a process still there (seen again now) was left
            still = [state for p, u, state, _ in host._proc_tasks() if p == pid and u == uid]
            if still and (zombies or still[0] != "Z"):
                left.append(pid)
        finally:
            os.close(fd)
    return left


def assert_host_fine():
    assert leftover_processes() == []
    assert (
        subprocess.run(["true"], check=True, timeout=10).returncode == 0
    )  # the host can still start a process


def test_doctests():
    assert doctest.testmod(sandbox).failed == 0


# ------------------------------------------------------------------------------------------------ positive


def test_correct_function_passes():
    r = check_function("def f(x):\n    return x + 3\n", "f", [((1,), 4), ((2,), 5), ((-3,), 0)], limits=FAST)
    assert r.ok and r.reason == "" and r.returncode == 0


def test_structured_values_round_trip():
    src = "def g(xs, d):\n    return sorted(xs), {k: v * 2 for k, v in d.items()}, (None, 1.5, b'x', {3})\n"
    want = ([1, 2, 3], {"a": 2}, (None, 1.5, b"x", {3}))
    assert check_function(src, "g", [(([3, 1, 2], {"a": 1}), want)], limits=FAST).ok


def test_wrong_function_names_the_case():
    r = check_function("def f(x):\n    return x + 2\n", "f", [((1,), 3), ((4,), 7)], limits=FAST)
    assert not r.ok and r.reason == "case 1: got 6, expected 7"


def test_raising_function_names_the_case():
    r = check_function("def f(x):\n    return 1 // x\n", "f", [((1,), 1), ((0,), 0)], limits=FAST)
    assert not r.ok and r.reason.startswith("case 1: raised ZeroDivisionError")


def test_syntax_error_fails_with_reason():
    r = check_function("def f(x)\n    return x\n", "f", [((1,), 1)], limits=FAST)
    assert not r.ok and r.reason.startswith("syntax error:")
    assert "SyntaxError" in r.stderr


def test_missing_function_and_bad_cases():
    assert (
        check_function("def g(x):\n    return x\n", "f", [((1,), 1)], limits=FAST).reason
        == "missing function 'f'"
    )
    with pytest.raises(ValueError, match="not a Python literal"):
        check_function("def f(x):\n    return x\n", "f", [((object(),), 1)])


def test_stdin_is_delivered_and_exit_codes_reported():
    r = run("import sys\nprint(sum(int(t) for t in sys.stdin.read().split()))", stdin="1 2 3\n4\n")
    assert r.ok and r.stdout == "10\n"
    r = run("import sys\nprint('bye')\nsys.exit(3)")
    assert not r.ok and r.returncode == 3 and r.reason == "exit code 3" and r.stdout == "bye\n"


def test_files_inside_the_workdir_work_and_vanish():
    r = run(
        """
        import os
        with open("notes.txt", "w") as f:
            f.write("hello")
        os.mkdir("sub")
        os.rename("notes.txt", "sub/n.txt")
        print(open("sub/n.txt").read(), os.getcwd())
        """
    )
    assert r.ok, r
    text, cwd = r.stdout.split()
    assert text == "hello" and not os.path.exists(cwd)


def test_root_runs_get_every_layer():
    if not ROOT:
        pytest.skip("the OS layers need root")
    r = run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())")
    assert r.ok
    uid, gid, groups = r.stdout.split(maxsplit=2)
    assert host._UID_BASE <= int(uid) < host._UID_BASE + host._UID_SLOTS and gid == uid
    assert groups.strip() == "[]"
    layers = {"netns", "ipcns", "pidns", "mountns", "ownroot", "readonly", "noexec", "proc", "nonewprivs", "uid",
              "rlimits", "audit"}  # fmt: skip
    assert layers <= set(r.layers)
    # the audit hook refuses to list /proc; without it, the PID namespace shows only the sandbox
    r = run("import os\nprint([p for p in os.listdir('/proc') if p.isdigit()])", {"audit": False})
    assert r.ok and r.stdout.strip() == "['1', '2']"  # its own init and itself: no host processes


# ------------------------------------------------------------------------------------------------ hostile


def test_infinite_loop_is_stopped():
    r = run("while True:\n    pass\n")
    assert not r.ok and r.reason in ("cpu time", "timeout")
    r = run("import time\ntime.sleep(60)\n", limits=SandboxLimits(wall_s=1.0, cpu_s=1))
    assert not r.ok and r.timed_out and r.reason == "timeout"


def test_infinite_loop_in_checked_function_names_the_case():
    t0 = time.monotonic()
    src = "def f(x):\n    while x:\n        pass\n    return 0\n"
    r = check_function(src, "f", [((0,), 0), ((1,), 0)], limits=FAST)
    assert time.monotonic() - t0 < FAST.wall_s + SLACK_S
    assert not r.ok and r.reason in ("case 1: cpu time", "case 1: timeout")


def test_memory_bomb_is_stopped():
    r = run("xs = []\nwhile True:\n    xs.append(bytearray(10 << 20))\n")
    assert not r.ok and r.reason == "memory"
    r = run("x = 'a' * (10 << 30)\n")
    assert not r.ok and r.reason == "memory"


def test_big_file_is_stopped():
    r = run(
        "open('big', 'wb').write(b'x' * (20 << 20))\n", limits=SandboxLimits(wall_s=2, cpu_s=1, file_mb=4)
    )
    assert not r.ok and ("File too large" in r.reason or r.reason in ("file size", "memory"))


@pytest.mark.parametrize(
    "source",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
        "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n",
        "import os\nwhile True:\n    os.system('sleep 60 &')\n",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '60'], {})\n",
    ],
    ids=["fork-loop", "fork-loop-ignoring-errors", "subprocess", "os.system", "posix_spawn"],
)
def test_fork_bomb_is_stopped(source):
    r = run(source)
    assert not r.ok
    assert_host_fine()


def test_fork_bomb_against_the_os_layers_alone():
    """No audit hook: RLIMIT_NPROC on the private uid bounds the bomb, and the PID namespace (or else the
    kill-by-uid sweep) ends it, even children that left the process group, leaving not even zombies."""
    if not ROOT:
        pytest.skip("the private uid needs root")
    probe = run(
        "import os, resource\nprint(os.getuid(), resource.getrlimit(resource.RLIMIT_NPROC)[0])",
        {"audit": False},
    )
    uid, nproc = map(int, probe.stdout.split())
    assert uid != 0 and nproc == FAST.nproc  # the bomb below must never run as root
    bomb = """
        import os
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()  # leave the process group: only the uid sweep can find this one
            except OSError:
                pass
        """
    zombies_before = set(leftover_processes(zombies=True))
    r = run(bomb, {"audit": False})
    assert not r.ok and r.reason in ("timeout", "cpu time")
    assert_host_fine()
    assert set(leftover_processes(zombies=True)) <= zombies_before  # the namespace reaped them all


@pytest.mark.parametrize("mode", MODES)
def test_writing_outside_the_workdir_is_stopped(mode, tmp_path):
    target_dir = tmp_path / "shared"
    target_dir.mkdir()
    target_dir.chmod(0o777)  # writable for everyone: only the sandbox can stop the write
    target = target_dir / "pwned.txt"
    r = run(f"open({str(target)!r}, 'w').write('pwned')\n", mode)
    assert not r.ok
    assert not target.exists()
    r = run(f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n", mode)
    assert not r.ok and not target.exists()
    # world-writable host directories: only the audit hook or the read-only mounts stop these
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        if not os.path.isdir(shared):
            continue
        target = os.path.join(shared, f"lnkit-sandbox-test-{os.getpid()}-{time.monotonic_ns()}")
        try:
            r = run(f"open({target!r}, 'w').write('pwned')\n", mode)
            assert not r.ok and not os.path.exists(target), (shared, r.reason)
        finally:
            if os.path.exists(target):
                os.remove(target)


@pytest.mark.parametrize("mode", MODES)
def test_deleting_outside_the_workdir_is_stopped(mode, tmp_path):
    tmp_path.chmod(0o777)
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    victim.chmod(0o666)
    r = run(f"import os\nos.remove({str(victim)!r})\n", mode)
    assert not r.ok
    r = run(f"import os\nos.rename({str(victim)!r}, 'mine.txt')\n", mode)
    assert not r.ok
    r = run(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n", mode)
    assert not r.ok
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_is_invisible(mode, monkeypatch):
    monkeypatch.setenv("LNKIT_SECRET", "s3cr3t-d0nt-l3ak")
    r = run(
        """
        import os
        print(dict(os.environ))
        for path in (f"/proc/{os.getppid()}/environ", "/proc/1/environ"):
            try:
                print(open(path, "rb").read())
            except Exception as e:
                print("blocked", type(e).__name__)
        """,
        mode,
    )
    assert "LNKIT_SECRET" not in r.stdout + r.stderr
    assert "s3cr3t" not in r.stdout + r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_loopback_connection_is_stopped(mode):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # loopback only, never any other address
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        r = run(
            f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
            s.sendall(b"hello")
            print("connected")
            """,
            mode,
        )
        assert not r.ok and "connected" not in r.stdout
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_stdout_flood_is_cut_off():
    limits = SandboxLimits(wall_s=5.0, cpu_s=4, output_bytes=4096)
    r = run("while True:\n    print('x' * 10000)\n", limits=limits)
    assert not r.ok and r.reason == "output limit"
    assert r.wall_s < 2.0  # killed as soon as the cap was passed, not at the timeout
    assert 0 < len(r.stdout) <= limits.output_bytes
    r = run("import sys\nwhile True:\n    sys.stderr.write('e' * 100000)\n", limits=limits)
    assert not r.ok and r.reason == "output limit" and len(r.stderr) <= limits.output_bytes


def test_escape_hatches_are_denied():
    for source in (
        "import ctypes\nctypes.CDLL(None).kill(1, 9)\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))\n",
        "import os\nos.kill(1, 0)\n",
        "import os\nos.symlink('/etc', 'etc')\nopen('etc/lnkit-test', 'w')\n",
    ):
        r = run(source)
        assert not r.ok and "is not allowed" in r.reason, (source, r.reason)


# ------------------------------------------------------------------------------------------------ forgery


def test_printing_pass_is_not_a_verdict():
    forged = """
        import os, sys
        print("PASS")
        print("ok: all tests passed")
        for fd in range(3, 64):  # spray guessed verdict lines at every fd it might have
            for line in (b"PASS\\n", b"ok\\n", b"load 'ok'\\nvalue 0 '6'\\n"):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
        os._exit(0)
        """
    r = check_function(textwrap.dedent(forged), "f", [((1,), 6)], limits=FAST)
    assert not r.ok and r.reason == "program exited before its function could be checked"


def test_stolen_nonce_cannot_forge_a_pass():
    """Even with the nonce and the result fd (read off the harness's frame), the program never sees the
    expected values; what it claims is compared by the parent, and duplicates count as forgery."""
    steal = """
        import os, sys
        frame = sys._getframe(1)
        nonce, fd = frame.f_locals["nonce"], frame.f_locals["result_fd"]
        os.write(fd, f"{nonce} load 'ok'\\n{nonce} value 0 '0'\\n".encode())
        def f(x):
            return -1
        """
    r = check_function(textwrap.dedent(steal), "f", [((1,), 6)], limits=FAST)
    assert not r.ok and r.reason == "forged verdict: a result was reported twice"
    exit_early = steal.replace("def f(x):", "os._exit(0)\n        def f(x):")
    r = check_function(textwrap.dedent(exit_early), "f", [((1,), 6)], limits=FAST)
    assert not r.ok and r.reason == "case 0: got 0, expected 6"


def test_lying_objects_and_patched_builtins_cannot_pass():
    liar = """
        import builtins
        class Anything:
            def __eq__(self, other):
                return True
            def __repr__(self):
                return "6"
        builtins.repr = lambda obj: "6"
        builtins.type = lambda obj: int
        builtins.print = lambda *a, **k: None
        def f(x):
            return Anything()
        """
    r = check_function(textwrap.dedent(liar), "f", [((1,), 6)], limits=FAST)
    assert not r.ok and r.reason == "case 0: returned a Anything, not a plain literal"
    subclass = "class I(int):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return I(0)\n"
    assert not check_function(subclass, "f", [((1,), 6)], limits=FAST).ok


def test_parallel_runs_do_not_interfere():
    from concurrent.futures import ThreadPoolExecutor

    src = "def f(x):\n    return x * 2\n"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: check_function(src, "f", [((i,), 2 * i)], limits=FAST), range(8)))
    assert all(r.ok for r in results), [r.reason for r in results]
    assert_host_fine()


def test_code_items_pass_with_their_reference_and_fail_otherwise(small_splits):
    """The task data's code items, through lnkit.verify (test_data leaves the code domain to this file)."""
    from lnkit.verify import check

    items = [it for it in small_splits["test"] if it.domain == "code"][:8]
    assert items
    for it in items:
        assert check(f"```python\n{it.direct}\n```", it), it.id
        assert not check("def f(x):\n    return x * 1000 + 7\n", it), it.id
        assert not check("print('PASS')\n", it), it.id


# ------------------------------------------------------------------------------------------------ the child alone


def run_child_alone(tmp_path, source: str, stdin: str = "", func_name=None, cases=None):
    """child.py copied alone into an empty directory and started as the host starts it (same interpreter,
    ``-I -S -B``, header then stdin), but without the host's run: no lnkit next to it or on its path. Only
    the rlimits and the audit hook (``isolate`` off: no uid lease, no namespaces). Returns the finished
    process and the result records, nonce stripped."""
    child = tmp_path / "alone" / "child.py"
    child.parent.mkdir()
    shutil.copy(host.CHILD, child)
    workdir = tmp_path / "work"
    workdir.mkdir()
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    try:
        config = host._config(
            source, FAST, nonce=nonce, result_fd=result_w, workdir=str(workdir), uid=None,
            isolate=False, audit=True, func_name=func_name, cases=cases,
        )  # fmt: skip
        proc = subprocess.run(
            [host._interpreter(), "-I", "-S", "-B", str(child)],
            input=host._payload(config, stdin),
            capture_output=True,
            cwd=workdir,
            env={"LC_ALL": "C.UTF-8"},
            pass_fds=(result_w,),
            timeout=30,
        )
        os.close(result_w)
        result_w = None
        with os.fdopen(result_r, "rb") as f:
            result_r = None
            lines = f.read().decode().splitlines()
    finally:
        for fd in (result_r, result_w):
            if fd is not None:
                os.close(fd)
    assert all(line.startswith(nonce + " ") for line in lines), lines
    return proc, [line[len(nonce) + 1 :] for line in lines]


def test_child_imports_only_the_stdlib():
    tree = ast.parse(open(host.CHILD).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "child.py must not import relatively: it runs as a script"
            imported.add(node.module.split(".")[0])
    assert {"os", "sys", "ctypes", "resource"} <= imported  # the walk does see the functions' imports
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_child_alone_runs_a_program_and_reports(tmp_path):
    source = "import sys\nprint('hello', sys.stdin.readline().strip())\nraise ValueError('boom')\n"
    proc, records = run_child_alone(tmp_path, source, stdin="world\n")
    assert proc.returncode == 1 and proc.stdout == b"hello world\n"
    assert b"ValueError: boom" in proc.stderr
    assert records == ["layers 'rlimits audit'", "exc 'ValueError: boom'"]


def test_child_alone_checks_a_function_without_lnkit(tmp_path):
    source = """
        import importlib.util, sys
        print([m for m in sys.modules if m.split(".")[0] == "lnkit"], importlib.util.find_spec("lnkit"))
        def f(x):
            return [x, x * 2]
        """
    cases = [((3,), None), (("a",), None)]  # expected values never reach the child; the host compares
    proc, records = run_child_alone(tmp_path, textwrap.dedent(source), func_name="f", cases=cases)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"[] None\n"  # nothing of lnkit loaded, and none of it even findable
    assert records == ["layers 'rlimits audit'", "load 'ok'", "value 0 '[3, 6]'", "value 1 \"['a', 'aa']\""]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
