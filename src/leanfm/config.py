"""The base of every method config, and the one method registry.

Why a base class: every method has settings that must be validated before any work starts (a one-line
:class:`LeanfmError`), saved as JSON beside its results, compared when a training run resumes, and turned into
command-line flags. Writing that once here means a new method only declares its fields.

A config is a ``@dataclass`` subclass of :class:`MethodConfig`. Field metadata drives the CLI:

- ``help``: the flag's help text (the default is appended by the CLI);
- ``choices``: accepted values (checked here in :meth:`MethodConfig.validate` too);
- ``cli``: ``False`` hides a field from the command line (library-only or test-only settings);
- ``flag``: the flag's name when it differs from the field's (``lam`` -> ``--lambda``).

Fields listed in ``RESUMABLE`` may differ between a checkpoint and the run that continues it (e.g. ``steps``:
train longer); every other field must match, otherwise the loss curve would not be the one the checkpoint began.

The registry (in the spirit of PEFT's ``register_peft_method``) maps a method name to its family, config class
and entry point, so the library, the CLI and the benchmarks agree on what exists without ``if method == ...``.
Each family fixes the entry point's signature:

- ``compress``: ``entry(model, tokenizer, config) -> CompressionReport`` (the model is changed in place);
- ``patch`` (token reduction): ``entry(model, config)`` applies, ``undo(model)`` restores;
- ``train``: ``entry(config, out, *, resume=False, overwrite=False, context=None) -> dict`` (a run folder with
  its metrics; the device is ``config.device``, ``context`` the torchrun process group);
- ``decode``: ``entry(folder) -> (model, tokenizer, extras)`` loads; generation is the family module's.

A method may be registered once per family (DynaMo trains heads, family ``train``, and decodes with them,
family ``decode``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from leanfm.errors import LeanfmError

C = TypeVar("C", bound="MethodConfig")
FAMILIES = ("compress", "patch", "train", "decode", "adapt", "audit")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[Any, ...] | None = None,
           cli: bool = True, flag: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the metadata the CLI and :meth:`MethodConfig.validate` read."""
    metadata = {"help": help, "choices": choices, "cli": cli, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class MethodConfig:
    """Base of every method config: validation, JSON round trip and the resume fingerprint."""

    RESUMABLE: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "device")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check ``choices`` from the field metadata; subclasses add their own checks (call ``super()``)."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                name = f.metadata.get("flag") or f.name
                raise LeanfmError(f"unknown {name} '{value}'; accepted: {', '.join(map(str, choices))}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config; unknown keys are a one-line error listing the accepted ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LeanfmError(f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; "
                              f"accepted: {', '.join(sorted(names))}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise LeanfmError(f"{cls.__name__} needs {', '.join(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        """Read a config saved with :meth:`to_json`; a missing or corrupt file is a one-line error."""
        target = Path(path)
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LeanfmError(f"no config file '{target}'") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LeanfmError(f"config file '{target}' is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise LeanfmError(f"config file '{target}' holds {type(data).__name__}; accepted: a JSON object")
        return cls.from_dict(data)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (all but :attr:`RESUMABLE`)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE}

    def check_resume(self, saved: dict[str, Any], where: str = "the checkpoint") -> None:
        """One-line error naming the first setting that differs from the saved ``fingerprint``."""
        mine = self.fingerprint()
        for key in sorted(set(mine) | set(saved)):
            if key in self.RESUMABLE:
                continue
            if mine.get(key) != saved.get(key):
                raise LeanfmError(f"{where} was trained with {key}={saved.get(key)!r}, not {mine.get(key)!r}; "
                                  "use the same settings or --overwrite to start over")


def check_at_least(config: object, minimum: int, *names: str) -> None:
    """One-line error when any of the integer fields ``names`` of ``config`` is below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise LeanfmError(f"{name} {value} is invalid; accepted: an integer >= {minimum}")


# ---------------------------------------------------------------- the method registry


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its family, config class and entry point (see the module docstring)."""

    name: str
    family: str
    config: type[MethodConfig] | None
    entry: Callable[..., Any]
    undo: Callable[..., Any] | None = None
    description: str = ""
    # the entry also accepts ``stream=`` (a model read block by block from its checkpoint, leanfm.models.streaming)
    streams: bool = False


_METHODS: dict[tuple[str, str], MethodSpec] = {}  # (name, family): a method may have a trainer and a decoder


def register_method(name: str, family: str, config: type[MethodConfig] | None, entry: Callable[..., Any],
                    undo: Callable[..., Any] | None = None, description: str = "", streams: bool = False) -> MethodSpec:
    """Register a method (one line per method, at the end of its module). Re-registering the same entry is a no-op."""
    if family not in FAMILIES:
        raise ValueError(f"unknown method family '{family}'; accepted: {', '.join(FAMILIES)}")
    spec = MethodSpec(name, family, config, entry, undo, description, streams)
    existing = _METHODS.get((name, family))
    if existing is not None and existing.entry is not entry:
        raise ValueError(f"method '{name}' ({family}) is already registered by {existing.entry.__module__}")
    _METHODS[(name, family)] = spec
    return spec


def get_method(name: str, family: str | None = None) -> MethodSpec:
    """The registered method ``name`` (of ``family`` when given); a one-line error lists the accepted names."""
    found = [s for s in list_methods(family) if s.name == name]
    if len(found) == 1:
        return found[0]
    if found:
        families = ", ".join(s.family for s in found)
        raise LeanfmError(f"method '{name}' is registered in several families ({families}); name one")
    accepted = ", ".join(dict.fromkeys(s.name for s in list_methods(family)))
    raise LeanfmError(f"unknown method '{name}'; accepted: {accepted}")


def list_methods(family: str | None = None) -> list[MethodSpec]:
    """Registered methods, in registration order, optionally of one family."""
    return [s for s in _METHODS.values() if family is None or s.family == family]
