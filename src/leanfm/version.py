"""The installed leanfm version (bottom layer, so results can record it without importing the package facade)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("leanfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
