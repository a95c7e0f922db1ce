"""Continual adapters: PEFT LoRA folding, the C-LoRA penalty, STAMINA's masks, the class-incremental trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file
from torch import nn

from fewshot_data import make_fewshot
from leanfm.adapt import continual
from leanfm.data import fewshot
from leanfm.errors import LeanfmError
from leanfm.eval.continual import average_accuracy, forgetting
from leanfm.models.encoders import bert_encoder
from leanfm.models.lora import AdapterSettings, ContinualAdapter, StaminaLinear, replay
from leanfm.training import TrainingInterrupted, load_checkpoint


class Tiny(nn.Module):
    """Two Linear layers with the names the adapter targets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(6, 5)
        self.value = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(torch.tanh(self.query(x)))


def _settings(**kw) -> AdapterSettings:
    return AdapterSettings(**{"method": "lora", "rank": 2, "alpha": 4.0, "targets": ("query", "value"), **kw})


def _randomise(adapter: ContinualAdapter, seed: int = 1) -> None:
    """Nonzero B (PEFT starts it at 0) and, for STAMINA, mask logits of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.lora_layers().values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
            if isinstance(layer, StaminaLinear):
                u = layer.lora_mask_u["default"]
                u.copy_(torch.randn(u.shape, generator=g) * 3)
                layer.lora_mask_b["default"].zero_()


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


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("method", ["lora", "clora", "stamina"])
def test_fold_equals_unfolded_forward_and_leaves_no_parameters(method):
    model = Tiny()
    before = sum(p.numel() for p in model.parameters())
    adapter = ContinualAdapter(model, _settings(method=method))
    adapter.begin_task()
    assert all(isinstance(m, LoraLinear) for m in adapter.lora_layers().values())  # PEFT's layers
    assert isinstance(adapter.lora_layers()["query"], StaminaLinear) == (method == "stamina")
    _randomise(adapter)
    model.eval()
    x = torch.randn(7, 6)
    unfolded = model(x)
    adapter.end_task()
    assert torch.allclose(model(x), unfolded, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == before
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_fold_adds_exactly_the_scaled_low_rank_product():
    model = Tiny()
    w0 = model.query.weight.detach().clone()
    adapter = ContinualAdapter(model, _settings())
    adapter.begin_task()
    _randomise(adapter)
    layer = adapter.lora_layers()["query"]
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    adapter.end_task()
    assert torch.allclose(model.query.weight, w0 + (4.0 / 2) * b @ a, atol=1e-6)


def test_clora_penalty_equals_a_hand_computation():
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="clora", reg_weight=3.0))
    past = {"query": torch.randn(5, 6), "value": torch.randn(4, 5)}  # entries of both signs: |P| matters
    adapter.past = {k: v.clone() for k, v in past.items()}
    adapter.begin_task()
    _randomise(adapter)
    layers = adapter.lora_layers()
    expected = 0.0
    for name, layer in layers.items():
        delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected += float(((past[name].abs() * delta.detach()) ** 2).sum())
    penalty, record = adapter.penalty()
    assert float(penalty.detach()) == pytest.approx(3.0 * expected, rel=1e-5)
    assert record["reg"] == pytest.approx(expected, rel=1e-5)
    penalty.backward()  # differentiable in the task's factors
    assert layers["query"].lora_B["default"].weight.grad.abs().sum() > 0


def test_clora_penalty_is_zero_on_the_first_task_and_for_plain_lora():
    adapter = ContinualAdapter(Tiny(), _settings(method="clora", reg_weight=5.0))
    adapter.begin_task()
    _randomise(adapter)
    assert float(adapter.penalty()[0]) == 0.0
    adapter.end_task()
    plain = ContinualAdapter(Tiny(), _settings(method="lora", reg_weight=5.0))
    plain.past = {"query": torch.ones(5, 6), "value": torch.ones(4, 5)}
    plain.begin_task()
    _randomise(plain)
    assert float(plain.penalty()[0]) == 0.0


def test_past_sum_accumulates_every_folded_update():
    model = Tiny()
    w0 = model.value.weight.detach().clone()
    adapter = ContinualAdapter(model, _settings(method="clora", reg_weight=1.0))
    for seed in (1, 2):
        adapter.begin_task()
        _randomise(adapter, seed)
        adapter.end_task()
    assert torch.allclose(adapter.past["value"], model.value.weight - w0, atol=1e-6)
    fresh = Tiny()
    replay(adapter.history, fresh)
    assert torch.allclose(fresh.value.weight, model.value.weight, atol=1e-6)


def test_adapter_history_saves_and_loads_onto_the_base_model(tmp_path):
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=0.3, seed=4))
    for seed in (1, 2):
        adapter.begin_task()
        _randomise(adapter, seed)
        adapter.end_task()
    adapter.save(tmp_path / "history.safetensors")
    fresh = Tiny()
    loaded = ContinualAdapter.load(tmp_path / "history.safetensors", fresh, apply=True)
    assert loaded.settings == adapter.settings and len(loaded.history) == 2
    assert all(torch.equal(loaded.past[k], adapter.past[k]) for k in adapter.past)
    assert torch.equal(loaded.history[1]["query.mask"], adapter.history[1]["query.mask"])
    x = torch.randn(4, 6)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(LeanfmError, match="cannot read adapter history"):
        ContinualAdapter.load(tmp_path / "bad.safetensors", Tiny())


def test_stamina_masks_are_binary_at_inference_and_masked_entries_never_change():
    model = Tiny()
    w0 = model.query.weight.detach().clone()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=0.5))
    adapter.begin_task()
    _randomise(adapter)
    layer = adapter.lora_layers()["query"]
    model.eval()
    mask = layer.mask()
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(mask, (layer.mask_logits() > 0).float())
    x = torch.randn(3, 6)
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = nn.functional.linear(x, w0 + mask * 2.0 * product, layer.base_layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    record = adapter.end_task()
    closed = ~record["query.mask"]
    assert closed.any() and (~closed).any()
    assert torch.equal(model.query.weight[closed], w0[closed])
    assert not torch.equal(model.query.weight[~closed], w0[~closed])


def test_stamina_training_mask_is_straight_through_and_the_sparsity_penalty_closes_it():
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=1.0, mask_init=3.0))
    adapter.begin_task()
    layer = adapter.lora_layers()["query"]
    model.train()
    sampled = layer.mask()
    assert set(sampled.detach().unique().tolist()) <= {0.0, 1.0}
    _, record = adapter.penalty()
    assert 0.9 < record["density"] < 1.0  # sigmoid(3) = 0.95: every entry starts open
    params = list(adapter.parameters().values())
    optimizer = torch.optim.SGD(params, lr=5.0)
    for _ in range(40):
        optimizer.zero_grad()
        adapter.penalty()[0].backward()
        optimizer.step()
    assert adapter.penalty()[1]["density"] < 0.5
    model.eval()
    assert float(layer.mask().mean()) < 0.5


def test_adapter_bad_inputs_are_one_line_errors():
    with pytest.raises(LeanfmError, match="rank 0 is invalid"):
        _settings(rank=0)
    with pytest.raises(LeanfmError, match="unknown target module 'nope'; accepted: query, value"):
        ContinualAdapter(Tiny(), _settings(targets=("nope",)))
    adapter = ContinualAdapter(Tiny(), _settings())
    with pytest.raises(LeanfmError, match="no task has begun"):
        adapter.end_task()
    adapter.begin_task()
    with pytest.raises(LeanfmError, match="still open"):
        adapter.begin_task()


def test_begin_task_initialises_the_same_whatever_the_global_rng():
    def first_a(noise_seed: int) -> torch.Tensor:
        torch.manual_seed(noise_seed)
        adapter = ContinualAdapter(Tiny(), _settings(seed=3))
        adapter.begin_task()
        return adapter.lora_layers()["query"].lora_A["default"].weight.detach().clone()

    assert torch.equal(first_a(1), first_a(2))


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
