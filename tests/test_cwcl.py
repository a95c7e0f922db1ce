"""CWCL: loss identities, weights, gradients, 2-process gathered loss, saved encoders, the align CLI.

The data, encoders and zero-shot metric it uses have their own tests (test_speech, test_shapes, test_encoders,
test_zero_shot); the align trainer's exact resume and resume errors are checked in test_contract.py.
"""

import json
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from leanfm.align.cwcl import ContrastiveLoss, clip_loss, cwcl_loss, intra_modal_weights
from leanfm.align.pipeline import load_encoder, save_encoder
from leanfm.cli import main
from leanfm.errors import LeanfmError
from leanfm.models.encoders import SpeechEncoder
from leanfm.training import DistributedContext, average_gradients


def _unit(n, d=16, seed=0):
    return nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_identity_weights_give_the_clip_loss():
    p, q = _unit(8, seed=1), _unit(8, seed=2)
    eye = torch.eye(8)
    torch.testing.assert_close(cwcl_loss(p, q, 0.1, weights=eye), clip_loss(p, q, 0.1))
    torch.testing.assert_close(cwcl_loss(p, q, 0.1, other="clip", weights=eye), clip_loss(p, q, 0.1))


def test_weights_are_in_unit_interval_with_ones_on_the_diagonal():
    q = _unit(20, seed=3)
    w = intra_modal_weights(q)
    assert w.min() >= 0 and w.max() <= 1
    torch.testing.assert_close(torch.diagonal(w), torch.ones(20))
    torch.testing.assert_close(w, w.T)
    # opposite embeddings: cos/2 + 1/2 can round to about -1e-7 (norms a rounding error above one, as a
    # normalised float32 vector may have); a weight must never be negative (a fractional power of one is NaN)
    opposite = torch.cat([q, -q]) * (1 + 1e-6)  # the rounding, made certain rather than left to the BLAS
    assert (opposite @ opposite.T / 2 + 0.5).min() < 0
    assert intra_modal_weights(opposite).min() >= 0
    assert not intra_modal_weights(opposite, power=0.5).isnan().any()


def test_weight_power_sharpens_and_keeps_the_paper_weights_at_one():
    q = _unit(20, seed=5)
    w, sharp = intra_modal_weights(q), intra_modal_weights(q, power=10)
    torch.testing.assert_close(sharp, w**10)
    torch.testing.assert_close(torch.diagonal(sharp), torch.ones(20))
    assert sharp.min() >= 0 and (sharp <= w + 1e-7).all()  # off-diagonal mass only shrinks
    p = _unit(20, seed=6)
    torch.testing.assert_close(cwcl_loss(p, q, 0.1, power=10), cwcl_loss(p, q, 0.1, weights=sharp))
    for power in (0, -1.0):
        with pytest.raises(LeanfmError, match="weight power"):
            cwcl_loss(p, q, 0.1, power=power)


def test_cwcl_rewards_similar_neighbours_unlike_clip():
    """Two near-identical frozen targets: CWCL does not push p_0 away from q_1, CLIP does."""
    q = _unit(4, seed=4)
    q[1] = nn.functional.normalize(q[0] + 0.01 * q[1], dim=0)
    p = q.clone().requires_grad_(True)
    cwcl_loss(p, q, 0.1).backward()
    cw = p.grad[0] @ (q[1] - q[0])
    p.grad = None
    clip_loss(p, q, 0.1).backward()
    assert (p.grad[0] @ (q[1] - q[0])) > cw  # CLIP's gradient pushes p_0 further from q_1 (descent = -grad)


def test_gradient_flows_only_to_the_trainable_tower():
    trainable, frozen = nn.Linear(5, 8), nn.Linear(6, 8).requires_grad_(False)
    loss = ContrastiveLoss("cwcl")
    value = loss(trainable(torch.randn(4, 5)), frozen(torch.randn(4, 6)))
    value.backward()
    assert trainable.weight.grad is not None and trainable.weight.grad.abs().sum() > 0
    assert frozen.weight.grad is None
    assert loss.log_scale.grad is not None


def _rank(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    q = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    context = DistributedContext(rank, world)
    loss_fn = ContrastiveLoss("cwcl")
    loss = loss_fn(layer(context.shard(x)), context.shard(q))
    loss.backward()
    average_gradients(list(layer.parameters()) + list(loss_fn.parameters()), context)
    if rank == 0:
        # plain lists, not a tensor: torch's queue would share the tensor through a file descriptor that
        # the parent can only fetch while this process is alive, and it may already have exited
        results.put((float(loss.detach()), layer.weight.grad.tolist(), float(loss_fn.log_scale.grad)))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gathered_loss_on_two_gloo_ranks_equals_one_process():
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    q = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    loss_fn = ContrastiveLoss("cwcl")
    index = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])  # rank order of strided shards
    single = loss_fn(layer(x[index]), q[index])
    single.backward()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, 2, os.path.join(tmp, "init"), results)) for r in range(2)]
        for proc in procs:
            proc.start()
        loss, grad, scale_grad = results.get(timeout=120)
        for proc in procs:
            proc.join(timeout=60)
    assert loss == pytest.approx(float(single.detach()), rel=1e-6)
    torch.testing.assert_close(torch.tensor(grad), layer.weight.grad, atol=1e-6, rtol=1e-5)
    assert scale_grad == pytest.approx(float(loss_fn.log_scale.grad), rel=1e-5)


def test_saved_encoder_reloads_including_folders_written_before_the_move(tmp_path):
    torch.manual_seed(0)
    encoder = SpeechEncoder(width=32, layers=1, heads=2).eval()
    save_encoder(tmp_path / "enc", encoder, {"kind": "speech", "frozen": "minilm-l6"})
    meta_file = tmp_path / "enc" / "align.json"
    meta = json.loads(meta_file.read_text())
    del meta["encoder"]["n_mels"]  # align.json as written when the encoder lived in align/speech.py
    meta_file.write_text(json.dumps(meta))
    loaded, saved = load_encoder(tmp_path / "enc")
    features, lengths = torch.randn(2, 30, 64), torch.tensor([30, 17])
    with torch.no_grad():
        assert torch.equal(loaded(features, lengths), encoder(features, lengths))
    assert saved["frozen"] == "minilm-l6" and not loaded.training


@pytest.mark.slow
@pytest.mark.speech
def test_align_speech_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "sp"
    assert main(["--quiet", "align", "speech", "--out", str(out), "--steps", "3", "--batch-size", "8",
                 "--phrases", "12", "--sentences", "4", "--weight-power", "2", "--json", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["intent_accuracy"] <= 1 and metrics["intent_items"] == 144
    assert 0 <= metrics["smart_home_intent_accuracy"] <= 1
    meta = json.loads((out / "align.json").read_text())
    assert meta["train"]["weight_power"] == 2 and meta["data"]["phrases"] == 12 and meta["data"]["sentences"] == 4
    assert metrics["keyword_items"] == 90
    assert 0 <= metrics["span_retrieval_accuracy"] <= 1 and metrics["span_retrieval_chance"] == 1 / 150
    assert main(["--quiet", "align", "eval", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics  # the saved encoder reproduces its metrics
    assert main(["--quiet", "align", "eval", str(out), "--synthesiser", "flite", "--json", "-"]) == 0
    flite = json.loads(capsys.readouterr().out)  # the same tests spoken by another engine, 4 voices
    assert flite["intent_items"] == 48 * 4 and flite["keyword_items"] == 90 and "span_retrieval_accuracy" not in flite
    assert flite["intent_accuracy"] != metrics["intent_accuracy"] or flite["keyword_accuracy"] != metrics[
        "keyword_accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["align", "speech", "--frozen", "clip-vit", "--out", "{tmp}/x"], "unknown frozen model 'clip-vit'"),
        (["align", "image", "--loss", "triplet", "--out", "{tmp}/x"], "unknown loss 'triplet'"),
        (["align", "eval", "{tmp}"], "is not an aligned encoder"),
        (["align", "eval", "{tmp}", "--synthesiser", "festival"], "invalid choice: 'festival'"),
        (["align", "image", "--weight-power", "0", "--out", "{tmp}/x"], "weight power 0.0 is invalid"),
        (["align", "speech", "--phrases", "0", "--out", "{tmp}/x"], "leave no training speech"),
        (["align", "image", "--validation", "0.5", "--out", "{tmp}/x"], "validation 0.5 is invalid"),
    ],
)
def test_bad_align_inputs_give_one_line_errors(args, message, tmp_path, capsys):
    try:
        code = main(["--quiet", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    except SystemExit as exit_:  # argparse's own errors (an unknown choice) exit from the parser
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cwcl_equals_a_hand_computation_with_uneven_weights():
    """Explicit loops over the paper's formula, on embeddings with negative cosines (so w = cos/2 + 1/2 differs
    from relu(cos)) and uneven row sums of w (so each row must be normalised by its own Σ_j w_ij)."""
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=-1)
    q[1] = -q[0]  # cosine -1: w = 0
    p = torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=-1)
    tau = 0.3
    w = [[float(q[i] @ q[j]) / 2 + 0.5 for j in range(5)] for i in range(5)]
    sums = [sum(row) for row in w]
    assert max(sums) - min(sums) > 0.5 and min(min(row) for row in w) < 0.05

    def direction(a, b):
        total = 0.0
        for i in range(5):
            logits = [float(a[i] @ b[j]) / tau for j in range(5)]
            norm = math.log(sum(math.exp(v) for v in logits))
            total += sum(w[i][j] * (logits[j] - norm) for j in range(5)) / sums[i]
        return -total / 5

    expected = (direction(p, q) + direction(q, p)) / 2
    assert cwcl_loss(p, q, tau).item() == pytest.approx(expected, rel=1e-5)
    clip_other = (direction(p, q) + float(torch.nn.functional.cross_entropy(q @ p.T / tau, torch.arange(5)))) / 2
    assert cwcl_loss(p, q, tau, other="clip").item() == pytest.approx(clip_other, rel=1e-5)


def test_each_row_is_normalised_by_its_own_weight_sum():
    """Scaling row i of w by any s_i > 0 leaves CWCL unchanged only if every row is divided by its own Σ_j w_ij
    (not by a column sum, the global sum, or nothing) — in both directions."""
    p, q = _unit(9, seed=11), _unit(9, seed=12)
    w = intra_modal_weights(q)
    scaled = torch.linspace(0.2, 5.0, 9)[:, None] * w
    for other in ("cwcl", "clip"):
        torch.testing.assert_close(cwcl_loss(p, q, 0.2, other=other, weights=scaled),
                                   cwcl_loss(p, q, 0.2, other=other, weights=w))
    assert not torch.isclose(cwcl_loss(p, q, 0.2, weights=scaled), cwcl_loss(p, q, 0.2, weights=scaled.T))


def test_loss_module_normalises_both_sides_and_uses_its_kind_and_temperature():
    """ContrastiveLoss = the functional loss of its kind on row-normalised inputs at its τ (paper weights by
    default); the learned scale is capped at 100 (τ >= 0.01), as CLIP."""
    g = torch.Generator().manual_seed(13)
    p = torch.randn(10, 6, generator=g) * torch.linspace(0.5, 4.0, 10)[:, None]
    q = torch.randn(10, 6, generator=g) * torch.linspace(3.0, 0.2, 10)[:, None]
    pn, qn = nn.functional.normalize(p, dim=-1), nn.functional.normalize(q, dim=-1)
    torch.testing.assert_close(ContrastiveLoss("clip", tau=0.3, learn_tau=False)(p, q), clip_loss(pn, qn, 0.3))
    torch.testing.assert_close(ContrastiveLoss("cwcl", tau=0.3)(p, q), cwcl_loss(pn, qn, 0.3))
    torch.testing.assert_close(ContrastiveLoss("cwcl", tau=0.3, other="clip", power=4.0)(p, q),
                               cwcl_loss(pn, qn, 0.3, other="clip", power=4.0))
    assert not torch.isclose(cwcl_loss(pn, qn, 0.3), clip_loss(pn, qn, 0.3))  # the dispatch is visible
    assert float(ContrastiveLoss(tau=0.5).tau.detach()) == pytest.approx(0.5)
    assert float(ContrastiveLoss().tau.detach()) == pytest.approx(0.07)  # CLIP's initial temperature
    assert float(ContrastiveLoss(tau=0.001).tau.detach()) == pytest.approx(0.01)
    with pytest.raises(LeanfmError, match="unknown loss 'triplet'"):
        ContrastiveLoss("triplet")


def test_mismatched_or_non_matrix_embeddings_are_refused():
    for p, q in ((torch.ones(4, 3), torch.ones(4, 2)), (torch.ones(4, 2), torch.ones(4, 3)),
                 (torch.ones(3, 2), torch.ones(4, 2)), (torch.ones(2, 4, 2), torch.ones(2, 4, 2)),
                 (torch.ones(4), torch.ones(4))):
        with pytest.raises(LeanfmError, match="p and q must be"):
            cwcl_loss(p, q, 0.1)


def test_temperature_is_fixed_or_learned_without_weight_decay():
    """--no-learn-tau keeps τ; a learned τ sits in its own group without weight decay, at --tau-lr's rate."""
    from leanfm.align.trainer import AlignConfig, train_aligned

    targets = _unit(32, 8, seed=1)
    inputs = _unit(32, 8, seed=2)
    moved = {}
    for learn, tau_lr in ((False, 0.0), (True, 0.0), (True, 0.05)):
        encoder = nn.Linear(8, 8)
        config = AlignConfig(steps=6, batch_size=16, lr=1e-3, warmup=1, tau=0.5, learn_tau=learn, tau_lr=tau_lr,
                             weight_decay=0.5, checkpoint_every=10, device="cpu")
        taus = [row["tau"] for row in train_aligned(encoder, lambda rows: inputs[rows], targets, config)["history"]]
        moved[(learn, tau_lr)] = abs(taus[-1] - 0.5)
    assert moved[(False, 0.0)] < 1e-6
    assert moved[(True, 0.05)] > 5 * moved[(True, 0.0)] > 0  # 50x the rate moves τ much further
    with pytest.raises(LeanfmError, match="tau lr -1"):
        AlignConfig(tau_lr=-1)


def test_validation_combinations_come_out_of_training_never_the_test():
    from leanfm.data import shapes

    train, test = shapes.split_combinations(0)
    fit, validation = shapes.split_validation(train, 0.1, 0)
    assert len(validation) == round(0.1 * len(train)) and sorted(fit + validation) == sorted(train)
    assert not set(validation) & set(test) and not set(validation) & set(fit)
    assert all({c[k] for c in fit} == {c[k] for c in shapes.all_combinations()} for k in range(4))
    assert (fit, validation) == shapes.split_validation(train, 0.1, 0)  # seeded
    assert validation != shapes.split_validation(train, 0.1, 1)[1]
    assert shapes.split_validation(train, 0.0, 0) == (train, [])


@pytest.mark.slow
def test_align_image_holds_validation_combinations_out_and_scores_them(tmp_path, capsys):
    out = tmp_path / "im"
    assert main(["--quiet", "align", "image", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--per-combo", "1", "--validation", "0.1", "--json", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    meta = json.loads((out / "align.json").read_text())
    assert meta["data"]["validation_combinations"] == 14 and meta["data"]["train_combinations"] == 130
    assert meta["data"]["images"] == 130  # one render per fitted combination: the validation ones never train
    assert 0 <= metrics["validation_accuracy"] <= 1 and metrics["validation_items"] == 1400  # 100 renders each
    assert main(["--quiet", "align", "eval", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics  # evaluation re-derives the same validation split
    assert main(["--quiet", "align", "eval", str(out), "--synthesiser", "flite"]) == 2
    assert "synthesiser 'flite' is for speech encoders" in capsys.readouterr().err
