"""Atomic files and verified checkpoints: nothing half-written survives a crash, nothing corrupt loads.

Every artifact is written to a temporary name beside its target and renamed into place (``os.replace``
is atomic on POSIX), so a reader sees the old file or the new one, never a torn one. Checkpoint folders
are built under a temporary name too, with a ``manifest.json`` of every file's size and SHA-256; loading
checks the manifest first, so a truncated or edited file is an error naming that file, never a model
with silently wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

TMP_MARK = ".tmp-"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt."""


def _new_beside(path: Path, make) -> Path:
    """Create a new file or folder with ``make(name)`` under an unused temporary name next to ``path``.

    Not ``tempfile.mkstemp`` / ``mkdtemp``: those create mode 0600 / 0700, which the rename would carry to
    the artifact, so a group sharing the run folder could not read it. ``os.open(..., 0o666)`` and
    ``os.mkdir`` (0o777) are cut by the umask like any ``open()``: 0644 / 0755 under umask 022.
    """
    for _ in range(100):
        tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def _new_file(tmp: Path) -> None:
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.
    The file gets the mode a plain ``open()`` would give it (the umask's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_beside(path, _new_file)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ArtifactError(ValueError):
    """An artifact a stage reads is unreadable (corrupt JSON, not UTF-8)."""


def read_json(path: str | Path):
    """A JSON artifact; a corrupt one is an :class:`ArtifactError` naming the file, not a parser traceback.

    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "m.json"); _ = open(f, "w").write('{"a": ')
    >>> read_json(f)
    Traceback (most recent call last):
    lnkit.io.ArtifactError: .../m.json is not valid JSON (Expecting value: line 1 column 7 (char 6)); rerun the stage that wrote it
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rerun the stage that wrote it") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (to fingerprint data a training run depends on)."""
    return _sha256(Path(path))[:16]


def folder_digest(path: str | Path) -> str:
    """A digest of a model folder: of its manifest when lnkit wrote it, else of its files' names and sizes."""
    path = Path(path)
    mf = path / MANIFEST
    text = mf.read_text() if mf.is_file() else json.dumps(sorted((q.name, q.stat().st_size) for q in path.iterdir()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_checkpoint(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the first missing, truncated or altered file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it was not written by lnkit or is incomplete")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {mf} is corrupt: {e}") from None
    for name, want in manifest.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        if p.stat().st_size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint file {p} is truncated or corrupt: {p.stat().st_size} bytes, expected {want['bytes']}"
            )
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: its SHA-256 does not match {MANIFEST}")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder; on success write its manifest and swap it in for ``path``.

    The old folder (if any) is only removed after the new one is complete and in place. The folder gets
    the mode a plain ``mkdir`` would give it (the umask's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_beside(path, os.mkdir)
    try:
        yield tmp
        write_manifest(tmp)
        old = None
        if path.exists():
            old = path.with_name(path.name + TMP_MARK + "old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_partial(folder: str | Path) -> list[Path]:
    """Delete leftovers of writes interrupted by a crash (``*.tmp-*``) under ``folder``; return them.

    A rerun calls this first, so it neither loads nor keeps a half-written file.
    """
    folder = Path(folder)
    if not folder.exists():
        return []
    removed = []
    # A crash between the two renames of atomic_dir leaves only the old folder: put it back.
    for old in folder.rglob(f"*{TMP_MARK}old"):
        target = old.with_name(old.name[: -len(TMP_MARK + "old")])
        if old.is_dir() and not target.exists():
            os.replace(old, target)
    for p in sorted(folder.rglob(f"*{TMP_MARK}*"), key=lambda p: -len(p.parts)):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
        removed.append(p)
    return removed
