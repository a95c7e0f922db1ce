"""Token n-gram statistics of a corpus as sparse tensors (DynaMo's co-occurrence masking, METHODS.md section 3).

Why sorted keys: the pair and triplet tables of a 49k-token vocabulary are astronomically large as dense
tensors but tiny in practice (one entry per distinct n-gram seen). Each n-gram ``(x_1..x_m)`` is packed into one
int64 key ``((x_1 V + x_2) V + ...)`` (``V^3 < 2^63`` for any vocabulary below 2 million), the keys are kept
sorted with their counts, and a lookup of thousands of candidate n-grams is one ``searchsorted``.
:meth:`NgramCounts.sparse` exposes a table as a ``torch.sparse_coo_tensor`` for users who want one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_bytes


def pack(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """One int64 key per n-gram: ``tokens[..., m] -> [...]``."""
    key = tokens[..., 0].long()
    for i in range(1, tokens.shape[-1]):
        key = key * vocab + tokens[..., i].long()
    return key


@dataclass
class NgramCounts:
    """Counts of every 1..``max_order``-gram of a token stream; ``keys[m]`` sorted, ``counts[m]`` aligned."""

    vocab: int
    total: int  # tokens counted
    keys: dict[int, torch.Tensor]
    counts: dict[int, torch.Tensor]

    @classmethod
    def build(cls, ids: torch.Tensor, vocab: int, max_order: int = 3) -> NgramCounts:
        """Count the n-grams of the 1-D token stream ``ids`` for n = 1..``max_order``."""
        if max_order < 1 or vocab ** max_order >= 2**63:
            raise LeanfmError(f"cannot pack {max_order}-grams of a {vocab}-token vocabulary into int64 keys")
        ids = ids.flatten().long()
        keys, counts = {}, {}
        for order in range(1, max_order + 1):
            if ids.numel() < order:
                keys[order], counts[order] = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
                continue
            grams = ids.unfold(0, order, 1)  # [N - order + 1, order]
            keys[order], counts[order] = torch.unique(pack(grams, vocab), sorted=True, return_counts=True)
        return cls(vocab=vocab, total=int(ids.numel()), keys=keys, counts=counts)

    @property
    def max_order(self) -> int:
        """The longest n-gram counted."""
        return max(self.keys)

    def count(self, tokens: torch.Tensor) -> torch.Tensor:
        """Occurrences of each n-gram ``tokens[..., m]`` (0 when never seen)."""
        order = tokens.shape[-1]
        if order not in self.keys:
            raise LeanfmError(f"{order}-grams were not counted (max order {self.max_order})")
        keys, counts = self.keys[order], self.counts[order]
        if keys.numel() == 0:
            return torch.zeros(tokens.shape[:-1], dtype=torch.long)
        query = pack(tokens, self.vocab).contiguous()
        index = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
        return torch.where(keys[index] == query, counts[index], torch.zeros_like(query))

    def probability(self, tokens: torch.Tensor) -> torch.Tensor:
        """Empirical ``p̂(x_1..x_m)`` = count / number of m-gram positions."""
        positions = max(1, self.total - tokens.shape[-1] + 1)
        return self.count(tokens).double() / positions

    def sparse(self, order: int) -> torch.Tensor:
        """The ``order``-gram counts as a sparse COO tensor of shape ``[V] * order``."""
        keys = self.keys[order]
        coords = []
        for _ in range(order):
            coords.append(keys % self.vocab)
            keys = keys // self.vocab
        return torch.sparse_coo_tensor(torch.stack(coords[::-1]), self.counts[order], [self.vocab] * order,
                                       check_invariants=True).coalesce()

    def save(self, path: Path) -> None:
        """Write a safetensors file atomically."""
        tensors = {f"keys.{m}": k.contiguous() for m, k in self.keys.items()}
        tensors |= {f"counts.{m}": c.contiguous() for m, c in self.counts.items()}
        tensors["meta"] = torch.tensor([self.vocab, self.total], dtype=torch.long)
        atomic_write_bytes(path, save(tensors))

    @classmethod
    def load(cls, path: Path) -> NgramCounts:
        """Read what :meth:`save` wrote."""
        tensors = load_file(str(path))
        vocab, total = tensors.pop("meta").tolist()
        orders = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("keys."))
        return cls(vocab=vocab, total=total, keys={m: tensors[f"keys.{m}"] for m in orders},
                   counts={m: tensors[f"counts.{m}"] for m in orders})
