"""The tiny text-to-image model both t2i test modules build (their ``home`` fixture is in conftest.py)."""

import torch

from leanfm.models import t2i as model_lib

TINY = {"width": 8, "heads": 2, "text_encoder": "tiny-bert", "cross_attention_dim": 32}


def tiny_model(seed: int = 0) -> model_lib.T2IModel:
    """A seeded tiny T2I model (random weights; 32x32, tiny-bert captions)."""
    torch.manual_seed(seed)
    return model_lib.T2IModel(model_lib.T2IConfig(**TINY))
