"""Committed artifacts: bf16 weights + manifest, loadable as float32 checkpoints, size-capped."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from leanfm.errors import LeanfmError
from leanfm.models.artifacts import read_manifest, write_artifact
from leanfm.vision.train import load_vit

MANIFEST = {"name": "tiny-vit", "command": "leanfm vision train --out X", "steps": 3, "seed": 0,
            "data": "fashion-mnist train[:96]", "metrics": {"accuracy": 0.5}}


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                               num_labels=10)).eval()


def test_artifact_round_trips_as_bf16_rounded_float32_weights(tmp_path):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_artifact(model, tmp_path / "a", MANIFEST)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    loaded = load_vit(tmp_path / "a")
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, before[key].to(torch.bfloat16).float()), key
    manifest = read_manifest(tmp_path / "a")
    assert manifest["dtype"] == "bfloat16" and manifest["steps"] == 3 and manifest["parameters"] > 0
    assert 0 < manifest["size_mb"] < 1 and "torch" in manifest["versions"]


def test_artifact_refuses_a_thin_manifest_an_oversized_model_and_reads_a_corrupt_one_in_one_line(tmp_path):
    with pytest.raises(LeanfmError, match="lacks command, steps"):
        write_artifact(tiny_vit(), tmp_path / "b", {"name": "x", "seed": 0, "data": "d", "metrics": {}})
    with pytest.raises(LeanfmError, match=r"would be \d+\.\d+ MB; accepted: at most 0\.01 MB"):
        write_artifact(tiny_vit(), tmp_path / "c", MANIFEST, max_mb=0.01)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{oops")
    with pytest.raises(LeanfmError, match="not valid JSON"):
        read_manifest(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps([1]))
    with pytest.raises(LeanfmError, match="holds list"):
        read_manifest(tmp_path / "d")
