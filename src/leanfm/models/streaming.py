"""A causal LM read from its safetensors checkpoint one transformer block at a time.

Why: a layer-wise compressor needs only one dense block at a time, but a model loaded whole keeps every dense
block resident beside the compressed ones it is turned into (issue 14: the process peaked at 3x the float32
model). :class:`BlockStream` builds the model with its parameters on the ``meta`` device (no memory), loads
the parts outside the blocks (embedding, final norm, untied head) once, and reads a block's tensors from the
checkpoint only when asked (:meth:`BlockStream.load`); :meth:`BlockStream.release` sends a block back to
``meta`` (the layer-importance pass reads every block once, then lets it go).

What streams: a folder holding ``config.json`` of an architecture :mod:`leanfm.models.adapters` knows and its
weights as ``model.safetensors`` or shards listed in ``model.safetensors.index.json``, whose tensor names are
the model's own state-dict names (tied weights stored once). Anything else (a ``.bin`` checkpoint, renamed keys,
a leanfm compressed folder) makes :func:`open_stream` return ``None`` with the reason, and the caller loads the
model whole. Tensors are read with ``safetensors.safe_open`` and *cloned*: ``get_tensor`` returns views of the
file's memory map, which would keep the mapping (and every page read) alive, and would be unaligned (a
different memory alignment can change the last bits of a float32 GEMM); the clone is an ordinary, aligned
allocation with the exact values, so a streamed model computes exactly what the loaded one does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from leanfm.models.adapters import ADAPTERS, get_adapter

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, for a single-file or sharded checkpoint folder; ``None``
    when ``folder`` has neither ``model.safetensors`` nor a readable ``model.safetensors.index.json``."""
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), folder / SINGLE_FILE)
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return {name: folder / file for name, file in index["weight_map"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_meta(module: nn.Module) -> bool:
    """True when any parameter of ``module`` has no memory (lives on the ``meta`` device)."""
    return any(p.is_meta for p in module.parameters())


@dataclass
class BlockStream:
    """A model whose blocks are read from ``files`` on demand (see the module docstring).

    ``model`` is the usual transformers model; every block is on ``meta`` until :meth:`load` reads it, after
    which it is an ordinary module (and stays so once a compressor has rewritten it).
    """

    model: nn.Module
    files: dict[str, Path]
    device: torch.device
    dtype: torch.dtype = torch.float32
    loads: list[int] = field(default_factory=list)  # the block indices read so far, in order (tests, logs)

    @property
    def blocks(self) -> nn.ModuleList:
        return get_adapter(self.model).blocks(self.model)

    def prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
        block = self.blocks[index]
        name = next(n for n, m in self.model.named_modules() if m is block)
        return f"{name}."

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` from the checkpoint, cloned (own aligned memory), in ``dtype`` on ``device``."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        tensors = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as handle:  # the mapping closes once the views are gone
                for name in group:
                    view = handle.get_tensor(name)
                    tensors[name] = view.to(device=self.device, dtype=self.dtype, copy=True)
                    del view
        return tensors

    def load(self, index: int) -> nn.Module:
        """Block ``index`` with its dense weights read from the checkpoint (a no-op when it is resident)."""
        block = self.blocks[index]
        if not is_meta(block):
            return block
        prefix = self.prefix(index)
        tensors = self.read([prefix + name for name in block.state_dict()])
        block.load_state_dict({name[len(prefix):]: t for name, t in tensors.items()}, strict=True, assign=True)
        self.loads.append(index)
        return block

    def release(self, index: int) -> None:
        """Send block ``index``'s tensors back to ``meta`` (their memory is freed)."""
        self.blocks[index].to("meta")


def _block_prefixes(model: nn.Module) -> tuple[str, ...]:
    blocks = set(map(id, get_adapter(model).blocks(model)))
    return tuple(f"{name}." for name, module in model.named_modules() if id(module) in blocks)


def _resident_names(model: nn.Module, files: dict[str, Path]) -> tuple[list[str], dict[str, str]] | str:
    """Names outside the blocks to read, and ``{tied name: stored name}``; a string says why it cannot stream."""
    prefixes = _block_prefixes(model)
    state = model.state_dict(keep_vars=True)
    stored: dict[int, str] = {id(t): n for n, t in state.items() if n in files}
    missing = [n for n, t in state.items() if n not in files and id(t) not in stored]
    if missing:
        return f"the checkpoint lacks {len(missing)} of the model's tensors (e.g. '{missing[0]}')"
    tied = {n: stored[id(t)] for n, t in state.items() if n not in files}
    return [n for n in state if n in files and not n.startswith(prefixes)], tied


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    else:
        module._buffers[attr] = tensor


def open_stream(folder: Path, device: torch.device | str = "cpu") -> BlockStream | str:
    """A :class:`BlockStream` of the checkpoint ``folder`` (embedding, norms and head loaded; blocks on meta),
    or a one-line reason why it cannot stream (the caller then loads the model whole)."""
    files = weight_files(folder)
    if files is None:
        return f"'{folder}' has no {SINGLE_FILE} or {INDEX_FILE}"
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in ADAPTERS or not any(a.endswith("ForCausalLM") for a in config.architectures or []):
        return f"'{folder}' holds a {config.model_type} model, not a plain causal LM of {', '.join(ADAPTERS)}"
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    cast(PreTrainedModel, model).tie_weights()  # the patched constructor untied them (new meta Parameters)
    names = _resident_names(model, files)
    if isinstance(names, str):
        return names
    resident, tied = names
    stream = BlockStream(model.eval(), files, torch.device(device))
    tensors = stream.read(resident)
    model.load_state_dict(tensors, strict=False, assign=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, source in tied.items():  # tied weights (a head tied to the embedding): one Parameter again
        _set_tensor(model, name, params[source] if source in params else tensors[source])
    prefixes = _block_prefixes(model)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies) to the device
        if not name.startswith(prefixes):
            _set_tensor(model, name, buffer.to(stream.device))
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefixes)]
    if left:
        return f"'{folder}': '{left[0]}' could not be loaded outside the blocks"
    cast(PreTrainedModel, model).config.name_or_path = str(folder)
    return stream
