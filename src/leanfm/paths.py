"""Where leanfm keeps its caches, and atomic file writes.

Everything derived (converted checkpoints, extracted corpora, tokenised splits) lives under
``$LEANFM_HOME`` (default ``~/.cache/leanfm``) so a user can delete it at any time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leanfm.errors import LeanfmError


def leanfm_home() -> Path:
    """The cache root, ``$LEANFM_HOME`` or ``~/.cache/leanfm``; created on first use."""
    home = Path(os.environ.get("LEANFM_HOME", Path.home() / ".cache" / "leanfm")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def check_writable_file(path: str | Path) -> Path:
    """Fail early (before any work) if ``path`` cannot be written; returns it as a ``Path``."""
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise LeanfmError(f"output path '{path}' is a directory; expected a file path")
    if not parent.is_dir():
        raise LeanfmError(f"output path '{path}': directory '{parent}' does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise LeanfmError(f"output path '{path}' is not writable")
    try:  # permission bits do not tell the whole story (root, read-only or virtual file systems): try it
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".probe")
    except OSError as err:
        raise LeanfmError(f"output path '{path}' is not writable ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return target


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise LeanfmError(f"--out '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LeanfmError(f"--out '{out}' exists and is not empty; pass --overwrite to replace it")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so a reader sees either the old file or the whole new one, never a partial."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file a normal file's permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` whole.

    A crash leaves ``final`` as it was (or absent) and removes the temporary folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result should have a normal folder's permissions
    try:
        yield tmp
        if final.exists():
            backup = final.with_name(f".{final.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            final.rename(backup)
            tmp.rename(final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_directory(source: Path, target: Path) -> Path:
    """Replace ``target`` with a copy of folder ``source``, atomically (old or new, never partial); returns it."""
    with atomic_directory(Path(target)) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(target)


def read_description(folder: str | Path, name: str, fmt: str, what: str, hint: str = "") -> dict[str, Any]:
    """The JSON object ``folder/name`` whose ``format`` is ``fmt`` (a saved run's or model's description).

    Why one reader: five loaders repeated "missing / not JSON / wrong format" with drifting messages. Each case
    is a one-line :class:`LeanfmError` naming the path, saying the folder is not ``what`` (``"a t2i model"``)
    and ending with ``hint`` (how to create one), so a user pointing a command at the wrong folder knows which.
    """
    path = Path(folder) / name
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise LeanfmError(f"'{folder}' is not {what} ({name} missing){tail}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LeanfmError(f"'{path}' is not valid JSON ({err}){tail}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise LeanfmError(f"'{folder}' is not {what} of format {fmt}{tail}")
    return meta
