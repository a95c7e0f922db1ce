"""Auditing prompt-based classifiers: the victim interface (local and over HTTP), the ``leanfm serve`` endpoint,
the TrojPrompt attack and a trojan detector.

Importing the package registers ``trojprompt`` (family ``audit``).
"""

from leanfm.audit import trojprompt

__all__ = ["trojprompt"]
