"""Offline data shipped in npm packages, unpacked without installing them (the npm twin of ``debian.py``).

Why: this project's machines reach the npm registry but no dataset hub, and npm packages such as
``emoji-datasource-twitter`` carry drawn images under a permissive licence. ``npm pack`` downloads the release
tarball without running any install script; we extract only the members asked for into ``$LEANFM_HOME/npm``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, leanfm_home

_MARKER = ".leanfm-included.json"


def npm_package(name: str, version: str, include: tuple[str, ...]) -> Path:
    """The folder holding ``include`` (paths or folder prefixes inside the package) of ``name@version``.

    Fetched with ``npm pack`` on first use and cached under ``$LEANFM_HOME/npm/<name>-<version>``; a later call
    asking for more members fetches again and keeps the union. Raises a one-line ``LeanfmError`` when npm is
    missing or the registry cannot be reached.
    """
    target = leanfm_home() / "npm" / f"{name}-{version}"
    marker = target / _MARKER
    done = set(json.loads(marker.read_text())) if marker.is_file() else set()
    if set(include) <= done:
        return target
    if shutil.which("npm") is None:
        raise LeanfmError(f"cannot fetch npm package '{name}@{version}': npm not found; install Node.js and npm")
    wanted = tuple(sorted(done | set(include)))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as workdir:
        tarball = _pack(name, version, Path(workdir))
        with atomic_directory(target) as staging:
            _extract(tarball, wanted, staging)
            (staging / _MARKER).write_text(json.dumps(list(wanted)))
    return target


def _pack(name: str, version: str, workdir: Path) -> Path:
    """``npm pack name@version`` into ``workdir``; the path of the ``.tgz``."""
    try:
        done = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=workdir, capture_output=True,
                              text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired:
        raise LeanfmError(f"'npm pack {name}@{version}' timed out after 600 s (offline?)") from None
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        hint = (done.stderr.strip().splitlines() or ["no tarball produced"])[-1]
        raise LeanfmError(f"'npm pack {name}@{version}' failed ({hint}); is the npm registry reachable?")
    return tarballs[0]


def _extract(tarball: Path, include: tuple[str, ...], into: Path) -> None:
    """Copy the regular files under ``package/<include...>`` of an npm tarball into ``into`` (prefix dropped)."""
    found = dict.fromkeys(include, False)
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 2 or ".." in parts or parts[0] != "package":
                continue
            relative = "/".join(parts[1:])
            hits = [p for p in include if relative == p or relative.startswith(p.rstrip("/") + "/")]
            if not hits:
                continue
            found.update(dict.fromkeys(hits, True))
            path = into.joinpath(*parts[1:])
            path.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            if source is not None:
                path.write_bytes(source.read())
    missing = [p for p, hit in found.items() if not hit]
    if missing:
        raise LeanfmError(f"npm tarball '{tarball.name}' has no '{missing[0]}'")
