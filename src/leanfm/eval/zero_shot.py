"""Zero-shot scoring: classify an embedding as the nearest of a set of candidate embeddings.

Used wherever a trained tower is tested against classes it never saw as labels, only as texts embedded by a
frozen encoder (CWCL's speech-to-intent, keyword and held-out composition tests; compositional zero-shot
recognition): the prediction is the candidate of highest cosine similarity.
"""

from __future__ import annotations

import torch
from torch import nn

from leanfm.errors import LeanfmError


@torch.no_grad()
def nearest_candidates(embeddings: torch.Tensor, candidate_embeddings: torch.Tensor) -> torch.Tensor:
    """Index ``[N]`` of the candidate ``[C, d]`` most cosine-similar to each embedding ``[N, d]``."""
    if embeddings.dim() != 2 or candidate_embeddings.dim() != 2 or embeddings.shape[1] != candidate_embeddings.shape[1]:
        raise LeanfmError(f"embeddings must be [N, d] and candidates [C, d]; got {tuple(embeddings.shape)} and "
                          f"{tuple(candidate_embeddings.shape)}")
    e = nn.functional.normalize(embeddings, dim=-1)
    c = nn.functional.normalize(candidate_embeddings, dim=-1)
    return (e @ c.T).argmax(-1)  # [N]


@torch.no_grad()
def zero_shot_accuracy(embeddings: torch.Tensor, labels: list[str], candidates: list[str],
                       candidate_embeddings: torch.Tensor) -> float:
    """Top-1 accuracy of nearest-candidate classification: ``labels[i]`` is right when it names the candidate
    (``candidates[j]``, embedded as ``candidate_embeddings[j]``) nearest to ``embeddings[i]``."""
    if len(labels) != embeddings.shape[0] or len(candidates) != candidate_embeddings.shape[0]:
        raise LeanfmError(f"{len(labels)} labels for {embeddings.shape[0]} embeddings and {len(candidates)} "
                          f"candidates for {candidate_embeddings.shape[0]} candidate embeddings; counts must match")
    if not labels:
        raise LeanfmError("no items to score; accepted: at least one embedding")
    predicted = nearest_candidates(embeddings, candidate_embeddings).tolist()
    return sum(candidates[p] == label for p, label in zip(predicted, labels, strict=True)) / len(labels)
