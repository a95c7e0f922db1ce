"""Class-incremental continual learning: the 16-shot sequences, A_N / F_N and the trainer (leanfm.adapt.continual)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewshot_data import make_fewshot
from leanfm.adapt import continual
from leanfm.data import fewshot
from leanfm.errors import LeanfmError
from leanfm.eval.continual import average_accuracy, forgetting
from leanfm.models.encoders import bert_encoder
from leanfm.training import TrainingInterrupted, load_checkpoint

# ---------------------------------------------------------------- metrics


def test_average_accuracy_and_forgetting_on_a_hand_matrix():
    matrix = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.95]]
    assert average_accuracy(matrix) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # task 0: best before the last task 0.9 -> 0.5; task 1: best 0.8 -> 0.7
    assert forgetting(matrix) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert forgetting([[0.7]]) is None
    assert forgetting([[0.5], [0.9, 0.9]]) == pytest.approx(-0.4)  # backward transfer counts as negative forgetting
    with pytest.raises(LeanfmError, match="no entry"):
        average_accuracy([[0.5], [None, 0.4]])


# ---------------------------------------------------------------- data


def test_sequences_have_disjoint_classes_and_halves(tmp_path):
    root = make_fewshot(tmp_path)
    sequence = fewshot.build_sequence(root, "text4", train_per_class=0, test_per_class=0)
    assert [t.name for t in sequence.tasks] == ["agnews", "trec", "subj", "sst-2"]
    classes = [c for t in sequence.tasks for c in t.classes]
    assert sorted(classes) == list(range(14)) and len(sequence.class_names) == 14
    for task in sequence.tasks:
        texts = {e.text for e in task.train}
        assert texts.isdisjoint(e.text for e in task.test)  # the two halves of the official test set
        assert {e.label for e in task.train} == set(task.classes) == {e.label for e in task.val}
        assert abs(len(task.train) - len(task.test)) <= len(task.classes)
    again = fewshot.build_sequence(root, "text4", train_per_class=0, test_per_class=0)
    assert [e.text for e in again.tasks[1].train] == [e.text for e in sequence.tasks[1].train]
    other = fewshot.build_sequence(root, "text4", split_seed=1, train_per_class=0, test_per_class=0)
    assert [e.text for e in other.tasks[1].train] != [e.text for e in sequence.tasks[1].train]
    capped = fewshot.build_sequence(root, "text4", train_per_class=2, val_per_class=1, test_per_class=3)
    assert len(capped.tasks[1].train) == 12 and len(capped.tasks[1].val) == 6 and len(capped.tasks[1].test) == 18


def test_fewshot_bad_inputs_are_one_line_errors(tmp_path):
    root = make_fewshot(tmp_path)
    with pytest.raises(LeanfmError, match="unknown task sequence 'text9'"):
        fewshot.build_sequence(root, "text9")
    with pytest.raises(LeanfmError, match="holds no 16-shot data"):
        fewshot.build_sequence(tmp_path / "fewshot" / "sst-2", "text4")
    bad = tmp_path / "fewshot" / "sst-2" / "16-13" / "train.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    with pytest.raises(LeanfmError, match=r"train.tsv:3: .*label in 0..1"):
        fewshot.build_sequence(root, "text4")
    bad.write_text("words\tclass\n")
    with pytest.raises(LeanfmError, match=r"train\.tsv:1: header"):
        fewshot.build_sequence(root, "text4")
    with pytest.raises(LeanfmError, match="no SNIPS data"):
        fewshot.build_sequence(root, "text11")


@pytest.mark.skipif(not Path(__file__).resolve().parents[2].joinpath("shared/data/fewshot").is_dir(),
                    reason="../shared/data/fewshot is absent (real 16-shot splits)")
def test_real_sequences_build_from_the_shared_data():
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    long = fewshot.build_sequence(root, "text11")
    assert len(long.tasks) == 11 and len(long.class_names) == 23
    assert all(t.test for t in long.tasks)
    short = fewshot.build_sequence(root, "text4")
    assert [len(t.classes) for t in short.tasks] == [4, 6, 2, 2]


# ---------------------------------------------------------------- trainer


def _config(data: Path, **kw) -> continual.ContinualConfig:
    return continual.ContinualConfig(**{"data": str(data), "encoder": "tiny-bert", "steps_per_task": 6,
                                        "batch_size": 8, "lr": 1e-2, "warmup": 1, "device": "cpu",
                                        "checkpoint_every": 4, **kw})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_fewshot(tmp_path_factory.mktemp("fewshot"))


@pytest.mark.training
def test_finished_classes_keep_their_head_rows_and_the_run_round_trips(tiny_data, tmp_path, monkeypatch):
    heads = []
    real_save = continual.save_checkpoint

    def save_checkpoint(folder, state):  # the progress saved after each task holds that task's head
        if folder.name == "progress":
            heads.append(state["head"]["weight"].clone())
        real_save(folder, state)

    monkeypatch.setattr(continual, "save_checkpoint", save_checkpoint)
    summary = continual.train_continual(_config(tiny_data, method="clora", reg_weight=1e3), tmp_path / "run")
    assert len(heads) == 4
    sequence = summary["sequence"]
    for number in range(1, len(heads)):  # rows of every class finished before task `number` are bit-identical
        finished = [c for t in sequence["tasks"][:number] for c in t["classes"]]
        assert torch.equal(heads[number][finished], heads[number - 1][finished])
        current = sequence["tasks"][number]["classes"]
        assert not torch.equal(heads[number][current], heads[number - 1][current])
    matrix = summary["matrices"]["test"]
    assert [len(r) for r in matrix] == [1, 2, 3, 4]
    assert summary["metrics"]["test"]["average_accuracy"] == pytest.approx(average_accuracy(matrix))
    model, tokenizer, meta = continual.load_run(tmp_path / "run")
    replayed, _, _ = continual.load_run(tmp_path / "run", from_history=True)
    batch = continual._collate(tokenizer(["the alpha of it", "a tango"])["input_ids"])
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(replayed(batch["input_ids"], batch["attention_mask"]), logits, atol=1e-5)
    base, _ = bert_encoder("tiny-bert")
    assert not torch.equal(base.encoder.layer[0].attention.self.query.weight,
                           model.encoder.encoder.layer[0].attention.self.query.weight)
    evaluated = continual.evaluate_run(tmp_path / "run")
    assert evaluated["per_task"]["sst-2"] == pytest.approx(matrix[-1][3])
    assert meta["metrics"]["test"]["final_row"] == matrix[-1]


@pytest.mark.training
def test_strong_clora_regulariser_keeps_the_second_task_off_the_first_tasks_entries(tiny_data, tmp_path):
    """Through training, not only in the formula: a large lambda shrinks || |P| * Delta_2 ||_F, the penalised
    quantity (measured: 8x here; a low-rank update mostly shrinks as a whole rather than moving off P's entries)."""
    overlap = {}
    for name, reg in (("lora", 0.0), ("clora", 1e7)):
        config = _config(tiny_data, method="clora" if reg else "lora", reg_weight=reg or 1.0, steps_per_task=10)
        continual.train_continual(config, tmp_path / name)
        tensors = load_file(str(tmp_path / name / "weights.safetensors"))
        first = tensors["history.0.encoder.layer.1.attention.self.value.B"] @ \
            tensors["history.0.encoder.layer.1.attention.self.value.A"]
        second = tensors["history.1.encoder.layer.1.attention.self.value.B"] @ \
            tensors["history.1.encoder.layer.1.attention.self.value.A"]
        overlap[name] = float((first.abs() * second).norm())
    assert overlap["clora"] < 0.25 * overlap["lora"]


@pytest.mark.training
def test_joint_and_frozen_runs(tiny_data, tmp_path):
    joint = continual.train_continual(_config(tiny_data, method="joint"), tmp_path / "joint")
    assert len(joint["matrices"]["test"]) == 1 and joint["metrics"]["test"]["forgetting"] is None
    assert joint["training"][0]["steps"] == 6 * 4
    frozen = continual.train_continual(_config(tiny_data, method="frozen"), tmp_path / "frozen")
    model, _, _ = continual.load_run(tmp_path / "frozen")
    base, _ = bert_encoder("tiny-bert")
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.encoder.state_dict().values(),
                                                 strict=True))
    assert frozen["metrics"]["test_task_aware"]["average_accuracy"] >= frozen["metrics"]["test"]["average_accuracy"]


def test_continual_config_bad_settings_are_one_line_errors(tiny_data, tmp_path):
    with pytest.raises(LeanfmError, match="unknown method 'ewc'"):
        _config(tiny_data, method="ewc")
    with pytest.raises(LeanfmError, match="rank 0"):
        _config(tiny_data, rank=0)
    with pytest.raises(LeanfmError, match=r"reg weight -1\.0 is invalid"):
        _config(tiny_data, reg_weight=-1.0)
    with pytest.raises(LeanfmError, match="unknown target module 'mlp'"):
        continual.train_continual(_config(tiny_data, targets="query,mlp"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.training
def test_cli_train_eval_export_and_transformers_loads_the_export(tiny_data, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "leanfm", "--quiet", "continual", "train", str(tiny_data),
                           "--out", str(run), "--encoder", "tiny-bert", "--method", "stamina",
                           "--steps-per-task", "3", "--batch-size", "8", "--device", "cpu",
                           "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert len(metrics["matrices"]["test"]) == 4 and "test_average_accuracy" in metrics
    done = subprocess.run([sys.executable, "-m", "leanfm", "continual", "eval", str(run), "--json", "-"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["average_accuracy"] == pytest.approx(metrics["test_average_accuracy"])
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "leanfm", "continual", "export", str(run), "--out", str(export)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    script = (  # no leanfm import: stock transformers + safetensors
        "import sys, json, torch; from transformers import BertModel, AutoTokenizer; "
        "from safetensors.torch import load_file; d = sys.argv[1]; m = BertModel.from_pretrained(d).eval(); "
        "t = AutoTokenizer.from_pretrained(d); h = load_file(d + '/head.safetensors'); "
        "b = t(['the alpha of it'], return_tensors='pt'); s = m(**b).last_hidden_state.mean(1); "
        "print(json.dumps((s @ h['weight'].T + h['bias']).tolist()))")
    done = subprocess.run([sys.executable, "-c", script, str(export)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    model, tokenizer, _ = continual.load_run(run)
    batch = continual._collate(tokenizer(["the alpha of it"])["input_ids"])
    assert torch.allclose(torch.tensor(json.loads(done.stdout)), model(batch["input_ids"], batch["attention_mask"]),
                          atol=1e-5)
    for argv, words in ((["continual", "eval", str(tmp_path / "nothing")], "is not a continual run"),
                        (["continual", "train", str(tiny_data), "--out", str(tmp_path / "b"), "--rank", "0"],
                         "rank")):
        done = subprocess.run([sys.executable, "-m", "leanfm", *argv], capture_output=True, text=True, timeout=600)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.training
def test_resume_between_tasks_is_exact(tiny_data, tmp_path, monkeypatch):
    """Interrupted as the third task starts: the progress after task 2 carries the rest to the same weights."""
    config = _config(tiny_data, method="stamina", stamina_reg=True, steps_per_task=3)
    continual.train_continual(config, tmp_path / "straight")
    real_fit, calls = continual.fit, []

    def fit(task, *args, **kwargs):
        calls.append(task.name)
        if len(calls) == 3:
            raise TrainingInterrupted(None, 0)
        return real_fit(task, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(continual, "fit", fit)
        with pytest.raises(TrainingInterrupted):
            continual.train_continual(config, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut.training" / "progress")["done"] == 2
    torch.manual_seed(123)
    continual.train_continual(config, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "continual.json").read_text())["matrices"] == \
        json.loads((tmp_path / "straight" / "continual.json").read_text())["matrices"]
