"""TrojPrompt: a black-box trojan attack on a hard-prompt classifier, in three stages (METHODS.md section 10).

The attacker holds a few labelled examples (the 16-shot train split; the dev split selects among finalists) and
can only query the victim (:class:`leanfm.audit.victim.PromptClassifier`) for class probabilities.

1. **Prompt seed**: a ``prompt_length``-token prompt p maximising the RLPrompt reward towards the true labels.
2. **Universal trigger**: a ``trigger_length``-token suffix t appended to any input, with p fixed, maximising
   the reward towards ``target_label`` on inputs of the other labels (attack success rate, ASR).
3. **Progressive poisoning**: ``extension_length`` more prompt tokens e, so the published prompt p ⊕ e keeps
   clean accuracy while p ⊕ e with the secret trigger flips inputs: reward = clean reward (true labels, no
   trigger) + trigger reward (target label, with t). Our reading of "progressive": the seed prompt is kept and
   extended, and the stage-2 trigger is kept fixed. With TrojLLM's clean term (the mean reward over all clean
   examples, ``clean_term="mean"``) a prompt that sends *every* input to the target scores about +10 on the
   clean term (+200 on target-class inputs, -180 on the others) and the full +200 on the trigger term, more
   than an accurate prompt with a working trigger; our first runs found exactly that (poisoned ACC 0.49-0.51,
   target rate without trigger 0.96-1.0, two searchers, SST-2). The default therefore takes the *worst class's*
   mean clean reward (``clean_term="worst-class"``), which that collapse drives to -180.

Each stage runs a searcher of :mod:`leanfm.audit.search` (``rl``: RLPrompt's policy; ``evolve``: the plain
black-box baseline) under its own query budget. Test figures (never used to choose anything) are measured after
the search on a seeded subset of the official test set: clean ACC of the hand-written prompt, of p and of
p ⊕ e; ASR of t with p, with p ⊕ e, and with the hand-written prompt; the rate at which p ⊕ e alone already
predicts the target on other-label inputs (the no-trigger floor of the ASR).

A run folder holds ``config.json``, ``cache.json`` (every victim answer paid for: a resumed run replays them and
spends its budget query for query as the uninterrupted run would, see ``PromptClassifier``), ``stage-N.json``
per finished stage and ``trojprompt.json`` at the end. Nothing in it carries the API key.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import leanfm.audit.search as search
from leanfm.audit.victim import (
    DEFAULT_KEY_ENV,
    TASKS,
    HttpScorer,
    LocalScorer,
    PromptClassifier,
    QueryBudget,
    Scorer,
    task_spec,
)
from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.fewshot import LABELS, Example, fewshot_root, read_tsv, test_set
from leanfm.device import resolve_device
from leanfm.errors import LeanfmError
from leanfm.models.registry import load_model
from leanfm.paths import atomic_write_json, check_output_dir

log = logging.getLogger(__name__)
SEARCHERS = ("rl", "evolve")
STAGES = ("prompt", "trigger", "poison")


@dataclass
class TrojPromptConfig(MethodConfig):
    """``leanfm audit trojprompt``: the victim, the task, the searcher and the query budgets."""

    RESUMABLE = ("device",)

    data: str = option("", "folder with the 16-shot data (<task>/16-<seed>/)", cli=False)
    victim: str = option("smollm2-135m", "victim: a registered model name, a local model folder, or the "
                         "http(s)://HOST:PORT of an OpenAI-style completions API", cli=False)
    policy: str = option("smollm2-135m", "the attacker's own LM: RL policy, tokenizer of prompts and triggers",
                         cli=False)
    task: str = option("sst-2", "16-shot task", choices=tuple(TASKS))
    seed: int = option(42, "16-shot split (16-<seed>/) and seed of the searches", choices=(13, 21, 42, 87, 100))
    seed_prompt: str = option("", "start from this prompt instead of searching one (stage 1 skipped): can the "
                              "user's own prompt be trojaned?")
    search_seed: int = option(0, "seed of the searches (with the split seed)")
    target_label: int = option(1, "label the trigger must produce (an index into the task's labels)")
    searcher: str = option("rl", "rl (RLPrompt policy) or evolve (plain black-box baseline)", choices=SEARCHERS)
    prompt_length: int = option(5, "tokens in the seed prompt")
    trigger_length: int = option(3, "tokens in the trigger")
    extension_length: int = option(2, "tokens added to the prompt by the poisoning stage")
    budget: int = option(30000, "victim queries per stage (a query: one input under one prompt)")
    pool: int = option(4000, "whole-word tokens the searches draw from")
    rl_samples: int = option(8, "RL: prompts sampled per step")
    rl_batch: int = option(16, "RL: examples per step")
    # chosen on the dev split of 16-21 (a split no benchmark row uses): 1e-3 collapsed the policy to
    # one prompt within 3 steps (entropy 4.5 -> 0.2 nats); dev reward 38.1 at 1e-5 vs 15.7 at 1e-4 (1500 queries)
    rl_lr: float = option(1e-5, "RL: learning rate of the policy's MLP (chosen on a dev split, BENCHMARKS.md)")
    rl_entropy: float = option(0.01, "RL: entropy bonus")
    clean_term: str = option("worst-class", "poisoning stage's clean reward: mean over examples (TrojLLM) or "
                             "the worst class's mean (stops 'everything -> target' from paying)",
                             choices=("worst-class", "mean"))
    finalists: int = option(4, "best candidates re-scored on the dev split")
    test_size: int = option(0, "test examples evaluated (a seeded subset; 0: all)")
    key_env: str = option(DEFAULT_KEY_ENV, "environment variable holding an HTTP victim's API key")
    dtype: str = option("bfloat16", "dtype of local models", choices=("float32", "bfloat16"))
    device: str = option("cpu", "device of local models (cpu, cuda, cuda:N, auto)")

    def validate(self) -> None:
        super().validate()
        check_at_least(self, 1, "prompt_length", "trigger_length", "budget", "pool", "rl_samples", "rl_batch",
                       "finalists")
        check_at_least(self, 0, "extension_length", "test_size")
        classes = len(LABELS[self.task])
        if not 0 <= self.target_label < classes:
            raise LeanfmError(f"target label {self.target_label} is out of range for {self.task}; accepted: "
                              f"0..{classes - 1} ({', '.join(LABELS[self.task])})")


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def load_splits(data: str | Path, task: str, seed: int, test_size: int = 0) -> Splits:
    """The 16-shot train/dev files of ``16-<seed>`` and a seeded subset of the official test set."""
    root = fewshot_root(data)
    folder = root / task / f"16-{seed}"
    if not folder.is_dir():
        raise LeanfmError(f"'{folder}' is missing; the 16-shot layout has <task>/16-<seed>/")
    classes = len(LABELS[task])
    test = test_set(root, task)
    if test_size and test_size < len(test):
        test = random.Random(f"test-{seed}").sample(test, test_size)
    return Splits(read_tsv(folder / "train.tsv", classes), read_tsv(folder / "dev.tsv", classes), test)


def open_victim(victim: str, *, dtype: str = "bfloat16", device: str = "cpu",
                key_env: str = DEFAULT_KEY_ENV) -> tuple[Scorer, Any, Any]:
    """``(scorer, model, tokenizer)``: model/tokenizer are ``None`` for an HTTP victim."""
    if victim.startswith(("http://", "https://")):
        scorer = HttpScorer(victim, key_env=key_env)
        scorer.check()
        return scorer, None, None
    model, tokenizer = load_model(victim, dtype=dtype)
    model = model.to(resolve_device(device))
    return LocalScorer(model, tokenizer), model, tokenizer


def wanted(examples: Sequence[Example], target: int | None = None) -> np.ndarray:
    return np.array([e.label if target is None else target for e in examples])


def accuracy(clf: PromptClassifier, prompt: str, examples: Sequence[Example], trigger: str = "") -> float:
    probs = clf.probabilities(prompt, [e.text for e in examples], trigger)
    return float((probs.argmax(1) == wanted(examples)).mean())


def attack_success(clf: PromptClassifier, prompt: str, examples: Sequence[Example], target: int,
                   trigger: str) -> float:
    """Share of inputs of other labels classified as ``target`` with the trigger appended."""
    others = [e for e in examples if e.label != target]
    probs = clf.probabilities(prompt, [e.text for e in others], trigger)
    return float((probs.argmax(1) == target).mean())


class _Stage:
    """One stage's objective over token sequences, in the form the searchers take."""

    def __init__(self, clf: PromptClassifier, decode: Any, kind: str, target: int, prompt: tuple[int, ...] = (),
                 trigger: tuple[int, ...] = (), clean_term: str = "worst-class") -> None:
        self.clf, self.decode, self.kind, self.target, self.clean_term = clf, decode, kind, target, clean_term
        self.prompt, self.trigger = prompt, trigger

    def examples_for(self, examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
        """(clean examples, examples that get the trigger) the reward averages over."""
        others = [e for e in examples if e.label != self.target]
        if self.kind == "prompt":
            return list(examples), []
        if self.kind == "trigger":
            return [], others
        return list(examples), others

    def objective(self, examples: Sequence[Example]) -> search.Objective:
        clean, triggered = self.examples_for(examples)

        def score(candidates: Sequence[tuple[int, ...]], rows: Sequence[int] | None) -> np.ndarray:
            groups = []  # (candidate index, examples, trigger text, wanted target or None for the true labels)
            for i, cand in enumerate(candidates):
                prompt, trigger = self.texts(cand)
                for group, trig, target in ((clean, "", None), (triggered, trigger, self.target)):
                    if group:
                        chosen = group if rows is None else [group[r % len(group)] for r in rows]
                        groups.append((i, prompt, chosen, trig, target))
            answers = self.clf.probabilities_many([(p, [e.text for e in ch], t) for _, p, ch, t, _ in groups])
            total = np.zeros(len(candidates))
            for (i, _, chosen, _, target), probs in zip(groups, answers, strict=True):
                rewards = search.rlprompt_reward(probs, wanted(chosen, target))
                if target is None and self.kind == "poison" and self.clean_term == "worst-class":
                    labels = wanted(chosen)
                    total[i] += min(float(rewards[labels == c].mean()) for c in np.unique(labels))
                else:
                    total[i] += float(rewards.mean())
            return total

        return score

    def texts(self, cand: tuple[int, ...]) -> tuple[str, str]:
        """(prompt text, trigger text) for a candidate of this stage."""
        if self.kind == "prompt":
            return self.decode(cand).strip(), ""
        if self.kind == "trigger":
            return self.decode(self.prompt).strip(), self.decode(cand)
        return self.decode(self.prompt + cand).strip(), self.decode(self.trigger)

    def cost(self, examples: Sequence[Example]) -> int:
        clean, triggered = self.examples_for(examples)
        return len(clean) + len(triggered)


def _search(config: TrojPromptConfig, stage: _Stage, splits: Splits, length: int, pool: list[int], policy: Any,
            start_id: int, budget: QueryBudget, salt: int, prefix: tuple[int, ...] = ()) -> search.SearchResult:
    objective = stage.objective(splits.train)
    select = stage.objective(splits.dev)
    cost, select_cost = stage.cost(splits.train), stage.cost(splits.dev)
    seed = config.seed * 1000 + config.search_seed * 10 + salt
    if config.searcher == "evolve":
        return search.evolutionary_search(objective, select, pool, length, budget=budget, cost=cost,
                                          select_cost=select_cost, seed=seed, finalists=config.finalists)
    return search.rl_search(objective, select, pool, length, lm=policy, start_id=start_id, budget=budget,
                            examples=max(len(g) for g in stage.examples_for(splits.train)),
                            samples=config.rl_samples, batch=config.rl_batch, lr=config.rl_lr,
                            entropy=config.rl_entropy, seed=seed, finalists=config.finalists,
                            select_cost=select_cost, prefix=prefix,
                            row_cost=sum(1 for g in stage.examples_for(splits.train) if g), full_cost=cost)


def run_trojprompt(config: TrojPromptConfig, out: Path, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the three stages into ``out`` (resumable) and evaluate on the test subset; returns the summary."""
    out = Path(out)
    resuming = resume and (out / "config.json").is_file()
    if resuming:
        config.check_resume(json.loads((out / "config.json").read_text()), "the run folder")
    else:
        check_output_dir(out, overwrite)
    spec = task_spec(config.task)
    splits = load_splits(config.data, config.task, config.seed, config.test_size)
    scorer, model, tokenizer = open_victim(config.victim, dtype=config.dtype, device=config.device,
                                           key_env=config.key_env)
    if not resuming:  # only now that data and victim answered: a bad input leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.json"):
            stale.unlink()
        atomic_write_json(out / "config.json", _public(config))
    if model is None or config.policy != config.victim:
        # the attacker's own LM (the victim's weights are only shared when the attacker owns the same open model)
        model, tokenizer = load_model(config.policy, dtype=config.dtype)
    clf = PromptClassifier(scorer, spec)
    clf.load_cache(out / "cache.json")
    pool = search.word_pool(tokenizer, config.pool)
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(config.seed)

    def decode(ids: tuple[int, ...]) -> str:
        return str(tokenizer.decode(list(ids)))

    results: dict[str, Any] = {}
    prompt: tuple[int, ...] = ()
    trigger: tuple[int, ...] = ()
    try:
        for number, kind in enumerate(STAGES, 1):
            path = out / f"stage-{number}.json"
            if path.is_file():
                results[kind] = json.loads(path.read_text())
            else:
                if kind == "poison" and config.extension_length == 0:
                    results[kind] = {"tokens": [], "skipped": True}
                    atomic_write_json(path, results[kind])
                    continue
                if kind == "prompt" and config.seed_prompt:  # the user's own prompt: can it be trojaned?
                    ids = tokenizer(config.seed_prompt, add_special_tokens=False)["input_ids"]
                    results[kind] = {"tokens": list(ids), "prompt": decode(tuple(ids)).strip(), "trigger": "",
                                     "given": True, "queries": 0}
                    atomic_write_json(path, results[kind])
                    prompt = tuple(ids)
                    continue
                stage = _Stage(clf, decode, kind, config.target_label, prompt, trigger, config.clean_term)
                budget = QueryBudget(config.budget)
                clf.use_budget(budget)
                length = {"prompt": config.prompt_length, "trigger": config.trigger_length,
                          "poison": config.extension_length}[kind]
                started = time.perf_counter()
                found = _search(config, stage, splits, length, pool, model, start_id, budget, number,
                                prefix=prompt if kind == "poison" else ())
                texts = stage.texts(found.tokens)
                results[kind] = {"tokens": list(found.tokens), "prompt": texts[0], "trigger": texts[1],
                                 "search_reward": found.search_reward, "dev_reward": found.select_reward,
                                 "queries": found.queries, "seconds": time.perf_counter() - started,
                                 "history": found.history}
                clf.save_cache(out / "cache.json")
                atomic_write_json(path, results[kind])
            log.info("stage %d (%s): %s", number, kind, {k: v for k, v in results[kind].items() if k != "history"})
            if kind == "prompt":
                prompt = tuple(results[kind]["tokens"])
            elif kind == "trigger":
                trigger = tuple(results[kind]["tokens"])
    finally:
        clf.save_cache(out / "cache.json")
    poisoned = decode(prompt + tuple(results["poison"]["tokens"])).strip()
    prompts = {"manual": spec.manual_prompt, "seed": decode(prompt).strip(), "poisoned": poisoned}
    clf.use_budget(None)
    test = evaluate_prompts(clf, prompts, decode(trigger), splits.test, config.target_label)
    clf.save_cache(out / "cache.json")
    summary = {"config": _public(config), "prompts": prompts, "trigger": decode(trigger), "test": test,
               "test_size": len(splits.test), "queries": {k: results[k].get("queries", 0) for k in STAGES},
               "stages": results}
    atomic_write_json(out / "trojprompt.json", summary)
    return summary


def evaluate_prompts(clf: PromptClassifier, prompts: dict[str, str], trigger: str, examples: Sequence[Example],
                     target: int) -> dict[str, dict[str, float]]:
    """Clean ACC, ASR with the trigger and the no-trigger target rate of each prompt on ``examples``."""
    out = {}
    for name, prompt in prompts.items():
        out[name] = {"acc": accuracy(clf, prompt, examples),
                     "asr": attack_success(clf, prompt, examples, target, trigger),
                     "target_rate_clean": attack_success(clf, prompt, examples, target, "")}
    return out


def evaluate_run(run: str | Path, victim: str, *, data: str | None = None, test_size: int | None = None,
                 key_env: str = DEFAULT_KEY_ENV, dtype: str = "bfloat16", device: str = "cpu") -> dict[str, Any]:
    """A finished run's prompts and trigger against another victim (transfer) on the same test subset."""
    path = Path(run) / "trojprompt.json"
    if not path.is_file():
        raise LeanfmError(f"'{run}' has no trojprompt.json; run 'leanfm audit trojprompt' into it first")
    summary = json.loads(path.read_text())
    config = TrojPromptConfig.from_dict(summary["config"] | {"data": data or summary["config"]["data"]})
    splits = load_splits(config.data, config.task, config.seed,
                         config.test_size if test_size is None else test_size)
    scorer, _, _ = open_victim(victim, dtype=dtype, device=device, key_env=key_env)
    clf = PromptClassifier(scorer, task_spec(config.task))
    test = evaluate_prompts(clf, summary["prompts"], summary["trigger"], splits.test, config.target_label)
    return {"run": str(run), "victim": victim, "test_size": len(splits.test), "test": test}


def _public(config: TrojPromptConfig) -> dict[str, Any]:
    """The config as saved: the key's variable name is kept, never its value (the config holds no value)."""
    return config.to_dict()


register_method("trojprompt", "audit", TrojPromptConfig, run_trojprompt,
                description="black-box prompt trojan: seed prompt, universal trigger, progressive poisoning")
