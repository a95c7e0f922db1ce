"""One entry point for every compressor: pick a method by name, compress, save a loadable checkpoint.

The methods themselves are found in the method registry (:mod:`leanfm.config`): each compressor module
registers ``name -> (config class, entry)`` in one line, and ``import leanfm.compress`` imports them all, so
this module never names a method. :func:`compress_checkpoint` is the entry for a model given by name or
folder: it streams the checkpoint block by block where the method allows (peak memory ~ the compressed model, not
the dense one beside it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

from torch import nn
from transformers import PreTrainedModel

from leanfm.compress.base import CompressionReport, check_architecture
from leanfm.config import get_method
from leanfm.device import resolve_device
from leanfm.errors import LeanfmError
from leanfm.models.compressed import auto_map, standalone_file
from leanfm.models.registry import load_model, open_model_stream
from leanfm.paths import atomic_directory, atomic_write_bytes, atomic_write_json, check_output_dir

log = logging.getLogger(__name__)


def compress_model(model: nn.Module, tokenizer: Any, method: str = "modegpt", **settings: Any) -> CompressionReport:
    """Compress ``model`` in place with the registered compressor ``method`` and return the report.

    ``settings`` are fields of that method's config class (``ratio`` required): e.g. ``ridge`` for ``modegpt``,
    ``steps`` for ``disp``. A setting the method does not have is a one-line error naming the accepted ones.
    """
    spec = get_method(method, "compress")
    check_architecture(model)
    assert spec.config is not None  # every compressor has a config class
    config = spec.config.from_dict(settings)
    report: CompressionReport = spec.entry(model, tokenizer, config)
    report.settings = config.to_dict()
    return report


def compress_checkpoint(name: str, method: str = "modegpt", **settings: Any) -> tuple[nn.Module, Any,
                                                                                     CompressionReport]:
    """Load the model ``name`` (registered name or checkpoint folder) and compress it with ``method``; returns
    ``(model, tokenizer, report)``. What ``leanfm compress`` runs.

    A method registered with ``streams=True`` (the layer-wise ones) reads a plain safetensors checkpoint one
    block at a time (:mod:`leanfm.models.streaming`), so the process never holds the dense model beside the
    compressed one; the result is bit-identical to :func:`compress_model` on the loaded model, which is what
    runs otherwise (a log line says why: a method that needs the whole model, a model built in memory, a
    checkpoint that is not plain safetensors).
    """
    spec = get_method(method, "compress")
    assert spec.config is not None  # every compressor has a config class
    config = spec.config.from_dict(settings)
    device = resolve_device(getattr(config, "device", "cpu"))
    opened = open_model_stream(name, device) if spec.streams else f"--method {method} needs the whole model"
    if isinstance(opened, str):
        log.info("loading %s whole: %s", name, opened)
        model, tokenizer = load_model(name)
        check_architecture(model)
        report: CompressionReport = spec.entry(model, tokenizer, config)
    else:
        stream, tokenizer = opened
        log.info("streaming %s block by block from %s", name, stream.files[next(iter(stream.files))].parent)
        model = stream.model
        report = spec.entry(model, tokenizer, config, stream=stream)
    report.settings = config.to_dict()
    return model, tokenizer, report


def save_compressed(model: nn.Module, tokenizer: Any, out: Path, report: CompressionReport,
                    overwrite: bool = False) -> Path:
    """Write model, tokenizer, ``compression.json`` and a README to ``out`` atomically (all or nothing; a crash
    leaves a previous ``out`` intact). ``config.json`` always carries ``auto_map``, so the folder loads without
    leanfm once ``leanfm export OUT --standalone`` has copied the modeling file in."""
    check_output_dir(out, overwrite)
    with atomic_directory(out) as tmp:  # replaces an existing ``out`` only once the new one is complete
        cast(PreTrainedModel, model).save_pretrained(tmp, safe_serialization=True)  # a compressed transformers model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        config = _with_auto_map(tmp, required=False)
        (tmp / "README.md").write_text(readme_text(config, report.to_dict()), encoding="utf-8")
    return out


def _with_auto_map(folder: Path, required: bool = True) -> dict[str, Any]:
    """Add ``auto_map`` to ``folder/config.json`` (a leanfm model type) and return the config as a dict; another
    model type is a one-line error when ``required``, left as it is otherwise."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LeanfmError(f"'{folder}' is not a compressed model folder (config.json: {err})") from None
    mapping = auto_map(str(config.get("model_type")))
    if mapping is None and not required:
        return cast(dict[str, Any], config)
    if mapping is None:
        raise LeanfmError(f"'{folder}' is not a compressed model folder: model_type '{config.get('model_type')}' is "
                          "not a leanfm compressed type (leanfm_llama, leanfm_opt, leanfm_phi, leanfm_gpt_neox, "
                          "leanfm_sliced_llama)")
    if config.get("auto_map") != mapping:
        config["auto_map"] = mapping
        atomic_write_json(path, config)
    return cast(dict[str, Any], config)


def export_standalone(folder: Path) -> Path:
    """Make the compressed ``folder`` loadable without leanfm: ``auto_map`` in ``config.json`` and the modeling file
    (torch and transformers only) beside it; load with ``from_pretrained(folder, trust_remote_code=True)``.

    Both files are written atomically; a folder that is not a leanfm compressed model is a one-line error.
    """
    if not (folder / "config.json").is_file():
        raise LeanfmError(f"'{folder}' is not a compressed model folder (no config.json)")
    _with_auto_map(folder)
    source = standalone_file()
    atomic_write_bytes(folder / source.name, source.read_bytes())
    return folder / source.name


def readme_text(config: dict[str, Any], report: dict[str, Any]) -> str:
    """A short README for a compressed folder: what it is, how to load it with and without leanfm, its widths."""
    method, ratio = report.get("method", "?"), report.get("achieved_ratio", report.get("ratio", "?"))
    lines = [
        f"# A {config.get('base_model_type') or 'llama'} model compressed with leanfm ({method})",
        "",
        f"Structured compression by leanfm `{method}` (achieved ratio {ratio} of the transformer-block parameters, "
        f"{report.get('params_before', '?')} -> {report.get('params_after', '?')} parameters). Every block keeps "
        "its own widths, stored in `config.json` (`leanfm_layers`); the settings are in `compression.json`.",
        "",
        "## Loading",
        "",
        "With leanfm installed, `import leanfm` registers the classes (no remote code runs):",
        "",
        "```python",
        "import leanfm",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
        "```",
        "",
        "Without leanfm: run `leanfm export FOLDER --standalone` once (it copies `modeling_leanfm.py`, which needs "
        "only torch and transformers, into the folder), then",
        "`AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)`.",
        "",
        "## Widths",
        "",
        *_widths_summary(config),
    ]
    return "\n".join(lines) + "\n"


def _widths_summary(config: dict[str, Any]) -> list[str]:
    """One line per block (MLP width, q/k and v head dims, heads; DISP channel counts; SVD ranks)."""
    if "leanfm_original_hidden_size" in config:  # SliceGPT: one residual width for all blocks
        return [f"Residual stream sliced from {config['leanfm_original_hidden_size']} to {config['hidden_size']} "
                f"dims in all {config.get('num_hidden_layers')} blocks."]
    rows = ["| block | MLP width | q/k head dim | v head dim | heads (kv) | other |", "|---|---|---|---|---|---|"]
    for index, layer in enumerate(config.get("leanfm_layers") or []):
        other = ", ".join(f"{name} {len(kept)}" for name, kept in (layer.get("channels") or {}).items())
        other += ", ".join(f"{path} rank {rank}" for path, rank in (layer.get("low_rank") or {}).items())
        rows.append(f"| {index} | {layer['intermediate']} | {layer['qk_dim']} | {layer['v_dim']} | "
                    f"{layer['num_heads']} ({layer['num_kv_heads']}) | {other or '-'} |")
    return rows
