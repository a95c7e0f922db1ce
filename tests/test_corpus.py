import pytest

from leanfm.data import AUSTEN_NOVELS, calibration_windows, corpus, token_windows
from leanfm.data.corpus import austen_novel_paragraphs
from leanfm.errors import LeanfmError


def test_austen_has_six_real_novels():
    assert len(AUSTEN_NOVELS) == 6
    pride = corpus("austen", "novel:prideprejudice")
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune" in pride
    assert len(pride) > 600_000


def test_austen_splits_do_not_overlap():
    train = set(corpus("austen", "train").split("\n\n"))
    calib = set(corpus("austen", "calib").split("\n\n"))
    evaluation = set(corpus("austen", "eval").split("\n\n"))
    long = lambda ps: {p for p in ps if len(p) > 200}  # noqa: E731  (short lines like "CHAPTER I" repeat)
    assert not long(train) & long(calib)
    assert not long(train | calib) & long(evaluation)
    assert long(evaluation) <= set(austen_novel_paragraphs("persuasion"))
    assert 5 * len(corpus("austen", "calib")) < len(corpus("austen", "train")) < 12 * len(corpus("austen", "calib"))


@pytest.mark.parametrize(("name", "split"), [("austen", "test"), ("austen", "novel:ulysses"), ("wiki", "eval")])
def test_bad_corpus_or_split(name, split):
    with pytest.raises(LeanfmError) as err:
        corpus(name, split)
    message = str(err.value)
    assert "accepted" in message and (split.split(":")[-1] in message or name in message)


def test_token_windows_are_contiguous_and_non_overlapping():
    import torch

    ids = torch.arange(1000)
    windows = token_windows(ids, 128, 5)
    assert windows.shape == (5, 128)
    assert torch.equal(windows.flatten(), ids[:640])
    assert token_windows(ids, 128).shape == (7, 128)
    with pytest.raises(LeanfmError, match="fewer than one window"):
        token_windows(ids[:10], 128)


def test_calibration_windows_are_seeded(tokenizer):
    a = calibration_windows(tokenizer, samples=4, seqlen=64, seed=1)
    b = calibration_windows(tokenizer, samples=4, seqlen=64, seed=1)
    c = calibration_windows(tokenizer, samples=4, seqlen=64, seed=2)
    assert a.shape == (4, 64) and a.equal(b) and not a.equal(c)


def test_pydocs_corpus_if_installed():
    try:
        text = corpus("pydocs", "eval")
    except LeanfmError as err:
        pytest.skip(str(err))
    assert ".. " in text and len(text) > 100_000
