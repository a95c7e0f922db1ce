"""Shared encoders (leanfm.models.encoders): the speech and image towers and the frozen text encoder."""

import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.models.encoders import ImageEncoder, SpeechEncoder, check_text_encoder, text_encoder


def test_speech_encoder_ignores_padding():
    torch.manual_seed(0)
    encoder = SpeechEncoder(width=32, layers=1, heads=2).eval()
    feats = torch.randn(1, 40, 64)
    padded = torch.cat([feats, torch.randn(1, 24, 64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(feats, torch.tensor([40])), encoder(padded, torch.tensor([40])),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(encoder(feats, torch.tensor([40])), encoder(padded, torch.tensor([64])))


def test_towers_rebuild_from_their_config_including_configs_saved_before_n_mels():
    torch.manual_seed(0)
    speech = SpeechEncoder(width=32, layers=1, heads=2)
    old = {k: v for k, v in speech.config.items() if k != "n_mels"}  # align.json files written before the move
    rebuilt = SpeechEncoder(**old)
    rebuilt.load_state_dict(speech.state_dict())
    assert rebuilt.config == speech.config
    image = ImageEncoder(hidden=32, layers=1, heads=2)
    assert ImageEncoder(**{k: v for k, v in image.config.items() if k != "image_size"}).config == image.config
    assert image(torch.rand(5, 3, 32, 32)).shape == (5, 384)


def test_unknown_frozen_model_is_a_one_line_error_naming_the_registered_ones():
    assert check_text_encoder("minilm-l6") == "minilm-l6"
    with pytest.raises(LeanfmError, match="unknown frozen model 'tiny-llama'; accepted: minilm-l6"):
        check_text_encoder("tiny-llama")  # registered, but a causal LM, not a sentence encoder


@pytest.mark.slow
def test_text_encoder_gives_unit_vectors_that_put_paraphrases_nearer():
    texts = ["turn the lights on", "switch on the lamp", "a small striped red triangle", "x",
             "it is a truth universally acknowledged that a single man in possession of a good fortune"] * 30
    encoder = text_encoder()
    ours = encoder(texts)
    assert ours.shape == (150, 384) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=-1), torch.ones(150), atol=1e-5)
    assert torch.equal(ours[:5], ours[5:10])  # the same text, the same vector, wherever it sits in the batch
    assert ours[0] @ ours[1] > ours[0] @ ours[2] + 0.2  # a paraphrase is nearer than an unrelated caption
    assert encoder([]).shape == (0, 384)
