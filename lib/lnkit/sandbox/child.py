"""The sandbox child: the code that runs inside the locked-down process, before and around the user's program.

Standalone on purpose: standard library only, nothing from ``lnkit``. The host (:mod:`lnkit.sandbox.host`)
starts it by path from the base interpreter, ``python -I -S -B .../child.py``, so no site-packages, no
virtualenv and no ``PYTHON*`` variable reach this process (``-I`` also keeps this file's directory off
``sys.path``). It runs as root when the host is root, until :func:`main` drops to the run's private uid.

Protocol, all set up by the host:

- stdin: ten ASCII digits giving the length of a header, the header (``repr`` of a dict of plain literals:
  the nonce, the result fd, the working directory, the uid, the limits, the interpreter's prefixes, the
  source, the function name and the cases' arguments; see ``host._config``), then the user program's stdin.
- the result fd (inherited, its number in the header): one line per record,
  ``<nonce> <kind> [<case>] <repr of a str>``, kinds ``layers``, ``exc``, ``load``, ``value``, ``raised``
  and ``unreportable``; the host parses them (``host._parse_records``) and never trusts them blindly.
- exit status: the user program's (or 70 if the header never came or the host died first).

Why every function imports what it uses and reads no module global: the user's program runs in this same
interpreter and can reach this module (``sys.modules["__main__"]``) and rebind its globals, while
:func:`main` keeps running after it (the checked function's calls and their reports). So what runs after
user code uses only names bound before it: locals and default arguments.
"""


def isolate(cfg):
    """Namespaces, a root of its own, a memory cgroup, no-new-privileges; returns the layers obtained.

    As root: join the run's memory cgroup (made by the host), then new network, IPC, mount and PID
    namespaces. In the mount namespace the child builds a root of its own on a tmpfs (:func:`own_root`) and
    pivots into it, so no host path exists by any spelling (``/proc/self/root``, ``/proc/<pid>/root``,
    ``..``, symlinks). With a new PID namespace this process forks twice: it stays outside as a monitor that
    waits and passes the exit status on; its child is pid 1 of the namespace, an init that mounts the
    namespace's own ``/proc``, forbids executable memfds for the namespace, then only reaps; the grandchild
    returns from here and runs the user code as an ordinary process (pid 1 would ignore SIGXCPU). When the
    user process dies, init exits and the kernel kills and reaps everything left in the namespace.
    """
    import _signal
    import ctypes
    import gc
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, clone_newnet, clone_newuser, clone_newpid = 0x00020000, 0x40000000, 0x10000000, 0x20000000
    clone_newipc = 0x08000000
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount = 1, 2, 4, 8, 32
    layers = []

    def mount(src, dst, fstype, flags, data):
        def b(x):
            return x.encode() if isinstance(x, str) else x

        if libc.mount(b(src), b(dst), b(fstype), ctypes.c_ulong(flags), b(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox setup: mount {src} on {dst}: {os.strerror(err)}")

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)

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
        if mount_proc:  # a /proc of our own: the host's processes (and their roots) do not exist here
            mount("proc", "/proc", "proc", ms_nosuid | ms_nodev | ms_noexec, None)
            # per PID namespace (Linux 6.3+): memfds are created sealed non-executable and MFD_EXEC is refused
            try:
                write("/proc/sys/vm/memfd_noexec", "2")
                layers.append("memfd-noexec")
            except OSError:
                pass
            mount(None, "/proc", None, ms_remount | ms_rdonly | ms_nosuid | ms_nodev | ms_noexec, None)
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

    if cfg["cgroup"] is not None:  # before any fork: every process of the run is charged to it
        write(cfg["cgroup"] + "/cgroup.procs", str(os.getpid()))
        layers.append("memcg")
    try:
        write("/proc/self/oom_score_adj", "1000")  # under host memory pressure, die first
    except OSError:
        pass
    if libc.unshare(clone_newnet) == 0:
        layers.append("netns")
    if libc.unshare(clone_newipc) == 0:  # SysV IPC and POSIX queues of its own, gone with the run
        layers.append("ipcns")
        mb = 1 << 20
        try:  # the /proc still mounted is the host's, but these files are per IPC namespace
            write("/proc/sys/kernel/shmmax", str(cfg["file_mb"] * mb))
            write("/proc/sys/kernel/shmall", str(cfg["file_mb"] * mb // 4096))
            write("/proc/sys/kernel/shmmni", "8")
            layers.append("ipc-limits")
        except OSError:  # a read-only /proc/sys: the namespace still ends with the run; the cgroup bounds it
            pass
    mntns = libc.unshare(clone_newns) == 0
    if libc.unshare(clone_newpid) == 0:
        layers.append("pidns")
    if mntns:
        own_root(cfg, libc, mount)
        layers += ["mountns", "ownroot", "readonly", "noexec"]
    if "pidns" in layers:
        enter_pidns(mount_proc=mntns)
    # PR_SET_NO_NEW_PRIVS: no setuid binary can hand root back, even if the audit hook is bypassed
    if libc.prctl(38, ctypes.c_ulong(1), zero, zero, zero) == 0:
        layers.append("nonewprivs")
    libc = mount = None
    gc.collect()  # the CDLL's cached function pointers must not be found later through gc.get_objects()
    return layers


def own_root(cfg, libc, mount):
    """Pivot into a new root: a read-only tmpfs holding only what the interpreter needs, bound read-only from
    the host (``cfg["root"]``, planned by ``host._root_plan``: its ``sys.path``, the shared libraries its
    extension modules link, ``/etc/ld.so.cache``, four character devices), the interpreter's own
    site-packages covered by an empty tmpfs, an empty ``/proc`` for the PID namespace's, and the working
    directory: a small private tmpfs, ``noexec``. The old root is detached, so nothing else of the host is
    reachable. No ELF interpreter (``ld-linux``) is bound: no dynamically linked program can be started."""
    import os
    import platform

    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount = 1, 2, 4, 8, 32
    ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18
    ro = ms_remount | ms_bind | ms_rdonly | ms_nosuid
    workdir = cfg["workdir"]
    mount(None, "/", None, ms_rec | ms_private, None)  # nothing below propagates back to the host
    new = workdir  # any directory will do as the mount point of the new root; the host's workdir is ours
    mount("tmpfs", new, "tmpfs", ms_nosuid | ms_nodev, "mode=0755,size=1m,nr_inodes=1024")
    bound = []
    for path, kind, target in cfg["root"]:
        inside = new + path
        if any(path.startswith(d + "/") for d in bound):
            continue  # already visible through a bound directory; never create anything inside a bind
        if kind == "link":
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.symlink(target, inside)
            continue
        os.makedirs(inside if kind == "dir" else os.path.dirname(inside), exist_ok=True)
        if kind != "dir":
            os.close(os.open(inside, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(path, inside, None, ms_bind, None)
        mount(None, inside, None, ro | (0 if kind == "dev" else ms_nodev), None)
        if kind == "dir":
            bound.append(path)
    for path in cfg["hide"]:  # e.g. the base interpreter's site-packages, inside the bound stdlib
        empty = ms_rdonly | ms_nosuid | ms_nodev | ms_noexec
        mount("tmpfs", new + path, "tmpfs", empty, "size=4k,nr_inodes=4")
    os.makedirs(new + "/dev", exist_ok=True)
    for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + target, new + "/dev/" + name)
    os.makedirs(new + "/proc", exist_ok=True)
    os.makedirs(new + workdir, exist_ok=True)
    size_kb = 2 * cfg["file_mb"] * 1024
    opts = f"size={size_kb}k,nr_inodes=4096,mode=0700,uid={cfg['uid']},gid={cfg['uid']}"
    mount("tmpfs", new + workdir, "tmpfs", ms_nosuid | ms_nodev | ms_noexec, opts)
    os.chdir(new)
    syscalls = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}  # pivot_root
    if libc.syscall(syscalls[platform.machine()], b".", b".") != 0:
        raise OSError("sandbox setup: pivot_root failed")
    if libc.umount2(b".", 2) != 0:  # MNT_DETACH: the old root, stacked under the new one, is let go
        raise OSError("sandbox setup: detaching the old root failed")
    os.chdir("/")
    mount(None, "/", None, ms_remount | ms_rdonly | ms_nosuid | ms_nodev, None)
    os.chdir(workdir)


def set_limits(cfg):
    """The rlimits, hard limits included, so the program cannot raise them again."""
    import resource

    mb = 1 << 20
    # memfd files live outside the address space, each up to file_mb: without a memory cgroup to count
    # them, fewer descriptors keep their total near memory_mb
    nofile = 64 if cfg["cgroup"] is not None else max(16, min(64, cfg["memory_mb"] // cfg["file_mb"]))
    for name, soft, hard in (
        ("RLIMIT_CPU", cfg["cpu_s"], cfg["cpu_s"] + 1),  # SIGXCPU, then SIGKILL a second later
        ("RLIMIT_AS", cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
        ("RLIMIT_FSIZE", cfg["file_mb"] * mb, cfg["file_mb"] * mb),
        ("RLIMIT_NPROC", cfg["nproc"], cfg["nproc"]),
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_NOFILE", nofile, nofile),
        ("RLIMIT_MSGQUEUE", 0, 0),
        ("RLIMIT_MEMLOCK", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def install_audit_hook(workdir, prefixes):
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
    # entries of a process's /proc directory that are doors to other paths: /proc/self/root/<host path>
    # is the host's file whatever the lexical check thinks (the OS layers give the sandbox its own root;
    # this closes the door where they are missing)
    proc_doors = frozenset(("root", "cwd", "exe", "fd", "map_files"))

    path_events = {  # event -> (index of a path argument, index of its dir_fd argument or None)
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
        "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
        "sqlite3.connect": ((0, None),),  # sqlite opens its files in C, past the "open" event
    }  # fmt: skip

    def resolve(path, dir_fd=None, _fspath=os.fspath, _getcwd=os.getcwd, _readlink=os.readlink,
                _lstat=os.lstat, _isinstance=isinstance, _bytes=bytes, _len=len, _oserror=OSError):  # fmt: skip
        """The path the kernel will open: absolute, symlinks followed as the kernel follows them (the host
        has symlinks that lead out of any allowed directory: ``/dev/fd/../root`` is the host's ``/``), and
        ``..`` applied to what they lead to. The part past the first missing component is folded lexically.
        Only the ``os`` functions bound here are used, never ``os.path`` (whose module the program may patch).
        """
        path = _fspath(path)
        if _isinstance(path, _bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            at_cwd = dir_fd is None or dir_fd < 0  # events report "no dir_fd" as None, -1 or AT_FDCWD
            path = (_getcwd() if at_cwd else _readlink(f"/proc/self/fd/{dir_fd}")) + "/" + path
        todo = path.split("/")
        todo.reverse()
        parts, links, missing = [], 0, False
        while todo:
            part = todo.pop()
            if part == "..":
                if parts:
                    parts.pop()
                continue
            if not part or part == ".":
                continue
            parts.append(part)
            if missing:
                continue
            here = "/" + "/".join(parts)
            try:
                is_link = _lstat(here).st_mode & 0o170000 == 0o120000
            except _oserror:
                missing = True
                continue
            if is_link:
                links += 1
                if links > 40:
                    raise _oserror(40, "Too many levels of symbolic links", here)
                parts.pop()
                target = _readlink(here)
                if target.startswith("/"):
                    parts = []
                more = target.split("/")
                more.reverse()
                todo += more
        return "/" + "/".join(parts)

    def under(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def readable(full, _under=under, _read_roots=read_roots, _own_proc=own_proc, _doors=proc_doors):
        if not _under(full, _read_roots):
            return False
        if not full.startswith("/proc/"):
            return True
        if not _under(full, _own_proc):
            return False
        for part in full.split("/")[3:]:
            if part in _doors:
                return False
        return True

    def hook(event, args, _workdir=(workdir,), _read_roots=read_roots, _deny_exact=deny_exact,
             _deny_prefix=deny_prefix, _deny_import=deny_import, _path_events=path_events, _resolve=resolve,
             _under=under, _readable=readable, _write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
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
            elif not _readable(full):
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
        elif event in ("os.listdir", "os.scandir"):  # names only, but names of host files are the map
            path = args[0]
            if _isinstance(path, _int):
                full = _readlink(f"/proc/self/fd/{path}")
            else:
                full = _resolve("." if path is None else path)
            if not _readable(full):
                what = f"of {full!r}"
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


def main():
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
        layers += isolate(cfg)
    for name in [n for n in sys.modules if n in ("ctypes", "_ctypes") or n.startswith("ctypes.")]:
        del sys.modules[name]  # forces a fresh (audited, denied) import if user code asks for ctypes
    set_limits(cfg)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        layers.append("uid")
    layers.append("rlimits")
    os.umask(0o077)
    if cfg["audit"]:
        install_audit_hook(cfg["workdir"], cfg["prefixes"])
        layers.append("audit")
    report("layers", _repr(" ".join(layers)))
    sys.argv = ["solution.py"]
    sys.stdout.reconfigure(errors="backslashreplace")
    func_name, cases = cfg["func"], cfg["cases"]
    namespace = {"__name__": "__main__" if func_name is None else "__sandbox__", "__builtins__": __builtins__}
    source, result_bytes = cfg["source"], cfg["result_bytes"]
    del cfg
    _callable, _enumerate, _all, _len, _exit, _id = callable, enumerate, all, len, os._exit, id
    _flush, _dict, _errors = sys.stdout.flush, dict, (ValueError, RecursionError, MemoryError)
    # types compared by identity (their ids, ints): ``t in (int, ...)`` would call ``==`` on the type, which
    # a metaclass can answer with True
    atoms = frozenset(_id(t) for t in (int, float, complex, str, bytes, bool, _type(None)))
    containers = frozenset(_id(t) for t in (list, tuple, set))

    class TooLarge(Exception):
        pass

    def plain(value, depth=0):
        """Only built-in literal types; a container longer than ``result_bytes`` cannot have a repr that
        short, so it is refused before anything walks it."""
        t = _id(_type(value))
        if t in atoms:
            return True
        if depth > 50:
            return False
        if t == _id(_dict):
            if _len(value) > result_bytes:
                raise TooLarge
            return _all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in _dict.items(value))
        if t not in containers:
            return False
        if _len(value) > result_bytes:
            raise TooLarge
        return _all(plain(v, depth + 1) for v in value)

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
        exc.__traceback__ = tb.tb_next if tb is not None else None  # drop this file's own frame
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
            text = _repr(value)
            if _len(text) > result_bytes:
                report("unreportable", _str(i), _repr(f"returned a value too large to report ({_len(text)} "
                                                      f"characters, limit {result_bytes})"))  # fmt: skip
                continue
            report("value", _str(i), _repr(text))
        except (TooLarge, *_errors):
            report("unreportable", _str(i), _repr("returned a value too large to report"))
    try:
        _flush()
        sys.stderr.flush()
    finally:
        _exit(0)


if __name__ == "__main__":
    main()
