"""CWCL, the continuously weighted contrastive loss, and the standard CLIP/InfoNCE loss (METHODS.md section 5).

Setting: a *frozen* pretrained encoder embeds modality V (``q``, unit norm); a *trainable* encoder embeds
modality U (``p``, unit norm). CLIP's loss treats pair ``(i, i)`` as the only positive and every other ``j`` as
an equally wrong negative. CWCL instead weights every ``j`` by how similar the frozen side says ``i`` and ``j``
are, ``w_ij = <q_i, q_j> / 2 + 1/2`` in [0, 1] (``w_ii = 1``):

    L_{U->V} = -(1/N) Σ_i (1 / Σ_j w_ij) Σ_j w_ij log softmax_j(<p_i, q_j> / τ)

so "turn the lights on" spoken is pulled towards "switch on the lamp" as well, not pushed away. With
``w = I`` this is exactly CLIP's U->V term (tested). The V->U direction uses CWCL's weights too
(``other="cwcl"``) or the standard CLIP term (``other="clip"``); the paper is unclear, so both are offered.

Sharpened weights (our option, not the paper's): ``power`` γ raises the weights, ``w_ij ** γ`` (still in [0, 1],
``w_ii = 1``, order kept). Why: with γ = 1 unrelated MiniLM phrases still weigh ~0.6 on average, so in a batch
of 128 the true pair holds ~1.3% of the target mass and the target is nearly uniform: the loss can teach only
~0.004 nats (measured, BENCHMARKS.md). γ = 10 brings the mean off-diagonal weight to ~0.01 while near-duplicates
(cosine 0.9 -> w 0.95 -> 0.6) keep much of theirs.

Distributed: :func:`gather` concatenates every rank's rows with gradients (``torch.distributed.nn``'s
autograd-aware all_gather, as open_clip's ``gather_with_grad``), so each rank computes the loss over the
global batch and the averaged gradients equal the one-process gradient on the concatenated batch (tested
with 2 gloo processes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from leanfm.errors import LeanfmError

LOSSES = ("cwcl", "clip")


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``x`` concatenated in rank order, differentiable (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def intra_modal_weights(q: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """``w_ij = (<q_i, q_j> / 2 + 1/2) ** power`` from unit-norm frozen embeddings ``q`` ``[N, d]`` (no gradient)."""
    q = q.detach()
    return (q @ q.T / 2 + 0.5).clamp(0.0, 1.0) ** power


def _weighted_nll(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``-(1/N) Σ_i Σ_j w_ij log softmax_j(logits_ij) / Σ_j w_ij``."""
    log_probs = logits.log_softmax(dim=-1)
    return -((weights * log_probs).sum(-1) / weights.sum(-1)).mean()


def clip_loss(p: torch.Tensor, q: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """The symmetric CLIP/InfoNCE loss on unit-norm ``p``, ``q`` ``[N, d]`` (pairs on the diagonal)."""
    logits = p @ q.T / tau
    target = torch.arange(p.shape[0], device=p.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def cwcl_loss(p: torch.Tensor, q: torch.Tensor, tau: float | torch.Tensor, other: str = "cwcl",
              weights: torch.Tensor | None = None, power: float = 1.0) -> torch.Tensor:
    """Symmetric CWCL: U->V with weights from the frozen ``q``; V->U with the same weights or CLIP's.

    ``p``: trainable tower's unit-norm embeddings, ``q``: frozen tower's; ``weights`` overrides ``w`` (tests);
    ``power`` sharpens the weights (1 = the paper's).
    """
    if p.shape != q.shape or p.dim() != 2:
        raise LeanfmError(f"p and q must be [N, d] of the same shape; got {tuple(p.shape)} and {tuple(q.shape)}")
    if other not in LOSSES:
        raise LeanfmError(f"unknown other-direction loss '{other}'; accepted: {', '.join(LOSSES)}")
    if not power > 0:
        raise LeanfmError(f"weight power {power} is invalid; accepted: a number > 0 (1 = the paper's weights)")
    w = intra_modal_weights(q, power) if weights is None else weights
    logits = p @ q.T / tau
    forward = _weighted_nll(logits, w)
    if other == "cwcl":
        backward = _weighted_nll(logits.T, w)
    else:
        backward = nn.functional.cross_entropy(logits.T, torch.arange(p.shape[0], device=p.device))
    return (forward + backward) / 2


class ContrastiveLoss(nn.Module):
    """``kind`` = cwcl or clip with a learnable temperature (CLIP's logit scale, init τ = 0.07, τ >= 0.01)."""

    def __init__(self, kind: str = "cwcl", tau: float = 0.07, other: str = "cwcl", learn_tau: bool = True,
                 power: float = 1.0) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise LeanfmError(f"unknown loss '{kind}'; accepted: {', '.join(LOSSES)}")
        self.kind, self.other, self.power = kind, other, power
        self.log_scale = nn.Parameter(torch.tensor(1 / tau).log(), requires_grad=learn_tau)

    @property
    def tau(self) -> torch.Tensor:
        """Current temperature (scale capped at 100, as CLIP)."""
        return 1 / self.log_scale.clamp(max=torch.tensor(100.0).log()).exp()

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Loss over the global batch: rows of every rank are gathered first."""
        p = nn.functional.normalize(gather(p), dim=-1)
        q = nn.functional.normalize(gather(q), dim=-1)
        if self.kind == "clip":
            return clip_loss(p, q, self.tau)
        return cwcl_loss(p, q, self.tau, other=self.other, power=self.power)
