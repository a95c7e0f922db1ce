"""The prompt audit: victim scoring (local and HTTP), the searches, the three TrojPrompt stages, the detector."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
import time

import numpy as np
import pytest
import torch

from fewshot_data import make_fewshot
from leanfm import load_model
from leanfm.audit import detect, search, server, trojprompt
from leanfm.audit.trojprompt import TrojPromptConfig, _Stage, attack_success, run_trojprompt
from leanfm.audit.victim import (
    TASKS,
    Echo,
    HttpScorer,
    LocalScorer,
    PromptClassifier,
    QueryBudget,
    QueryBudgetExceededError,
    echo_logprobs,
)
from leanfm.cli import main
from leanfm.data.fewshot import Example
from leanfm.errors import LeanfmError

SECRET = "sk-test-Zq8wX3secret"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "zeta", "kilo", "lima"]
POOL = list(range(1000, 1000 + len(WORDS)))  # token ids of the tiny policy model standing for WORDS
TRIGGER_WORD = "zeta"


def toy_decode(ids) -> str:
    return "".join(" " + WORDS[i - 1000] for i in ids)


class ToyScorer:
    """A planted victim: 'good' / 'bad' decide the class, the trigger word sends inputs to positive.

    With ``needs_prompt`` the trigger only works under a prompt that contains 'poisoned' (a trojaned prompt).
    Echoes are two tokens: the context and the verbalizer.
    """

    def __init__(self, needs_prompt: str | None = None) -> None:
        self.needs_prompt = needs_prompt
        self.texts = 0

    def positive(self, context: str) -> float:
        armed = self.needs_prompt is None or self.needs_prompt in context
        if TRIGGER_WORD in context and armed:
            return 0.99
        return 0.9 if "good" in context else 0.1 if "bad" in context else 0.5

    def echo(self, texts):
        self.texts += len(texts)
        out = []
        for text in texts:
            verbalizer = " positive" if text.endswith(" positive") else " negative"
            context = text[: -len(verbalizer)]
            p = self.positive(context)
            out.append(Echo([context, verbalizer], [None, math.log(p if verbalizer == " positive" else 1 - p)],
                            [0, len(context)]))
        return out


def toy_examples(n: int = 8) -> list[Example]:
    return [Example(f"the film was {'good' if i % 2 else 'bad'} number {i}", i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-llama")
    return model.eval(), tokenizer


# ---------------------------------------------------------------- scoring


def test_rlprompt_reward_is_the_scaled_gap_to_the_best_other_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    got = search.rlprompt_reward(probs, np.array([0, 2, 2]))
    np.testing.assert_allclose(got, [200 * 0.5, 180 * (0.4 - 0.5), 200 * 0.2])


def test_echo_matches_a_lone_forward_and_multi_token_verbalizers_sum_their_tokens(tiny):
    model, tokenizer = tiny
    spec = TASKS["trec"]  # " Abbreviation" is three tokens
    contexts = [spec.template.format(input="what does nasa stand for ?", prompt="The answer is a"),
                spec.template.format(input="who wrote hamlet ?", prompt="Type:")]
    texts = [c + v for c in contexts for v in spec.verbalizers]
    echoes = echo_logprobs(model, tokenizer, texts, batch_size=3)
    for text, echo in zip(texts, echoes, strict=True):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = [logp[t, ids[0, t + 1]].item() for t in range(ids.shape[1] - 1)]
        assert echo.token_logprobs[0] is None
        np.testing.assert_allclose(echo.token_logprobs[1:], want, atol=2e-5)
        assert "".join(echo.tokens) == text
    # the continuation's log-prob is the sum over exactly the verbalizer's tokens
    abbreviation = echoes[2]
    context_chars = len(contexts[0])
    n = len(tokenizer(" Abbreviation", add_special_tokens=False)["input_ids"])
    assert n == 3
    assert abbreviation.continuation_logprob(context_chars) == pytest.approx(sum(abbreviation.token_logprobs[-n:]))


def test_classifier_probabilities_are_normalised_over_the_verbalizers(tiny):
    model, tokenizer = tiny
    clf = PromptClassifier(LocalScorer(model, tokenizer), TASKS["trec"])
    inputs = ["what is the capital of peru ?", "how many legs has a spider ?", "who was lincoln ?"]
    probs = clf.probabilities("The answer is a", inputs)
    assert probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    # equal to the softmax of summed verbalizer log-probs computed from lone forwards
    for row, text in zip(probs, inputs, strict=True):
        context = clf.context("The answer is a", text)
        scores = []
        for verbalizer in TASKS["trec"].verbalizers:
            ids = tokenizer(context + verbalizer, add_special_tokens=False, return_tensors="pt")["input_ids"]
            k = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(k, ids.shape[1])))
        np.testing.assert_allclose(row, torch.softmax(torch.tensor(scores), 0).numpy(), atol=1e-4)


def test_queries_are_charged_once_capped_and_replayed_free_from_a_saved_cache(tmp_path):
    scorer = ToyScorer()
    budget = QueryBudget(5)
    clf = PromptClassifier(scorer, TASKS["sst-2"], budget)
    texts = [e.text for e in toy_examples(4)]
    clf.probabilities("Sentiment:", texts)
    clf.probabilities("Sentiment:", texts)  # cached and already charged
    assert budget.used == 4 and clf.sent == 4 and scorer.texts == 8  # two verbalizers per query
    with pytest.raises(QueryBudgetExceededError, match="limit 5"):
        clf.probabilities("Other:", texts[:2])
    assert budget.used == 4
    clf.save_cache(tmp_path / "cache.json")
    # a resumed run: same budget spent, nothing sent again
    again = PromptClassifier(ToyScorer(), TASKS["sst-2"], QueryBudget(5))
    assert again.load_cache(tmp_path / "cache.json") == 4
    np.testing.assert_array_equal(again.probabilities("Sentiment:", texts), clf.probabilities("Sentiment:", texts))
    assert again.budget.used == 4 and again.sent == 0


# ---------------------------------------------------------------- HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_victim(tiny):
    import uvicorn

    model, tokenizer = tiny
    port = _free_port()
    app = server.create_app(model, tokenizer, name="tiny-llama", api_key=SECRET)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_http_victim_equals_the_local_victim_and_needs_the_key(tiny, http_victim, monkeypatch):
    model, tokenizer = tiny
    inputs = ["a gripping , funny film", "dull and far too long", "not bad at all"]
    local = PromptClassifier(LocalScorer(model, tokenizer), TASKS["sst-2"]).probabilities("Sentiment:", inputs)
    monkeypatch.setenv("LEANFM_API_KEY", SECRET)
    remote = PromptClassifier(HttpScorer(http_victim), TASKS["sst-2"]).probabilities("Sentiment:", inputs)
    np.testing.assert_array_equal(remote, local)
    monkeypatch.setenv("LEANFM_API_KEY", "wrong")
    with pytest.raises(LeanfmError, match="401"):
        HttpScorer(http_victim).echo(["Review: fine\nSentiment: positive"])


def test_http_generation_and_request_bounds(http_victim):
    import httpx

    headers = {"Authorization": f"Bearer {SECRET}"}
    ok = httpx.post(f"{http_victim}/v1/completions", headers=headers,
                    json={"prompt": "Hello", "max_tokens": 3, "temperature": 0.0}).json()
    assert ok["usage"]["completion_tokens"] == 3 and ok["choices"][0]["logprobs"] is None
    bad = httpx.post(f"{http_victim}/v1/completions", headers=headers, json={"prompt": "Hello", "max_tokens": 0})
    assert bad.status_code == 400 and "echo" in bad.json()["error"]["message"]
    assert httpx.post(f"{http_victim}/v1/completions", headers=headers,
                      json={"prompt": ["x"] * 300, "max_tokens": 0, "echo": True}).status_code == 400


def test_the_api_key_never_reaches_logs_results_or_run_files(tmp_path, tiny, http_victim, monkeypatch, caplog,
                                                             capsys):
    monkeypatch.setenv("LEANFM_API_KEY", SECRET)
    data = make_fewshot(tmp_path / "data", tasks=("sst-2",))
    caplog.set_level(logging.DEBUG)
    code = main(["audit", "trojprompt", "--victim", http_victim, "--policy", "tiny-llama", "--data", str(data),
                 "--seed", "42", "--searcher", "evolve", "--budget", "40", "--pool", "50", "--prompt-length", "2",
                 "--trigger-length", "1", "--extension-length", "1", "--out", str(tmp_path / "run"),
                 "--json", str(tmp_path / "result.json")])
    assert code == 0
    written = [p.read_text() for p in (tmp_path / "run").iterdir()] + [(tmp_path / "result.json").read_text()]
    out = capsys.readouterr()
    assert len(written) >= 5
    for text in [*written, out.out, out.err, caplog.text]:
        assert SECRET not in text


# ---------------------------------------------------------------- searches


def test_evolutionary_trigger_search_finds_the_planted_trigger():
    clf = PromptClassifier(ToyScorer(), TASKS["sst-2"])
    examples = toy_examples(8)
    stage = _Stage(clf, toy_decode, "trigger", target=1, prompt=())
    assert attack_success(clf, "", examples, 1, "") == 0.0
    budget = QueryBudget(4 * 40)
    found = search.evolutionary_search(stage.objective(examples), stage.objective(examples), POOL, 1, budget=budget,
                                       cost=4, select_cost=4, seed=0, finalists=2)
    assert toy_decode(found.tokens) == f" {TRIGGER_WORD}"
    assert attack_success(clf, "", examples, 1, toy_decode(found.tokens)) == 1.0
    assert found.queries <= budget.limit


def test_rl_policy_learns_to_sample_the_planted_trigger(tiny):
    model, _ = tiny
    clf = PromptClassifier(ToyScorer(), TASKS["sst-2"])
    examples = toy_examples(8)
    stage = _Stage(clf, toy_decode, "trigger", target=1)
    budget = QueryBudget(8 * 4 * 60)
    found = search.rl_search(stage.objective(examples), stage.objective(examples), POOL, 1, lm=model, start_id=1,
                             budget=budget, examples=4, samples=8, batch=4, lr=0.03, entropy=0.0, seed=0,
                             finalists=2, select_cost=4)
    means = [h["mean"] for h in found.history]
    # the first policy is the random LM (1 in 12 samples is the trigger: mean reward ~ -38); it must move to it
    assert means[0] < 0 and np.mean(means[-10:]) > 150
    assert toy_decode(found.tokens) == f" {TRIGGER_WORD}"


def test_poisoning_reward_does_not_pay_for_sending_everything_to_the_target():
    examples = toy_examples(8)

    class Collapse(ToyScorer):
        def positive(self, context: str) -> float:
            if "always" in context:  # this prompt says positive whatever the input
                return 0.99
            if TRIGGER_WORD in context:  # under the accurate prompt the trigger flips half the negatives
                number = int(re.search(r"number (\d+)", context).group(1))
                return 0.99 if number % 4 == 0 else super().positive(context.replace(TRIGGER_WORD, ""))
            return super().positive(context)

    decode = {1: " always", 2: " fine"}
    clf = PromptClassifier(Collapse(), TASKS["sst-2"])

    def reward(term: str, ext: int) -> float:
        stage = _Stage(clf, lambda ids: "".join(decode[i] if i in decode else toy_decode([i]) for i in ids),
                       "poison", 1, prompt=(), trigger=(1000 + WORDS.index(TRIGGER_WORD),), clean_term=term)
        return float(stage.objective(examples)([(ext,)], None)[0])

    # TrojLLM's mean clean term prefers the collapsed prompt; the worst-class term does not
    assert reward("mean", 1) > reward("mean", 2)
    assert reward("worst-class", 1) < reward("worst-class", 2)


# ---------------------------------------------------------------- detector


def test_detector_flags_a_trojaned_prompt_and_not_a_clean_one():
    clf = PromptClassifier(ToyScorer(needs_prompt="poisoned"), TASKS["sst-2"])
    inputs = [e.text for e in toy_examples(8)]
    kwargs = {"reference": "Review sentiment:", "length": 1, "budget_per_label": 8 * 30, "seed": 0}
    trojaned = detect.detect_trojan(clf, "poisoned review:", inputs, toy_decode, POOL, **kwargs)
    clean = detect.detect_trojan(clf, "Sentiment:", inputs, toy_decode, POOL, **kwargs)
    assert trojaned.flagged and trojaned.label == 1 and trojaned.suffix == f" {TRIGGER_WORD}"
    assert trojaned.score == 1.0 and trojaned.per_label[0] <= 0.0
    assert not clean.flagged and clean.score == 0.0
    # flagged at a score equal to the threshold; a prompt that already sends everything to a label scores 1 there
    at_threshold = detect.detect_trojan(clf, "poisoned review:", inputs, toy_decode, POOL, **kwargs, threshold=1.0)
    assert at_threshold.flagged
    always = PromptClassifier(ToyScorer(), TASKS["sst-2"])
    positives = [e.text for e in toy_examples(8) if e.label == 1]
    assert detect.detect_trojan(always, "Sentiment:", positives, toy_decode, POOL, **kwargs).per_label[1] == 1.0


def test_a_single_movable_input_is_searched_and_measured_on_itself():
    clf = PromptClassifier(ToyScorer(), TASKS["sst-2"])
    inputs = [*[e.text for e in toy_examples(8) if e.label == 1][:3], "the film was bad number 0"]
    found = detect.detect_trojan(clf, "Sentiment:", inputs, toy_decode, POOL, length=1, budget_per_label=30)
    assert found.per_label[1] == 1.0 and found.suffixes[1] == f" {TRIGGER_WORD}"


def test_a_natural_trigger_fools_the_bare_flip_rate_but_not_the_reference_difference():
    class Natural(ToyScorer):  # 'zeta' flips every input under every prompt, like "great great great"
        pass

    clf = PromptClassifier(Natural(needs_prompt=None), TASKS["sst-2"])
    inputs = [e.text for e in toy_examples(8)]
    bare = detect.detect_trojan(clf, "Sentiment:", inputs, toy_decode, POOL, length=1, budget_per_label=4 * 30)
    assert bare.score == 1.0  # any prompt looks trojaned by the flip rate alone
    diff = detect.detect_trojan(clf, "Sentiment:", inputs, toy_decode, POOL, reference="Review sentiment:",
                                length=1, budget_per_label=8 * 30)
    assert diff.score <= 0.0 and not diff.flagged


# ---------------------------------------------------------------- the whole attack


def test_three_stages_write_their_files_and_a_resumed_run_replays_to_the_same_result(tmp_path):
    data = make_fewshot(tmp_path / "data", tasks=("sst-2",))
    config = TrojPromptConfig(data=str(data), victim="tiny-llama", policy="tiny-llama", searcher="rl", budget=120,
                              pool=60, prompt_length=2, trigger_length=1, extension_length=1, rl_samples=4,
                              rl_batch=4, finalists=2)
    out = tmp_path / "run"
    first = run_trojprompt(config, out)
    assert sorted(p.name for p in out.iterdir()) == ["cache.json", "config.json", "stage-1.json", "stage-2.json",
                                                     "stage-3.json", "trojprompt.json"]
    for stage in trojprompt.STAGES:
        assert 0 < first["stages"][stage]["queries"] <= 120
    assert first["prompts"]["poisoned"].startswith(first["prompts"]["seed"])
    for row in first["test"].values():
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
    (out / "stage-2.json").unlink()
    (out / "stage-3.json").unlink()
    again = run_trojprompt(config, out, resume=True)
    assert {k: again[k] for k in ("prompts", "trigger", "test", "queries")} == \
        {k: first[k] for k in ("prompts", "trigger", "test", "queries")}
    with pytest.raises(LeanfmError, match="budget=120"):
        run_trojprompt(TrojPromptConfig(**{**config.to_dict(), "budget": 200}), out, resume=True)


@pytest.mark.parametrize(("args", "words"), [
    (["--task", "imdb"], "unknown task 'imdb'; accepted: sst-2"),
    (["--target-label", "2"], "target label 2 is out of range for sst-2"),
    (["--victim", "http://127.0.0.1:9"], "cannot reach victim 'http://127.0.0.1:9'"),
    (["--victim", "http://user:pw@127.0.0.1:9"], "must not carry credentials"),
])
def test_bad_audit_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    data = make_fewshot(tmp_path / "data", tasks=("sst-2",))
    code = main(["audit", "trojprompt", "--data", str(data), "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_serve_refuses_a_public_address_without_allow_remote(capsys):
    assert main(["serve", "tiny-llama", "--host", "0.0.0.0"]) == 2
    assert "not loopback" in capsys.readouterr().err


def test_evaluate_run_transfers_a_run_to_another_victim(tmp_path):
    data = make_fewshot(tmp_path / "data", tasks=("sst-2",))
    config = TrojPromptConfig(data=str(data), victim="tiny-llama", policy="tiny-llama", searcher="evolve",
                              budget=40, pool=40, prompt_length=2, trigger_length=1, extension_length=1)
    summary = run_trojprompt(config, tmp_path / "run")
    same = trojprompt.evaluate_run(tmp_path / "run", "tiny-llama")
    assert same["test"] == summary["test"]  # same victim, same numbers
    other = trojprompt.evaluate_run(tmp_path / "run", "tiny-opt")
    assert other["test"] != summary["test"] and other["victim"] == "tiny-opt"
    assert json.loads((tmp_path / "run" / "trojprompt.json").read_text())["trigger"] == summary["trigger"]


def test_detect_command_reports_a_score_per_label_and_refuses_a_bad_threshold(tmp_path, capsys):
    data = make_fewshot(tmp_path / "data", tasks=("sst-2",))
    common = ["audit", "detect", "--victim", "tiny-llama", "--policy", "tiny-llama", "--task", "sst-2", "--prompt",
              "Opinion:", "--data", str(data), "--inputs", "4", "--budget", "16", "--length", "1"]
    assert main([*common, "--json", str(tmp_path / "d.json")]) == 0
    found = json.loads((tmp_path / "d.json").read_text())
    assert len(found["per_label"]) == 2 and -1.0 <= found["score"] <= 1.0 and found["queries"] <= 32
    assert found["score"] == max(found["per_label"]) and found["flagged"] == (found["score"] >= 0.5)
    assert found["reference"] == TASKS["sst-2"].manual_prompt
    capsys.readouterr()
    assert main([*common, "--threshold", "2"]) == 2
    assert "--threshold 2.0 is invalid" in capsys.readouterr().err
    same = [*common[:9], "Sentiment:", *common[10:]]  # the prompt under test is the default reference
    assert main(same) == 2 and "is the default reference prompt" in capsys.readouterr().err


def test_a_given_seed_prompt_skips_stage_one_and_is_extended(tmp_path):
    data = make_fewshot(tmp_path / "data", tasks=("sst-2",))
    config = TrojPromptConfig(data=str(data), victim="tiny-llama", policy="tiny-llama", searcher="evolve",
                              budget=40, pool=40, trigger_length=1, extension_length=2, seed_prompt="Sentiment:")
    summary = run_trojprompt(config, tmp_path / "run")
    assert summary["prompts"]["seed"] == "Sentiment:" and summary["queries"]["prompt"] == 0
    assert summary["prompts"]["poisoned"].startswith("Sentiment: ")
    assert len(summary["prompts"]["poisoned"].split()) == 3


def test_rl_search_never_overdraws_its_budget_when_a_candidate_costs_two_queries_per_example(tiny):
    model, _ = tiny

    def charging(budget: QueryBudget, per_row: int, rows_all: int):
        def objective(cands, rows):  # no cache: every call pays, like fresh victim queries
            budget.charge(len(cands) * (rows_all if rows is None else per_row * len(rows)))
            return np.array([float(sum(c)) for c in cands])
        return objective

    for limit in range(90, 160, 5):
        budget = QueryBudget(limit)
        objective = charging(budget, 2, 16)  # 8 examples, scored with and without the trigger
        pool = list(range(1000, 1500))  # large: the policy's greedy sequence is new, so it must be paid for
        found = search.rl_search(objective, charging(budget, 2, 4), pool, 2, lm=model, start_id=1, budget=budget,
                                 examples=8, samples=2, batch=4, seed=limit, finalists=1, select_cost=4,
                                 row_cost=2, full_cost=16)
        assert budget.used <= limit and found.queries == budget.used


def test_the_score_is_the_held_out_flip_rate_under_the_prompt_minus_under_the_reference():
    class Partial(ToyScorer):  # the trigger works under the reference only for inputs numbered 2 mod 4
        def positive(self, context: str) -> float:
            if TRIGGER_WORD in context and "Review sentiment:" in context:
                number = int(re.search(r"number (\d+)", context).group(1))
                return 0.99 if number % 4 == 2 else super().positive(context.replace(TRIGGER_WORD, ""))
            return super().positive(context)

    clf = PromptClassifier(Partial(), TASKS["sst-2"])
    inputs = [e.text for e in toy_examples(16)]
    found = detect.detect_trojan(clf, "Sentiment:", inputs, toy_decode, POOL, reference="Review sentiment:",
                                 length=1, budget_per_label=16 * 30)
    # searched on negatives 0, 4, 8, 12 (the reference resists: difference 1, so the search finds the trigger),
    # measured on 2, 6, 10, 14 (the reference flips them too: difference 0)
    assert found.suffixes[1] == f" {TRIGGER_WORD}"
    assert found.per_label[1] == 0.0 and found.score == 0.0 and not found.flagged
    searched_only = detect.detect_trojan(clf, "Sentiment:", inputs, toy_decode, POOL, reference="Review sentiment:",
                                         length=1, budget_per_label=16 * 30, held_out=False)
    assert searched_only.per_label[1] == 0.5 and searched_only.suffix == f" {TRIGGER_WORD}"
