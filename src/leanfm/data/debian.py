"""Offline data shipped in Debian packages, unpacked without installing them.

Why: this project's machines reach Debian's archive but no dataset hub. ``apt-get download`` plus
``dpkg -x`` needs no root and no dependency resolution (R is never installed for the Austen corpus).
Packages already installed system-wide are used in place.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from leanfm.errors import LeanfmError
from leanfm.paths import leanfm_home


def extracted_root(package: str) -> Path:
    """The folder under ``$LEANFM_HOME/debian`` that a package is (or would be) unpacked into."""
    return leanfm_home() / "debian" / package


def find_package_path(package: str, relative: str, fetch: bool = True) -> Path:
    """Return ``/relative`` from the system, else from leanfm's unpacked copy of ``package``.

    With ``fetch`` the package is downloaded and unpacked on first use. Raises ``LeanfmError``
    with an install hint when neither is possible.
    """
    system = Path("/") / relative
    if system.exists():
        return system
    local = extracted_root(package) / relative
    if local.exists():
        return local
    if fetch:
        unpack_package(package)
        if local.exists():
            return local
    raise LeanfmError(
        f"Debian package '{package}' is not available (looked for /{relative}); "
        f"install it with 'apt-get install {package}' or run 'make setup'"
    )


def unpack_package(package: str) -> Path:
    """``apt-get download`` the package and ``dpkg -x`` it into ``$LEANFM_HOME/debian/<package>``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise LeanfmError(f"cannot fetch Debian package '{package}': apt-get/dpkg not found on this system")
    target = extracted_root(package)
    with tempfile.TemporaryDirectory() as workdir:
        done = subprocess.run(
            ["apt-get", "download", package], cwd=workdir, capture_output=True, text=True, check=False
        )
        debs = list(Path(workdir).glob(f"{package}_*.deb"))
        if done.returncode != 0 or not debs:
            hint = (done.stderr.strip().splitlines() or ["no .deb produced"])[-1]
            raise LeanfmError(
                f"'apt-get download {package}' failed ({hint}); run 'apt-get update' first, then 'make setup'"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{package}."))
        try:
            subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target
