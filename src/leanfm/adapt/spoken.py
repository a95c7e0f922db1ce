"""Spoken input for an SLU run: Whisper tiny.en transcribes, the text model reads the transcript.

Why a cascade: the SLU models here are trained on text (ATIS/SNIPS carry no audio), and a pretrained recogniser is
what a user has; the cost of speech is then the recogniser's errors, which :func:`evaluate_spoken` measures on
espeak-ng renderings of a split (no recorded ATIS audio exists offline).

Normalisation (our choice, applied to reference and transcript alike): lower case, dots inside a word dropped
("p.m." -> "pm", as ATIS writes it), every other character but ``a-z``, ``0-9`` and the apostrophe a space, then
whitespace splitting. Word error rate is jiwer's over those words. Numbers stay as the recogniser writes them
(Whisper: digits), so "seven" in a reference against "7" counts as an error.

Slot F1 on a transcript cannot be scored by seqeval, whose tag sequences must align word for word with the gold
ones; we score **slot (type, value) pairs** instead — per utterance the multiset of ``(type, normalised value)``
predicted vs gold, micro-averaged — and report the same measure on the gold text beside it, so the drop is the
recogniser's alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jiwer
import numpy as np

from leanfm.adapt.slu import JointSlu, load_run, predict_utterances, predict_words
from leanfm.data.slu import Utterance
from leanfm.data.speech import SAMPLE_RATE as ESPEAK_RATE
from leanfm.data.speech import read_wav, resample, synthesize
from leanfm.errors import LeanfmError
from leanfm.models.whisper import SAMPLE_RATE, load_whisper, transcribe
from leanfm.progress import progress

__all__ = ["evaluate_spoken", "normalise", "predict_audio", "slot_pair_f1", "slot_pairs", "transcribe_files"]


def normalise(text: str) -> str:
    """Lower case; dots inside words dropped ("p.m." -> "pm"); other non-alphanumerics (but ') become spaces."""
    text = re.sub(r"(?<=\w)\.(?=\w)", "", text.lower())
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text).split())


def slot_pairs(words: Sequence[str], tags: Sequence[str]) -> Counter:
    """The multiset of ``(slot type, normalised value)`` of a tagged utterance."""
    spans = Utterance(tuple(words), tuple(tags), "").spans()
    return Counter((kind, normalise(" ".join(words[s:e]))) for kind, s, e in spans)


def slot_pair_f1(gold: Sequence[Counter], predicted: Sequence[Counter]) -> dict[str, float]:
    """Micro precision, recall and F1 of predicted vs gold ``(type, value)`` multisets."""
    hit = sum(sum((g & p).values()) for g, p in zip(gold, predicted, strict=True))
    n_pred = sum(sum(p.values()) for p in predicted)
    n_gold = sum(sum(g.values()) for g in gold)
    precision = hit / n_pred if n_pred else 0.0
    recall = hit / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _read_16k(path: str | Path) -> np.ndarray:
    samples, rate = read_wav(path)
    return resample(samples, rate, SAMPLE_RATE)


def predict_audio(folder: str | Path, audio: str | Path) -> dict[str, Any]:
    """Transcribe a WAV file with Whisper tiny.en, then intent and slots of the transcript with the run."""
    wave = _read_16k(audio)  # a bad file fails before any model loads
    loaded = load_run(folder)
    recogniser, whisper_tokenizer = load_whisper()
    transcript = transcribe(recogniser, whisper_tokenizer, [wave])[0]
    words = tuple(normalise(transcript).split())
    if not words:
        raise LeanfmError(f"no words recognised in '{audio}'")
    return {"transcript": transcript, **predict_words(*loaded, words)}


def transcribe_files(paths: Sequence[str | Path]) -> dict[str, str]:
    """``{path: transcript}`` of PCM WAV files (read and checked before the model loads)."""
    waves = [_read_16k(path) for path in paths]
    recogniser, whisper_tokenizer = load_whisper()
    return dict(zip(map(str, paths), transcribe(recogniser, whisper_tokenizer, waves), strict=True))


def evaluate_spoken(model: JointSlu, tokenizer: Any, meta: dict[str, Any], utterances: Sequence[Utterance],
                    voice: str = "en-us", batch_size: int = 8) -> dict[str, Any]:
    """Render each utterance with espeak-ng (``voice``), transcribe, and score the run on transcript and gold text.

    Returns intent accuracy and slot-pair F1 on both inputs, the word error rate, and a few transcripts.
    """
    recogniser, whisper_tokenizer = load_whisper()
    references = [" ".join(u.tokens) for u in utterances]
    transcripts: list[str] = []
    for start in progress(range(0, len(references), batch_size), desc=f"spoken ({voice})"):
        chunk = references[start : start + batch_size]
        waves = [resample(synthesize(text, voice=voice).numpy(), ESPEAK_RATE, SAMPLE_RATE) for text in chunk]
        transcripts += transcribe(recogniser, whisper_tokenizer, waves, batch_size=batch_size)
    heard = [tuple(normalise(t).split()) or ("",) for t in transcripts]
    label = (meta["intents"], meta["slots"], meta["config"]["max_length"])
    spoken = predict_utterances(model, tokenizer, [Utterance(w, ("O",) * len(w), "") for w in heard], *label)
    written = predict_utterances(model, tokenizer, utterances, *label)
    gold = [slot_pairs(u.tokens, u.tags) for u in utterances]
    result: dict[str, Any] = {"utterances": len(utterances), "voice": voice,
                              "wer": jiwer.wer([normalise(r) for r in references], [" ".join(h) for h in heard])}
    for name, predicted, words in (("spoken", spoken, heard), ("text", written, [u.tokens for u in utterances])):
        result[name] = {"intent_accuracy": float(np.mean([p[0] == u.intent for p, u in zip(predicted, utterances,
                                                                                            strict=True)])),
                        "slot_pair": slot_pair_f1(gold, [slot_pairs(w, p[1]) for w, p in zip(words, predicted,
                                                                                              strict=True)])}
    result["examples"] = [{"reference": r, "transcript": t} for r, t in zip(references[:5], transcripts[:5],
                                                                             strict=True)]
    return result
