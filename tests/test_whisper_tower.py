"""Whisper tiny.en as CWCL's speech tower: the crop, the frozen/trained split, the feature cache, save/load, the CLI.

What is *not* tested, because it is false: that the cropped encoder's outputs equal the 30 s encoder's on the same
first frames (there, attention also sees 27 s of padding).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leanfm.align import pipeline
from leanfm.cli import main
from leanfm.data import speech
from leanfm.errors import LeanfmError
from leanfm.models import whisper
from leanfm.models.encoders import WhisperTower, load_tower, save_tower

pytestmark = pytest.mark.slow  # loads the converted Whisper checkpoint

JOBS = [("good morning to you", "en-us", 160, 50), ("no", "en-gb+f2", 190, 30),
        ("she walked slowly along the lane to the village", "en-029+m3", 140, 70)]


@pytest.fixture(scope="module")
def tower() -> WhisperTower:
    torch.manual_seed(0)
    return WhisperTower(frames=300).eval()


def _perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_crop_keeps_the_first_150_positions_and_transformers_accepts_300_frames(tower):
    full, _ = whisper.load_whisper()
    table = full.model.encoder.embed_positions.weight
    assert tower.whisper.embed_positions.weight.shape == (150, 384)
    assert torch.equal(tower.whisper.embed_positions.weight, table[:150])
    assert full.config.max_source_positions == 1500  # the decoder's model keeps its own config
    mel = torch.randn(2, 80, 300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tower.whisper(mel, output_hidden_states=True)  # transformers' own forward and length check
        with pytest.raises(ValueError, match="300"):
            tower.whisper(torch.zeros(1, 80, 3000))
        # the split: body = the input of the top layer, top + final norm = transformers' last hidden state
        assert torch.equal(tower.body(mel), ours.hidden_states[-2])
        assert torch.equal(tower.whisper.layer_norm(tower.top(tower.body(mel), None)), ours.last_hidden_state)
    with pytest.raises(LeanfmError, match="accepted: 1 to 1500"):
        whisper.crop_encoder(full.model.encoder, 1501)
    with pytest.raises(LeanfmError, match="even number"):
        WhisperTower(frames=301)


def test_real_positions_are_half_the_frames_rounded_up():
    assert whisper.real_positions([0, 1, 320, 321, 16000, 10**6], 150).tolist() == [1, 1, 1, 2, 50, 150]


def test_output_is_the_mean_of_the_real_positions_and_ignores_padding(tower):
    generator = torch.Generator().manual_seed(2)
    hidden, lengths = torch.randn(3, 12, 384, generator=generator), torch.tensor([12, 5, 1])
    with torch.no_grad():
        got = tower(hidden, lengths)
        junk = hidden.clone()
        junk[1, 5:] = 100.0
        junk[2, 1:] = -7.0
        assert torch.equal(tower(junk, lengths), got)
        for i, n in enumerate(lengths.tolist()):  # one clip alone, no mask: layer, norm, mean, projection
            x = tower.whisper.layer_norm(tower.top(hidden[i : i + 1, :n], None))[0]  # [n, d]
            torch.testing.assert_close(got[i], tower.proj(x.mean(0)), rtol=1e-5, atol=1e-5)
    assert got.shape == (3, 384)


def test_only_the_top_layer_the_final_norm_and_the_projection_learn(tower):
    trained = {k for k, p in tower.named_parameters() if p.requires_grad}
    assert trained == {k for k in tower.state_dict()}
    assert all(k.startswith(("whisper.layers.3.", "whisper.layer_norm.", "proj.")) for k in trained)
    assert any(k.startswith("whisper.layers.3.") for k in trained) and "proj.weight" in trained
    tower.zero_grad()
    mel = torch.randn(2, 80, 300, generator=torch.Generator().manual_seed(3))
    tower.embed(mel, torch.tensor([150, 60])).square().sum().backward()
    for name, p in tower.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trained), name
    tower.zero_grad(set_to_none=True)


def test_save_and_load_round_trip_without_copying_the_frozen_body(tower, tmp_path):
    trained = copy.deepcopy(tower)
    _perturb(trained, seed=4)
    save_tower(tmp_path / "enc", trained, {"kind": "whisper", "frozen": "minilm-l6"})
    stored = load_file(str(tmp_path / "enc" / "encoder.safetensors"))
    assert set(stored) == set(trained.state_dict()) and not any(k.startswith("whisper.layers.0.") for k in stored)
    assert sum(v.numel() for v in stored.values()) < 2_500_000  # one layer + norm + projection, not 8M
    loaded, meta = load_tower(tmp_path / "enc")
    assert isinstance(loaded, WhisperTower) and meta["encoder"] == {"out_dim": 384, "frames": 300}
    mel = torch.randn(2, 80, 300, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([150, 33])
    with torch.no_grad():
        assert torch.equal(loaded.embed(mel, lengths), trained.embed(mel, lengths))
        assert not torch.allclose(tower.embed(mel, lengths), trained.embed(mel, lengths))


@pytest.mark.speech
def test_cached_features_equal_the_uncached_forward(tower, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path))  # the tower is already loaded; the feature cache goes here
    texts, voices = [j[0] for j in JOBS], ("en-us", "en-gb+f2", "en-029+m3")
    jobs = pipeline.rendition_jobs(texts, voices, seed=7)
    waves = [speech.resample(speech.synthesize(*j).numpy(), speech.SAMPLE_RATE, whisper.SAMPLE_RATE) for j in jobs]
    lengths = whisper.real_positions([len(w) for w in waves], 150)
    with torch.no_grad():
        uncached = tower.embed(whisper.features(waves, 300, crop=True), lengths)
        exact = pipeline.whisper_speech_set(tower, texts, texts, voices, seed=7, dtype=torch.float32, cache=False)
        assert torch.equal(exact.batch(torch.arange(3))[1], lengths)
        assert torch.equal(tower(*exact.batch(torch.arange(3))), uncached)
        first = pipeline.whisper_speech_set(tower, texts, texts, voices, seed=7, name="t")  # float16, written
        again = pipeline.whisper_speech_set(tower, texts, texts, voices, seed=7, name="t")  # read back
        assert len(list((tmp_path / "cache" / "whisper-features").glob("t-*/hidden.safetensors"))) == 1
        assert torch.equal(again.hidden, first.hidden) and again.hidden.dtype == torch.float16
        torch.testing.assert_close(tower(*again.batch(torch.arange(3))), uncached, rtol=0.02, atol=0.02)
    assert again.seconds == pytest.approx(sum(len(w) for w in waves) / whisper.SAMPLE_RATE)


@pytest.mark.speech
def test_rendition_jobs_draw_the_scratch_sets_voices(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path))
    texts, voices = ["one", "two words", "and three words"], speech.train_voices()
    data = speech.build_speech_set(texts, texts, voices, seed=3, renditions=2, name="t")
    jobs = pipeline.rendition_jobs(texts, voices, seed=3, renditions=2)
    assert [j[0] for j in jobs] == data.texts and len({j[1:] for j in jobs}) == 6
    for i, job in enumerate(jobs):  # the same voice, speed and pitch give the same audio
        mel = speech.log_mel(speech.synthesize(*job)).half().float()
        assert torch.equal(mel, data.features[data.offsets[i] : data.offsets[i + 1]])


@pytest.mark.speech
def test_align_speech_cli_with_the_whisper_tower(tmp_path, capsys):
    out = tmp_path / "wh"
    assert main(["--quiet", "align", "speech", "--tower", "whisper", "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--phrases", "12", "--warmup", "1", "--json", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["intent_items"] == 144 and metrics["keyword_items"] == 90
    assert 0 <= metrics["keyword_accuracy"] <= 1 and 0 <= metrics["span_retrieval_accuracy"] <= 1
    meta = json.loads((out / "align.json").read_text())
    assert meta["kind"] == "whisper" and meta["train"]["tower"] == "whisper" and meta["data"]["utterances"] <= 12
    assert main(["--quiet", "align", "eval", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics  # the saved tower reproduces its metrics
    assert main(["--quiet", "align", "speech", "--tower", "wav2vec", "--out", str(tmp_path / "x")]) == 2
    assert "unknown tower 'wav2vec'" in capsys.readouterr().err


def test_features_reject_long_audio_unless_cropped():
    wave = np.zeros(4 * whisper.SAMPLE_RATE, dtype=np.float32)
    with pytest.raises(LeanfmError, match="at most 3 s"):
        whisper.features([wave], 300)
    assert whisper.features([wave], 300, crop=True).shape == (1, 80, 300)
