"""The host stays out of the sandbox's reach: files by any spelling, native code, Unix sockets, SysV IPC,
memory outside the address space, and the parent's own cost of reading results (issue 11's hostile-input
review). Each case runs in every mode where the wall it tests exists: everything on, the OS layers alone
(no audit hook, as root) and, where the audit hook is meant to hold on its own, the hook alone.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import textwrap
import tracemalloc

import pytest

from lnkit import sandbox
from lnkit.sandbox import SandboxLimits, check_function, memcg
from test_sandbox import FAST, MODES, ROOT, assert_host_fine, run

OS_MODES = [m for m in MODES if m.id != "audit-hook-only"]  # the walls that need the OS layers
os_layers = pytest.mark.skipif(not ROOT, reason="the OS layers (namespaces, own root) need root")


@pytest.fixture
def host_secret():
    """A world-readable file outside the sandbox, in a world-readable directory: only the sandbox's own
    root (or the audit hook) keeps it out, not file permissions."""
    folder = f"/tmp/lnkit-secret-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(folder)
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "expected_outputs.txt")
    with open(path, "w") as f:
        f.write("EXPECTED-OUTPUT-7f3a9c")
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(folder)


@pytest.mark.parametrize("mode", [{}, {"isolate": False}, {"audit": False}], ids=["all", "hook", "os"])
def test_host_files_are_unreachable_by_any_spelling(mode, host_secret):
    if mode.get("audit") is False and not ROOT:
        pytest.skip("the OS layers need root")
    relative = "../" * 8 + host_secret.lstrip("/")
    r = run(
        f"""
        import os, threading
        secret = {host_secret!r}
        spellings = [
            secret,
            "/proc/self/root" + secret,
            "/proc/thread-self/root" + secret,
            "/proc/1/root" + secret,
            f"/proc/{{os.getpid()}}/root" + secret,
            f"/proc/self/task/{{threading.get_native_id()}}/root" + secret,
            "/proc/self/cwd/" + {relative!r},
            "/dev/fd/../root" + secret,
            "/proc/self/root/proc/self/root" + secret,
        ]
        try:
            os.symlink(secret, "link")
            spellings.append("link")
        except OSError as e:
            print("symlink", type(e).__name__)
        for path in spellings:
            try:
                print("LEAK", path, open(path).read())
            except Exception as e:
                print("blocked", path, type(e).__name__)
        for path in ("/proc/self/root" + os.path.dirname(secret), "/proc/1/root/tmp"):
            try:
                print("LISTED", path, os.listdir(path))
            except Exception as e:
                print("blocked", path, type(e).__name__)
        """,
        mode,
    )
    out = r.stdout + r.stderr
    assert "EXPECTED-OUTPUT" not in out, out
    lines = r.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("LEAK", "LISTED"))], out
    blocked = [line for line in lines if line.startswith("blocked")]
    assert len(blocked) >= 11, out  # 9 spellings (+ the symlink where it could be made) and 2 listings
    if mode.get("audit") is False:  # the OS layers alone: not refused, absent (the root is the sandbox's);
        # /proc/1 is the namespace's init, another uid's process: the kernel refuses before looking
        assert all(line.endswith("FileNotFoundError") for line in blocked if "/proc/1/" not in line), out


@os_layers
def test_the_sandbox_root_holds_only_what_the_interpreter_needs():
    """Looked at with the OS layers alone (the audit hook would refuse to list "/")."""
    r = run(
        """
        import os, sys
        print(sorted(os.listdir("/")))
        for path in ("/work", "/home", "/root/.cache", "/bin/sh", "/usr/bin", "/lib64/ld-linux-x86-64.so.2",
                     os.path.join(sys.prefix, "lib", "python3.%d" % sys.version_info[1], "site-packages", "pip")):
            print(path, os.path.exists(path))
        import json, decimal, sqlite3, hashlib, ssl, zlib  # the stdlib's C modules still load
        print("stdlib ok")
        """,
        {"audit": False},
    )
    assert r.ok, r
    lines = r.stdout.splitlines()
    top = set(eval(lines[0]))  # noqa: S307 -- our own program's printed list
    assert top <= {"dev", "etc", "lib", "lib64", "proc", "root", "tmp", "usr"}, top
    assert all(line.endswith(" False") for line in lines[1:-1]), lines
    assert lines[-1] == "stdlib ok"
    assert {"ownroot", "readonly", "noexec", "ipcns"} <= set(r.layers)


@pytest.mark.parametrize("mode", MODES)
def test_venv_packages_cannot_be_imported_through_proc(mode):
    import lnkit

    site = os.path.dirname(os.path.dirname(lnkit.__file__))
    r = run(
        f"""
        import sys
        for prefix in ("/proc/self/root", "/proc/1/root", "/proc/self/cwd/" + "../" * 8):
            sys.path.insert(0, prefix + {site!r})
        try:
            import lnkit
            print("IMPORTED", lnkit.__file__)
        except ImportError as e:
            print("blocked", type(e).__name__)
        """,
        mode,
    )
    assert "IMPORTED" not in r.stdout and "blocked" in r.stdout, r


@pytest.fixture(scope="module")
def native_module(tmp_path_factory):
    """A shared object that prints NATIVE-CODE-RAN from its constructor, as an extension module ``evil``."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build a shared object")
    folder = tmp_path_factory.mktemp("native")
    source = folder / "evil.c"
    source.write_text(
        "#include <unistd.h>\n"
        '__attribute__((constructor)) static void ran(void) { write(1, "NATIVE-CODE-RAN\\n", 16); }\n'
        "void *PyInit_evil(void) { return 0; }\n"
    )
    target = folder / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(target), str(source)], check=True, timeout=120)
    return target.read_bytes()


@os_layers
@pytest.mark.parametrize("mode", OS_MODES)
def test_a_shared_object_written_to_the_workdir_cannot_run(mode, native_module):
    """Written by the program, then imported as an extension module (no ctypes needed): the working
    directory is mounted noexec, so the loader cannot map it."""
    r = run(
        f"""
        import base64, os, sys
        with open("evil.so", "wb") as f:
            f.write(base64.b64decode({base64.b64encode(native_module).decode()!r}))
        sys.path.insert(0, os.getcwd())
        import evil
        """,
        mode,
    )
    assert not r.ok and "NATIVE-CODE-RAN" not in r.stdout, r
    assert "failed to map segment" in r.stderr or "not allowed" in r.stderr, r.stderr


@os_layers
def test_a_memfd_cannot_be_executed():
    """A program's bytes in a memfd, run through /proc/self/fd/N: refused by the OS layers alone (memfds of
    the namespace are sealed non-executable, and there is no ELF interpreter in the root)."""
    with open("/bin/true", "rb") as f:
        elf = base64.b64encode(f.read()).decode()
    r = run(
        """
        import base64, os, sys
        fd = os.memfd_create("payload", 0)
        os.write(fd, base64.b64decode(sys.stdin.read()))
        try:
            os.execv(f"/proc/self/fd/{fd}", ["payload"])
        except OSError as e:
            print("refused", e.errno, e.strerror)
        """,
        {"audit": False},
        stdin=elf,
    )
    assert r.ok and r.stdout.startswith("refused"), r
    if "memfd-noexec" in r.layers:
        assert r.stdout.split()[1] == "13", r.stdout  # EACCES: the seal, before the missing loader matters


@pytest.fixture
def host_sockets():
    """A Unix socket listening on a path anyone may connect to, and one in the abstract namespace."""
    folder = f"/tmp/lnkit-sock-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(folder)
    os.chmod(folder, 0o777)
    path = os.path.join(folder, "host.sock")
    listeners = []
    for address in (path, "\0lnkit-test-" + os.urandom(6).hex()):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(8)
        s.settimeout(0.3)
        listeners.append((address, s))
    os.chmod(path, 0o777)
    yield listeners
    for _, s in listeners:
        s.close()
    shutil.rmtree(folder)


@pytest.mark.parametrize("mode", MODES)
def test_host_unix_sockets_are_unreachable(mode, host_sockets):
    addresses = [a for a, _ in host_sockets] + ["/proc/self/root" + host_sockets[0][0]]
    r = run(
        f"""
        import socket
        for address in {addresses!r}:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(address)
                s.sendall(b"hello")
                print("CONNECTED", repr(address))
            except Exception as e:
                print("blocked", type(e).__name__)
        """,
        mode,
    )
    assert "CONNECTED" not in r.stdout, r
    for _, listener in host_sockets:
        with pytest.raises(TimeoutError):
            listener.accept()


def host_shm_segments() -> set[str]:
    with open("/proc/sysvipc/shm") as f:
        return {line.split()[1] for line in f.readlines()[1:]}


@os_layers
def test_sysv_shared_memory_does_not_outlive_the_run():
    """Native code (ctypes, allowed with the hook off) makes SysV segments and exits without removing
    them: they live in the run's IPC namespace and go with it. Big ones are refused outright."""
    before = host_shm_segments()
    r = run(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        made = [libc.shmget(0, ctypes.c_size_t(1 << 20), 0o1600) for _ in range(4)]  # IPC_PRIVATE|IPC_CREAT
        big = libc.shmget(0, ctypes.c_size_t(256 << 20), 0o1600)
        print(made, big)
        """,
        {"audit": False},
    )
    assert r.ok, r
    made, big = r.stdout.rsplit(maxsplit=1)
    assert all(int(x) >= 0 for x in made.strip("[]").split(",")), r.stdout  # they were made, inside
    if "ipc-limits" in r.layers:
        assert int(big) == -1  # 256 MiB is above the namespace's shmmax
    assert host_shm_segments() <= before


@pytest.mark.parametrize("mode", MODES)
def test_memfd_files_cannot_hold_memory_beyond_the_limit(mode):
    """memfd files are memory outside RLIMIT_AS: a memory cgroup counts them (the run is killed, "memory");
    without one, the descriptor limit bounds them."""
    limits = SandboxLimits(wall_s=10.0, cpu_s=8, memory_mb=256, file_mb=8)
    r = run(
        """
        import os, sys
        held, fds = 0, []
        chunk = b"x" * (8 << 20)
        for i in range(60):
            try:
                fd = os.memfd_create(f"m{i}", 0)
                os.write(fd, chunk)
            except OSError as e:
                print("stopped", type(e).__name__, flush=True)
                break
            fds.append(fd)
            held += 8
            print("held", held, flush=True)
        """,
        mode,
        limits=limits,
    )
    held = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("held")]
    bound = limits.memory_mb + 2 * limits.file_mb + 32
    assert max(held, default=0) <= bound, (max(held), r)
    if "memcg" in r.layers:
        assert not r.ok and r.reason == "memory", r
    assert_host_fine()


def test_the_memory_cgroup_is_removed_after_each_run(monkeypatch):
    if not ROOT or memcg._own_group() is None:
        pytest.skip("no writable memory cgroup here")
    made = []
    create = memcg.create
    monkeypatch.setattr(memcg, "create", lambda *a: made.append(create(*a)) or made[-1])  # this run's group only:
    r = run("x = bytearray(10 << 20)\nprint(len(x))\n")  # other sandboxes may run on the machine meanwhile
    assert r.ok and "memcg" in r.layers
    assert len(made) == 1 and made[0] and not os.path.exists(made[0])


def test_an_oversized_result_costs_the_parent_little():
    """A 1.35M-element list used to cost the verifier seconds and a gigabyte to parse: now the child refuses
    to report it and the parent would refuse to parse it."""
    tracemalloc.start()
    try:
        r = check_function("def f(x):\n    return [0] * 1_350_000\n", "f", [((1,), [0])], limits=FAST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not r.ok and "too large" in r.reason, r.reason
    assert peak < 32 << 20, peak


def test_a_forged_huge_report_is_not_parsed():
    """With the nonce stolen, a 3 MB value line is written straight to the result fd: the parent counts it
    as too large without parsing it (and the real report then makes it a forgery)."""
    forge = """
        import os, sys
        frame = sys._getframe(1)
        nonce, fd = frame.f_locals["nonce"], frame.f_locals["result_fd"]
        os.write(fd, (nonce + " value 0 " + repr(repr([0] * 1_000_000)) + "\\n").encode())
        os._exit(0)
        """
    tracemalloc.start()
    try:
        r = check_function(textwrap.dedent(forge), "f", [((1,), [0])], limits=FAST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not r.ok, r
    assert peak < 32 << 20, peak


def test_rebinding_builtins_dict_cannot_fake_a_value():
    """The child's value check used to look ``dict`` up after the user's code ran."""
    liar = """
        import builtins
        class D(dict):
            def __repr__(self):
                return "6"
        builtins.dict = D
        def f(x):
            return D()
        """
    r = check_function(textwrap.dedent(liar), "f", [((1,), 6)], limits=FAST)
    assert not r.ok and r.reason == "case 0: returned a D, not a plain literal", r.reason


def test_a_metaclass_that_equals_every_type_cannot_fake_a_value():
    """``type(v) in (int, str, ...)`` compares types with ``==``, which a metaclass answers."""
    liar = """
        class Meta(type):
            def __eq__(cls, other):
                return True
            __hash__ = type.__hash__
        class Six(metaclass=Meta):
            def __repr__(self):
                return "6"
        def f(x):
            return Six()
        """
    r = check_function(textwrap.dedent(liar), "f", [((1,), 6)], limits=FAST)
    assert not r.ok and r.reason == "case 0: returned a Six, not a plain literal", r.reason


def test_result_bytes_is_a_checked_limit():
    with pytest.raises(ValueError, match="result_bytes"):
        SandboxLimits(result_bytes=0)
    r = check_function("def f(n):\n    return 'x' * n\n", "f", [((10,), "x" * 10), ((100,), "x" * 100)],
                       limits=SandboxLimits(result_bytes=50))  # fmt: skip
    assert not r.ok and r.reason.startswith("case 1: returned a value too large"), r.reason
    assert sandbox.SandboxLimits().result_bytes == 65536
