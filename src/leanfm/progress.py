"""Progress bars for every long loop, hidden with ``--quiet`` or when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) all leanfm progress bars for this process."""
    global _quiet
    _quiet = quiet


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar unless quiet or not attached to a TTY."""
    disable = _quiet or not sys.stderr.isatty()
    yield from tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True)
