"""Continual text-to-image customisation (``leanfm continual t2i``): concept tokens as input embeddings, LoRA on the
cross-attention keys/values folded exactly, C-LoRA's regulariser against the right history, STAMINA's MLP token,
save/load reproducing samples, exact resume of a sequence, fidelity bookkeeping and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import leanfm.adapt.t2i_continual as seq
import t2i_fixtures
from conftest import ctrl_c_fit
from leanfm.cli import main
from leanfm.data.t2i import held_out_concepts
from leanfm.errors import LeanfmError
from leanfm.eval.t2i import ConceptClassifier, image_features, kid, save_classifier
from leanfm.models import t2i as model_lib
from leanfm.models.lora import ContinualAdapter, factor
from leanfm.training import Runtime, TrainingInterrupted, load_checkpoint

TARGETS = ("attn2.to_k", "attn2.to_v")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for this module: its tensors are tiny, and two OpenMP threads on the shared 2-core machine
    ran these U-Net steps ~10x slower than one (measured: 57 s vs 5 s for the save/load test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> model_lib.T2IModel:
    return t2i_fixtures.tiny_model(seed).eval()


@pytest.fixture
def base(tmp_path):
    return model_lib.save_t2i(tiny_model(), tmp_path / "base")


def tiny_config(base, **overrides) -> seq.T2IContinualConfig:
    settings = {"base": str(base), "method": "clora", "concepts": "penguin,rocket", "shots": 2, "steps": 4,
                "batch_size": 4, "warmup": 1, "samples": 2, "sample_steps": 2, "real": 3, "checkpoint_every": 3,
                "autocast": False, "device": "cpu", "reg_weight": 1e3}
    return seq.T2IContinualConfig(**{**settings, **overrides})


def captions() -> model_lib.TokenCaptions:
    return model_lib.TokenCaptions(model_lib.caption_encoder("tiny-bert", 24))


def _inputs(n: int = 2):
    g = torch.Generator().manual_seed(5)
    states, mask = captions().encoder(["a picture of bear"] * n)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([300, 700][:n]), states, mask


# ------------------------------------------------------------------------------------------------ tokens


def test_a_token_is_an_input_embedding_contextualised_by_the_caption_encoder():
    enc = captions()
    word = enc.encoder.tokenizer("penguin", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    vector = enc.encoder.bert.get_input_embeddings().weight[word[0]].detach()
    states, mask = enc.states("a picture of <c1>", {"<c1>": vector})
    plain_states, plain_mask = enc.encoder(["a picture of penguin"])
    torch.testing.assert_close(states, plain_states, atol=1e-5, rtol=1e-5)  # the word's row, before BERT
    assert torch.equal(mask, plain_mask)
    other = vector.clone().requires_grad_(True)
    changed, _ = enc.states("a picture of <c1>", {"<c1>": other * 3})
    moved = (changed - plain_states).abs().amax(-1)[0, : int(mask.sum())]
    assert bool((moved > 1e-4).all())  # every real position moves, not only the token's: BERT saw the vector
    changed.sum().backward()
    assert other.grad is not None and float(other.grad.abs().sum()) > 0
    with_tokens = model_lib.TokenCaptions(enc.encoder, {"<c1>": vector})
    torch.testing.assert_close(with_tokens(["a picture of <c1>", "a picture of bear"])[0][0], plain_states[0],
                               atol=1e-5, rtol=1e-5)


def test_stamina_mlp_token_starts_at_the_init_and_learns_through_its_mlp():
    init = torch.randn(32, generator=torch.Generator().manual_seed(1))
    free, mlp = seq.ConceptToken(init), seq.ConceptToken(init, hidden=8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(free(), init) and torch.equal(mlp(), init)
    assert [n for n, _ in free.named_parameters()] == ["vector"]
    assert {n for n, _ in mlp.named_parameters()} == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    target = torch.randn(32)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(3):
        loss = ((mlp() - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(mlp.mlp[2].weight.detach().abs().sum()) > 0 and float(mlp.mlp[0].weight.grad.abs().sum()) > 0
    assert float(((mlp().detach() - target) ** 2).sum()) < float(((init - target) ** 2).sum())


# ------------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("method", ["lora", "stamina"])
def test_folding_equals_the_unfolded_forward_on_the_cross_attention_keys_and_values(method):
    model = tiny_model()
    names = [n for n, m in model.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    keys_before = set(model.unet.state_dict())
    config = tiny_config("unused", method=method)
    adapter = ContinualAdapter(model.unet, config.adapter_settings())
    assert adapter.layers and all(n.endswith(TARGETS) for n in adapter.layers)
    assert len(adapter.layers) == sum(n.endswith(TARGETS) for n in names)  # attn1.to_k (self-attention) untouched
    adapter.begin_task()
    with torch.no_grad():
        for i, layer in enumerate(adapter.lora_layers().values()):
            factor(layer, "B").normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
            if method == "stamina":  # close about half the entries
                layer.lora_mask_b["default"].normal_(0, 1, generator=torch.Generator().manual_seed(10 + i))
    x, t, states, mask = _inputs()
    model.eval()  # STAMINA's exact mask 1[L > 0], not a Gumbel draw
    with torch.no_grad():
        unfolded = model(x, t, states, mask)
        adapter.end_task()
        folded = model(x, t, states, mask)
    plain = tiny_model()
    with torch.no_grad():
        assert not torch.allclose(plain(x, t, states, mask), folded, atol=1e-3)  # the update did something
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-4)
    assert set(model.unet.state_dict()) == keys_before  # no extra parameters after folding


def _penalty_by_hand(adapter: ContinualAdapter, past: dict[str, torch.Tensor], weight: float) -> float:
    total = 0.0
    for name, layer in adapter.lora_layers().items():
        delta = factor(layer, "B") @ factor(layer, "A") * float(layer.scaling["default"])
        total += float(((past[name].abs() * delta.detach()) ** 2).sum())
    return weight * total


def test_clora_regulariser_is_zero_first_then_penalises_overlap_with_the_earlier_products(home, base):
    config = tiny_config(base, reg_weight=1e3)
    model = tiny_model()
    adapter = ContinualAdapter(model.unet, config.adapter_settings())
    enc = captions()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    runtime = Runtime()
    products = {}
    for number in range(3):
        adapter.begin_task()
        with torch.no_grad():
            for i, layer in enumerate(adapter.lora_layers().values()):
                b = factor(layer, "B")
                b.normal_(0, 0.3, generator=torch.Generator().manual_seed(100 * number + i))
                b[: b.shape[0] // 2] = 0 if number == 0 else b[: b.shape[0] // 2]  # concept 1: half the rows
        token = seq.ConceptToken(torch.zeros(32))
        task = seq._concept_task(model, adapter, token, enc, images, number, config, runtime)
        _, record = task.loss(0, task.batch(0))
        if number == 0:
            assert "reg" not in record and float(adapter.penalty()[0]) == 0  # nothing learned before
        else:
            # against the sum of the *earlier* concepts' products, each recorded when it was folded
            past = {name: sum(products[k][name] for k in range(number)) for name in adapter.layers}
            assert record["loss"] - record["mse"] == pytest.approx(_penalty_by_hand(adapter, past, 1e3), rel=1e-4)
            assert record["reg"] > 0
        if number == 1:  # an update only on the rows concept 1 left alone costs nothing
            with torch.no_grad():
                for layer in adapter.lora_layers().values():
                    factor(layer, "B")[factor(layer, "B").shape[0] // 2 :] = 0
            assert float(adapter.penalty()[0].detach()) == pytest.approx(0, abs=1e-12)
        record_of_fold = adapter.end_task()
        products[number] = {name: record_of_fold[f"{name}.B"] @ record_of_fold[f"{name}.A"]
                            for name in adapter.layers}


# ------------------------------------------------------------------------------------------------ runs


def _run(config, folder, resume=False):
    summary = seq.train_t2i_continual(config, folder / "out", resume=resume, overwrite=resume)
    weights = load_file(str(folder / "out" / "unet" / model_lib.WEIGHTS))
    tokens = load_file(str(folder / "out" / "tokens.safetensors"))
    samples = load_file(str(folder / "out" / seq.SAMPLES_FILE))
    return summary, {**weights, **{f"token.{k}": v for k, v in tokens.items()},
                     **{f"samples.{k}": v for k, v in samples.items()}}


@pytest.mark.training
def test_a_learned_and_folded_concept_reproduces_its_samples_after_save_and_load(home, base, tmp_path, capsys):
    config = tiny_config(base, method="stamina", lr=1e-2)
    code = main(["--quiet", "continual", "t2i", "--out", str(tmp_path / "out"), "--base", str(base), "--method",
                 "stamina", "--concepts", "penguin,rocket", "--shots", "2", "--steps", "4", "--batch-size", "4",
                 "--warmup", "1", "--samples", "2", "--sample-steps", "2", "--real", "3", "--checkpoint-every", "3",
                 "--no-autocast", "--device", "cpu", "--reg-weight", "1e3", "--lr", "1e-2", "--json", "-"])
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert code == 0 and summary["config"] == config.to_dict()  # the flags make the library's config
    assert summary["tokens"] == {"<c1>": "penguin", "<c2>": "rocket"} and len(summary["training"]) == 2
    saved = {f"samples.{k}": v for k, v in load_file(str(tmp_path / "out" / seq.SAMPLES_FILE)).items()}
    model, enc, meta = seq.load_run(tmp_path / "out")
    assert meta["method"] == "stamina" and set(enc.tokens) == {"<c1>", "<c2>"}
    assert set(model.unet.state_dict()) == set(tiny_model().unet.state_dict())  # folded: no adapter left
    for i, token in enumerate(("<c1>", "<c2>")):
        again = seq._draw(model, enc, f"a picture of {token}", config)
        assert torch.equal(again, saved["samples.final"][i])
    assert not torch.equal(saved["samples.final"][0], saved["samples.base"][0])
    assert (tmp_path / "out" / seq.GRID_FILE).is_file()
    judge = ConceptClassifier([c.caption for c in held_out_concepts(2)], width=8).eval()
    save_classifier(judge, tmp_path / "clf")  # metrics later, from the saved samples
    later = seq.evaluate_run(tmp_path / "out", tmp_path / "clf")
    assert later == seq.fidelity(judge, held_out_concepts(2), {k[len("samples."):]: v for k, v in saved.items()
                                                               if k.startswith("samples.")}, config)
    code = main(["--quiet", "t2i", "sample", str(tmp_path / "out"), "--caption", "a picture of <c2>", "--n", "2",
                 "--steps", "2", "--out", str(tmp_path / "c2.png")])
    assert code == 0 and (tmp_path / "c2.png").is_file()
    capsys.readouterr()


@pytest.mark.training
def test_textual_inversion_learns_only_the_tokens_so_it_cannot_forget(home, base, tmp_path):
    summary, saved = _run(tiny_config(base, method="ti", lr=1e-2), tmp_path)
    unet = tiny_model().unet.state_dict()
    assert all(torch.equal(saved[k], unet[k]) for k in unet)  # every fold added exactly nothing
    start = torch.Generator().manual_seed(0 * 7_919 + 0)  # where <c1> started (_learn's generator, seed 0)
    init = seq._init_vector(captions(), tiny_config(base, method="ti"), start)
    assert not torch.allclose(saved["token.<c1>"], init)  # the token did learn
    assert torch.equal(saved["samples.after"], saved["samples.final"])  # nothing later changed an earlier concept
    assert [len(h) for h in summary["histories"]] == [4, 4] and "reg" not in summary["histories"][1][-1]


@pytest.mark.training
def test_resume_of_a_sequence_equals_an_uninterrupted_one(home, base, tmp_path, monkeypatch):
    config = tiny_config(base, method="stamina")
    straight, weights = _run(config, tmp_path / "straight")
    assert [len(h) for h in straight["histories"]] == [4, 4] and "density" in straight["histories"][0][0]
    with monkeypatch.context() as patch:
        patch.setattr(seq, "fit", ctrl_c_fit(seq.fit, 2, call=2))  # Ctrl-C inside the second concept
        with pytest.raises(TrainingInterrupted):
            _run(config, tmp_path / "cut")
    training = tmp_path / "cut" / "out.training"
    assert load_checkpoint(training / "progress")["done"] == 1
    cut = load_checkpoint(training / "concept-01")
    assert cut["step"] == 2
    assert {"mlp.0.weight", "mlp.2.bias"} <= set(cut["modules"]["token"])  # STAMINA trains an MLP token
    torch.manual_seed(99)
    again, resumed = _run(config, tmp_path / "cut", resume=True)
    assert again["histories"] == straight["histories"]
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    with pytest.raises(LeanfmError, match="was trained with lr="):
        _run(tiny_config(base, method="stamina", lr=0.5), tmp_path / "cut", resume=True)


def test_fidelity_compares_each_set_with_the_real_renders_and_forgetting_is_after_minus_final(home):
    concepts = held_out_concepts(2)
    classifier = ConceptClassifier([c.caption for c in concepts], width=8).eval()
    config = tiny_config("unused", samples=3, real=4)
    g = torch.Generator().manual_seed(0)
    samples = {k: torch.randint(0, 256, (2, 3, 3, 32, 32), generator=g, dtype=torch.uint8) for k in seq.KINDS}
    samples["final"][1] = samples["after"][1]
    metrics = seq.fidelity(classifier, concepts, samples, config)
    row = metrics["per_concept"][0]
    real = seq.render_concepts(concepts, 4, seed=seq.REAL_SEED, font=config.font)[0].float() / 255
    expected = kid(image_features(classifier, real), image_features(classifier, samples["final"][0].float() / 255))
    assert row["final"]["kid"] == pytest.approx(expected)
    assert row["forgetting"]["kid"] == pytest.approx(row["final"]["kid"] - row["after"]["kid"])
    assert row["forgetting"]["recognised"] == pytest.approx(row["after"]["recognised"] - row["final"]["recognised"])
    assert metrics["per_concept"][1]["forgetting"] == {"recognised": 0.0, "kid": 0.0, "mmd": 0.0}
    assert metrics["mean"]["floor"]["kid"] == pytest.approx(
        sum(r["floor"]["kid"] for r in metrics["per_concept"]) / 2)


# ------------------------------------------------------------------------------------------------ errors


def test_concepts_are_a_count_or_held_out_names():
    assert [c.name for c in seq.parse_concepts("3")] == ["penguin", "rocket", "pineapple"]
    assert [c.name for c in seq.parse_concepts("owl, crab")] == ["owl", "crab"]
    assert len(seq.parse_concepts("30")) == 30
    with pytest.raises(LeanfmError, match="41 held-out concepts asked for; accepted: 1 to 40"):
        seq.parse_concepts("41")
    with pytest.raises(LeanfmError, match="unknown held-out concept 'cat'; accepted: a count 1 to 40"):
        seq.parse_concepts("penguin,cat")
    with pytest.raises(LeanfmError, match="are empty or repeated"):
        seq.parse_concepts("owl,owl")


def test_a_classifier_without_the_concepts_is_refused_before_any_work(home, base, tmp_path):
    save_classifier(ConceptClassifier(["a picture of penguin"], width=8), tmp_path / "clf")
    with pytest.raises(LeanfmError, match="has no concept 'rocket'"):
        seq.train_t2i_continual(tiny_config(base, classifier=str(tmp_path / "clf")), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.training").exists()


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--method", "ewc"], "unknown method 'ewc'"),
    (["--concepts", "41"], "41 held-out concepts asked for; accepted: 1 to 40"),
    (["--concepts", "penguin,cat"], "unknown held-out concept 'cat'"),
    (["--base", "{tmp}/nothing"], "is not a t2i model (t2i.json missing)"),
    (["--shots", "0"], "shots 0 is invalid"),
    (["--targets", "attn3.to_q"], "unknown target module 'attn3.to_q'"),
])
def test_bad_input_gives_one_line_errors_and_writes_nothing(capsys, home, base, tmp_path, argv, fragment):
    args = ["--base", str(base), "--steps", "1", "--samples", "2", "--device", "cpu", *argv]
    code = main(["--quiet", "continual", "t2i", "--out", str(tmp_path / "run"),
                 *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("leanfm: error: ") and err.count("\n") == 1 and out == ""
    assert fragment in err
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("base", "home")] == []
