"""``leanfm slu``: bad input is one line on stderr with exit 2; split and eval/predict through the command line."""

from __future__ import annotations

import json

import pytest

from test_cli import _run_cli
from test_slu_data import make_dataset


@pytest.mark.parametrize(("argv", "fragment"), [
    (["slu", "split", "{tmp}/nowhere", "--kind", "length", "--out", "{tmp}/c"], "SLU data folder '"),
    (["slu", "split", "{data}", "--kind", "random", "--out", "{tmp}/c"], "argument --kind: invalid choice: 'random'"),
    (["slu", "split", "{data}", "--kind", "length", "--k", "-1", "--out", "{tmp}/c"], "-1 is invalid"),
    (["slu", "split", "{data}", "--kind", "length", "--k", "9", "--out", "{tmp}/c"], "leaves an empty side"),
    (["slu", "split", "{bad}", "--kind", "length", "--out", "{tmp}/c"], "train/seq.out:1: 3 tags for 2 words"),
    (["slu", "train", "{data}", "--out", "{tmp}/c", "--method", "crf"], "unknown method 'crf'"),
    (["slu", "train", "{data}", "--out", "{tmp}/c", "--encoder", "bert-base"], "unknown encoder 'bert-base'"),
    (["slu", "train", "{data}", "--out", "{tmp}/c", "--pair-fraction", "2"], "pair fraction 2.0 is invalid"),
    (["slu", "train", "{data}", "--out", "{tmp}/c", "--device", "tpu"], "unknown device 'tpu'"),
    (["slu", "eval", "{data}"], "is not an SLU run (slu.json missing)"),
    (["slu", "predict", "{tmp}/nowhere", "hello"], "is not an SLU run"),
])
def test_bad_input_gives_one_line_error(capsys, tmp_path, argv, fragment):
    data = make_dataset(tmp_path / "data")
    bad = make_dataset(tmp_path / "bad")
    (bad / "train" / "seq.out").write_text("O O O\n" + "".join((bad / "train" / "seq.out").read_text()
                                                            .splitlines(True)[1:]))
    subs = {"{tmp}": str(tmp_path), "{data}": str(data), "{bad}": str(bad)}
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    code, out, err = _run_cli(capsys, "--quiet", *argv)
    assert code == 2
    assert (err.count("\n") == 1 and err.startswith("leanfm: error: ")) or err.startswith("usage:")
    assert fragment in err and "Traceback" not in err and out == ""
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_split_writes_the_layout_and_prints_its_statistics(capsys, tmp_path):
    data = make_dataset(tmp_path / "data")
    code, out, _ = _run_cli(capsys, "--quiet", "slu", "split", str(data), "--kind", "length", "--out",
                            str(tmp_path / "nc"), "--json", "-")
    assert code == 0
    stats = json.loads(out)
    assert stats == json.loads((tmp_path / "nc" / "split.json").read_text())
    assert stats["k"] == 3 and stats["max_slots"]["train"] == 3 and stats["sizes"]["test"] == 5 * 3


@pytest.mark.training
def test_train_eval_predict_through_the_cli(capsys, tmp_path):
    data = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    code, out, _ = _run_cli(capsys, "--quiet", "slu", "train", str(data), "--out", str(run), "--encoder", "tiny-bert",
                            "--steps", "3", "--batch-size", "8", "--device", "cpu", "--json", "-")
    assert code == 0
    trained = json.loads(out)
    code, out, _ = _run_cli(capsys, "--quiet", "slu", "eval", str(run), "--json", "-")
    assert code == 0 and json.loads(out)["slot_f1"] == trained["test_slot_f1"]
    code, out, _ = _run_cli(capsys, "--quiet", "slu", "predict", str(run), "show flights from boston")
    assert code == 0 and len(json.loads(out)["tags"]) == 4
