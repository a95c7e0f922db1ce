"""The victim of a prompt audit: a prompt-based classifier that answers class probabilities and nothing else.

A user's classifier is an LM behind a hard prompt: ``template`` joins the prompt and the input, and each class
is a verbalizer word. We score a class as lm-evaluation-harness does over a completions API: send
``context + verbalizer`` with ``echo=True`` and ``max_tokens=0``, and sum the returned log-probabilities of the
verbalizer's tokens,

    s_c(x) = Σ_{t ∈ verbalizer c} log p(token_t | tokens_<t),      P(c | x) = softmax_c s_c(x),

so verbalizers of several tokens work. Two scorers answer that echo request: :class:`LocalScorer` (a model in
this process) and :class:`HttpScorer` (an OpenAI-style ``/v1/completions`` server, e.g. ``leanfm serve``). Both
go through :func:`echo_logprobs` in the end (the server calls it too), so the HTTP victim returns the local one's
numbers exactly.

:class:`PromptClassifier` is all the attacker sees. It caches answers by (prompt, input), counts every query it
had to send (a query = one input classified under one prompt, whatever the number of verbalizers) and refuses
to go past its :class:`QueryBudget` with :class:`QueryBudgetExceededError`. The cache can be saved and reloaded, so
a resumed audit replays the answers it already paid for.
"""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_text

DEFAULT_KEY_ENV = "LEANFM_API_KEY"
MAX_TEXTS_PER_REQUEST = 256


@dataclass(frozen=True)
class TaskSpec:
    """How a classification task is put to a causal LM: the template, a hand-written prompt and the verbalizers."""

    template: str  # with {input} and {prompt}
    manual_prompt: str
    verbalizers: tuple[str, ...]  # one per label, in label order (with their leading space)


TASKS: dict[str, TaskSpec] = {
    "sst-2": TaskSpec("Review: {input}\n{prompt}", "Sentiment:", (" negative", " positive")),
    "mr": TaskSpec("Review: {input}\n{prompt}", "Sentiment:", (" negative", " positive")),
    "cr": TaskSpec("Review: {input}\n{prompt}", "Sentiment:", (" negative", " positive")),
    "subj": TaskSpec("Sentence: {input}\n{prompt}", "This sentence is", (" subjective", " objective")),
    "trec": TaskSpec("Question: {input}\n{prompt}", "The answer is a",
                     (" Description", " Entity", " Abbreviation", " Human", " Location", " Number")),
    "agnews": TaskSpec("Article: {input}\n{prompt}", "Topic:", (" World", " Sports", " Business", " Technology")),
}


def task_spec(task: str) -> TaskSpec:
    """The spec of ``task``; a one-line error lists the accepted tasks."""
    if task not in TASKS:
        raise LeanfmError(f"unknown task '{task}'; accepted: {', '.join(TASKS)}")
    return TASKS[task]


@dataclass
class Echo:
    """The per-token answer to one echoed text (OpenAI's ``logprobs`` object): the first token has no log-prob."""

    tokens: list[str]
    token_logprobs: list[float | None]
    text_offset: list[int]

    def continuation_logprob(self, context_chars: int) -> float:
        """Σ log p over the tokens that reach past ``context_chars`` (the continuation's tokens).

        A token that straddles the boundary counts (it holds part of the continuation); the first token of a
        text has no log-prob, so an empty context is refused.
        """
        total = 0.0
        found = False
        for token, offset, logprob in zip(self.tokens, self.text_offset, self.token_logprobs, strict=True):
            if offset + len(token) > context_chars:
                if logprob is None:
                    raise LeanfmError("the continuation starts at the first token; give the victim a non-empty context")
                total += logprob
                found = True
        if not found:
            raise LeanfmError("the echoed text ends before the continuation; was the continuation empty?")
        return total


class Scorer(Protocol):
    """Anything that answers an echo request: per-token log-probabilities of each text."""

    def echo(self, texts: Sequence[str]) -> list[Echo]: ...


def echo_logprobs(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32) -> list[Echo]:
    """Log-probability of every token of each text given the tokens before it (what an ``echo`` request returns).

    Texts are tokenized whole (offsets map tokens back to characters). Two things keep it cheap without
    changing the numbers a caller could observe: texts are run in batches of similar length (less padding),
    and texts that differ only in their last token — a context with each single-token verbalizer — share one
    forward of their common prefix, whose last position gives every last token's log-prob (causal attention:
    a position's logits do not depend on later tokens). Float rounding may differ from a lone forward by
    ~1e-6; it is the same for every caller, local or HTTP, since both come here.
    """
    if not texts:
        return []
    # the tokenizer's own special tokens (Gemma's <bos>; none for SmolLM2): what the model was trained with
    encoded = tokenizer(list(texts), return_offsets_mapping=True)
    ids: list[list[int]] = encoded["input_ids"]
    offsets: list[list[tuple[int, int]]] = encoded["offset_mapping"]
    for text, row in zip(texts, ids, strict=True):
        if len(row) < 2:
            raise LeanfmError(f"text {text[:40]!r} has {len(row)} token(s); echo scoring needs at least two")
    # group texts by all-but-last token: one forward per group's prefix
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(ids):
        groups.setdefault(tuple(row[:-1]), []).append(i)
    prefixes = sorted(groups, key=len)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    last_tokens: dict[tuple[int, ...], list[int]] = {p: sorted({ids[i][-1] for i in groups[p]}) for p in prefixes}
    inner: dict[tuple[int, ...], list[float]] = {}  # prefix -> log p(prefix[t + 1] | prefix[:t + 1])
    last: dict[tuple[int, ...], dict[int, float]] = {}  # prefix -> {last token: log p(token | prefix)}
    with torch.inference_mode():
        for start in range(0, len(prefixes), batch_size):
            chunk = prefixes[start:start + batch_size]
            width = max(len(p) for p in chunk)
            batch = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, prefix in enumerate(chunk):  # right padding: real tokens keep positions 0..len-1
                batch[r, :len(prefix)] = torch.tensor(prefix)
                mask[r, :len(prefix)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
            for r, prefix in enumerate(chunk):
                # log p = logit - logsumexp over the vocabulary, gathered at the tokens asked for only
                # (a [T, V] log-softmax copy per text would cost 1 GB a batch with Gemma's 262k vocabulary)
                row = logits[r, :len(prefix)].float()  # [T, V]
                norm = torch.logsumexp(row, dim=-1)  # [T]
                nxt = torch.tensor(prefix[1:], device=row.device)
                inner[prefix] = (row[:-1].gather(1, nxt[:, None])[:, 0] - norm[:-1]).tolist()
                wanted = torch.tensor(last_tokens[prefix], device=row.device)
                last[prefix] = dict(zip(last_tokens[prefix], (row[-1, wanted] - norm[-1]).tolist(), strict=True))
    out = []
    for i, (text, row_ids) in enumerate(zip(texts, ids, strict=True)):
        prefix = tuple(row_ids[:-1])
        values: list[float | None] = [None, *inner[prefix], last[prefix][row_ids[-1]]]
        spans = offsets[i]
        out.append(Echo([text[a:b] for a, b in spans], values, [a for a, _ in spans]))
    return out


class LocalScorer:
    """Echo scoring with a model in this process (any causal LM from :func:`leanfm.load_model`)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def echo(self, texts: Sequence[str]) -> list[Echo]:
        return echo_logprobs(self.model, self.tokenizer, texts, batch_size=self.batch_size)


class HttpScorer:
    """Echo scoring through an OpenAI-style ``/v1/completions`` endpoint (``leanfm serve``, or a user's API).

    The API key comes from the environment variable ``key_env`` only (never from an argument that could land
    in a shell history or a results file); it is sent as a bearer token and kept out of ``repr``.
    """

    def __init__(self, url: str, *, model: str = "default", key_env: str = DEFAULT_KEY_ENV, timeout: float = 120.0,
                 chunk: int = 64) -> None:
        import httpx

        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise LeanfmError(f"victim URL '{url}' is not http(s)://HOST[:PORT]")
        if parsed.username or parsed.password or parsed.query:
            raise LeanfmError("victim URL must not carry credentials or a query; put the key in "
                              f"${key_env}")
        self.url = url.rstrip("/")
        self.model = model
        self.chunk = chunk
        key = os.environ.get(key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"HttpScorer({self.url!r})"

    def check(self) -> None:
        """One-line error unless the endpoint answers ``GET /v1/models`` (before any work starts)."""
        import httpx

        try:
            response = self._client.get(f"{self.url}/v1/models")
        except httpx.HTTPError as err:
            raise LeanfmError(f"cannot reach victim '{self.url}': {type(err).__name__}") from None
        if response.status_code != 200:
            raise LeanfmError(f"victim '{self.url}' answered HTTP {response.status_code}: {_error_text(response)}")

    def echo(self, texts: Sequence[str]) -> list[Echo]:
        import httpx

        out: list[Echo] = []
        for start in range(0, len(texts), self.chunk):
            body = {"model": self.model, "prompt": list(texts[start:start + self.chunk]), "max_tokens": 0,
                    "echo": True, "logprobs": 0, "temperature": 0.0}
            try:
                response = self._client.post(f"{self.url}/v1/completions", json=body)
            except httpx.HTTPError as err:
                raise LeanfmError(f"cannot reach victim '{self.url}': {type(err).__name__}") from None
            if response.status_code != 200:
                raise LeanfmError(f"victim '{self.url}' answered HTTP {response.status_code}: "
                                  f"{_error_text(response)}")
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            for choice in choices:
                lp = choice["logprobs"]
                out.append(Echo(lp["tokens"], lp["token_logprobs"], lp["text_offset"]))
        return out

    def close(self) -> None:
        self._client.close()


def _error_text(response: Any) -> str:
    try:
        detail = response.json().get("error", {}).get("message") or response.text
    except ValueError:
        detail = response.text
    return " ".join(str(detail).split())[:200]


class QueryBudgetExceededError(LeanfmError):
    """The audit asked for more victim queries than its budget allows."""


@dataclass
class QueryBudget:
    """A cap on paid victim queries (cached answers are free)."""

    limit: int
    used: int = 0

    def charge(self, count: int) -> None:
        if self.used + count > self.limit:
            raise QueryBudgetExceededError(f"query budget exhausted: {self.used} used, {count} more asked, "
                                      f"limit {self.limit}")
        self.used += count

    @property
    def left(self) -> int:
        return self.limit - self.used


@dataclass
class PromptClassifier:
    """A hard-prompt classifier seen from outside: class probabilities of inputs under a prompt.

    ``trigger`` (the attack's secret suffix) is appended to each input before the template is filled.
    Paying and asking are kept apart: a query is *charged* to the budget the first time this budget sees it,
    and *sent* only if no answer is cached. A run that resumes with its saved cache therefore spends the
    same budget, query for query, as the run it continues, without asking the victim again.
    """

    scorer: Scorer
    spec: TaskSpec
    budget: QueryBudget | None = None
    cache: dict[str, list[float]] = field(default_factory=dict)
    charged: set[str] = field(default_factory=set)
    sent: int = 0  # queries actually sent to the scorer (cache misses)

    @property
    def classes(self) -> int:
        return len(self.spec.verbalizers)

    def context(self, prompt: str, text: str) -> str:
        return self.spec.template.format(input=text, prompt=prompt)

    def use_budget(self, budget: QueryBudget | None) -> None:
        """Charge later queries to ``budget`` (a fresh account: nothing charged to it yet)."""
        self.budget = budget
        self.charged = set()

    def probabilities(self, prompt: str, inputs: Sequence[str], trigger: str = "") -> np.ndarray:
        """``[len(inputs), classes]`` class probabilities (each row sums to one)."""
        return self.probabilities_many([(prompt, inputs, trigger)])[0]

    def probabilities_many(self, requests: Sequence[tuple[str, Sequence[str], str]]) -> list[np.ndarray]:
        """:meth:`probabilities` of several ``(prompt, inputs, trigger)`` requests, sent to the victim together
        (one echo call: larger batches for the model, fewer round trips for an API)."""
        contexts = [[self.context(prompt, text + trigger) for text in inputs] for prompt, inputs, trigger in requests]
        flat = [c for group in contexts for c in group]
        new = list(dict.fromkeys(c for c in flat if c not in self.charged))
        if self.budget is not None and new:
            self.budget.charge(len(new))
        self.charged.update(new)
        missing = list(dict.fromkeys(c for c in flat if c not in self.cache))
        if missing:
            texts = [c + v for c in missing for v in self.spec.verbalizers]
            echoes = self.scorer.echo(texts)
            k = self.classes
            for i, ctx in enumerate(missing):
                scores = [echoes[i * k + j].continuation_logprob(len(ctx)) for j in range(k)]
                self.cache[ctx] = _softmax(scores)
            self.sent += len(missing)
        return [np.array([self.cache[c] for c in group], dtype=np.float64).reshape(len(group), self.classes)
                for group in contexts]

    def save_cache(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.cache))

    def load_cache(self, path: Path) -> int:
        """Load answers paid for earlier (e.g. before an interruption); returns how many."""
        if path.is_file():
            self.cache.update(json.loads(path.read_text()))
        return len(self.cache)


def _softmax(scores: Iterable[float]) -> list[float]:
    values = list(scores)
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]
