import math

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from leanfm.errors import LeanfmError
from leanfm.vision import tofu, tome
from leanfm.vision.merge import bipartite_soft_matching, reduce_tokens
from leanfm.vision.patch import expand_r


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    config = ViTConfig(image_size=28, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=4,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(config).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("patch", [tome.apply_patch, tofu.apply_patch])
def test_r_zero_is_bit_identical(patch):
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        patch(model, r=0)
        assert torch.equal(model(pixel_values=x).logits, reference)


def test_token_counts_follow_the_schedule():
    model = tiny_vit()
    schedule = [10, 20, 0, 30]
    tofu.apply_patch(model, r=schedule, prune_layers=2)
    with torch.no_grad():
        model(pixel_values=images())
    assert model._leanfm_reduction.state.tokens == [197, 187, 167, 167]
    tome.apply_patch(model, r=8)  # re-patching replaces the old patch
    with torch.no_grad():
        model(pixel_values=images())
    assert model._leanfm_reduction.state.tokens == [197, 189, 181, 173]


def test_sizes_sum_to_original_token_count_when_merging():
    model = tiny_vit()
    tome.apply_patch(model, r=[40, 30, 20, 10])
    with torch.no_grad():
        model(pixel_values=images(3))
    size = model._leanfm_reduction.state.size
    assert size.shape == (3, 197 - 100, 1)
    assert torch.allclose(size.sum(1), torch.full((3, 1), 197.0))
    assert size[:, 0].eq(1).all()  # the class token is never merged


def test_mlerp_keeps_max_norm_and_equals_average_for_parallel_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 8, generator=gen)
    size = torch.ones(2, 11, 1)
    matching = bipartite_soft_matching(x, 4)
    avg, _ = reduce_tokens(x, size, matching, "average")
    mlerp, merged_size = reduce_tokens(x, size, matching, "mlerp")
    # every merged group keeps the largest input norm of the group
    for b in range(2):
        a_tokens, b_tokens = x[b, ::2], x[b, 1::2]
        for dst in matching.dst[b, :, 0].unique().tolist():
            sources = matching.src[b, :, 0][matching.dst[b, :, 0] == dst]
            group_norms = torch.cat([b_tokens[dst : dst + 1], a_tokens[sources]]).norm(dim=-1)
            out = mlerp[b, matching.unmatched.shape[1] + dst]
            assert out.norm() == pytest.approx(float(group_norms.max()), rel=1e-5)
    assert merged_size.sum() == 22
    same = torch.randn(8, generator=gen).expand(2, 11, 8).clone()  # parallel tokens of equal norm
    m = bipartite_soft_matching(same, 4)
    torch.testing.assert_close(reduce_tokens(same, size, m, "mlerp")[0], reduce_tokens(same, size, m, "average")[0])
    assert avg.shape == (2, 7, 8)


def test_prune_drops_matched_tokens_unchanged():
    x = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(2))
    matching = bipartite_soft_matching(x, 3)
    out, size = reduce_tokens(x, torch.ones(1, 9, 1), matching, "prune")
    assert out.shape == (1, 6, 4) and torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[:, -4:], x[:, 1::2]) and size.sum() == 6


def test_patch_remove_round_trip_restores_outputs_and_keys():
    model = tiny_vit()
    x = images()
    keys = set(model.state_dict())
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        tofu.apply_patch(model, r=16)
        assert not torch.equal(model(pixel_values=x).logits, reference)
        assert set(model.state_dict()) == keys
        tofu.remove_patch(model)
        assert torch.equal(model(pixel_values=x).logits, reference)
    assert type(model.vit.layers[0]).__name__ == "ViTLayer" and not hasattr(model, "_leanfm_reduction")


def test_patched_model_trains():
    model = tiny_vit().train()
    tofu.apply_patch(model, r=8)
    loss = torch.nn.functional.cross_entropy(model(pixel_values=images()).logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.vit.layers[-1].mlp.parameters())


@pytest.mark.parametrize(("r", "message"), [(-1, "negative"), (99, "more than 50%"), ([1, 2], "one per layer")])
def test_bad_r(r, message):
    with pytest.raises(LeanfmError, match=message):
        tome.apply_patch(tiny_vit(), r=r)


def test_r_schedule_follows_tome_inflection():
    assert expand_r((8, -1), 4, 197) == [16, 10, 5, 0]
    assert expand_r((8, 1), 4, 197) == [0, 5, 10, 16]
    assert expand_r((8, 0), 4, 197) == [8, 8, 8, 8]
    model = tome.apply_patch(tiny_vit(), r=(8, -1))
    with torch.no_grad():
        model(pixel_values=images())
    assert model._leanfm_reduction.state.tokens == [197, 181, 171, 166]
    with pytest.raises(LeanfmError, match="inflect"):
        expand_r((8, 2), 4, 197)


def tiny_timm_vit(**kwargs):
    timm = pytest.importorskip("timm")  # optional extra: runs where timm (and torchvision) are installed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4,
                                 num_classes=10, **kwargs).eval()


@pytest.mark.parametrize("patch", [tome.apply_patch, tofu.apply_patch])
def test_timm_vit_patch(patch):
    model = tiny_timm_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        patch(model, r=0)
        assert torch.equal(model(x), reference)
        patch(model, r=8)
        reduced = model(x)
        assert model._leanfm_reduction.state.tokens == [65, 57, 49, 41]
        assert reduced.shape == reference.shape and not torch.equal(reduced, reference)
        tome.remove_patch(model)
        assert torch.equal(model(x), reference) and type(model.blocks[0]).__name__ == "Block"


def test_timm_vit_without_class_token_merges_every_token_and_trains():
    model = tiny_timm_vit(class_token=False, global_pool="avg").train()
    tome.apply_patch(model, r=8)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model._leanfm_reduction.state.size.sum(1).flatten().tolist() == [64.0, 64.0]
    assert model.blocks[-1].mlp.fc1.weight.grad is not None


def test_linearity_profile_and_split():
    errors = tofu.linearity_profile(tiny_vit(), images(6))
    assert len(errors) == 4 and all(e >= 0 for e in errors)
    assert tofu.split_by_linearity([0.9, 0.8, 0.1, 0.05]) == 2
    assert tofu.split_by_linearity([0.3, 0.2], threshold=0.0) == 2


def test_fashion_mnist_reader():
    from leanfm.data.images import fashion_mnist

    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist()[:5] == [9, 2, 1, 1, 6] and set(labels.tolist()) == set(range(10))
    with pytest.raises(LeanfmError, match="accepted: train, test"):
        fashion_mnist("validation")


TINY_VIT = {"hidden_size": 32, "heads": 2, "mlp": 64, "layers": 2, "epochs": 1, "batch_size": 32, "train_limit": 192,
            "eval_limit": 64, "checkpoint_every": 3, "warmup_steps": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    """A tiny ViT trained once for this module (6 steps; accuracy on 64 test images). Exact resume: test_contract."""
    from leanfm.vision.train import ViTTrainConfig, train_vit

    out = tmp_path_factory.mktemp("vit") / "a"
    return out, train_vit(ViTTrainConfig(**TINY_VIT), out)


@pytest.mark.training
def test_train_writes_model_and_metrics_with_its_checkpoint_beside(trained_vit):
    import json

    from leanfm.training import STATE_FILE, checkpoint_path

    out, metrics = trained_vit
    assert metrics["steps"] == 6 and metrics["images"] == 64 and len(metrics["history"]) == 6
    assert 0 <= metrics["accuracy"] <= 1 and all(math.isfinite(h["loss"]) for h in metrics["history"])
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert (out / "model" / "config.json").is_file() and not (out / "checkpoint").exists()
    assert (checkpoint_path(out) / STATE_FILE).is_file()


def test_bench_cli_on_a_saved_vit(tmp_path, capsys):
    import json

    from leanfm.cli import main

    out = tmp_path / "vit"
    tiny_vit().save_pretrained(out / "model")  # bench needs a saved classifier, not a trained one
    code = main(["--quiet", "vision", "bench", str(out), "--method", "tofu", "--r", "8", "--limit", "64",
                 "--json", "-"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["method"] == "tofu" and result["images"] == 64 and 0 <= result["accuracy"] <= 1
    assert main(["--quiet", "vision", "bench", str(out), "--method", "tome", "--r", "-3"]) == 2
    assert "negative" in capsys.readouterr().err
    assert main(["--quiet", "vision", "bench", str(out), "--method", "tofu", "--prune-layers", "x"]) == 2
    assert "prune_layers 'x' is invalid" in capsys.readouterr().err
    assert main(["--quiet", "vision", "bench", str(out), "--method", "fast"]) == 2
    assert "unknown method 'fast'; accepted: none, tome, tofu" in capsys.readouterr().err
    code = main(["--quiet", "vision", "bench", str(out), "--method", "tome", "--r", "8", "--r-inflect", "-1",
                 "--limit", "64", "--json", "-"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and (result["r"], result["r_inflect"]) == (8, -1.0)  # ToMe's (r, inflect) schedule


@pytest.mark.training
def test_init_from_continues_a_trained_vit_and_records_every_stage(trained_vit, tmp_path):
    from dataclasses import replace

    from leanfm.vision.train import ViTTrainConfig, train_vit

    out, first = trained_vit
    config = ViTTrainConfig(**TINY_VIT)
    continued = train_vit(replace(config, init_from=str(out)), tmp_path / "c")
    assert [s["steps"] for s in continued["stages"]] == [6, 6]  # the whole history is recorded
    assert continued["stages"][0]["accuracy"] == first["accuracy"]
    with pytest.raises(LeanfmError, match="different architecture"):
        train_vit(replace(config, layers=3, init_from=str(out)), tmp_path / "d")


@pytest.mark.training
def test_init_from_a_shallower_vit_grows_it_without_changing_its_function(trained_vit):
    from leanfm.vision.train import ViTTrainConfig, _load_weights, build_vit, load_vit

    out, _ = trained_vit
    shallow = load_vit(out)
    grown = build_vit(ViTTrainConfig(**{**TINY_VIT, "layers": 4, "seed": 5})).eval()
    _load_weights(grown, str(out))
    pixels = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(grown(pixel_values=pixels).logits, shallow(pixel_values=pixels).logits)
    layers = grown.vit.layers
    for index in (1, 3):  # the copies: zero residual outputs, inner weights of the layer they follow
        assert not layers[index].mlp.fc2.weight.any() and not layers[index].attention.o_proj.bias.any()
        torch.testing.assert_close(layers[index].mlp.fc1.weight, shallow.vit.layers[index // 2].mlp.fc1.weight)
    assert layers[2].mlp.fc2.weight.any()  # the trained layers keep their outputs
    grown.train()
    torch.nn.functional.cross_entropy(grown(pixel_values=pixels).logits, torch.arange(4)).backward()
    assert layers[1].mlp.fc2.weight.grad.abs().sum() > 0  # the copies train from the first step


def test_patch_configs_parse_r_and_refuse_bad_settings():
    from leanfm.vision.tofu import TofuConfig
    from leanfm.vision.tome import TomeConfig

    assert TomeConfig(r="16").schedule() == 16
    assert TomeConfig(r="8,8,4,0").schedule() == [8, 8, 4, 0]
    assert TomeConfig(r=12, r_inflect=-1.0).schedule() == (12, -1.0)
    assert TofuConfig(prune_layers="3").prune_layers == 3
    config = TofuConfig(r="4,4,2,2", merge="average")
    assert TofuConfig.from_dict(config.to_dict()) == config
    for bad, message in [(lambda: TomeConfig(r="x"), "r 'x'"),
                         (lambda: TomeConfig(r=[4, 4], r_inflect=0.5), "single r"),
                         (lambda: TomeConfig(r=4, r_inflect=2.0), "r_inflect 2.0"),
                         (lambda: TofuConfig(merge="max"), "merge 'max'"),
                         (lambda: TofuConfig(prune_layers="some"), "prune_layers 'some'")]:
        with pytest.raises(LeanfmError, match=message):
            bad()


@pytest.mark.parametrize(("name", "settings"), [("tome", {"r": "8", "r_inflect": -1.0}),
                                                ("tofu", {"r": 8, "prune_layers": 1, "merge": "average"})])
def test_registered_patches_match_apply_patch_and_undo(name, settings):
    from leanfm.config import get_method

    spec = get_method(name, "patch")
    x = images()
    reference_model, model = tiny_vit(), tiny_vit()
    config = spec.config(**settings)
    with torch.no_grad():
        dense = model(pixel_values=x).logits
        if name == "tome":
            tome.apply_patch(reference_model, r=(8, -1.0))
        else:
            tofu.apply_patch(reference_model, r=8, prune_layers=1, merge="average")
        spec.entry(model, config)
        patched = model(pixel_values=x).logits
        assert torch.equal(patched, reference_model(pixel_values=x).logits)
        assert not torch.allclose(patched, dense)
        spec.undo(model)
        assert torch.equal(model(pixel_values=x).logits, dense)



def test_vision_train_refuses_an_unrelated_folder_and_old_checkpoints(tmp_path, capsys):
    from leanfm.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not ours")
    assert main(["--quiet", "vision", "train", "--out", str(photos), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists and is not empty; pass --overwrite" in err and len(err.splitlines()) == 1
    assert (photos / "holiday.jpg").read_bytes() == b"not ours"
    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    (old / "checkpoint" / "state.pt").write_bytes(b"")  # the layout before the one training loop
    assert main(["--quiet", "vision", "train", "--out", str(old), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint of an older leanfm ViT trainer" in err and "old.training" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("setting", "message"), [({"hidden_size": 30}, "hidden_size 30 is not divisible by heads 4"),
                                                  ({"patch_size": 3}, "patch_size 3 does not divide"),
                                                  ({"eval_limit": 0}, "eval_limit 0 is invalid"),
                                                  ({"dataset": "cifar"}, "unknown dataset 'cifar'")])
def test_bad_vit_settings_are_one_line_errors(setting, message):
    from leanfm.vision.train import ViTTrainConfig

    with pytest.raises(LeanfmError, match=message):
        ViTTrainConfig(**setting)


def test_matching_pairs_the_most_similar_tokens():
    """A's tokens 1 and 2 have exact twins in B; token 3 is far from everything: the two twins are matched."""
    a = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.2]])
    b = torch.tensor([[0.1, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.05, 0.0], [0.3, -0.2, 0.9]])
    tokens = torch.stack([a, b], dim=1).reshape(1, 8, 3)  # interleaved: A at even, B at odd positions
    matching = bipartite_soft_matching(tokens, 2)
    assert sorted(matching.src.flatten().tolist()) == [1, 2]
    pairs = dict(zip(matching.src.flatten().tolist(), matching.dst.flatten().tolist(), strict=True))
    assert pairs == {1: 2, 2: 0}
    assert matching.unmatched.flatten().tolist() == [0, 3]  # the class token stays first


def test_merge_is_size_weighted():
    """Merging a token of size 3 into one of size 1 gives (3 a + b) / 4 and size 4; MLERP rescales that mean."""
    x = torch.tensor([[[9.0, 9.0], [0.0, 4.0], [4.0, 0.0], [1.0, 1.0]]])  # A = {0, 2}, B = {1, 3}
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0]]])
    matching = bipartite_soft_matching(x, 1)  # A token 2 -> B token 0 (position 1) or 1 (position 3)
    out, new_size = reduce_tokens(x, size, matching, "average")
    dst = int(matching.dst.flatten()[0])
    partner = x[0, 1::2][dst]
    torch.testing.assert_close(out[0, 1 + dst], (3 * x[0, 2] + partner) / 4)
    assert new_size[0, 1 + dst, 0] == 4 and new_size.sum() == 6
    mlerp, _ = reduce_tokens(x, size, matching, "mlerp")
    mean = (3 * x[0, 2] + partner) / 4
    torch.testing.assert_close(mlerp[0, 1 + dst], mean / mean.norm() * max(x[0, 2].norm(), partner.norm()))


def test_prune_with_size_transfer_keeps_the_mass():
    x = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(2))
    matching = bipartite_soft_matching(x, 3)
    out, size = reduce_tokens(x, torch.ones(1, 9, 1), matching, "prune-transfer")
    plain, plain_size = reduce_tokens(x, torch.ones(1, 9, 1), matching, "prune")
    assert torch.equal(out, plain) and size.sum() == 9 and plain_size.sum() == 6
    expected = torch.ones(4)
    expected.index_add_(0, matching.dst.flatten(), torch.ones(3))
    assert torch.equal(size[0, -4:, 0], expected)


@pytest.mark.parametrize("proportional", [True, False])
def test_proportional_attention_makes_merging_twins_exact(proportional):
    """Tokens come in identical pairs (no position embeddings, each patch repeated to its right): merging twins
    with proportional attention (log size added to the logits) leaves the logits unchanged; without it, not."""
    model = tiny_vit()
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.zero_()
        patches = torch.rand(2, 14, 7, 1, 2, 2, generator=torch.Generator().manual_seed(4))  # [B, row, pair, j, i, k]
        x = patches.expand(-1, -1, -1, 2, -1, -1).permute(0, 1, 4, 2, 3, 5).reshape(2, 1, 28, 28)  # twins side by side
        reference = model(pixel_values=x).logits
        tome.apply_patch(model, r=[40, 0, 0, 0], proportional_attention=proportional)
        patched = model(pixel_values=x).logits
    assert model._leanfm_reduction.state.tokens == [197, 157, 157, 157]
    if proportional:
        torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-4)
    else:
        assert (patched - reference).abs().max() > 1e-3
