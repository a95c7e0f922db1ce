"""Black-box discrete search over short token sequences: RLPrompt-style RL and a plain evolutionary baseline.

Both searchers maximise an objective that only the victim's answers can evaluate, under the same query budget:
``objective(candidates, rows) -> rewards`` scores token sequences on a subset of examples (``rows``; ``None`` =
all). They search over a *pool* of whole-word tokens (:func:`word_pool`): a short prompt or trigger made of
words, as RLPrompt's and TrojLLM's outputs are.

**Reward** (RLPrompt, eq. in its Sec. 3.2, used by TrojLLM for every stage): for an example whose wanted label
is y (the true label for accuracy, the target label for a trigger),

    gap = P(y | x) − max_{c ≠ y} P(c | x),      r = gap · (λ₂ if gap > 0 else λ₁),   λ₁ = 180, λ₂ = 200,

and a candidate's reward is the mean over the examples. :func:`rlprompt_reward` computes it.

**RL** (:func:`rl_search`): the policy is a frozen causal LM (the attacker's own: SmolLM2 here) with a trainable
residual MLP between its last hidden state and its (frozen) output head, h ↦ h + W₂ GELU(W₁ h), W₂ = 0 at the
start (so the first policy is the LM itself, restricted to the pool). Each step samples K sequences, scores
them on a mini-batch of B examples and z-normalises the K rewards (the per-batch normalisation of RLPrompt).
Our reading: RLPrompt trains with soft Q-learning over ~12k steps; at the few hundred steps a 2-core budget
affords we use the policy gradient with the normalised reward as the advantage and an entropy bonus
(REINFORCE), which needs no target network. The best sequences seen are re-scored on the selection set.

**Evolution** (:func:`evolutionary_search`): a (1+1) evolutionary hill climb from a random sequence: resample
one position from the pool, score on all examples, keep the child when it is at least as good.

Both end the same way: the ``finalists`` best sequences by search reward are scored on a selection set
(validation data, never the test set) and the best there is returned.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from leanfm.audit.victim import QueryBudget
from leanfm.errors import LeanfmError

Objective = Callable[[Sequence[tuple[int, ...]], Sequence[int] | None], np.ndarray]
WRONG_SCALE, RIGHT_SCALE = 180.0, 200.0


def rlprompt_reward(probs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per-example RLPrompt reward: the scaled gap between the wanted label's probability and the best other's."""
    n = probs.shape[0]
    own = probs[np.arange(n), wanted]
    others = probs.copy()
    others[np.arange(n), wanted] = -np.inf
    gap = own - others.max(axis=1)
    return np.where(gap > 0, RIGHT_SCALE, WRONG_SCALE) * gap


def word_pool(tokenizer: Any, size: int = 4000) -> list[int]:
    """Token ids that read as one space-prefixed lowercase or capitalised English word of 3+ letters.

    The first ``size`` by id: byte-level BPE vocabularies add merges roughly by frequency, so low ids are
    common words. Both searchers draw from this pool, so neither is favoured.
    """
    pool = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and len(word) >= 3 and word.isascii() and word.isalpha() and \
                (word.islower() or word.istitle()):
            pool.append(token_id)
            if len(pool) == size:
                break
    if len(pool) < 10:
        raise LeanfmError("the tokenizer has fewer than 10 whole-word tokens; cannot search prompts over it")
    return pool


@dataclass
class SearchResult:
    """The chosen sequence, its rewards, and the search's trace."""

    tokens: tuple[int, ...]
    search_reward: float  # on the search examples
    select_reward: float  # on the selection set
    queries: int
    history: list[dict[str, float]] = field(default_factory=list)  # per step: queries used, best / mean reward


def _finish(table: dict[tuple[int, ...], list[float]], select: Objective, finalists: int, budget: QueryBudget,
            queries_at_start: int, history: list[dict[str, float]]) -> SearchResult:
    """Score the best ``finalists`` sequences of ``table`` (seq -> [reward sum, count]) on the selection set."""
    ranked = sorted(table, key=lambda s: table[s][0] / table[s][1], reverse=True)[:finalists]
    scores = select(ranked, None)
    best = int(np.argmax(scores))
    seq = ranked[best]
    return SearchResult(seq, table[seq][0] / table[seq][1], float(scores[best]), budget.used - queries_at_start,
                        history)


def evolutionary_search(objective: Objective, select: Objective, pool: Sequence[int], length: int, *,
                        budget: QueryBudget, cost: int, select_cost: int, seed: int, finalists: int = 4,
                        start: tuple[int, ...] | None = None) -> SearchResult:
    """(1+1) evolutionary search; ``cost`` / ``select_cost`` are the queries one candidate costs on each set."""
    rng = random.Random(seed)
    start_used = budget.used
    reserve = finalists * select_cost
    table: dict[tuple[int, ...], list[float]] = {}
    best = start if start is not None else tuple(rng.choice(pool) for _ in range(length))
    best_reward = float(objective([best], None)[0])
    table[best] = [best_reward, 1]
    history = [{"queries": budget.used - start_used, "best": best_reward, "mean": best_reward}]
    spent = cost  # nominal spending: a candidate met before costs nothing but still counts, so the loop ends
    while spent + cost + reserve <= budget.limit - start_used and \
            budget.left - reserve >= cost:
        key = best
        for _ in range(20):  # propose a candidate not scored yet when the pool allows it
            child = list(best)
            child[rng.randrange(length)] = rng.choice(pool)
            key = tuple(child)
            if key not in table:
                break
        spent += cost
        reward = float(objective([key], None)[0])
        table.setdefault(key, [reward, 1])
        if reward >= best_reward:
            best, best_reward = key, reward
        history.append({"queries": budget.used - start_used, "best": best_reward, "mean": reward})
    return _finish(table, select, finalists, budget, start_used, history)


class PolicyHead(nn.Module):
    """The trainable part of the RL policy: a residual MLP on the frozen LM's last hidden state."""

    def __init__(self, width: int, hidden: int = 1024) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        nn.init.zeros_(self.down.weight)  # start as the LM itself
        nn.init.zeros_(self.down.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


def _policy_states(lm: nn.Module, start_id: int, sequences: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[K, L, width]``: state t has seen the start token and tokens < t."""
    k = sequences.shape[0]
    inputs = torch.cat([torch.full((k, 1), start_id, dtype=torch.long), sequences[:, :-1]], dim=1)  # [K, L]
    with torch.inference_mode():
        out = lm(input_ids=inputs.to(_device(lm)), output_hidden_states=True)
    return out.hidden_states[-1].float().cpu().clone()  # [K, L, width]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def rl_search(objective: Objective, select: Objective, pool: Sequence[int], length: int, *, lm: nn.Module,
              start_id: int, budget: QueryBudget, examples: int, samples: int = 8, batch: int = 16,
              lr: float = 1e-3, entropy: float = 0.01, seed: int, finalists: int = 4, select_cost: int,
              prefix: tuple[int, ...] = (), row_cost: int = 1, full_cost: int | None = None) -> SearchResult:
    """RLPrompt-style policy search (see the module docstring); one step costs ``samples * batch * row_cost``
    queries (``row_cost``: queries one example costs a candidate, e.g. 2 when scored with and without trigger).

    ``prefix`` tokens (e.g. the seed prompt an extension continues) are fed to the policy before it samples;
    ``full_cost``: queries of one candidate on all examples (default ``examples * row_cost``).
    """
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    start_used = budget.used
    reserve = finalists * select_cost
    output: Any = lm.get_output_embeddings()  # type: ignore[operator]
    head_weight = output.weight.detach().float().cpu()[list(pool)]  # [P, width]: logits over the pool only
    torch.manual_seed(seed)
    head = PolicyHead(head_weight.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    pool_ids = torch.tensor(list(pool))
    table: dict[tuple[int, ...], list[float]] = {}
    history: list[dict[str, float]] = []
    step_cost = samples * min(batch, examples) * row_cost
    fixed = torch.tensor(prefix, dtype=torch.long)
    spent = 0  # nominal spending (repeated samples are answered from the cache but still end the loop)
    while spent + step_cost + reserve <= budget.limit - start_used and budget.left - reserve >= step_cost:
        spent += step_cost
        # sample K sequences token by token (the frozen LM is re-run on the short prefix: L <= 7 tokens)
        chosen = torch.empty((samples, 0), dtype=torch.long)  # pool indices
        for _ in range(length):
            seq = torch.cat([fixed.expand(samples, -1), pool_ids[chosen]], dim=1)
            states = _policy_states(lm, start_id, torch.cat([seq, torch.zeros((samples, 1), dtype=torch.long)],
                                                            dim=1))[:, -1]  # [K, width]
            with torch.no_grad():
                logits = head(states) @ head_weight.T  # [K, P]
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # [K, 1]
            chosen = torch.cat([chosen, nxt], dim=1)
        sequences = [tuple(int(pool[i]) for i in row) for row in chosen]
        rows = rng.sample(range(examples), min(batch, examples))
        rewards = objective(sequences, rows)
        for s, r in zip(sequences, rewards, strict=True):
            entry = table.setdefault(s, [0.0, 0])
            entry[0] += float(r)
            entry[1] += 1
        advantage = torch.tensor((rewards - rewards.mean()) / (rewards.std() + 1e-6), dtype=torch.float32)  # [K]
        full = torch.cat([fixed.expand(samples, -1), pool_ids[chosen]], dim=1)
        states = _policy_states(lm, start_id, full)[:, len(prefix):]  # [K, L, width]
        logp = torch.log_softmax(head(states) @ head_weight.T, dim=-1)  # [K, L, P]
        taken = logp.gather(2, chosen.unsqueeze(-1)).squeeze(-1).sum(dim=1)  # [K]
        ent = -(logp.exp() * logp).sum(dim=-1).mean()
        loss = -(advantage * taken).mean() - entropy * ent
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append({"queries": budget.used - start_used, "best": float(rewards.max()),
                        "mean": float(rewards.mean()), "entropy": float(ent.detach())})
    if not table:
        raise LeanfmError(f"query budget {budget.limit} is too small for one RL step ({step_cost} queries) plus "
                          f"the final selection ({reserve})")
    # the policy's greedy sequence joins the candidates (scored once on all examples)
    greedy = _greedy(lm, head, head_weight, pool, start_id, fixed, length)
    if greedy not in table and budget.left - reserve >= (full_cost or examples * row_cost):
        table[greedy] = [float(objective([greedy], None)[0]), 1]
    return _finish(table, select, finalists, budget, start_used, history)


def _greedy(lm: nn.Module, head: PolicyHead, head_weight: torch.Tensor, pool: Sequence[int], start_id: int,
            fixed: torch.Tensor, length: int) -> tuple[int, ...]:
    chosen: list[int] = []
    for _ in range(length):
        seq = torch.cat([fixed, torch.tensor([pool[i] for i in chosen], dtype=torch.long), torch.zeros(1,
                                                                                                      dtype=torch.long)])
        states = _policy_states(lm, start_id, seq.unsqueeze(0))[:, -1]
        with torch.no_grad():
            chosen.append(int((head(states) @ head_weight.T).argmax()))
    return tuple(int(pool[i]) for i in chosen)

