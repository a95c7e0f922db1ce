"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class LeanfmError(ValueError):
    """Bad user input or a missing prerequisite; the message names the value and what is accepted."""
