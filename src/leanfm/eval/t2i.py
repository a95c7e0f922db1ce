r"""Judging generated images: a concept classifier trained here, and KID / MMD on its features.

Why a classifier of our own: no pretrained image encoder (Inception, CLIP) exists offline. A small CNN trained on
the *real* renders of every concept (pretraining and held-out, :mod:`leanfm.data.t2i`) answers two questions:

* recognition — the fraction of samples generated for a caption that it classifies as that caption's concept
  (the pretraining stopping rule and a per-concept fidelity figure);
* features — its penultimate layer (``feature_dim`` wide, after global average pooling) is the image encoder
  for the distribution distances below, in the role Inception-v3's pool features play for FID / KID.

KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of MMD^2 with the cubic polynomial
kernel :math:`k(x, y) = (x \cdot y / d + 1)^3` (``d`` the feature width), for ``X`` (m rows) and ``Y`` (n rows):

.. math:: \frac{1}{m(m-1)} \sum_{i \ne j} k(x_i, x_j) + \frac{1}{n(n-1)} \sum_{i \ne j} k(y_i, y_j)
          - \frac{2}{mn} \sum_{i, j} k(x_i, y_j)

Its expectation is 0 when both sets come from one distribution (a single estimate can be slightly negative).
The paper averages it over random subsets of 1000 for large sets; ``subsets`` does the same here.

MMD: the same unbiased MMD^2 estimator with a Gaussian kernel :math:`k(x, y) = \exp(-\|x - y\|^2 / (2 \sigma^2))`,
with the median heuristic (Gretton et al. 2012) for the bandwidth: :math:`\sigma` = the median Euclidean
distance between distinct points of ``X`` and ``Y`` pooled. Our choice of variant, stated because the median
heuristic has several (some use the median of squared distances, some halve it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option
from leanfm.device import resolve_device
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, atomic_write_bytes, atomic_write_json, read_description
from leanfm.training import Runtime, Task, fit, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name

__all__ = ["ClassifierConfig", "ConceptClassifier", "image_features", "kid", "load_classifier", "mmd",
           "predict_concepts", "recognised_fraction", "save_classifier", "train_classifier"]

FORMAT = "leanfm-t2i-classifier/1"
INFO_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"


@dataclass
class ClassifierConfig(MethodConfig):
    """Training settings of the concept classifier (short enough to rerun rather than resume)."""

    width: int = option(32, "channels of the first conv stage (stages: w, 2w, 4w)")
    steps: int = option(1500, "optimizer steps")
    batch_size: int = option(128, "images per step")
    lr: float = option(2e-3, "peak learning rate (warm-up, then cosine)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup_steps: int = option(100, "warm-up steps")
    blur: float = option(0.5, "probability of a 2x down-and-up-sampled copy (samples are softer than renders)")
    seed: int = option(0, "seed of the weights and of every batch")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        check_at_least(self, 1, "width", "steps", "batch_size")
        if self.width % 8:
            raise LeanfmError(f"width {self.width} is invalid; accepted: a multiple of 8 (GroupNorm of 8 groups)")
        check_device_name(self.device)
        check_at_least(self, 0, "warmup_steps")
        if not 0 <= self.blur <= 1:
            raise LeanfmError(f"blur {self.blur} is out of range; accepted: 0 <= blur <= 1")
        super().validate()


class ConceptClassifier(nn.Module):
    """``[B, 3, 32, 32]`` in [0, 1] -> logits over ``captions``; :meth:`features` is the penultimate layer.

    Three stages of two 3x3 convs (GroupNorm, SiLU), the last two starting with stride 2 (32 -> 16 -> 8 px),
    global average pooling to ``4 * width`` features, then a linear layer per concept.
    """

    def __init__(self, captions: list[str], width: int = 32) -> None:
        super().__init__()
        self.captions, self.width = list(captions), width
        layers: list[nn.Module] = []
        channels = 3
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for k in range(2):
                stride = 2 if stage > 0 and k == 0 else 1
                layers += [nn.Conv2d(channels, out, 3, stride, 1), nn.GroupNorm(8, out), nn.SiLU()]
                channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, len(self.captions))

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images in [0, 1]."""
        return self.body((images - 0.5) / 0.25).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _soften(images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Rows where ``chosen`` replaced by a 2x average-pooled, bilinearly upsampled copy (a blur)."""
    soft = nn.functional.interpolate(nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="bilinear",
                                     align_corners=False)
    return torch.where(chosen[:, None, None, None], soft, images)


def train_classifier(images: torch.Tensor, captions: list[str], config: ClassifierConfig | None = None
                     ) -> tuple[ConceptClassifier, dict[str, Any]]:
    """Train on uint8 renders ``[C, R, 3, S, S]`` of the ``C`` concepts named by ``captions``; returns the
    classifier (eval mode, CPU) and a summary with the loss history. Runs on the one training loop without a
    checkpoint (it is short: rerun it rather than resume)."""
    config = config or ClassifierConfig()
    if images.ndim != 5 or images.shape[0] != len(captions):
        raise LeanfmError(f"renders of shape {tuple(images.shape)} for {len(captions)} captions; accepted: "
                          "[concepts, renders, 3, H, W] with one caption per concept")
    torch.manual_seed(config.seed)
    model = ConceptClassifier(captions, config.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    count, renders = images.shape[:2]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        concept = torch.randint(count, (config.batch_size,), generator=generator)
        render = torch.randint(renders, (config.batch_size,), generator=generator)
        chosen = torch.rand(config.batch_size, generator=generator) < config.blur
        return _soften(images[concept, render].float() / 255, chosen), concept

    def loss(step: int, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(pair[0])
        value = nn.functional.cross_entropy(logits, pair[1])
        return value, {"loss": float(value.detach()), "accuracy": float((logits.argmax(-1) == pair[1]).float().mean())}

    task = Task("train concept classifier", {"classifier": model}, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, config.warmup_steps), log_every=200)
    runtime = Runtime(device=resolve_device(config.device))
    result = fit(task, config, runtime)
    return model.cpu().eval(), {"steps": result.step, "train_seconds": result.seconds, "history": result.history,
                                "config": config.to_dict()}


@torch.no_grad()
def _batched(fn: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)])


def image_features(classifier: ConceptClassifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features ``[N, feature_dim]`` (float64) of ``[N, 3, S, S]`` images in [0, 1]."""
    classifier.eval()
    return _batched(classifier.features, images).double()


def predict_concepts(classifier: ConceptClassifier, images: torch.Tensor) -> list[str]:
    """The caption of the concept each image is classified as."""
    classifier.eval()
    return [classifier.captions[i] for i in _batched(classifier, images).argmax(-1).tolist()]


def recognised_fraction(classifier: ConceptClassifier, images: torch.Tensor, caption: str) -> float:
    """Fraction of ``images`` (generated for ``caption``) classified as ``caption``'s concept."""
    if caption not in classifier.captions:
        raise LeanfmError(f"the classifier has no concept '{caption}'; accepted: one of its "
                          f"{len(classifier.captions)} captions")
    if len(images) == 0:
        raise LeanfmError("no images to classify; accepted: at least one")
    return sum(p == caption for p in predict_concepts(classifier, images)) / len(images)


def _unbiased_mmd2(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    """The unbiased MMD^2 of kernel matrices (diagonals of ``kxx``/``kyy`` excluded)."""
    m, n = kxx.shape[0], kyy.shape[0]
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def _check_sets(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise LeanfmError(f"feature sets of shapes {tuple(x.shape)} and {tuple(y.shape)}; accepted: [m, d] and [n, d]")
    if len(x) < 2 or len(y) < 2:
        raise LeanfmError(f"feature sets of {len(x)} and {len(y)} rows; accepted: at least 2 rows each")


def kid(x: torch.Tensor, y: torch.Tensor, subsets: int | None = None, subset_size: int = 1000,
        seed: int = 0) -> float:
    """KID: unbiased MMD^2 with ``k(a, b) = (a . b / d + 1)^3`` between features ``x`` ``[m, d]`` and ``y``
    ``[n, d]`` (float64). With ``subsets``, the mean over that many seeded random subsets of ``subset_size`` rows
    (capped at the smaller set), as Binkowski et al. do for large sets."""
    _check_sets(x, y)
    x, y = x.double(), y.double()
    d = x.shape[1]

    def one(a: torch.Tensor, b: torch.Tensor) -> float:
        return _unbiased_mmd2((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)

    if subsets is None:
        return one(x, y)
    size = min(subset_size, len(x), len(y))
    generator = torch.Generator().manual_seed(seed)
    values = [one(x[torch.randperm(len(x), generator=generator)[:size]],
                  y[torch.randperm(len(y), generator=generator)[:size]]) for _ in range(subsets)]
    return sum(values) / len(values)


def mmd(x: torch.Tensor, y: torch.Tensor, sigma: float | None = None) -> float:
    """Unbiased MMD^2 with the Gaussian kernel ``exp(-|a - b|^2 / (2 sigma^2))`` between ``x`` and ``y``; ``sigma``
    defaults to the median distance between distinct pooled points (module docstring)."""
    _check_sets(x, y)
    pooled = torch.cat([x, y]).double()
    squared = torch.cdist(pooled, pooled).pow(2)  # [m + n, m + n]
    if sigma is None:
        upper = torch.triu_indices(len(pooled), len(pooled), offset=1)
        sigma = float(np.median(squared[upper[0], upper[1]].sqrt().numpy()))  # torch's median takes the lower one
    if sigma <= 0:
        raise LeanfmError(f"MMD bandwidth {sigma} is invalid (identical points?); accepted: sigma > 0")
    kernel = torch.exp(-squared / (2 * sigma**2))
    m = len(x)
    return _unbiased_mmd2(kernel[:m, :m], kernel[m:, m:], kernel[:m, m:])


def save_classifier(classifier: ConceptClassifier, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` (format, width, captions, ``extra``) atomically."""
    target = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    with atomic_directory(target) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(state))
        atomic_write_json(tmp / INFO_FILE, {**(extra or {}), "format": FORMAT, "width": classifier.width,
                                            "captions": classifier.captions})
    return target


def load_classifier(folder: str | Path) -> tuple[ConceptClassifier, dict[str, Any]]:
    """(classifier in eval mode, ``classifier.json``) of a folder written by :func:`save_classifier`."""
    info = read_description(folder, INFO_FILE, FORMAT, "a t2i concept classifier")
    classifier = ConceptClassifier(info["captions"], int(info["width"]))
    try:
        classifier.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    except (OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LeanfmError(f"classifier weights in '{folder}' cannot be loaded ({first})") from None
    return classifier.eval(), info
