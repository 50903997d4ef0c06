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
import shutil
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt."""


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + TMP_MARK, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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

    The old folder (if any) is only removed after the new one is complete and in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + TMP_MARK, dir=path.parent))
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
