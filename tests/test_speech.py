"""Synthetic speech data (leanfm.data.speech): log-mel maths, espeak-ng synthesis, training texts, cached sets."""

import math

import pytest
import torch

from leanfm.data import speech
from leanfm.errors import LeanfmError


def test_mel_filterbank_is_triangular_on_the_htk_scale():
    bank = speech.mel_filterbank()
    assert bank.shape == (513, 64) and bank.max() <= 1 and (bank.sum(0) > 0).all()
    hz = torch.linspace(0, speech.SAMPLE_RATE / 2, 513)
    peaks = hz[bank.argmax(0)]
    mel = 2595 * torch.log10(1 + peaks / 700)
    steps = mel.diff()
    assert (steps > 0).all() and steps.std() / steps.mean() < 0.2  # centres evenly spaced in mel, not in Hz
    assert peaks[-1] - peaks[-2] > 10 * (peaks[1] - peaks[0])


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_log_mel_of_a_tone_peaks_in_the_band_of_its_frequency(freq):
    t = torch.arange(speech.SAMPLE_RATE // 2) / speech.SAMPLE_RATE
    feats = speech.log_mel(0.5 * torch.sin(2 * math.pi * freq * t))
    assert feats.shape == (t.numel() // speech.HOP + 1, 64)
    hz = torch.linspace(0, speech.SAMPLE_RATE / 2, 513)
    centres = hz[speech.mel_filterbank().argmax(0)]
    assert abs(int(feats[10:-10].mean(0).argmax()) - int((centres - freq).abs().argmin())) <= 1
    assert feats.min() >= math.log(1e-6) - 1e-4


def test_log_mel_rejects_what_is_not_a_waveform():
    with pytest.raises(LeanfmError, match="1-D waveform"):
        speech.log_mel(torch.zeros(2, 4000))
    with pytest.raises(LeanfmError, match="at least 551 samples"):
        speech.log_mel(torch.zeros(100))


def test_training_texts_leave_out_every_evaluation_text():
    phrases = speech.austen_phrases(3000)
    held_out = speech.evaluation_texts()
    assert any(speech.normalise(t) in held_out for t in phrases)  # e.g. "no", "on": common single words
    kept = speech.training_texts(3000)
    assert kept and not any(speech.normalise(t) in held_out for t in kept)
    assert all(1 <= len(t.split()) <= 4 for t in kept)


def test_validation_spans_are_held_out_from_training_tests_and_voices():
    texts = speech.validation_texts(150)
    assert len(set(texts)) == 150 and texts == speech.validation_texts(150)
    assert all(3 <= len(t.split()) <= 4 for t in texts)
    held_out = speech.evaluation_texts()
    assert not any(speech.normalise(t) in held_out for t in texts)
    train = set(speech.training_texts(20000))
    assert sum(t in train for t in texts) <= 5  # another split of the novels: a few common phrases may coincide
    voices = set(speech.VALIDATION_VOICES)
    assert not voices & set(speech.train_voices()) and not voices & set(speech.EVAL_VOICES)


def test_austen_sentences_are_distinct_seeded_and_bounded():
    a, b = speech.austen_sentences(30, seed=1), speech.austen_sentences(30, seed=1)
    assert a == b and len(set(a)) == 30 and a != speech.austen_sentences(30, seed=2)
    assert all(3 <= len(s.split()) <= 14 for s in a)
    with pytest.raises(LeanfmError, match="usable sentences"):
        speech.austen_sentences(10**7)


def test_speech_set_batches_pad_with_zeros_and_report_lengths():
    feats = torch.arange(10 * 64, dtype=torch.float32).reshape(10, 64)
    data = speech.SpeechSet(feats, torch.tensor([0, 3, 10]), ["a", "b"], ["x", "y"])
    batch, lengths = data.batch(torch.tensor([1, 0]))
    assert batch.shape == (2, 7, 64) and lengths.tolist() == [7, 3]
    assert torch.equal(batch[1, :3], feats[:3]) and not batch[1, 3:].any()
    assert speech.seconds_of(data) == pytest.approx(10 * speech.HOP / speech.SAMPLE_RATE)


@pytest.mark.speech
def test_log_mel_of_a_synthesised_wav():
    wave = speech.synthesize("turn on the lights", "en-us", 160, 50)
    assert wave.dim() == 1 and 0.05 < wave.abs().max() <= 1.0
    feats = speech.log_mel(wave)
    assert feats.shape == (wave.numel() // speech.HOP + 1, 64)
    assert torch.isfinite(feats).all() and feats.max() < 15 and feats.min() >= torch.log(torch.tensor(1e-6)) - 1e-4
    silence = speech.log_mel(torch.zeros(4000))
    assert silence.max() < feats.max() - 5  # speech has far more energy than silence


@pytest.mark.speech
def test_speech_set_is_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path))
    texts, voices = ["good morning", "a letter"], speech.train_voices()
    first = speech.build_speech_set(texts, ["g", "l"], voices, seed=4, renditions=2, name="t")
    assert len(first) == 4 and first.texts == [t for t in texts for _ in range(2)] and first.labels[2] == "l"
    assert first.offsets[-1] == first.features.shape[0] and first.features.shape[1] == 64
    assert not torch.equal(first.features[: first.offsets[1]], first.features[first.offsets[1] : first.offsets[2]])

    def no_synthesis(*_args):
        raise AssertionError("synthesised although cached")

    monkeypatch.setattr(speech, "synthesize", no_synthesis)
    again = speech.build_speech_set(texts, ["g", "l"], voices, seed=4, renditions=2, name="t")
    assert torch.equal(again.features, first.features) and again.labels == first.labels


def test_bad_speech_inputs(monkeypatch):
    with pytest.raises(LeanfmError, match="empty text"):
        speech.synthesize("  ")
    monkeypatch.setattr(speech.shutil, "which", lambda _name: None)
    with pytest.raises(LeanfmError, match="apt-get install espeak-ng"):
        speech.synthesize("hello")


@pytest.mark.speech
def test_flite_is_another_synthesiser_at_the_same_rate_whose_speed_stretches_time():
    slow = speech.synthesize("bring the carriage round", "flite:slt", 130, 50)
    fast = speech.synthesize("bring the carriage round", "flite:slt", 200, 50)
    assert slow.dim() == 1 and 0.05 < slow.abs().max() <= 1.0
    # 22.05 kHz like espeak-ng (flite writes 16 kHz): ~1.5-3 s for four words; duration scales with 1 / speed
    assert 1.0 < slow.numel() / speech.SAMPLE_RATE < 4.0
    assert slow.numel() / fast.numel() == pytest.approx(200 / 130, rel=0.15)
    other = speech.synthesize("bring the carriage round", "en-us", 130, 50)
    n = min(other.numel(), slow.numel())
    assert not torch.allclose(speech.log_mel(other[:n]), speech.log_mel(slow[:n]), atol=1.0)
    assert not {v.removeprefix(speech.FLITE) for v in speech.UNSEEN_SYNTH_VOICES} & {
        v.split("+")[0] for v in (*speech.train_voices(), *speech.EVAL_VOICES, *speech.VALIDATION_VOICES)}


@pytest.mark.speech
def test_flite_voice_sets_are_built_and_cached_apart_from_espeak_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path))
    flite = speech.keyword_set(voices=speech.UNSEEN_SYNTH_VOICES[:2])
    espeak = speech.keyword_set()
    assert len(flite) == len(espeak) == 3 * len(speech.KEYWORDS) and flite.labels == espeak.labels
    assert flite.features.shape != espeak.features.shape or not torch.equal(flite.features, espeak.features)
    assert len(list((tmp_path / "speech").iterdir())) == 2


def test_missing_or_unknown_flite_is_a_one_line_error(monkeypatch):
    with pytest.raises(LeanfmError, match="unknown flite voice 'nobody'; accepted: flite:slt, flite:rms"):
        speech.synthesize("hello", "flite:nobody")
    monkeypatch.setattr(speech.shutil, "which", lambda name: None if name == "flite" else f"/usr/bin/{name}")
    with pytest.raises(LeanfmError, match="apt-get install flite"):
        speech.check_synthesisers(("en-us", "flite:slt"))
    speech.check_synthesisers(("en-us",))  # espeak-ng voices alone do not need flite
