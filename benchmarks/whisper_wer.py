"""Whisper tiny.en's word error rate on five real LibriVox recordings: a sanity check of the CTranslate2 converter.

    python benchmarks/whisper_wer.py                 # ~1 min on one core; writes results/whisper_wer.json

The clips (Sense and Sensibility, one reader, 16 kHz) and their transcripts come from Debian's
``pocketsphinx-testdata`` (:func:`leanfm.data.speech.librivox_clips`). Decoding is :func:`leanfm.models.whisper.
transcribe` (greedy). Words are compared after :func:`leanfm.adapt.spoken.normalise` (lower case, punctuation
dropped) on both sides; WER = (substitutions + deletions + insertions) / reference words, by jiwer (a project
dependency): per clip and pooled over the five (the pooled figure is not the mean of the per-clip rates).
Reference point: OpenAI report ~5.6% for tiny.en on LibriSpeech test-clean with their English text normaliser,
which also spells titles out; the ``titles spelled out`` column applies that one rule (``mr`` -> ``mister``, ...)
to the transcripts, because the reference transcripts spell "mister".
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import jiwer

from leanfm.adapt.spoken import normalise, transcribe_files
from leanfm.data.speech import librivox_clips, read_wav
from leanfm.paths import atomic_write_json

TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}  # Whisper's normaliser spells these out
RESULTS = Path(__file__).resolve().parent.parent / "results" / "whisper_wer.json"
log = logging.getLogger("whisper_wer")


def spell_titles(text: str) -> str:
    """``normalise``d text with abbreviated titles spelled out."""
    return " ".join(TITLES.get(word, word) for word in text.split())


def error_counts(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Pooled word errors of normalised texts: counts and WER."""
    out = jiwer.process_words(references, hypotheses)
    words = out.hits + out.substitutions + out.deletions
    errors = out.substitutions + out.deletions + out.insertions
    return {"wer": errors / words, "words": words, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    clips = librivox_clips()
    start = time.perf_counter()
    heard = transcribe_files([path for path, _ in clips])
    seconds = time.perf_counter() - start
    references = [normalise(text) for _, text in clips]
    plain = [normalise(heard[str(path)]) for path, _ in clips]
    spelled = [spell_titles(text) for text in plain]
    rows = []
    for (path, _), reference, hypothesis, titled in zip(clips, references, plain, spelled, strict=True):
        audio, rate = read_wav(path)
        rows.append({"clip": path.stem, "seconds": round(len(audio) / rate, 2), "reference": reference,
                     "transcript": heard[str(path)], "wer": jiwer.wer(reference, hypothesis),
                     "wer_titles_spelled_out": jiwer.wer(reference, titled)})
        log.info("%s  WER %.3f  %r", path.stem, rows[-1]["wer"], heard[str(path)])
    result = {"model": "whisper-tiny-en (converted from CTranslate2)", "decoding": "greedy",
              "normalisation": "leanfm.adapt.spoken.normalise on both sides",
              "pooled": error_counts(references, plain),
              "pooled_titles_spelled_out": error_counts(references, spelled),
              "transcribe_seconds": round(seconds, 1), "clips": rows}
    atomic_write_json(args.out, result)
    log.info("pooled WER %.2f%% (%.2f%% with titles spelled out) over %d words -> %s",
             100 * result["pooled"]["wer"], 100 * result["pooled_titles_spelled_out"]["wer"],
             result["pooled"]["words"], args.out)


if __name__ == "__main__":
    main()
