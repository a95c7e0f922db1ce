"""MoDeGPT's three decompositions checked against what they promise, so a planted bug in the maths fails here.

Planted bugs these tests were written against (issue 13): no Nyström reconstruction, random or lowest-scoring
q/k dims, V keeping the smallest singular directions, the solve ridge ignored, pair energies not used.
"""

import pytest
import torch

from leanfm.compress.modegpt import ModegptConfig, mlp_nystrom, qk_select, vo_svd
from leanfm.errors import LeanfmError
from leanfm.models.adapters import AttentionLayout


def _activations(tokens: int, width: int, rank: int, seed: int) -> torch.Tensor:
    """Correlated activations: a rank-``rank`` signal with uneven scales plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=torch.Generator().manual_seed(99))
    scales = torch.linspace(3.0, 0.3, rank)
    signal = (torch.randn(tokens, rank, generator=gen) * scales) @ basis
    return signal + 0.05 * torch.randn(tokens, width, generator=gen)


def _mlp_error(acts: torch.Tensor, down: torch.Tensor, kept: torch.Tensor, new_down: torch.Tensor) -> float:
    return float(torch.linalg.norm(acts @ down.T - acts[:, kept] @ new_down.T))


def test_nystrom_reconstruction_beats_selection_alone_on_held_out_activations():
    calib, held = _activations(2000, 48, 12, seed=0), _activations(500, 48, 12, seed=1)
    down = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    gram = (calib.T @ calib).double()
    kept, solved = mlp_nystrom(gram, down, keep=16, ridge=1e-2, solve_ridge=1e-3)
    kept_copy, copied = mlp_nystrom(gram, down, keep=16, ridge=1e-2, reconstruct=False)
    assert torch.equal(kept, kept_copy)  # same selection; only the down projection differs
    assert torch.equal(copied, down[:, kept])
    recon, plain = _mlp_error(held, down, kept, solved), _mlp_error(held, down, kept, copied)
    assert recon < 0.5 * plain, (recon, plain)


def test_nystrom_without_ridge_is_the_least_squares_optimum_on_calibration():
    """W_D C[:,J] C[J,J]^-1 minimises ||X W_D^T - X_J W'^T|| over W' for the calibration X (normal equations)."""
    calib = _activations(800, 20, 20, seed=3)
    down = torch.randn(6, 20, generator=torch.Generator().manual_seed(4))
    gram = (calib.T @ calib).double()
    kept, solved = mlp_nystrom(gram, down, keep=8, ridge=1e-2, solve_ridge=0.0)
    lstsq = torch.linalg.lstsq(calib[:, kept].double(), (calib @ down.T).double()).solution.T
    torch.testing.assert_close(solved.double(), lstsq, atol=1e-4, rtol=1e-4)


def test_solve_ridge_shrinks_the_solution():
    calib = _activations(300, 24, 6, seed=5)
    down = torch.randn(5, 24, generator=torch.Generator().manual_seed(6))
    gram = (calib.T @ calib).double()
    norms = [float(torch.linalg.norm(mlp_nystrom(gram, down, 10, 1e-2, mu)[1])) for mu in (0.0, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def test_nystrom_keeps_the_channels_that_carry_the_signal():
    """Channels 0-7 carry independent signals, 8-15 almost nothing: ridge leverage must keep 0-7."""
    gen = torch.Generator().manual_seed(7)
    acts = torch.cat([torch.randn(1000, 8, generator=gen) * 2, 1e-3 * torch.randn(1000, 8, generator=gen)], 1)
    kept, _ = mlp_nystrom((acts.T @ acts).double(), torch.randn(4, 16), keep=8, ridge=1e-2)
    assert kept.tolist() == list(range(8))


def _vo_error(x: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, new_v: torch.Tensor, new_o: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ wv.T @ wo.T - x @ new_v.T @ new_o.T) ** 2)


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: Gram eigenvalues below 1, so no clamp may touch them
def test_vo_svd_error_equals_the_discarded_singular_mass(scale):
    """Type III: ||X (W_V W_O - W_V' W_O')||^2 = sum of the discarded squared singular values of X W_V W_O."""
    layout = AttentionLayout(num_heads=2, num_kv_heads=1, head_dim=8, rotary_dim=0)
    gen = torch.Generator().manual_seed(8)
    x = scale * _activations(600, 16, 16, seed=9).double()
    wv = torch.randn(8, 16, generator=gen, dtype=torch.float64)  # [KV*hd, in]
    wo = torch.randn(16, 16, generator=gen, dtype=torch.float64)  # [out, H*hd]
    gram = x.T @ x
    for keep in (2, 5):
        new_v, _, new_o = vo_svd(wv, None, wo, gram, layout, keep)
        # the group's map X -> per head outputs, stacked: [tokens, H*out]
        full = torch.cat([x @ wv.T @ wo[:, h * 8:(h + 1) * 8].T for h in range(2)], 1)
        small = torch.cat([x @ new_v.T @ new_o[:, h * keep:(h + 1) * keep].T for h in range(2)], 1)
        sing = torch.linalg.svdvals(full)
        err = float(torch.linalg.norm(full - small) ** 2)
        assert err == pytest.approx(float((sing[keep:] ** 2).sum()), rel=1e-6)


def test_vo_svd_full_rank_is_exact_and_keeps_the_bias_mapping():
    layout = AttentionLayout(num_heads=2, num_kv_heads=2, head_dim=4, rotary_dim=0)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    wv = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    wo = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    bv = torch.randn(8, generator=gen, dtype=torch.float64)
    new_v, new_b, new_o = vo_svd(wv, bv, wo, x.T @ x, layout, 4)
    assert new_b is not None
    torch.testing.assert_close((x @ new_v.T + new_b) @ new_o.T, (x @ wv.T + bv) @ wo.T, atol=1e-8, rtol=1e-8)


def _score_error(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, dims: torch.Tensor, hd: int) -> float:
    """Error of the attention logits q k^T of one head when only ``dims`` survive (no RoPE)."""
    q, k = x @ wq.T, x @ wk.T
    return float(torch.linalg.norm(q @ k.T - q[:, dims] @ k[:, dims].T))


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: energies below 1, so no clamp may touch them
def test_qk_selection_beats_random_and_reversed_selection(scale):
    layout = AttentionLayout(num_heads=1, num_kv_heads=1, head_dim=16, rotary_dim=0)
    gen = torch.Generator().manual_seed(11)
    x = scale * torch.randn(300, 24, generator=gen)
    scale = torch.logspace(0, -2, 16)[:, None]  # dims with very different energies
    wq = torch.randn(16, 24, generator=gen) * scale
    wk = torch.randn(16, 24, generator=gen) * scale.flip(0).sqrt() * scale.sqrt()
    gram = (x.T @ x).double()
    dims, _ = qk_select(wq, wk, gram, layout, keep=0.25)
    chosen = _score_error(x, wq, wk, dims[0], 16)
    energy = (((wq.double() @ gram) * wq.double()).sum(1) * ((wk.double() @ gram) * wk.double()).sum(1)).sqrt()
    worst = _score_error(x, wq, wk, energy.argsort()[:4], 16)
    randoms = [_score_error(x, wq, wk, torch.randperm(16, generator=gen)[:4], 16) for _ in range(10)]
    assert chosen < worst
    assert chosen < min(randoms)


def test_rotary_pairs_score_by_pair_energy():
    """Pair A = dims (0, 2) holds q energy on one dim and k energy on the other: per-dim products are ~0, but
    RoPE rotates q_0 into k_2, so the pair carries real logit mass. Pair B = (1, 3) is weaker but balanced.
    Pair energies keep A; summing per-dim scores would keep B."""
    layout = AttentionLayout(num_heads=1, num_kv_heads=1, head_dim=4, rotary_dim=4)
    gram = torch.eye(4, dtype=torch.float64)
    wq = torch.diag(torch.tensor([3.0, 1.0, 0.0, 1.0]))
    wk = torch.diag(torch.tensor([0.0, 1.0, 3.0, 1.0]))
    dims, rope_index = qk_select(wq, wk, gram, layout, keep=0.5)
    assert rope_index == [[0]]
    assert sorted(dims[0].tolist()) == [0, 2]


def test_pair_energies_with_more_pairs_and_non_rotary_dims():
    """head_dim 12, rotary 8 (pairs (j, j+4)), 4 pass-through dims. Pair 3 = (3, 7) is q-on-one, k-on-the-other
    (pair energy 16, per-dim 0); pairs 0-2 are balanced and weak (energy 2); pass dims score per dim."""
    layout = AttentionLayout(num_heads=1, num_kv_heads=1, head_dim=12, rotary_dim=8)
    q_diag = torch.tensor([1.0, 1, 1, 4, 1, 1, 1, 0, 3, 0.1, 0.1, 0.1])
    k_diag = torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 4, 3, 0.1, 0.1, 0.1])
    dims, rope_index = qk_select(torch.diag(q_diag), torch.diag(k_diag), torch.eye(12, dtype=torch.float64),
                                 layout, keep=0.25)
    assert rope_index == [[3]]
    assert dims[0].tolist() == [3, 7, 8]  # the strong pair, then the best pass-through dim


def test_modegpt_config_refuses_negative_ridges():
    with pytest.raises(LeanfmError, match="solve_ridge -1"):
        ModegptConfig(ratio=0.3, solve_ridge=-1).validate()


def test_pair_energies_add_the_partners_energies():
    """Pair A = (0, 2) spreads its energy over both dims (q = k = (2, 2)); pair B = (1, 3) holds it in one
    (q = k = (3, 0)). Pair energies: A 4, B 3 -> keep A (a difference or a ratio of the partners would keep B)."""
    layout = AttentionLayout(num_heads=1, num_kv_heads=1, head_dim=4, rotary_dim=4)
    w = torch.diag(torch.tensor([2.0, 3.0, 2.0, 0.0]).sqrt())  # row energies (2, 3, 2, 0) on an identity Gram
    dims, rope_index = qk_select(w, w, torch.eye(4, dtype=torch.float64), layout, keep=0.5)
    assert rope_index == [[0]] and sorted(dims[0].tolist()) == [0, 2]


def test_qk_score_is_a_product_of_query_and_key_energies():
    """dim 0: E_q 100, E_k 0.01 (product 1); dim 1: E_q = E_k = 2 (product 4): the logit mass is in dim 1."""
    layout = AttentionLayout(num_heads=1, num_kv_heads=1, head_dim=2, rotary_dim=0)
    wq = torch.diag(torch.tensor([100.0, 2.0]).sqrt())
    wk = torch.diag(torch.tensor([0.01, 2.0]).sqrt())
    dims, _ = qk_select(wq, wk, torch.eye(2, dtype=torch.float64), layout, keep=0.5)
    assert dims.tolist() == [[1]]


def test_qk_scores_sum_over_the_query_heads_of_each_kv_group():
    """GQA, 2 KV groups x 2 query heads: group 0's heads use dim 0, group 1's dim 1 — each group keeps its own."""
    layout = AttentionLayout(num_heads=4, num_kv_heads=2, head_dim=2, rotary_dim=0)
    wq = torch.tensor([[1.0, 0], [0, 0], [1, 0], [0, 0], [0, 0], [0, 1], [0, 0], [0, 1]])  # [H*hd, in]
    wk = torch.ones(4, 2)
    dims, _ = qk_select(wq, wk, torch.eye(2, dtype=torch.float64), layout, keep=0.5)
    assert dims.tolist() == [[0], [1]]
