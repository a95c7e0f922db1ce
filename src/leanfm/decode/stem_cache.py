"""Cached stem states for DynaMo head training: the frozen base's work done once, on disk, per machine.

Why: the heads (METHODS.md section 3) sit on the *penultimate* hidden state of a frozen base, so every training
step that reruns the 30-layer stem recomputes the same numbers. Here the stem runs once over fixed,
non-overlapping windows of each training source and its states are kept in bfloat16 under
``$LEANFM_HOME/cache/dynamo-states/<key>/``; training then samples windows from the cache and runs only the heads
and the frozen LM head.

Layout: one folder per key (:func:`cache_key`: base model, sources, seqlen, windows per source, dtype, leanfm
version), ``manifest.json`` plus shards ``s<source>-<kind>-<shard>.safetensors`` each holding ``ids`` ``[n, T]``
and ``states`` ``[n, T, d]`` (kind ``penultimate``: the input of the base's last block; kind ``final``: the base's
last hidden state after its final norm, only built when self-distillation needs the base's distributions). Every
shard is written atomically, so a shard file that exists is complete and an interrupted build resumes at the first
missing shard. The cache is rebuilt per machine and never committed.

Which windows: of a source's ``T // seqlen`` non-overlapping windows, ``windows`` evenly spaced ones (all when
``windows`` is 0 or larger), so a subset still covers the whole source rather than its first files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from leanfm.models.adapters import get_adapter
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.version import __version__

log = logging.getLogger(__name__)
KINDS = ("penultimate", "final")
MANIFEST = "manifest.json"
_CACHE_KWARGS = ("cache", "layer_past", "past_key_values")


def cache_key(base: str, sources: list[str], seqlen: int, windows: int, dtype: str = "bfloat16") -> str:
    """A short hash naming a cache: a change of base, sources, seqlen, window count, dtype or version misses."""
    text = json.dumps({"base": base, "sources": sources, "seqlen": seqlen, "windows": windows, "dtype": dtype,
                       "leanfm": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_folder(key: str, root: Path | None = None) -> Path:
    """``<root>/cache/dynamo-states/<key>`` (root defaults to ``$LEANFM_HOME``)."""
    return (root if root is not None else leanfm_home()) / "cache" / "dynamo-states" / key


def spaced_windows(ids: torch.Tensor, seqlen: int, windows: int) -> torch.Tensor:
    """``windows`` evenly spaced of the non-overlapping ``seqlen`` windows of ``ids`` (all for 0), ``[n, T]``."""
    available = ids.numel() // seqlen
    every = ids[: available * seqlen].view(available, seqlen)
    if windows <= 0 or windows >= available:
        return every
    picks = torch.linspace(0, available - 1, windows).round().long()
    return every[picks]


def stem_pass(base: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One frozen forward of ``base``'s decoder stack: (penultimate states, final normed states, block kwargs).

    The penultimate state and the keyword arguments (mask, rotary embeddings, positions) are those the base's
    last block receives, captured by a pre-hook; cache arguments are dropped, so a head layer can reuse them.
    """
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handle = get_adapter(base).blocks(base)[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = base.base_model(input_ids=ids, use_cache=False)  # type: ignore[operator]
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    for name in _CACHE_KWARGS:
        if name in kwargs:
            kwargs[name] = None
    kwargs["use_cache"] = False
    return captured["hidden"], out.last_hidden_state, kwargs


def block_kwargs(base: nn.Module, seqlen: int) -> dict[str, Any]:
    """The last block's keyword arguments for an unpadded window of ``seqlen`` tokens, batch-broadcastable.

    Taken from a one-row forward of the base (mask and rotary embeddings depend on the length, not the tokens),
    so training on cached states never reruns the stem per batch.
    """
    _, _, kwargs = stem_pass(base, torch.zeros(1, seqlen, dtype=torch.long, device=_device(base)))
    return kwargs


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _shard_name(source: int, kind: str, shard: int) -> str:
    return f"s{source}-{kind}-{shard:04d}.safetensors"


def build_stem_cache(base: nn.Module, streams: list[torch.Tensor], names: list[str], folder: Path, seqlen: int,
                     windows: int, kinds: tuple[str, ...] = ("penultimate",), shard_windows: int = 64,
                     batch: int = 8, on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Build (or finish) the cache in ``folder``; returns its manifest with the build's tokens/s.

    The stem runs on a bfloat16 copy of ``base`` (the caller's model is untouched). Existing shards are kept,
    so an interrupted build resumes shard by shard.
    """
    folder.mkdir(parents=True, exist_ok=True)
    picked = [spaced_windows(ids, seqlen, windows) for ids in streams]
    manifest = {"sources": names, "seqlen": seqlen, "windows": [int(w.shape[0]) for w in picked],
                "shard_windows": shard_windows, "dtype": "bfloat16", "hidden": int(getattr(base, "config").hidden_size),  # noqa: B009
                "leanfm": __version__}
    atomic_write_json(folder / MANIFEST, manifest)
    stem: nn.Module | None = None
    built_tokens, seconds = 0, 0.0
    for source, rows in enumerate(picked):
        for shard, start in enumerate(range(0, rows.shape[0], shard_windows)):
            missing = [k for k in kinds if not (folder / _shard_name(source, k, shard)).is_file()]
            if not missing:
                continue
            if stem is None:
                stem = copy.deepcopy(base).to(torch.bfloat16).eval()
            tick = time.perf_counter()
            part = rows[start : start + shard_windows]
            outputs: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
            for chunk in part.split(batch):
                hidden, final, _ = stem_pass(stem, chunk.to(_device(stem)))
                outputs["penultimate"].append(hidden.to(torch.bfloat16).cpu())
                outputs["final"].append(final.to(torch.bfloat16).cpu())
            for kind in missing:
                data = {"ids": part.contiguous(), "states": torch.cat(outputs[kind]).contiguous()}
                atomic_write_bytes(folder / _shard_name(source, kind, shard), save(data))
            seconds += time.perf_counter() - tick
            built_tokens += part.numel()
            log.info("stem cache %s: source %d shard %d (%d windows), %.0f tok/s", folder.name, source, shard,
                     part.shape[0], built_tokens / max(seconds, 1e-9))
            if on_shard is not None:
                on_shard(shard)
    return {**manifest, "built_tokens": built_tokens, "build_seconds": seconds,
            "build_tokens_per_second": built_tokens / seconds if seconds else None}


class StemCache:
    """Read access to a built cache: window ``i`` of source ``s`` as (ids, penultimate states[, final states])."""

    def __init__(self, folder: Path, kinds: tuple[str, ...] = ("penultimate",)) -> None:
        self.folder, self.kinds = Path(folder), kinds
        self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        self.windows: list[int] = self.manifest["windows"]
        self.shard_windows: int = self.manifest["shard_windows"]
        self._handles: dict[tuple[int, str, int], Any] = {}

    def _handle(self, source: int, kind: str, shard: int) -> Any:
        key = (source, kind, shard)
        if key not in self._handles:
            self._handles[key] = safe_open(str(self.folder / _shard_name(source, kind, shard)), framework="pt")
        return self._handles[key]

    def window(self, source: int, index: int) -> tuple[torch.Tensor, ...]:
        """``(ids [T], penultimate [T, d][, final [T, d]])`` of one cached window (bfloat16 states)."""
        shard, row = divmod(index, self.shard_windows)
        first = self._handle(source, self.kinds[0], shard)
        parts = [first.get_slice("ids")[row : row + 1][0]]
        for kind in self.kinds:
            parts.append(self._handle(source, kind, shard).get_slice("states")[row : row + 1][0])
        return tuple(parts)

    def batch(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The windows ``[(source, index), ...]`` stacked: ``(ids [B, T], states [B, T, d], ...)``."""
        rows = [self.window(s, i) for s, i in picks]
        return tuple(torch.stack(column) for column in zip(*rows, strict=True))
