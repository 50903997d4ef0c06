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


def set_limits(cfg):
    """The rlimits, hard limits included, so the program cannot raise them again."""
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
            report("value", _str(i), _repr(_repr(value)))
        except (ValueError, RecursionError, MemoryError):
            report("unreportable", _str(i), _repr("returned a value too large to report"))
    try:
        _flush()
        sys.stderr.flush()
    finally:
        _exit(0)


if __name__ == "__main__":
    main()
