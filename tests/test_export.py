"""Standalone export: a compressed folder loads in stock transformers (``trust_remote_code=True``) in a process
that never imports leanfm, with the same logits as leanfm's own load; ``leanfm export`` errors are one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from leanfm import load_model
from leanfm.cli import main
from leanfm.compress import compress_model, save_compressed

SMALL = {"calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}
DISP = {"steps": 2, "batch_size": 2, "seqlen": 32, "checkpoint_every": 2, "autocast": False,
        "train_corpus": "austen:calib"}
CASES = [("tiny-llama", "modegpt", SMALL), ("tiny-neox", "modegpt", SMALL), ("tiny-llama", "disp", DISP),
         ("tiny-neox", "disp", DISP), ("tiny-llama", "slicegpt", SMALL)]
IDS = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(7))

# Runs in a fresh interpreter whose import system refuses leanfm: stock transformers only.
CHILD = r"""
import importlib.abc, json, sys
class NoLeanfm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "leanfm":
            raise ImportError("leanfm must not be imported here")
sys.meta_path.insert(0, NoLeanfm())
import torch
from transformers import AutoModelForCausalLM
result = {}
for folder in sys.argv[1:]:
    expected = torch.load(folder + "/expected.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        refusal = "loaded without trust_remote_code"
    except Exception as err:
        refusal = str(err)
    result[folder] = {"class": type(model).__module__ + "." + type(model).__name__,
                      "max_diff": (logits - expected["logits"]).abs().max().item(), "refusal": refusal}
assert not any(name.split(".")[0] == "leanfm" for name in sys.modules)
print("RESULT:" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """Five compressed folders, exported, each with leanfm's logits on IDS in ``expected.pt``."""
    root = tmp_path_factory.mktemp("export")
    folders = {}
    for name, method, settings in CASES:
        model, _ = load_model(name)
        report = compress_model(model, tokenizer, method=method, ratio=0.4, **settings)
        folder = save_compressed(model, tokenizer, root / f"{name}-{method}", report)
        assert main(["--quiet", "export", str(folder), "--standalone"]) == 0
        ours, _ = load_model(str(folder))  # leanfm's load of the saved folder
        with torch.no_grad():
            torch.save({"ids": IDS, "logits": ours(IDS).logits}, folder / "expected.pt")
        folders[(name, method)] = folder
    return folders


def test_stock_transformers_loads_the_export_without_leanfm(exported, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    child = subprocess.run([sys.executable, "-c", CHILD, *map(str, exported.values())], capture_output=True,
                           text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.rpartition("RESULT:")[2])  # after transformers' [y/N] prompt (stdin is closed)
    for (name, method), folder in exported.items():
        row = result[str(folder)]
        assert row["class"].startswith("transformers_modules.") and row["class"].endswith("ForCausalLM")
        assert row["max_diff"] < 1e-6, (name, method, row)
        assert "custom code" in row["refusal"] and "update Transformers" not in row["refusal"]


def test_folder_has_auto_map_readme_and_leanfm_classes_win(exported):
    import leanfm  # noqa: F401  (registers the compressed classes)

    for (_, method), folder in exported.items():
        config = json.loads((folder / "config.json").read_text())
        mapping = config["auto_map"]
        assert mapping["AutoConfig"] == f"modeling_leanfm.{config['architectures'][0].replace('ForCausalLM', 'Config')}"
        assert mapping["AutoModelForCausalLM"] == f"modeling_leanfm.{config['architectures'][0]}"
        readme = (folder / "README.md").read_text()
        assert "trust_remote_code=True" in readme and "import leanfm" in readme and method in readme
        model = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code: registered classes load it
        assert type(model).__module__ == "leanfm.models.modeling_leanfm"
    widths = (exported[("tiny-llama", "modegpt")] / "README.md").read_text()
    layers = json.loads((exported[("tiny-llama", "modegpt")] / "config.json").read_text())["leanfm_layers"]
    assert f"| 1 | {layers[1]['intermediate']} | {layers[1]['qk_dim']} | {layers[1]['v_dim']} |" in widths


def test_export_errors_are_one_line(tmp_path, capsys):
    dense = tmp_path / "dense"
    load_model("tiny-llama")[0].save_pretrained(dense)
    cases = [([str(dense), "--standalone"], "model_type 'llama' is not a leanfm compressed type"),
             ([str(tmp_path / "nowhere"), "--standalone"], "is not a folder"),
             ([str(tmp_path), "--standalone"], "is not a compressed model folder (no config.json)"),
             ([str(dense)], "nothing to export; accepted: --standalone")]
    for argv, fragment in cases:
        assert main(["--quiet", "export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    assert not (dense / "modeling_leanfm.py").exists()
