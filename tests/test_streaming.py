"""Streaming compression (issue 14): a checkpoint read one block at a time gives the checkpoint the loaded model
gives, bit for bit, with one dense block resident at a time; lazy CLI imports."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leanfm.cli import COMMANDS, build_parser, command_of, main
from leanfm.compress import compress_model
from leanfm.compress.api import compress_checkpoint
from leanfm.compress.engine import capture_block_inputs, layer_importance
from leanfm.models import get_adapter, load_model
from leanfm.models.registry import open_model_stream, smollm2_tokenizer
from leanfm.models.streaming import BlockStream, is_meta, open_stream
from leanfm.models.tiny import build_tiny

SMALL = {"calib_samples": 5, "calib_seqlen": 32, "batch_size": 2}  # a last batch of 1: kwargs replayed across sizes


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny models saved as ordinary safetensors checkpoint folders (with SmolLM2's tokenizer)."""
    made = {}
    for name in ("tiny-llama", "tiny-gemma3", "tiny-opt"):
        folder = tmp_path_factory.mktemp("ckpt") / name
        build_tiny(name).save_pretrained(folder)
        smollm2_tokenizer().save_pretrained(folder)
        made[name] = folder
    return made


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


CASES = [("tiny-llama", "modegpt", "global"), ("tiny-llama", "wanda-sp", "global"),
         ("tiny-llama", "svd-llm", "uniform"), ("tiny-gemma3", "modegpt", "global"),
         ("tiny-opt", "modegpt-heads", "global")]


@pytest.mark.parametrize(("name", "method", "allocation"), CASES)
def test_streamed_checkpoint_is_bit_identical_to_the_loaded_model(folders, name, method, allocation, caplog):
    settings = {"ratio": 0.3, "allocation": allocation, **SMALL}
    with caplog.at_level(logging.INFO, logger="leanfm.compress.api"):
        streamed, tokenizer, report = compress_checkpoint(str(folders[name]), method, **settings)
    assert "streaming" in caplog.text  # it did stream
    model, _ = load_model(str(folders[name]))  # the same tokenizer object: its calibration ids are cached
    reference = compress_model(model, tokenizer, method, **settings)
    _assert_identical(_state(streamed), _state(model))
    assert streamed.config.leanfm_layers == model.config.leanfm_layers
    assert report.layer_sparsity == reference.layer_sparsity and report.achieved_ratio == reference.achieved_ratio
    assert report.params_before == reference.params_before  # counted on the meta skeleton: the same


def test_cli_streams_and_saves_the_same_tensors(folders, tmp_path):
    out = tmp_path / "streamed"
    assert main(["--quiet", "compress", str(folders["tiny-llama"]), "--ratio", "0.3", "--calib-samples", "5",
                 "--calib-seqlen", "32", "--out", str(out)]) == 0
    model, tokenizer = load_model(str(folders["tiny-llama"]))
    compress_model(model, tokenizer, "modegpt", ratio=0.3, calib_samples=5, calib_seqlen=32)
    _assert_identical(load_file(out / "model.safetensors"), {k: v.contiguous() for k, v in _state(model).items()
                                                            if k != "lm_head.weight"})


def test_only_one_dense_block_is_resident(folders, monkeypatch):
    seen: list[tuple[str, int, list[int]]] = []
    original = BlockStream.load

    def spy(self: BlockStream, index: int) -> nn.Module:
        before = [i for i, b in enumerate(self.blocks) if not is_meta(b)]
        block = original(self, index)
        seen.append(("load", index, before))
        return block

    monkeypatch.setattr(BlockStream, "load", spy)
    folder = folders["tiny-gemma3"]  # three blocks
    opened = open_model_stream(str(folder))
    assert not isinstance(opened, str)
    stream, tokenizer = opened
    dense = sum(p.numel() for p in build_tiny("tiny-gemma3").model.layers[0].parameters())
    assert all(is_meta(block) for block in stream.blocks)  # nothing read yet
    from leanfm.compress.modegpt import ModegptConfig, compress_modegpt

    compress_modegpt(stream.model, tokenizer, ModegptConfig(ratio=0.3, **SMALL), stream=stream)
    n = len(stream.blocks)
    # importance pass: each block read alone; compression pass: read again, the ones before it already compressed
    assert [s[1] for s in seen] == [*range(n), *range(n)]
    assert [s[2] for s in seen[:n]] == [[]] * n
    assert [s[2] for s in seen[n:]] == [list(range(i)) for i in range(n)]
    assert not any(is_meta(b) for b in stream.blocks)  # every block ends up real, and smaller in total
    assert sum(p.numel() for b in stream.blocks for p in b.parameters()) < n * dense


def test_open_stream_explains_what_does_not_stream(folders, tmp_path, caplog):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for item in folders["tiny-llama"].iterdir():
        (renamed / item.name).write_bytes(item.read_bytes())
    tensors = load_file(renamed / "model.safetensors")
    save_file({k.replace("model.", "base."): v for k, v in tensors.items()}, renamed / "model.safetensors")
    assert "lacks" in str(open_stream(renamed))
    (renamed / "model.safetensors").unlink()
    assert "has no model.safetensors" in str(open_stream(renamed))
    assert "built in memory" in str(open_model_stream("tiny-llama"))
    with caplog.at_level(logging.INFO, logger="leanfm.compress.api"):
        _, _, report = compress_checkpoint(str(folders["tiny-llama"]), "flap", ratio=0.3, **SMALL)
    assert "loading" in caplog.text and "needs the whole model" in caplog.text and report.achieved_ratio > 0


def _importance_by_full_forward(model: nn.Module, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The reference: 1 - cos(in, out) of every block measured by hooks inside the model's own forward."""
    blocks = get_adapter(model).blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    handles = []
    for i, block in enumerate(blocks):
        def hook(_m, args, kw, out, i=i):
            x, y = (args[0] if args else kw["hidden_states"]), (out[0] if isinstance(out, tuple) else out)
            sums[i] += (1 - nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum()

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for batch in calib.split(batch_size):
            model.base_model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return (sums / calib.numel()).float()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-opt"])
def test_block_by_block_importance_equals_the_full_forward(name):
    model = build_tiny(name)
    calib = torch.randint(0, 5000, (5, 24), generator=torch.Generator().manual_seed(0))
    expected = _importance_by_full_forward(model, calib, 2)
    assert torch.equal(layer_importance(model, calib, 2), expected)
    if name == "tiny-gemma3":  # the per-layer-type kwargs are recorded without running any block
        _, kwargs = capture_block_inputs(model, calib, 2)
        assert len(kwargs["leanfm_per_block"]) == len(model.model.layers)


def test_lazy_cli_imports_only_the_command_family():
    code = ("import sys, leanfm.cli as c; c.build_parser('compress'); "
            "print(sorted(m for m in ('diffusers', 'sentence_transformers', 'peft', 'lm_eval', 'matplotlib') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().replace("'", '"')) == []


def test_command_table_matches_the_full_parser():
    full = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(full) == set(COMMANDS)
    for command in COMMANDS:
        assert command in build_parser(command)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert command_of(["--threads", "2", "--quiet", "compress", "x"]) == "compress"
    assert command_of(["--version"]) is None
