"""The small text-to-image model: data split and renders, sampling, exact resume, the batch's maths, KID / MMD,
the concept classifier, and one-line errors of ``leanfm t2i``."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import leanfm.adapt.t2i as trainer
from conftest import ctrl_c_fit
from leanfm.cli import main
from leanfm.data import t2i as data
from leanfm.errors import LeanfmError
from leanfm.eval.t2i import (
    ClassifierConfig,
    ConceptClassifier,
    kid,
    load_classifier,
    mmd,
    predict_concepts,
    recognised_fraction,
    save_classifier,
    train_classifier,
)
from leanfm.models import t2i as model_lib
from leanfm.training import Runtime, TrainingInterrupted, load_checkpoint
from t2i_fixtures import tiny_model


def tiny_config(**overrides) -> trainer.T2IPretrainConfig:
    settings = {"captions": "shapes", "renders": 2, "width": 8, "heads": 2, "text_encoder": "tiny-bert", "steps": 4,
                "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 3, "autocast": False, "device": "cpu"}
    return trainer.T2IPretrainConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------------ data


def test_the_split_is_fixed_and_held_out_emoji_never_reach_pretraining():
    held = data.held_out_concepts()
    pool = data.pretraining_concepts("emoji", emoji_count=len(data._pretraining_emoji()))
    assert len(held) == 40 and [c.name for c in held[:3]] == ["penguin", "rocket", "pineapple"]
    assert {c.key for c in held}.isdisjoint(c.key for c in pool) and len({c.key for c in pool}) == len(pool)
    words = {w for c in held for w in c.name.split()}
    assert not any(words & {w.rstrip("s") for w in c.name.lower().split()} for c in pool)  # no "camera with flash"
    assert data.pretraining_concepts("emoji", 10) == pool[:10]  # smaller runs use a prefix of the same order
    mixed = data.pretraining_concepts("emoji,shapes", 5)
    assert len(mixed) == 5 + 180 and mixed[0].caption == f"a picture of {mixed[0].name}"
    assert mixed[-1].caption == "a large dotted orange diamond"


def test_renders_are_seeded_and_cached(home, monkeypatch):
    concepts = [*data.held_out_concepts(2), *data.pretraining_concepts("shapes")[:1]]
    first = data.render_concepts(concepts, 3, seed=0)
    assert first.shape == (3, 3, 3, 32, 32) and first.dtype == torch.uint8
    assert len(list((home / "t2i").glob("renders-*.safetensors"))) == 1
    assert not torch.equal(first[0, 0], first[0, 1])  # augmented: distinct images per caption
    monkeypatch.setattr(data, "_render", lambda *a: pytest.fail("re-rendered instead of reading the cache"))
    assert torch.equal(data.render_concepts(concepts, 3, seed=0), first)
    monkeypatch.undo()
    assert torch.equal(data.render_concepts(concepts, 3, seed=0, cache=False), first)
    assert not torch.equal(data.render_concepts(concepts, 3, seed=1, cache=False), first)


def test_bad_data_settings_are_one_line_errors(home, tmp_path):
    with pytest.raises(LeanfmError, match="unknown caption set 'photos'; accepted: emoji, shapes"):
        data.parse_sources("emoji,photos")
    with pytest.raises(LeanfmError, match="install the Debian package fonts-noto-color-emoji"):
        data.render_concepts(data.held_out_concepts(1), 2, font=tmp_path / "none.ttf")
    assert not (home / "t2i").exists()


# ------------------------------------------------------------------------------------------------ model


def test_the_default_unet_is_small_and_cross_attends_to_minilm_states():
    model = model_lib.T2IModel(model_lib.T2IConfig())
    assert model.parameter_count() <= 3_000_000 and model.unet.config.sample_size == 32
    keys = [m for n, m in model.unet.named_modules() if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")]
    assert keys and all(m.in_features == 384 for m in keys)


def test_sampling_is_deterministic_with_a_seed_and_survives_save_and_load(tmp_path):
    model = tiny_model()
    encoder = model_lib.caption_encoder("tiny-bert", 24)
    captions = ["a picture of bear", "a small solid red circle", "a picture of bear"]
    first = model_lib.sample(model, captions, steps=3, guidance=3.0, seed=0, encoder=encoder)
    assert first.shape == (3, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    # the noise does not depend on the batching; the kernels may (AVX2 convolutions round differently per batch)
    torch.testing.assert_close(first, model_lib.sample(model, captions, steps=3, seed=0, encoder=encoder,
                                                       batch_size=2), atol=1e-2, rtol=0)
    assert not torch.equal(first, model_lib.sample(model, captions, steps=3, seed=1, encoder=encoder))
    assert not torch.equal(first[0], first[2])  # same caption, other noise row
    model_lib.save_t2i(model, tmp_path / "m")
    loaded, info = model_lib.load_t2i(tmp_path / "m")
    assert info["config"]["width"] == 8
    assert torch.equal(first, model_lib.sample(loaded, captions, steps=3, seed=0, encoder=encoder))


def test_guidance_is_eps_uncond_plus_scale_times_the_difference():
    model = tiny_model().eval()
    encoder = model_lib.caption_encoder("tiny-bert", 24)
    cond, null = encoder(["a picture of bear"] * 2), encoder([""])
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor(500)
    with torch.no_grad():
        eps_c = model(x, t.expand(2), *cond)
        eps_u = model(x, t.expand(2), null[0].expand(2, -1, -1), null[1].expand(2, -1))
        guided = model_lib._guided(model, x, t, cond, null, 2.5)
    torch.testing.assert_close(guided, eps_u + 2.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ training


def _cosine_abar(t: int, total: int = 1000, s: float = 0.008) -> float:
    """abar_t of the cosine schedule (Nichol & Dhariwal 2021), betas capped at 0.999 as diffusers does."""
    f = [math.cos((k / total + s) / (1 + s) * math.pi / 2) ** 2 for k in range(total + 1)]
    product = 1.0
    for k in range(t + 1):
        product *= 1 - min(1 - f[k + 1] / f[k], 0.999)
    return product


def test_a_batch_is_noised_clean_renders_with_dropped_captions_and_the_loss_is_eps_mse(home):
    config = tiny_config(batch_size=64, uncond_prob=0.5)
    concepts = data.pretraining_concepts("shapes")
    images = data.render_concepts(concepts, 2, seed=0)
    encoder = model_lib.caption_encoder("tiny-bert", 24)
    model = tiny_model()
    task = trainer.pretrain_task(model, None, images, [c.caption for c in concepts], encoder, config, Runtime())
    batch = task.batch(7)
    empty = encoder([""])[0][0]
    dropped = (batch["states"] == empty).flatten(1).all(1)
    assert 16 <= int(dropped.sum()) <= 48  # p = 0.5 of 64
    renders = images.flatten(0, 1).float() / 127.5 - 1  # [C * R, 3, 32, 32]
    for row in range(0, 64, 9):
        abar = _cosine_abar(int(batch["timesteps"][row]))
        clean = (batch["noisy"][row] - math.sqrt(1 - abar) * batch["noise"][row]) / math.sqrt(abar)
        assert float((renders - clean).abs().flatten(1).amax(1).min()) < 2e-3  # one of the renders
    assert torch.equal(task.batch(7)["noise"], batch["noise"])  # seeded by (seed, step)
    loss, _ = task.loss(7, batch)
    expected = ((model(batch["noisy"], batch["timesteps"], batch["states"], batch["mask"]) - batch["noise"]) ** 2)
    torch.testing.assert_close(loss, expected.mean())


def test_the_saved_average_moves_towards_the_new_weights_with_the_warmed_up_decay(home):
    import copy

    config = tiny_config(ema=0.9)
    concepts = data.pretraining_concepts("shapes")[:3]
    model = tiny_model()
    average = copy.deepcopy(model.unet).requires_grad_(False)
    task = trainer.pretrain_task(model, average, data.render_concepts(concepts, 2, seed=0),
                                 [c.caption for c in concepts], model_lib.caption_encoder("tiny-bert", 24), config,
                                 Runtime())
    for step in (0, 40):
        before = [p.detach().clone() for p in average.parameters()]
        loss, record = task.loss(step, task.batch(step))
        loss.backward()
        task.optimizer.step()
        task.optimizer.zero_grad()
        assert set(record()) == {"loss"}
        decay = min(0.9, (1 + step) / (10 + step))  # warm-up: 0.1 at step 0, 0.82 at step 40
        for old, new, weight in zip(before, average.parameters(), model.unet.parameters(), strict=True):
            torch.testing.assert_close(new, decay * old + (1 - decay) * weight.detach())


def _run(config, folder, resume=False):
    summary = trainer.train_t2i(config, folder / "out", resume=resume, overwrite=resume)
    return summary["history"], load_file(str(folder / "out" / "unet" / model_lib.WEIGHTS))


@pytest.mark.training
def test_pretraining_resumes_exactly_after_ctrl_c(home, tmp_path, monkeypatch):
    history, weights = _run(tiny_config(), tmp_path / "straight")
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "fit", ctrl_c_fit(trainer.fit, 2))
        with pytest.raises(TrainingInterrupted):
            _run(tiny_config(), tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "out.training")["step"] == 2
    torch.manual_seed(99)
    again, resumed = _run(tiny_config(), tmp_path / "cut", resume=True)
    assert again == history  # the same losses ...
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    with pytest.raises(LeanfmError, match="was trained with lr="):
        _run(tiny_config(lr=0.5), tmp_path / "cut", resume=True)


# ------------------------------------------------------------------------------------------------ metrics


def _poly(a, b):
    return (sum(p * q for p, q in zip(a, b, strict=True)) / len(a) + 1) ** 3


def test_kid_is_the_unbiased_cubic_kernel_mmd_written_out():
    x = [[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]]
    y = [[0.0, 1.0], [2.0, -1.0]]
    m, n = len(x), len(y)
    within_x = sum(_poly(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(_poly(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(_poly(a, b) for a in x for b in y) / (m * n)
    assert kid(torch.tensor(x), torch.tensor(y)) == pytest.approx(within_x + within_y - 2 * across, rel=1e-12)
    assert kid(torch.tensor(x), torch.tensor(y)) == pytest.approx(-4.1875)  # 2.4792 + 0.125 - 2 * 3.3958, by hand


def test_mmd_uses_a_gaussian_kernel_with_the_median_distance_as_bandwidth():
    x, y = [[0.0], [1.0]], [[3.0], [4.0]]  # pooled distances 1, 3, 4, 2, 3, 1: median 2.5
    sigma = 2.5

    def k(a, b):
        return math.exp(-((a[0] - b[0]) ** 2) / (2 * sigma**2))

    expected = k(x[0], x[1]) + k(y[0], y[1]) - 2 * sum(k(a, b) for a in x for b in y) / 4
    assert mmd(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-12)
    assert mmd(torch.tensor(x), torch.tensor(y), sigma=1.0) != pytest.approx(expected)


def test_kid_and_mmd_are_near_zero_for_one_distribution_and_large_for_a_shifted_one():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    shifted = torch.randn(300, 16, generator=g) + 0.5
    same, apart = kid(a, b), kid(a, shifted)
    assert abs(same) < 0.02 * apart and apart > 0.1
    assert abs(mmd(a, b)) < 0.1 * mmd(a, shifted)
    assert kid(a, shifted, subsets=5, subset_size=100) == pytest.approx(apart, rel=0.5)
    with pytest.raises(LeanfmError, match="at least 2 rows"):
        kid(a[:1], b)


def test_the_classifier_learns_renders_and_round_trips(home, tmp_path):
    concepts = [data.pretraining_concepts("shapes")[i] for i in (0, 7, 100)]
    captions = [c.caption for c in concepts]
    images = data.render_concepts(concepts, 8, seed=0)
    classifier, summary = train_classifier(images, captions, ClassifierConfig(width=8, steps=40, batch_size=24,
                                                                               warmup_steps=5, device="cpu"))
    assert summary["steps"] == 40
    flat = images.flatten(0, 1).float() / 255
    predicted = predict_concepts(classifier, flat)
    assert sum(p == captions[i // 8] for i, p in enumerate(predicted)) >= 20  # of 24
    assert recognised_fraction(classifier, flat[:8], captions[0]) == sum(p == captions[0] for p in predicted[:8]) / 8
    save_classifier(classifier, tmp_path / "clf")
    again, info = load_classifier(tmp_path / "clf")
    assert info["captions"] == captions and isinstance(again, ConceptClassifier)
    assert torch.equal(again.features(flat), classifier.features(flat))
    with pytest.raises(LeanfmError, match="has no concept 'a picture of bear'"):
        recognised_fraction(classifier, flat, "a picture of bear")


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(("argv", "fragment"), [
    (["t2i", "pretrain", "--out", "{tmp}/run", "--captions", "photos"], "unknown caption set 'photos'"),
    (["t2i", "pretrain", "--out", "{tmp}/run", "--steps", "0"], "steps 0 is invalid; accepted: an integer >= 1"),
    (["t2i", "pretrain", "--out", "{tmp}/run", "--font", "{tmp}/no.ttf"], "apt-get install fonts-noto-color-emoji"),
    (["t2i", "pretrain", "--out", "{tmp}/run", "--width", "12", "--heads", "5"], "width 12 with 5 heads is invalid"),
    (["t2i", "sample", "{tmp}", "--caption", "a", "--out", "{tmp}/run.png"], "is not a t2i model (t2i.json missing)"),
    (["t2i", "sample", "{tmp}", "--caption", "a", "--out", "{tmp}/run.jpg"], "is not a .png file"),
])
def test_bad_input_gives_one_line_errors_and_writes_nothing(capsys, home, tmp_path, argv, fragment):
    code = main(["--quiet", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("leanfm: error: ") and err.count("\n") == 1 and out == ""
    assert fragment in err
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == []  # no run, checkpoint or PNG
