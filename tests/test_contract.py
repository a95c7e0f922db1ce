"""The contract every trainable method honours, checked for each by adding one entry to ``CONTRACTS``.

- its config survives a JSON round trip;
- a bad setting is a one-line error naming it;
- Ctrl-C in the middle of a run leaves a checkpoint that resumes to the losses and weights of an uninterrupted run;
- a checkpoint trained with other settings is refused with a one-line error.

An entry says how to build a tiny config, how to run the method's public trainer (into a folder, resuming or
not) and read back its loss history and trained weights, and in which module the trainer calls
:func:`leanfm.training.fit` (the contract interrupts runs there, at a step of its choosing).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import leanfm.adapt.continual as continual
import leanfm.adapt.mmpt as mmpt
import leanfm.adapt.slu as slu
import leanfm.adapt.t2i_continual as t2i_continual
import leanfm.align.trainer as align_trainer
import leanfm.compress.disp as disp
import leanfm.decode.training as dynamo
import leanfm.vision.train as vit
from conftest import ctrl_c_fit
from czsl_fixtures import make_base, make_czsl
from fewshot_data import make_fewshot
from leanfm import load_model
from leanfm.align.pipeline import ImageAlignConfig, SpeechAlignConfig
from leanfm.config import MethodConfig
from leanfm.decode.dynamo import HEADS_FILE
from leanfm.errors import LeanfmError
from leanfm.training import TrainingInterrupted, load_checkpoint
from test_slu_data import make_dataset

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Contract:
    """One trainable method's entry: tiny config, how to run it, a bad setting, a setting that changes training."""

    name: str
    config: Callable[..., MethodConfig]  # tiny settings; keyword overrides
    run: Callable[[MethodConfig, Path, bool], tuple[list[dict[str, Any]], Weights]]  # (config, folder, resume)
    module: ModuleType  # the module whose ``fit`` the trainer calls
    checkpoint: Callable[[Path], Path]  # the checkpoint folder the run in ``folder`` writes
    bad: tuple[dict[str, Any], str]  # a bad setting and words of its error
    other: dict[str, Any]  # a setting a resumed run may not change


def _vit_run(config, folder, resume):
    metrics = vit.train_vit(config, folder / "out", resume=resume)
    return metrics["history"], vit.load_vit(folder / "out").state_dict()


def _dynamo_run(config, folder, resume):
    summary = dynamo.train_and_save(config, folder / "out", resume=resume)
    return summary["history"], load_file(str(folder / "out" / HEADS_FILE))


def _disp_run(config, folder, resume):
    model, tokenizer = load_model("tiny-llama")
    report = disp.compress_disp(model, tokenizer, config, folder / "out.training", resume=resume)
    return report.training["history"], model.state_dict()


def _align_run(config, folder, resume):
    targets = nn.functional.normalize(torch.randn(32, 8, generator=torch.Generator().manual_seed(6)), dim=-1)
    inputs = torch.randn(32, 5, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.2), nn.Linear(16, 8))  # dropout: torch's RNG matters
    summary = align_trainer.train_aligned(encoder, lambda rows: inputs[rows], targets, config,
                                          folder / "out.training", resume)
    return summary["history"], encoder.state_dict()


@functools.cache
def _slu_data() -> str:
    """A small hand-made dataset in JointBERT's layout, written once per test session."""
    folder = Path(tempfile.mkdtemp(prefix="leanfm-slu-"))
    atexit.register(shutil.rmtree, folder, True)
    return str(make_dataset(folder / "data"))


def _slu_run(config, folder, resume):
    summary = slu.train_slu(config, folder / "out", resume=resume)
    return summary["training"]["history"], load_file(str(folder / "out" / "model.safetensors"))


@functools.cache
def _fewshot_data() -> str:
    """A small hand-made dataset in the 16-shot layout, written once per test session."""
    folder = Path(tempfile.mkdtemp(prefix="leanfm-fewshot-"))
    atexit.register(shutil.rmtree, folder, True)
    return str(make_fewshot(folder, per_class_test=4))


def _continual_run(config, folder, resume):
    """The last task's history (4 steps) and the saved weights (every task's update and the folded layers)."""
    summary = continual.train_continual(config, folder / "out", resume=resume)
    return summary["training"][-1]["history"], load_file(str(folder / "out" / "weights.safetensors"))


@functools.cache
def _czsl_folders() -> tuple[str, str]:
    """A tiny CZSL dataset in the public layout and a tiny frozen base, written once per test session."""
    folder = Path(tempfile.mkdtemp(prefix="leanfm-czsl-"))
    atexit.register(shutil.rmtree, folder, True)
    return str(make_czsl(folder / "data")), str(make_base(folder / "base"))


def _mmpt_run(config, folder, resume):
    summary = mmpt.train_czsl(config, folder / "out", resume=resume)
    return summary["training"]["history"], load_file(str(folder / "out" / "prompts.safetensors"))


@functools.cache
def _t2i_base() -> str:
    """A tiny random text-to-image model folder (tiny BERT captions), written once per test session."""
    from leanfm.models.t2i import T2IConfig, T2IModel, save_t2i

    folder = Path(tempfile.mkdtemp(prefix="leanfm-t2i-"))
    atexit.register(shutil.rmtree, folder, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T2IModel(T2IConfig(width=8, heads=2, text_encoder="tiny-bert", cross_attention_dim=32))
    return str(save_t2i(model, folder / "base"))


def _t2i_continual_run(config, folder, resume):
    """The last concept's history (4 steps) and the saved folded U-Net plus the learned tokens."""
    summary = t2i_continual.train_t2i_continual(config, folder / "out", resume=resume)
    tokens = load_file(str(folder / "out" / "tokens.safetensors"))
    return summary["histories"][-1], load_file(str(folder / "out" / "unet" / "diffusion_pytorch_model.safetensors")) \
        | {f"token.{k}": v for k, v in tokens.items()}


def _beside(folder: Path) -> Path:
    return folder / "out.training"


CONTRACTS = [
    Contract(
        "vit",
        lambda **kw: vit.ViTTrainConfig(**{"hidden_size": 16, "heads": 2, "mlp": 32, "layers": 1, "epochs": 1,
                                           "batch_size": 16, "train_limit": 64, "eval_limit": 32,
                                           "checkpoint_every": 3, "warmup_steps": 1, "device": "cpu", **kw}),
        _vit_run, vit, _beside, ({"heads": 3}, "hidden_size 16 is not divisible by heads 3"), {"lr": 1e-2},
    ),
    Contract(
        "dynamo",
        lambda **kw: dynamo.DynamoTrainConfig(**{"model": "tiny-llama", "heads": 2, "steps": 4, "batch_size": 2,
                                                 "seqlen": 16, "checkpoint_every": 3, "autocast": False,
                                                 "device": "cpu", **kw}),
        _dynamo_run, dynamo, _beside, ({"init": "zeros"}, "unknown head init 'zeros'"), {"lr": 1e-2},
    ),
    Contract(
        "disp",
        lambda **kw: disp.DispConfig(**{"ratio": 0.4, "steps": 4, "batch_size": 2, "seqlen": 32,
                                        "checkpoint_every": 3, "autocast": False, "device": "cpu",
                                        "train_corpus": "austen:calib", **kw}),
        _disp_run, disp, _beside, ({"sampler": "softmax"}, "unknown sampler 'softmax'"), {"lam": 1.0},
    ),
    Contract(
        "align",
        lambda **kw: align_trainer.AlignConfig(**{"steps": 4, "batch_size": 8, "warmup": 2, "checkpoint_every": 3,
                                                  "device": "cpu", **kw}),
        _align_run, align_trainer, _beside, ({"loss": "triplet"}, "unknown loss 'triplet'"), {"tau": 0.1},
    ),
    Contract(
        "slu",
        lambda **kw: slu.SluConfig(**{"data": _slu_data(), "encoder": "tiny-bert", "method": "compositional",
                                      "paired": True, "steps": 4, "batch_size": 8, "warmup": 1, "eval_limit": 4,
                                      "checkpoint_every": 3, "device": "cpu", **kw}),
        _slu_run, slu, _beside, ({"method": "crf"}, "unknown method 'crf'"), {"lr": 1e-2},
    ),
    Contract(  # STAMINA: Gumbel noise and dropout draw from torch's RNG across four tasks and a resume
        "continual",
        lambda **kw: continual.ContinualConfig(**{"data": _fewshot_data(), "encoder": "tiny-bert",
                                                  "method": "stamina", "stamina_reg": True, "steps_per_task": 4,
                                                  "batch_size": 8, "warmup": 1, "checkpoint_every": 3,
                                                  "device": "cpu", **kw}),
        _continual_run, continual, lambda folder: folder / "out.training" / "task-00",
        ({"method": "ewc"}, "unknown method 'ewc'"), {"lr": 1e-2},
    ),
    Contract(  # MMPT: coupled visual prompts, vocabulary and context all learned; the towers frozen
        "mmpt",
        lambda **kw: mmpt.CZSLConfig(**{"data": _czsl_folders()[0], "base": _czsl_folders()[1], "method": "mmpt",
                                        "steps": 4, "batch_size": 8, "warmup": 1, "checkpoint_every": 3,
                                        "device": "cpu", **kw}),
        _mmpt_run, mmpt, _beside, ({"method": "maple"}, "unknown method 'maple'"), {"lr": 1e-2},
    ),
    Contract(  # STAMINA on the t2i U-Net: Gumbel noise across two concepts, MLP tokens, a resume mid-concept
        "continual-t2i",
        lambda **kw: t2i_continual.T2IContinualConfig(**{"base": _t2i_base(), "method": "stamina",
                                                         "concepts": "penguin,rocket", "shots": 2, "steps": 4,
                                                         "batch_size": 4, "warmup": 1, "samples": 2,
                                                         "sample_steps": 1, "checkpoint_every": 3,
                                                         "autocast": False, "device": "cpu", **kw}),
        _t2i_continual_run, t2i_continual, lambda folder: folder / "out.training" / "concept-00",
        ({"method": "textual-inversion"}, "unknown method 'textual-inversion'"), {"lr": 1e-2},
    ),
]
IDS = [c.name for c in CONTRACTS]


def _interrupted(contract: Contract, monkeypatch, folder: Path, at: int = 2, **overrides: Any) -> TrainingInterrupted:
    """Run with Ctrl-C at step ``at`` (inside the step function, as a real Ctrl-C would arrive)."""
    with monkeypatch.context() as patch:
        patch.setattr(contract.module, "fit", ctrl_c_fit(contract.module.fit, at))
        with pytest.raises(TrainingInterrupted) as caught:
            contract.run(contract.config(**overrides), folder, False)
    return caught.value


def _one_line_error(call: Callable[[], Any], words: str) -> None:
    with pytest.raises(LeanfmError) as caught:
        call()
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_config_survives_a_json_round_trip(contract, tmp_path):
    config = contract.config()
    (tmp_path / "config.json").write_text(config.to_json())
    again = type(config).from_json(tmp_path / "config.json")
    assert again == config and again.fingerprint() == config.fingerprint()
    assert "device" in config.to_dict()  # every trainer says where it runs


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_bad_setting_is_a_one_line_error(contract):
    overrides, words = contract.bad
    _one_line_error(lambda: contract.config(**overrides), words)
    _one_line_error(lambda: contract.config(device="tpu"), "unknown device 'tpu'")


@pytest.mark.training
@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_resume_after_ctrl_c_is_exact(contract, tmp_path, monkeypatch):
    history, weights = contract.run(contract.config(), tmp_path / "straight", False)
    assert len(history) == 4 and all(h["step"] == i + 1 for i, h in enumerate(history))
    interrupt = _interrupted(contract, monkeypatch, tmp_path / "cut")
    assert interrupt.checkpoint == contract.checkpoint(tmp_path / "cut") and interrupt.step == 2
    assert load_checkpoint(interrupt.checkpoint)["step"] == 2  # saved on Ctrl-C (checkpoint_every is 3)
    torch.manual_seed(99)  # the resumed process starts from other RNG state; the checkpoint's must win
    again, resumed = contract.run(contract.config(), tmp_path / "cut", True)
    assert again == history
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_checkpoint_trained_with_other_settings_is_refused(contract, tmp_path, monkeypatch):
    _interrupted(contract, monkeypatch, tmp_path, at=1)
    key, value = next(iter(contract.other.items()))
    _one_line_error(lambda: contract.run(contract.config(**contract.other), tmp_path, True),
                    f"was trained with {key}=")
    assert value != getattr(contract.config(), key)


@pytest.mark.parametrize(("name", "config_class"), [("vit", vit.ViTTrainConfig), ("dynamo", dynamo.DynamoTrainConfig),
                                                   ("cwcl-speech", SpeechAlignConfig),
                                                   ("cwcl-image", ImageAlignConfig), ("slu", slu.SluConfig),
                                                   ("continual", continual.ContinualConfig),
                                                   ("mmpt", mmpt.CZSLConfig),
                                                   ("continual-t2i", t2i_continual.T2IContinualConfig)])
def test_trainers_are_registered_with_the_train_entry_shape(name, config_class):
    """``entry(config, out, *, resume=False, overwrite=False, ...) -> dict``, one line per trainer."""
    import inspect

    from leanfm.config import get_method

    spec = get_method(name, "train")
    assert spec.config is config_class and spec.description
    params = inspect.signature(spec.entry).parameters
    assert list(params)[:2] == ["config", "out"]
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY and params[k].default is False
               for k in ("resume", "overwrite"))
