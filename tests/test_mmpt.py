"""MMPT and its peers (zero-shot, CoOp, CSP): what each learns, that the encoders never change, the coupled
visual prompts, training, saving and loading, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from czsl_fixtures import make_base, make_czsl
from leanfm.adapt import mmpt
from leanfm.cli import main
from leanfm.data.czsl import read_czsl
from leanfm.errors import LeanfmError
from leanfm.models.dual_encoder import TowerDualEncoder, load_base
from leanfm.models.encoders import ImageEncoder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("czsl")
    return make_czsl(root / "data"), make_base(root / "base")


def _config(folders, **kw):
    data, base = folders
    return mmpt.CZSLConfig(**{"data": str(data), "base": str(base), "steps": 6, "batch_size": 8, "warmup": 1,
                              "lr": 5e-2, "checkpoint_every": 4, "device": "cpu", "autocast": False, **kw})


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_zero_shot_text_is_the_frozen_encoder_of_the_words(folders):
    """zero-shot scores the pair's own words: '[CLS] a photo of red triangle [SEP]' through the text tower."""
    base = load_base(folders[1])
    data = read_czsl(folders[0])
    prompts = mmpt.Prompts(base, data.attrs, data.objs, "zero-shot", "a photo of", 0)
    pairs = torch.tensor([[data.attrs.index("red"), data.objs.index("triangle")],
                          [data.attrs.index("blue"), data.objs.index("square")]])
    got = mmpt.pair_features(base, prompts, pairs)
    ids, mask = base.tokenize(["a photo of red triangle", "a photo of blue square"])
    want = base.encode_text(base.token_embeddings(ids), mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not list(prompts.parameters())  # nothing to learn


def test_vocabulary_starts_at_the_words_own_embeddings(folders):
    """CSP's attribute/object vectors start at each word's (mean) word-piece embedding: with one-piece words the
    CSP prompt at initialisation is the zero-shot prompt, so the features agree."""
    base = load_base(folders[1])
    data = read_czsl(folders[0])
    pairs = torch.tensor([[a, o] for a in range(3) for o in range(3)])
    zero = mmpt.Prompts(base, data.attrs, data.objs, "zero-shot", "a photo of", 0)
    csp = mmpt.Prompts(base, data.attrs, data.objs, "csp", "a photo of", 0)
    for name in data.attrs + data.objs:  # the fixture's words are single word pieces
        assert len(base.tokenize([name])[0][0]) == 3
    torch.testing.assert_close(mmpt.pair_features(base, csp, pairs), mmpt.pair_features(base, zero, pairs),
                               atol=1e-6, rtol=1e-5)
    ids, _ = base.tokenize(["red"])
    torch.testing.assert_close(csp.attr_vec[data.attrs.index("red")], base.token_embeddings(ids)[0, 1].float())


def test_multi_piece_names_start_at_their_mean_embedding():
    from leanfm.models.encoders import bert_encoder

    bert, tokenizer = bert_encoder("tiny-bert")
    base = TowerDualEncoder(bert, tokenizer, ImageEncoder(out_dim=32, hidden=16, layers=1, heads=2), 10.0)
    prompts = mmpt.Prompts(base, ["medium_dark"], ["thumbs_up"], "csp", "a photo of", 0)
    ids, mask = base.tokenize(["medium dark"])
    pieces = base.token_embeddings(ids)[0, 1 : int(mask.sum()) - 1].float()
    assert pieces.shape[0] == 2
    torch.testing.assert_close(prompts.attr_vec[0], pieces.mean(0))


@pytest.mark.parametrize(("method", "learned"), [("zero-shot", set()), ("coop", {"ctx"}),
                                                 ("csp", {"attr_vec", "obj_vec"}),
                                                 ("mmpt", {"ctx", "attr_vec", "obj_vec", "couple.0.weight",
                                                           "couple.0.bias", "couple.1.weight", "couple.1.bias"})])
def test_each_method_learns_exactly_its_parameters(folders, method, learned):
    base = load_base(folders[1])
    data = read_czsl(folders[0])
    prompts = mmpt.Prompts(base, data.attrs, data.objs, method, "a photo of", 2)
    assert {k for k, p in prompts.named_parameters()} == learned


def test_visual_prompts_replace_the_previous_layers_prompts():
    """Deep prompts: each prompted layer sees 1 + patches + n tokens (replaced, not stacked)."""
    torch.manual_seed(0)
    tower = ImageEncoder(out_dim=8, hidden=16, layers=3, heads=2).eval()
    images = torch.rand(2, 3, 32, 32)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
             for layer in tower.vit.layers]
    prompts = [torch.randn(3, 16), torch.randn(3, 16)]
    with torch.no_grad():
        prompted = tower(images, prompts)
        seen_prompted = list(seen)
        seen.clear()
        plain = tower(images)
        empty = tower(images, [torch.zeros(0, 16)])
        first_only = tower(images, prompts[:1])
    for hook in hooks:
        hook.remove()
    assert seen_prompted == [65 + 3, 65 + 3, 65 + 3] and seen[:3] == [65, 65, 65]
    torch.testing.assert_close(empty, plain)
    assert not torch.allclose(prompted, plain) and not torch.allclose(prompted, first_only)
    with pytest.raises(LeanfmError, match="accepted: at most 3"):
        tower(images, [torch.randn(1, 16)] * 4)


def test_mmpt_couples_the_image_prompts_to_the_text_context(folders):
    """The visual prompts are W_j C + b_j: a change of the text context moves the image features."""
    base = load_base(folders[1])
    data = read_czsl(folders[0])
    torch.manual_seed(0)
    prompts = mmpt.Prompts(base, data.attrs, data.objs, "mmpt", "a photo of", 2)
    pixels = torch.rand(2, 3, 32, 32)
    visual = prompts.visual_prompts()
    assert visual is not None and len(visual) == 2
    torch.testing.assert_close(visual[1], prompts.ctx @ prompts.couple[1].weight.T + prompts.couple[1].bias)
    before = mmpt.image_features(base, prompts, pixels)
    with torch.no_grad():
        prompts.ctx.add_(torch.randn_like(prompts.ctx))
    assert not torch.allclose(mmpt.image_features(base, prompts, pixels), before)
    unprompted = mmpt.Prompts(base, data.attrs, data.objs, "mmpt", "a photo of", 0)
    torch.testing.assert_close(mmpt.image_features(base, unprompted, pixels), base.encode_image(pixels))


@pytest.mark.training
@pytest.mark.parametrize("method", ["coop", "csp", "mmpt"])
def test_training_moves_only_the_prompts_and_fits_the_seen_pairs(folders, tmp_path, monkeypatch, method):
    config = _config(folders, method=method, steps=30)
    seen = {}

    def spy(path, *args, **kwargs):  # keep the very base object the trainer uses, and its weights before
        seen["base"] = real(path, *args, **kwargs)
        seen["before"] = _weights(seen["base"])
        return seen["base"]

    real = mmpt.load_base
    monkeypatch.setattr(mmpt, "load_base", spy)
    summary = mmpt.train_czsl(config, tmp_path / "run")
    history = summary["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    after = _weights(seen["base"])
    assert after.keys() == seen["before"].keys()
    for key, value in after.items():
        assert torch.equal(value, seen["before"][key]), key
    base, prompts, meta = mmpt.load_run(tmp_path / "run")
    torch.manual_seed(config.seed)
    start = dict(mmpt.Prompts(base, meta["attrs"], meta["objs"], method, "a photo of",
                              config.vision_depth).named_parameters())
    assert all(not torch.allclose(p, start[k]) for k, p in prompts.named_parameters())  # every learned part moved
    test = summary["metrics"]["test"]
    assert set(test) == {"closed", "open", "open_feasible"} and 0 <= test["closed"]["auc"] <= 1
    assert "feasibility_threshold" in summary["metrics"]


@pytest.mark.training
def test_a_saved_run_scores_exactly_as_trained(folders, tmp_path):
    summary = mmpt.train_czsl(_config(folders, method="mmpt"), tmp_path / "run")
    again = mmpt.evaluate_run(tmp_path / "run")
    assert json.dumps(again, sort_keys=True) == json.dumps(summary["metrics"], sort_keys=True)


def test_zero_shot_writes_a_run_without_training(folders, tmp_path):
    summary = mmpt.train_czsl(_config(folders, method="zero-shot"), tmp_path / "run")
    assert summary["training"]["steps"] == 0 and not (tmp_path / "run.training").exists()
    assert (tmp_path / "run" / "czsl.json").is_file()


@pytest.mark.parametrize(("kw", "words"), [({"method": "maple"}, "unknown method 'maple'"),
                                           ({"context": "  "}, "the prompt context is empty"),
                                           ({"lr": 0.0}, "learning rate 0.0 is invalid"),
                                           ({"vision_depth": -1}, "vision_depth")])
def test_bad_settings_are_one_line_errors(folders, kw, words):
    with pytest.raises(LeanfmError) as caught:
        _config(folders, **kw)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_vision_depth_beyond_the_tower_is_refused(folders, tmp_path):
    with pytest.raises(LeanfmError, match="exceeds the base's 2 ViT layers"):
        mmpt.train_czsl(_config(folders, vision_depth=3), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_folder_that_is_no_base(folders, tmp_path, capsys):
    code = main(["czsl", "train", str(folders[0]), "--base", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a base model" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_minilm_text_path_equals_the_sentence_encoder_the_tower_was_aligned_to():
    """The base's image tower was aligned to sentence-transformers' MiniLM embeddings; prompt tuning runs BERT
    itself (mean pooling, L2 norm) so it can feed input embeddings: both must give the same vectors."""
    from leanfm.models.encoders import bert_encoder, text_encoder

    bert, tokenizer = bert_encoder("minilm-l6")
    base = TowerDualEncoder(bert, tokenizer, ImageEncoder(), 14.0)
    texts = ["a photo of medium-dark thumbs up", "a small striped red triangle", "grinning face"]
    ids, mask = base.tokenize(texts)
    with torch.no_grad():
        ours = base.encode_text(base.token_embeddings(ids), mask)
    torch.testing.assert_close(ours, text_encoder("minilm-l6")(texts), atol=2e-5, rtol=1e-4)


def test_cli_train_then_eval_open_world(folders, tmp_path, capsys):
    data, base = folders
    run = tmp_path / "run"
    assert main(["--quiet", "czsl", "train", str(data), "--base", str(base), "--method", "csp", "--steps", "3",
                 "--batch-size", "8", "--device", "cpu", "--out", str(run), "--json", str(tmp_path / "t.json")]) == 0
    trained = json.loads((tmp_path / "t.json").read_text())
    assert trained["test_closed_auc"] == trained["metrics"]["test"]["closed"]["auc"]
    capsys.readouterr()
    assert main(["--quiet", "czsl", "eval", str(run), "--open-world", "--json", "-"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["test_open_feasible_auc"] == trained["test_open_feasible_auc"]
    assert main(["czsl", "eval", str(run), "--data", str(tmp_path)]) == 2  # not a CZSL folder: one-line error


@pytest.mark.training
def test_mmpt_trains_on_a_clip_base(folders, tmp_path, monkeypatch):
    """The same prompts around a transformers CLIP folder (a tiny random one): trains, stays frozen, evaluates."""
    from test_clip import tiny_model, tiny_tokenizer

    tiny_model().save_pretrained(tmp_path / "clip")
    tiny_tokenizer().save_pretrained(tmp_path / "clip")
    seen = {}
    real = mmpt.load_base

    def spy(path, *args, **kwargs):
        seen["base"] = real(path, *args, **kwargs)
        seen["before"] = _weights(seen["base"])
        return seen["base"]

    monkeypatch.setattr(mmpt, "load_base", spy)
    summary = mmpt.train_czsl(_config(folders, base=str(tmp_path / "clip"), steps=4), tmp_path / "run")
    assert summary["training"]["steps"] == 4 and "open_feasible" in summary["metrics"]["test"]
    assert type(seen["base"]).__name__ == "CLIPDualEncoder"
    for key, value in _weights(seen["base"]).items():
        assert torch.equal(value, seen["before"][key]), key
    _, prompts, _ = mmpt.load_run(tmp_path / "run")
    assert prompts.couple[0].weight.shape == (48, 32)  # text width 32 -> the CLIP image tower's 48


@pytest.mark.training
def test_first_loss_is_cross_entropy_over_seen_pairs_at_the_bases_temperature(folders, tmp_path):
    """loss_0 = CE(exp(t) <f_img(x), f_txt(a, o)>, true seen pair) on step 0's seeded batch, by hand."""
    config = _config(folders, method="csp", steps=1, batch_size=8)
    summary = mmpt.train_czsl(config, tmp_path / "run")
    base = load_base(folders[1])
    data = read_czsl(folders[0])
    assert base.logit_scale == 10.0  # the fixture's, not CLIP's default
    prompts = mmpt.Prompts(base, data.attrs, data.objs, "csp", "a photo of", 0)
    train = mmpt.load_split(data, "train", base.image_size)
    rows = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(config.seed * 1_000_003))[:8]
    open_pairs = data.all_pairs()
    labels = torch.tensor([data.seen_pairs.index(open_pairs[int(i)]) for i in train.labels[rows]])
    with torch.no_grad():
        text = mmpt.pair_features(base, prompts, mmpt.pair_tensor(data, data.seen_pairs))
        logits = 10.0 * mmpt.image_features(base, prompts, train.images[rows]) @ text.T
    want = torch.nn.functional.cross_entropy(logits, labels)
    assert summary["training"]["history"][0]["loss"] == pytest.approx(float(want), rel=1e-5)


def test_cli_build_writes_a_readable_dataset_and_never_overwrites_silently(tmp_path, capsys):
    assert main(["--quiet", "czsl", "build", "shapes", "--out", str(tmp_path / "shapes")]) == 0
    assert "18 attributes, 5 objects, 50 seen pairs" in capsys.readouterr().out
    assert len(read_czsl(tmp_path / "shapes").split("train")) == 50 * 16
    assert main(["czsl", "build", "shapes", "--out", str(tmp_path / "shapes")]) == 2
    assert "--overwrite" in capsys.readouterr().err
