"""Compositional SLU: sub-token alignment, paired examples, the compositional loss, a tiny run, predict."""

from __future__ import annotations

import json

import pytest
import torch

from leanfm.adapt import slu
from leanfm.data.slu import Utterance
from leanfm.errors import LeanfmError
from leanfm.models.encoders import bert_encoder, minilm_tokenizer
from test_slu_data import make_dataset

INTENTS = ["UNK", "flight"]
SLOTS = ["PAD", "UNK", "O", "B-from", "I-from", "B-to", "I-to"]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def test_only_first_sub_tokens_carry_tags(tokenizer):
    u = Utterance(("flights", "from", "westbam", "to", "new", "york"), ("O", "O", "B-from", "O", "B-to", "I-to"),
                  "flight")
    (e,) = slu.encode(tokenizer, [u], INTENTS, SLOTS)
    pieces = tokenizer(list(u.tokens), is_split_into_words=True, add_special_tokens=False).word_ids()
    assert pieces.count(2) > 1  # westbam splits into several sub-tokens
    labelled = [p for p, label in enumerate(e.labels) if label != slot_ignore()]
    assert labelled == list(e.first) and len(labelled) == len(u.tokens)
    assert [SLOTS[e.labels[p]] for p in e.first] == list(u.tags)
    assert all(e.spans[p] == 1 for p, w in enumerate(pieces) if w == 2)  # every piece of the span, not just the first
    assert [e.spans[p] for p in e.first] == [0, 0, 1, 0, 2, 2]


def slot_ignore() -> int:
    return slu.IGNORE


def test_paired_examples_keep_tags_and_spans_aligned(tokenizer):
    a = Utterance(("from", "boston"), ("O", "B-from"), "flight")
    b = Utterance(("to", "new", "york"), ("O", "B-to", "I-to"), "flight")
    ea, eb = slu.encode(tokenizer, [a, b], INTENTS, SLOTS)
    joined = slu.pair(ea, eb)
    assert joined.ids == ea.ids + eb.ids
    assert [SLOTS[joined.labels[p]] for p in joined.first] == list(a.tags + b.tags)
    assert [joined.spans[p] for p in joined.first] == [0, 1, 0, 2, 2]  # b's span renumbered after a's
    batch = slu.collate([joined, ea], tokenizer.cls_token_id, tokenizer.sep_token_id, 64, intent_on=[False, True])
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id and batch["intent_mask"].tolist() == [0.0, 1.0]
    row = batch["labels"][0, 1 : 1 + len(joined.ids)]
    assert row.tolist() == list(joined.labels)  # shifted by [CLS] only


def test_compositional_loss_is_the_attention_mass_to_other_slot_spans():
    spans = torch.tensor([[0, 1, 1, 2, 0]])
    att = torch.zeros(1, 1, 5, 5)
    att[0, 0, 1] = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])  # token of span 1 -> 0.3 to span 2
    att[0, 0, 2] = torch.tensor([0.0, 0.6, 0.4, 0.0, 0.0])  # stays within its span -> 0
    att[0, 0, 3] = torch.tensor([0.1, 0.2, 0.2, 0.5, 0.0])  # span 2 -> 0.4 to span 1
    att[0, 0, 0] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])  # not a slot token: ignored
    value = slu.compositional_loss((torch.zeros_like(att), att), spans, layers=1)
    assert value.item() == pytest.approx((0.3 + 0.0 + 0.4) / 3)
    two = slu.compositional_loss((att, att), spans, layers=2)
    assert two.item() == pytest.approx(value.item())
    assert slu.compositional_loss((att,), torch.tensor([[0, 1, 1, 1, 0]]), 1).item() == 0.0  # one slot: nothing


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LeanfmError, match="unknown method 'bilstm'; accepted: jointbert, compositional"):
        slu.SluConfig(method="bilstm")
    with pytest.raises(LeanfmError, match="pair fraction 0 is invalid"):
        slu.SluConfig(pair_fraction=0)
    with pytest.raises(LeanfmError, match="no SLU data"):
        slu.train_slu(slu.SluConfig(device="cpu"), "/nonexistent/out")


@pytest.mark.training
def test_a_tiny_run_saves_evaluates_and_predicts(tmp_path):
    data = make_dataset(tmp_path / "data")
    config = slu.SluConfig(data=str(data), encoder="tiny-bert", method="compositional", paired=True, steps=30,
                           batch_size=16, lr=3e-3, warmup=3, device="cpu")
    summary = slu.train_slu(config, tmp_path / "run")
    history = summary["training"]["history"]
    assert len(history) == 30 and all("comp" in h for h in history)
    assert history[-1]["slot_ce"] < history[0]["slot_ce"]
    meta = json.loads((tmp_path / "run" / "slu.json").read_text())
    assert meta["metrics"]["test"] == summary["metrics"]["test"]
    model, tokenizer, _ = slu.load_run(tmp_path / "run")
    again = slu.evaluate(model, tokenizer, slu.load(data).test, meta["intents"], meta["slots"])
    assert again == summary["metrics"]["test"]  # the saved run reproduces its metrics
    out = slu.predict(tmp_path / "run", "show flights from boston to new york")
    assert out["intent"] in ("flight", "airfare") and len(out["tags"]) == 7
    assert all(s["value"] == " ".join(out["text"].split()[s["start"] : s["end"]]) for s in out["slots"])
    with pytest.raises(LeanfmError, match="is not an SLU run"):
        slu.load_run(tmp_path / "data")


def test_crf_reads_each_kept_word_at_its_first_sub_token(tokenizer):
    u = Utterance(("from", "westbam", "to", "new", "york"), ("O", "B-from", "O", "B-to", "I-to"), "flight")
    (e,) = slu.encode(tokenizer, [u], INTENTS, SLOTS)
    batch = slu.collate([e], tokenizer.cls_token_id, tokenizer.sep_token_id, 64)
    assert batch["words"][0].tolist() == [p + 1 for p in e.first]  # +1 for [CLS]
    assert [SLOTS[i] for i in batch["word_labels"][0].tolist()] == list(u.tags)
    logits = torch.arange(batch["input_ids"].shape[1], dtype=torch.float)[None, :, None].expand(1, -1, 3)
    assert slu.word_emissions(logits, batch["words"])[0, :, 0].tolist() == [p + 1 for p in e.first]
    cut = slu.collate([e], tokenizer.cls_token_id, tokenizer.sep_token_id, 2 + e.first[3])  # keeps 3 words
    assert cut["word_mask"][0].tolist() == [True] * 3 and cut["words"][0].tolist() == [p + 1 for p in e.first[:3]]


def test_crf_prediction_is_viterbi_not_argmax(tokenizer):
    encoder, _ = bert_encoder("tiny-bert")
    words = Utterance(("from", "boston", "to", "denver"), ("O",) * 4, "")
    tagged = {}
    for crf in (False, True):
        model = slu.JointSlu(encoder, len(INTENTS), len(SLOTS), crf=crf)
        with torch.no_grad():
            model.slot_head.weight.zero_()
            model.slot_head.bias.copy_(torch.tensor([0, 0, 1.0, 0, 0, 0, 3.0]))  # every word prefers I-to
            if model.crf is not None:
                model.crf.transitions.zero_()
                model.crf.start_transitions[SLOTS.index("I-to")] = -1e4  # an I- tag cannot start a sequence
        tagged[crf] = slu.predict_utterances(model, tokenizer, [words], INTENTS, SLOTS)[0][1]
    assert tagged[False] == ["I-to"] * 4
    assert tagged[True] == ["O", "I-to", "I-to", "I-to"]


@pytest.mark.training
def test_a_tiny_crf_run_learns_and_reloads(tmp_path):
    data = make_dataset(tmp_path / "data")
    config = slu.SluConfig(data=str(data), encoder="tiny-bert", crf=True, steps=30, batch_size=16, lr=3e-3, warmup=3,
                           device="cpu")
    summary = slu.train_slu(config, tmp_path / "run")
    history = summary["training"]["history"]
    assert history[-1]["slot_ce"] < 0.7 * history[0]["slot_ce"]  # the CRF's per-word NLL falls
    model, tokenizer, meta = slu.load_run(tmp_path / "run")
    assert model.crf is not None and meta["config"]["crf"] is True
    again = slu.evaluate(model, tokenizer, slu.load(data).test, meta["intents"], meta["slots"])
    assert again == summary["metrics"]["test"]  # transitions saved and Viterbi used again


def test_cross_slot_attention_measures_the_penalised_mass(tokenizer):
    encoder, _ = bert_encoder("tiny-bert")
    model = slu.JointSlu(encoder, len(INTENTS), len(SLOTS)).eval()
    utterances = [Utterance(("from", "boston", "to", "new", "york"), ("O", "B-from", "O", "B-to", "I-to"), "flight"),
                  Utterance(("to", "denver"), ("O", "B-to"), "flight")]  # one slot: no other span to attend to
    value = slu.cross_slot_attention(model, tokenizer, utterances, INTENTS, SLOTS, layers=1)
    assert model.encoder.config._attn_implementation == "sdpa"  # restored after the eager measurement
    batch = slu.collate(slu.encode(tokenizer, utterances[:1], INTENTS, SLOTS), tokenizer.cls_token_id,
                        tokenizer.sep_token_id, 64)
    model.encoder.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(batch["input_ids"], batch["attention_mask"], attentions=True)[2]
    first = float(slu.compositional_loss(att, batch["spans"], 1))
    slot_tokens = [int((batch["spans"] > 0).sum()), 1]  # the second utterance's slot token contributes 0
    assert first > 0 and value == pytest.approx(first * slot_tokens[0] / sum(slot_tokens), rel=1e-5)
