import json
import subprocess
import sys

import pytest

from leanfm.cli import main


def _run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["eval", "no-such-model", "--no-speed"], "unknown model 'no-such-model'"),
        (["eval", "./missing/checkpoint"], "model path './missing/checkpoint' does not exist"),
        (["eval", "tiny-llama", "--seqlen", "0"], "seqlen 0 is invalid; accepted: an integer >= 2"),
        (["eval", "tiny-llama", "--seqlen", "x"], "argument --seqlen: invalid int value: 'x'"),
        (["eval", "tiny-llama", "--device", "tpu"], "unknown device 'tpu'; accepted: auto, cpu, cuda, cuda:N"),
        (["compress", "tiny-llama", "--ratio", "0.3", "--out", "{tmp}/c", "--steps", "5"],
         "--steps does not apply to --method modegpt; its flags: --ratio, --allocation"),
        (["compress", "tiny-llama", "--method", "disp", "--ratio", "0.3", "--out", "{tmp}/c", "--allocation",
          "uniform"], "--allocation does not apply to --method disp"),
        (["compress", "tiny-llama", "--method", "wanda-sp", "--ratio", "0.3", "--out", "{tmp}/c", "--lambda", "3"],
         "--lambda does not apply to --method wanda-sp"),
        (["compress", "tiny-llama", "--ratio", "0.3", "--out", "{tmp}/c", "--resume"],
         "--resume does not apply to --method modegpt"),
        (["compress", "tiny-llama", "--out", "{tmp}/c"], "--ratio is required"),
        (["compress", "tiny-llama", "--ratio", "1.5", "--out", "{tmp}/c"], "ratio 1.5 is out of range"),
        (["compress", "tiny-llama", "--method", "sparsegpt", "--ratio", "0.3", "--out", "{tmp}/c"],
         "unknown method 'sparsegpt'; accepted: modegpt, modegpt-heads, wanda-sp, svd-llm, flap, disp, slicegpt"),
        (["vision", "bench", "{tmp}", "--r", "4"], "--r does not apply to --method none"),
        (["vision", "bench", "{tmp}", "--method", "tome", "--merge", "average"],
         "--merge does not apply to --method tome"),
        (["dynamo", "generate", "{tmp}", "--prompt", "a", "--threshold", "2"], "threshold 2.0 is out of range"),
        (["eval", "tiny-llama", "--split", "test"], "unknown split 'test' of corpus 'austen'; accepted"),
        (["eval", "tiny-llama", "--json", "/no/such/dir/out.json"], "directory '/no/such/dir' does not exist"),
        (["eval", "tiny-llama", "--dtype", "int8", "--no-speed"], "unknown dtype 'int8'"),
        (["eval", "minilm-l6", "--no-speed"], "not a causal language model"),
        (["report", "/no/such.json"], "results file '/no/such.json' does not exist"),
    ],
)
def test_bad_input_gives_one_line_error(capsys, tmp_path, argv, fragment):
    code, out, err = _run_cli(capsys, "--quiet", *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("leanfm: error: ")
    assert fragment in err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_unwritable_json_path_fails_before_any_work(capsys):
    code, out, err = _run_cli(capsys, "--quiet", "eval", "tiny-llama", "--json", "/proc/leanfm-result.json")
    assert code == 2 and "output path '/proc/leanfm-result.json' is not writable" in err and out == ""


def test_json_is_written_atomically(tmp_path, monkeypatch):
    """A crash while writing leaves the previous result intact and no temporary file behind."""
    from leanfm import paths

    target = tmp_path / "r.json"
    paths.atomic_write_json(target, {"old": 1})

    def crash(*_args, **_kwargs):
        raise RuntimeError("disk died")

    monkeypatch.setattr(paths.os, "fsync", crash)
    with pytest.raises(RuntimeError):
        paths.atomic_write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_eval_and_report_end_to_end(capsys, tmp_path):
    out_json = tmp_path / "tiny.json"
    code, out, _ = _run_cli(
        capsys, "--quiet", "eval", "tiny-llama", "--seqlen", "32", "--windows", "2", "--cloze", "4",
        "--no-speed", "--json", str(out_json),
    )
    assert code == 0 and "perplexity" in out
    data = json.loads(out_json.read_text())
    assert data["model"] == "tiny-llama" and data["seqlen"] == 32 and data["windows"] == 2
    code, out, _ = _run_cli(capsys, "--quiet", "report", str(out_json), "--out", str(tmp_path / "rep"))
    assert code == 0 and "| tiny-llama |" in out
    assert (tmp_path / "rep" / "REPORT.md").is_file()
    assert (tmp_path / "rep" / "perplexity_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_json_to_stdout_is_pure_json():
    """A real subprocess: stdout must parse as JSON with nothing else on it."""
    done = subprocess.run(
        [sys.executable, "-m", "leanfm", "--quiet", "eval", "tiny-opt", "--seqlen", "16", "--windows", "1",
         "--cloze", "0", "--no-speed", "--json", "-"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "tiny-opt"


def test_models_lists_registry(capsys):
    code, out, _ = _run_cli(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "tiny-neox" in out
