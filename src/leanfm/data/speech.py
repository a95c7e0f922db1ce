"""Synthetic speech data: espeak-ng synthesis, log-mel features, Austen training texts and zero-shot test sets.

Why synthetic speech: no speech corpus exists offline here, but espeak-ng (Debian) speaks any text in many
voices, speeds and pitches in milliseconds. Training pairs are Austen phrases and sentences spoken by
*training* voices; the zero-shot tests (spoken commands -> intent, spoken single words -> keyword) use *other*
voices and texts never seen in training, classified only by embeddings of the candidate texts. Data only: the
speech encoder lives in :mod:`leanfm.models.encoders`; CWCL (``leanfm.align``) and the spoken-language methods
to come read the same sets from here.

A second synthesiser, flite (CMU, Debian ``flite``), speaks the same test commands for the open-world test: a
voice ``flite:NAME`` (:data:`UNSEEN_SYNTH_VOICES`) is another engine's prosody and spectra altogether, which
espeak-ng's voice variants never are. Nothing trains on it.

Features: 64 log-mel bands, 25 ms windows, 10 ms hop, from ``torch.stft`` and an HTK mel filterbank (torchaudio's
PyPI build does not load beside our CPU torch, and librosa would pull numba for one 15-line matrix).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly
from torch import nn

from leanfm.data.corpus import corpus
from leanfm.data.debian import find_package_path
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, leanfm_home
from leanfm.progress import progress

SAMPLE_RATE = 22050  # espeak-ng's output rate
N_MELS, N_FFT, WIN, HOP = 64, 1024, 551, 220  # 25 ms window, 10 ms hop at 22.05 kHz
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-gbclan")
TRAIN_VARIANTS = ("", "+m1", "+m3", "+f1", "+f2", "+f4")
EVAL_VOICES = ("en-gb-x-rp+f3", "en-us-nyc+m7", "en-gb-x-gbcwmd+klatt")  # accents and variants unseen in training
# Validation (choosing a temperature): training accents with variants neither training nor the tests use.
VALIDATION_VOICES = ("en-us+m5", "en-gb+f3", "en-029+m6")
# Another synthesiser altogether (flite's built-in voices: US female, US male, Scottish male, US male diphone).
UNSEEN_SYNTH_VOICES = ("flite:slt", "flite:rms", "flite:awb", "flite:kal16")
FLITE = "flite:"

INTENTS: dict[str, tuple[str, ...]] = {  # description (what MiniLM sees) -> spoken commands (never trained on)
    # Requests a household of the novels' world makes, worded with words the Austen training text contains: an
    # encoder trained from scratch cannot know words it never heard (see SMART_HOME_INTENTS).
    "send for the carriage": ("order the carriage", "have the horses put to", "we must have the carriage",
                              "bring the carriage round"),
    "write a letter": ("i must write to my sister", "bring me pen and paper", "i shall write a letter",
                       "let me answer her letter"),
    "go for a walk": ("let us walk in the garden", "shall we take a walk", "i want to walk out",
                      "a walk would do us good"),
    "play some music": ("play something on the pianoforte", "will you sing for us", "let us have some music",
                        "play us an air"),
    "serve the tea": ("bring us some tea", "we will have tea now", "is the tea ready", "we would like some tea"),
    "dance": ("will you dance with me", "shall we dance", "may i have the next dance", "let us join the dancing"),
    "read a book": ("read to us from the book", "i will read for an hour", "give me the book",
                    "let me finish my book"),
    "go to bed": ("i am going to bed", "good night to you all", "i must go to sleep", "it is time to rest"),
    "visit the neighbours": ("let us call on our neighbours", "we should visit them tomorrow",
                             "pay a visit to the family", "go and see our friends"),
    "ask about the weather": ("will it rain today", "what a fine day it is", "is the weather bad",
                              "is it cold out of doors"),
    "light the fire": ("light the fire please", "the room is very cold", "put more wood on the fire",
                       "make the room warm"),
    "serve dinner": ("when shall we dine", "is dinner ready", "let us go in to dinner", "let us eat"),
}
SMART_HOME_INTENTS: dict[str, tuple[str, ...]] = {  # modern commands: mostly words absent from the training text
    "turn the lights on": ("switch on the lights", "turn on the lamp", "lights on please", "make it brighter in here"),
    "turn the lights off": ("switch off the lights", "turn off the lamp", "lights off please", "make it dark in here"),
    "play some music": ("play a song", "put on some music", "start the music", "I want to hear a song"),
    "stop the music": ("stop the song", "turn the music off", "silence the music", "no more music please"),
    "increase the volume": ("turn it up", "make it louder", "raise the volume", "louder please"),
    "decrease the volume": ("turn it down", "make it quieter", "lower the volume", "quieter please"),
    "what is the weather": ("will it rain today", "is it sunny outside", "what is the forecast",
                            "how cold is it today"),
    "what time is it": ("tell me the time", "what is the time now", "do you know the time", "what hour is it"),
    "set an alarm": ("wake me up at seven", "set an alarm for the morning", "set my alarm", "I need an alarm"),
    "call someone on the phone": ("phone my mother", "call my sister", "ring my friend", "make a phone call"),
    "make the room warmer": ("turn up the heating", "it is too cold in here", "warm up the house",
                             "increase the temperature"),
    "make the room cooler": ("turn down the heating", "it is too hot in here", "cool down the house",
                             "decrease the temperature"),
}
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one", "two", "three",
            "four", "five", "six", "seven", "eight", "nine", "cat", "dog", "house", "tree", "water", "music",
            "light", "door", "window", "bird")


def espeak_binary() -> str:
    """Path of espeak-ng, or a one-line error saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise LeanfmError("espeak-ng is not installed; install it with 'apt-get install espeak-ng' (make setup does)")
    return path


def check_synthesisers(voices: tuple[str, ...]) -> None:
    """A one-line error before any work when a synthesiser ``voices`` need (espeak-ng, flite) is missing."""
    if any(not v.startswith(FLITE) for v in voices):
        espeak_binary()
    if any(v.startswith(FLITE) for v in voices):
        flite_binary()


def flite_binary() -> str:
    """Path of flite, or a one-line error saying how to install it."""
    path = shutil.which("flite")
    if path is None:
        raise LeanfmError("flite is not installed; install it with 'apt-get install flite' (make setup does)")
    return path


def _flite(text: str, voice: str, speed: int) -> torch.Tensor:
    """flite's rendition at 22.05 kHz (resampled from its 16 kHz): speed as a duration stretch around espeak-ng's
    default 175 words a minute; flite's voices have no pitch control comparable to espeak-ng's, so pitch is unused."""
    if FLITE + voice not in UNSEEN_SYNTH_VOICES:  # flite itself falls back to its default voice without a word
        raise LeanfmError(f"unknown flite voice '{voice}'; accepted: {', '.join(UNSEEN_SYNTH_VOICES)}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in.txt").write_text(text, encoding="utf-8")  # a file: text is never an option
        done = subprocess.run([flite_binary(), "-voice", voice, "--setf", f"duration_stretch={175 / speed:.3f}",
                               "-f", str(Path(tmp) / "in.txt"), "-o", str(Path(tmp) / "out.wav")],
                              capture_output=True, check=False)
        if done.returncode != 0 or not (Path(tmp) / "out.wav").is_file():
            raise LeanfmError(f"flite failed for voice '{voice}': {done.stderr.decode(errors='replace').strip()}")
        samples, rate = read_wav(Path(tmp) / "out.wav")
    return torch.from_numpy(resample(samples, rate, SAMPLE_RATE))


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> torch.Tensor:
    """Mono float waveform in [-1, 1] at 22.05 kHz of ``text`` spoken by espeak-ng (or flite for ``flite:NAME``)."""
    if not text or not text.strip():
        raise LeanfmError("cannot synthesise empty text; pass at least one word")
    if voice.startswith(FLITE):
        return _flite(text, voice.removeprefix(FLITE), speed)
    done = subprocess.run([espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--stdin"],
                          input=text.encode(), capture_output=True, check=False)  # stdin: text is never an option
    if done.returncode != 0 or len(done.stdout) <= 44:
        raise LeanfmError(f"espeak-ng failed for voice '{voice}': {done.stderr.decode(errors='replace').strip()}")
    data = done.stdout
    start = data.find(b"data") + 8  # the streamed header's sizes are bogus: read every sample after it
    samples = torch.frombuffer(bytearray(data[start : start + (len(data) - start) // 2 * 2]), dtype=torch.int16)
    return samples.float() / 32768.0


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(mono float32 waveform in [-1, 1], sample rate) of a PCM WAV file (8/16/32-bit; channels averaged)."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except FileNotFoundError:
        raise LeanfmError(f"audio file '{path}' does not exist") from None
    except (wave.Error, EOFError, OSError) as err:
        raise LeanfmError(f"'{path}' is not a readable PCM WAV file ({err}); accepted: 8/16/32-bit PCM .wav") from None
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2147483648.0)}
    if width not in kinds:
        raise LeanfmError(f"'{path}' has {8 * width}-bit samples; accepted: 8, 16 or 32-bit PCM")
    dtype, zero, scale = kinds[width]
    samples = (np.frombuffer(raw, dtype=dtype).astype(np.float32) - zero) / scale
    if samples.size == 0:
        raise LeanfmError(f"'{path}' holds no audio samples")
    return samples.reshape(-1, channels).mean(axis=1), rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy's ``resample_poly``, anti-aliased), e.g. espeak-ng's 22.05 kHz -> 16 kHz."""
    if rate == target:
        return samples.astype(np.float32)
    factor = math.gcd(rate, target)
    return resample_poly(samples, target // factor, rate // factor).astype(np.float32)


LIBRIVOX = "usr/share/pocketsphinx/test/data/librivox"


def librivox_clips(fetch: bool = True) -> list[tuple[Path, str]]:
    """Five real recordings (LibriVox, Sense and Sensibility, 16 kHz) with their transcripts, from Debian's
    ``pocketsphinx-testdata`` (unpacked on first use): ``[(wav path, lower-case transcript), ...]``."""
    listing = find_package_path("pocketsphinx-testdata", f"{LIBRIVOX}/transcription", fetch=fetch)
    clips = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"<s>(.*)</s>\s*\((\S+)\)", line.strip())
        if match:
            clips.append((listing.parent / f"{match.group(2)}.wav", match.group(1).strip()))
    if not clips:
        raise LeanfmError(f"no transcripts found in '{listing}'")
    return clips


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular HTK-mel filters, ``[n_fft // 2 + 1, n_mels]``, 0 Hz to Nyquist."""
    def to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595 * torch.log10(1 + hz / 700)

    def to_hz(mel: torch.Tensor) -> torch.Tensor:
        return 700 * (10 ** (mel / 2595) - 1)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = to_hz(torch.linspace(0, float(to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2, dtype=torch.float64))
    low, center, high = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - low) / (center - low)
    falling = (high - freqs[:, None]) / (high - center)
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


_FILTERS: dict[int, torch.Tensor] = {}


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """``[frames, 64]`` log-mel energies (natural log, floor 1e-6) of a 22.05 kHz waveform."""
    if wave.dim() != 1 or wave.numel() < WIN:
        raise LeanfmError(f"expected a 1-D waveform of at least {WIN} samples; got shape {tuple(wave.shape)}")
    if N_MELS not in _FILTERS:
        _FILTERS[N_MELS] = mel_filterbank()
    spec = torch.stft(wave, n_fft=N_FFT, hop_length=HOP, win_length=WIN, window=torch.hann_window(WIN),
                      center=True, return_complex=True)
    power = spec.abs() ** 2  # [freq, frames]
    return torch.log(power.T @ _FILTERS[N_MELS] + 1e-6)


@dataclass
class SpeechSet:
    """Utterances as one padded-free store: ``features`` ``[sum T, 64]`` with ``offsets`` and their texts."""

    features: torch.Tensor
    offsets: torch.Tensor  # [N + 1]
    texts: list[str]
    labels: list[str]  # what the utterance means (the sentence, intent description or keyword)

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, index: torch.Tensor, max_frames: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded ``[B, T, 64]`` features and lengths of utterances ``index`` (cut at ``max_frames``)."""
        chunks = [self.features[self.offsets[i] : self.offsets[i + 1]][:max_frames] for i in index.tolist()]
        lengths = torch.tensor([c.shape[0] for c in chunks])
        return nn.utils.rnn.pad_sequence(chunks, batch_first=True), lengths


def austen_sentences(count: int, split: str = "train", seed: int = 0, min_words: int = 3,
                     max_words: int = 14) -> list[str]:
    """``count`` distinct short sentences of an Austen split, drawn with ``seed``."""
    pieces = re.split(r"(?<=[.!?])\s+", " ".join(corpus("austen", split).split()))
    clean = sorted({p.strip(" \"'_-") for p in pieces if min_words <= len(p.split()) <= max_words
                    and re.fullmatch(r"[A-Za-z ,;'.!?-]+", p.strip(" \"'_-"))
                    and not re.search(r"\b(Mr|Mrs|Dr|St|Col)\.$", p)})  # abbreviations are not sentence ends
    if len(clean) < count:
        raise LeanfmError(f"split '{split}' has only {len(clean)} usable sentences; asked for {count}")
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[:count]
    return [clean[i] for i in order.tolist()]


def austen_phrases(count: int, split: str = "train", seed: int = 0, max_words: int = 4) -> list[str]:
    """``count`` random spans of 1..``max_words`` consecutive words of an Austen split, drawn with ``seed``.

    Why: speech-to-intent and keyword tests are short (1-6 words). Whole sentences teach a small encoder from
    scratch to memorise utterances; short spans of running text give it many more, cheaper examples of each
    word in varied company, which is what zero-shot transfer to unseen short commands needs. Spans are drawn
    from the corpus alone (no look at the evaluation sets) and may repeat, as frequent phrases do in speech.
    """
    words = [w for w in (t.strip("\"'_-.,;:!?()") for t in corpus("austen", split).split())
             if w and re.fullmatch(r"[A-Za-z']+", w)]
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_words + 1, (count,), generator=generator).tolist()
    starts = torch.randint(0, len(words) - max_words, (count,), generator=generator).tolist()
    return [" ".join(words[s : s + n]).lower() for s, n in zip(starts, lengths, strict=True)]


def evaluation_texts() -> set[str]:
    """Every spoken text of the zero-shot sets, normalised (lower case, letters and spaces)."""
    commands = [c for table in (INTENTS, SMART_HOME_INTENTS) for cmds in table.values() for c in cmds]
    return {normalise(t) for t in [*commands, *KEYWORDS]}


def normalise(text: str) -> str:
    """Lower case, letters/apostrophes and single spaces only (to compare texts)."""
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def training_texts(phrases: int, sentences: int = 0, seed: int = 0) -> list[str]:
    """Austen phrases then sentences for training, minus any text equal to an evaluation command or keyword."""
    texts = (austen_phrases(phrases, seed=seed) if phrases else []) + (
        austen_sentences(sentences, seed=seed) if sentences else [])
    held_out = evaluation_texts()
    return [t for t in texts if normalise(t) not in held_out]


def _render(job: tuple[str, str, int, int]) -> torch.Tensor:
    text, voice, speed, pitch = job
    return log_mel(synthesize(text, voice, speed, pitch))


def build_speech_set(texts: list[str], labels: list[str], voices: tuple[str, ...], seed: int = 0,
                     renditions: int = 1, name: str | None = None) -> SpeechSet:
    """Synthesise every text ``renditions`` times with a seeded voice/speed/pitch; cached under $LEANFM_HOME."""
    key = hashlib.sha256(json.dumps([texts, labels, voices, seed, renditions, N_MELS, HOP]).encode()).hexdigest()[:16]
    folder = leanfm_home() / "speech" / f"{name or 'set'}-{key}"
    if (folder / "features.pt").is_file():
        data = torch.load(folder / "features.pt", weights_only=True)
        meta = json.loads((folder / "meta.json").read_text())
        return SpeechSet(data["features"].float(), data["offsets"], meta["texts"], meta["labels"])
    check_synthesisers(voices)
    generator = torch.Generator().manual_seed(seed)
    pairs = [(t, lab) for t, lab in zip(texts, labels, strict=True) for _ in range(renditions)]
    jobs = []
    for text, _ in pairs:  # voice/speed/pitch drawn in order, so the set does not depend on the worker count
        voice = voices[int(torch.randint(len(voices), (1,), generator=generator))]
        speed = int(torch.randint(130, 201, (1,), generator=generator))
        pitch = int(torch.randint(25, 76, (1,), generator=generator))
        jobs.append((text, voice, speed, pitch))
    out_texts, out_labels = [t for t, _ in pairs], [lab for _, lab in pairs]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # espeak-ng runs in subprocesses
        feats = list(progress(pool.map(_render, jobs), desc=f"espeak-ng {name or ''}", total=len(jobs)))
    offsets = torch.tensor([0] + [f.shape[0] for f in feats]).cumsum(0)
    result = SpeechSet(torch.cat(feats).to(torch.float16).float(), offsets, out_texts, out_labels)
    with atomic_directory(folder) as tmp:
        torch.save({"features": result.features.to(torch.float16), "offsets": offsets}, tmp / "features.pt")
        (tmp / "meta.json").write_text(json.dumps({"texts": out_texts, "labels": out_labels, "voices": voices}))
    return result


def train_voices() -> tuple[str, ...]:
    """Every training voice with every variant (30 voices)."""
    return tuple(v + var for v in TRAIN_VOICES for var in TRAIN_VARIANTS)


def intent_set(seed: int = 1, intents: dict[str, tuple[str, ...]] | None = None,
               voices: tuple[str, ...] = EVAL_VOICES) -> SpeechSet:
    """Spoken commands (labels = intent descriptions) in the evaluation ``voices``, each command as often as there
    are voices (each rendition a seeded draw of voice, speed and pitch)."""
    intents = INTENTS if intents is None else intents
    texts = [c for cmds in intents.values() for c in cmds for _ in voices]
    labels = [d for d, cmds in intents.items() for _ in cmds for _ in voices]
    return build_speech_set(texts, labels, voices, seed=seed, name="intents")


def keyword_set(seed: int = 2, voices: tuple[str, ...] = EVAL_VOICES) -> SpeechSet:
    """Single spoken words (labels = the word) in the evaluation ``voices``, three renditions each."""
    return build_speech_set(list(KEYWORDS), list(KEYWORDS), voices, seed=seed, renditions=3, name="keywords")


def validation_texts(count: int = 150, seed: int = 3) -> list[str]:
    """``count`` distinct 3-4 word spans of the Austen ``calib`` split (training speaks ``train`` spans; 3+ words so
    few equal a training span), none equal to a test command or keyword: held-out spoken spans for choosing
    hyperparameters, never the test sets."""
    held_out, texts = evaluation_texts(), []
    for text in austen_phrases(count * 6, split="calib", seed=seed):
        if len(text.split()) >= 3 and normalise(text) not in held_out and text not in texts:
            texts.append(text)
    if len(texts) < count:
        raise LeanfmError(f"only {len(texts)} distinct validation spans; asked for {count}")
    return texts[:count]


def validation_set(count: int = 150, seed: int = 3) -> SpeechSet:
    """:func:`validation_texts` spoken once each in :data:`VALIDATION_VOICES` (labels = the texts)."""
    texts = validation_texts(count, seed)
    return build_speech_set(texts, texts, VALIDATION_VOICES, seed=seed, name="validation")


def seconds_of(speech: SpeechSet) -> float:
    """Total audio duration represented by ``speech`` (frames x hop)."""
    return int(speech.offsets[-1]) * HOP / SAMPLE_RATE

