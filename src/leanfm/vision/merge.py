"""Token reduction by bipartite soft matching (ToMe) with ToFu's prune and MLERP merge.

Pure tensor functions. :func:`bipartite_soft_matching` computes the matching once from a similarity metric and
returns a :class:`Matching`; the same matching then reduces tokens and their sizes, so everything that travels
with the tokens stays aligned (ToMe's closure idea, as a small dataclass).

Modes of :func:`reduce_tokens`:
- ``"average"`` — ToMe: a merged token is the size-weighted mean of its group.
- ``"mlerp"`` — ToFu: the size-weighted mean ``m`` rescaled to the largest norm in the group,
  ``m / ||m|| * max_i ||x_i||``, which keeps the norm distribution the next layers expect.
- ``"prune"`` — ToFu's early layers: matched tokens of set A are dropped, their partners are unchanged.
- ``"prune-transfer"`` — ours, an ablation: as ``prune``, but each dropped token's size is added to the partner
  it matched (its nearest kept token), so proportional attention keeps the mass plain pruning loses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("average", "mlerp", "prune", "prune-transfer")


@dataclass(frozen=True)
class Matching:
    """Result of matching tokens ``[B, N, C]``: A = even positions, B = odd positions.

    ``unmatched`` ``[B, Na - r, 1]`` indexes A tokens that stay; ``src`` ``[B, r, 1]`` indexes the A tokens
    that go away and ``dst`` ``[B, r, 1]`` the B token each of them is merged into.
    """

    unmatched: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor

    @property
    def r(self) -> int:
        """Number of tokens removed."""
        return self.src.shape[1]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = True) -> Matching:
    """Match the ``r`` most similar A->B token pairs by cosine similarity of ``metric`` ``[B, N, C]``.

    ``protect_first`` keeps token 0 (the class token) out of every merge; it stays first.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    a, b = metric[:, ::2], metric[:, 1::2]  # [B, Na, C], [B, Nb, C]
    scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
    if protect_first:
        scores[:, 0, :] = -torch.inf
    best, best_dst = scores.max(dim=-1)  # [B, Na]
    order = best.argsort(dim=-1, descending=True)[..., None]  # [B, Na, 1]
    src, unmatched = order[:, :r], order[:, r:]
    if protect_first:
        unmatched = unmatched.sort(dim=1).values  # the class token (A index 0) stays first
    return Matching(unmatched=unmatched, src=src, dst=best_dst[..., None].gather(1, src))


def reduce_tokens(
    x: torch.Tensor, size: torch.Tensor, matching: Matching, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``matching`` to tokens ``x`` ``[B, N, C]`` and sizes ``[B, N, 1]``; returns both reduced by ``r``.

    Output order: unmatched A tokens (class token first), then all B tokens.
    """
    if mode not in MODES:
        raise ValueError(f"unknown merge mode '{mode}'; accepted: {', '.join(MODES)}")
    channels = x.shape[-1]
    a_x, b_x = x[:, ::2], x[:, 1::2]
    a_s, b_s = size[:, ::2], size[:, 1::2]
    keep_x = a_x.gather(1, matching.unmatched.expand(-1, -1, channels))
    keep_s = a_s.gather(1, matching.unmatched)
    if mode == "prune":
        return torch.cat([keep_x, b_x], dim=1), torch.cat([keep_s, b_s], dim=1)
    src_s = a_s.gather(1, matching.src)  # [B, r, 1]
    if mode == "prune-transfer":
        return torch.cat([keep_x, b_x], dim=1), torch.cat([keep_s, b_s.scatter_add(1, matching.dst, src_s)], dim=1)
    src_x = a_x.gather(1, matching.src.expand(-1, -1, channels))  # [B, r, C]
    dst_index = matching.dst.expand(-1, -1, channels)
    weighted = (b_x * b_s).scatter_add(1, dst_index, src_x * src_s)  # size-weighted sums per B token
    merged_s = b_s.scatter_add(1, matching.dst, src_s)
    merged = weighted / merged_s
    if mode == "mlerp":
        max_norm = b_x.norm(dim=-1, keepdim=True).scatter_reduce(
            1, matching.dst, src_x.norm(dim=-1, keepdim=True), reduce="amax", include_self=True
        )
        merged = merged / merged.norm(dim=-1, keepdim=True).clamp_min(1e-6) * max_norm
    return torch.cat([keep_x, merged.to(x.dtype)], dim=1), torch.cat([keep_s, merged_s], dim=1)
